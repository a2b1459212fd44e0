"""The names a subprocess gets the test machinery by: the HOSTSIM_* variables and the directory
whose sitecustomize.py reads them (hostsim.inject installs what they ask for).

A module of its own, importing nothing of hostsim: the simulators (hostsim.systemd starts the
agents' daemons with these variables removed or kept) need the names, and hostsim.inject needs the
simulators, so the names living in inject made an import cycle.
"""

from __future__ import annotations

from pathlib import Path

SIMULATE_ENV = "HOSTSIM_SIMULATE"  # "1": tree hosts get hostsim.kernel's simulators
FAULT_AT_ENV = "HOSTSIM_FAULT_AT"  # N, or a point's name: killed there (SIGKILL)
FAULT_KIND_ENV = "HOSTSIM_FAULT_KIND"  # "enospc": that write fails as on a full disk instead
FAULT_LOG_ENV = "HOSTSIM_FAULT_LOG"  # FILE: every point as it passes, "N<TAB>name"
SETTLE_ENV = "HOSTSIM_HEALTH_SETTLE"  # seconds: the agents' settle window
FORBID_LIVE_ENV = "HOSTSIM_FORBID_LIVE_ROOT"  # "1": building a host on the real / raises
FAULT_ENV = (FAULT_AT_ENV, FAULT_KIND_ENV, FAULT_LOG_ENV)
ALL_ENV = (SIMULATE_ENV, *FAULT_ENV, SETTLE_ENV, FORBID_LIVE_ENV)

SITE_DIR = Path(__file__).resolve().parent / "_site"
