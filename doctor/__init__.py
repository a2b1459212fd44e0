"""vectorlay-node-doctor: health checks of a provider node."""
