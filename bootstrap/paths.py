"""Where things live on a node: host paths (absolute, resolved inside a Host's root) that more than
one program of this project names. One definition each, so the installer that puts a file there and
the doctor that looks for it cannot disagree."""

from __future__ import annotations

# gVisor's runtime, installed from the control plane's `runsc` artifact (container-GPU mode) into
# its versioned release directory; `current` is switched by rename, so this path never changes.
RUNSC = "/opt/vectorlay/releases/runsc/current/bin/runsc"
IDENTITY_DIR = "/etc/vectorlay/identity"
# Beside IDENTITY_DIR: where the identity writer moves a plain directory it found at IDENTITY_DIR before
# its first switch (bootstrap.identity), so the window in which `identity` does not exist is recoverable.
IDENTITY_LEGACY = ".identity-legacy"
# What a complete identity directory holds (the installer writes it, the doctor checks it), and which
# of those files are secrets (0600, root's).
IDENTITY_FILES = (
    "node.key",
    "node.crt",
    "ca.crt",
    "nebula.key",
    "nebula.crt",
    "nebula-ca.crt",
    "nomad.key",
    "nomad.crt",
    "nomad-ca.crt",
    "node-token",
    "node.json",
)
IDENTITY_SECRETS = ("node.key", "node-token", "nebula.key", "nomad.key")
LOG_PATH = "/var/log/vectorlay/bootstrap.log"
# The long-running agents, by artifact name, and the systemd units that run them.
AGENT_SERVICES = {"nebula": "nebula.service", "nomad": "nomad.service", "node-agent": "node-agent.service"}
SETTINGS_PATH = "/etc/vectorlay/node.yaml"
# The node-agent's own configuration (the installer writes it; the node-agent reads it).
AGENT_CONFIG = "/etc/vectorlay/node-agent.yaml"
# Where the installer puts the systemd units it adds (systemd.unit(5): the administrator's directory).
SYSTEMD_UNITS = "/etc/systemd/system"
# A directory that exists only while systemd is the init system (sd_booted(3)).
SYSTEMD_BOOTED = "/run/systemd/system"
# The timer that runs `vectorlay-bootstrap update`: the installer installs it, the doctor asks about it.
UPDATE_TIMER = "node-agent-update.timer"
# The GPUs the node enrolled with (address and IOMMU group each), written by the enroll stage: the
# doctor reports a GPU that is no longer on the bus (`gpu_missing`). A node enrolled before this
# record existed has none, and then nothing is reported missing.
ENROLLED_GPUS = "/var/lib/vectorlay/enrolled-gpus.json"
# Each GPU/NVSwitch function's AER counts as the node-agent's last doctor run saw them: what "grew
# since the last run" is measured against. In the agent's own state directory (its unit's
# StateDirectory=): the rest of /var/lib/vectorlay is read-only in its sandbox.
UNIT_HEALTH_STATE = "/var/lib/vectorlay/node-agent/unit-health.json"
# The VM-attach probe's results per unit (bootstrap.vmprobe writes them, the doctor reads them).
UNIT_PROBES = "/var/lib/vectorlay/unit-probes.json"
