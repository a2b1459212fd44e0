"""Builds host trees laid out the way the Linux kernel lays out sysfs/procfs, from a YAML description.

Used by the tests and the demo. Not shipped in the wheel: it only ever writes inside a temp tree.
"""

from __future__ import annotations

from hostsim.builder import build_host, load_topology, topology_names

__all__ = ["build_host", "load_topology", "topology_names"]
