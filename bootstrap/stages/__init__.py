"""The installer's stages: one module per stage (preflight.py ... verify.py), the contract they
share (contract.py), what preflight and enroll share of the control plane and the token
(control_plane.py), and the ordered registry the runner reads (registry.py)."""
