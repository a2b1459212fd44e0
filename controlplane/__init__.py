"""The reference control plane: the server side of the API in docs/contracts.md, runnable on one machine.

It exists so that enrollment is tested against a real HTTPS/mTLS server with a real database, and so
that the whole flow can be run on a laptop. Install it with the `controlplane` extra.
"""
