"""vectorlay-node-agent: the node's heartbeat to the control plane (doctor verdict, load, versions),
its health socket, and draining on SIGUSR1 for `vectorlay-bootstrap update`."""

# The release pipeline (hostsim.agents.node_agent_tarball) stamps the artifact's version here.
__version__ = "0.1.0"
