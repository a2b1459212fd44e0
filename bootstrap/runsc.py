"""How the node runs gVisor's runsc: what docker is told to pass it, and what release that needs.

One definition, used by the agents stage (docker's daemon.json) and by the doctor (which runs the
installed runsc with exactly these arguments), so the two cannot drift apart.

`--nvproxy=true` is all a current runsc needs for `docker run --runtime=runsc --gpus ...`: docker
adds the NVIDIA Container Toolkit's prestart hook for `--gpus`, and runsc serves the GPUs through
nvproxy. `--nvproxy-docker` was needed by the first nvproxy releases (2023) for that; release-20240729
still accepts it but marks it deprecated (it only injects the same hook), so it is not rendered: a
deprecated flag is the next one a release refuses.
"""

from __future__ import annotations

from bootstrap.paths import RUNSC

RUNTIME_NAME = "runsc"
RUNTIME_ARGS = ("--nvproxy=true",)
# The first gVisor release with nvproxy; runsc before it stops at "flag provided but not defined".
NVPROXY_SINCE = "release-20230529"


def docker_runtime() -> dict[str, object]:
    """The entry under daemon.json's "runtimes" that registers runsc with docker."""
    return {"path": RUNSC, "runtimeArgs": list(RUNTIME_ARGS)}


def drivers_probe() -> list[str]:
    """runsc's list of the NVIDIA driver versions its nvproxy has the ioctl ABI of, one a line
    (`runsc nvproxy list-supported-drivers`, since 2024). nvproxy refuses to start a sandbox on any
    other driver ("unsupported Nvidia driver version"), which docker reports only as an EOF."""
    return [RUNSC, *RUNTIME_ARGS, "nvproxy", "list-supported-drivers"]


def flag_probe() -> list[str]:
    """runsc with docker's arguments and `--version`: runsc parses every top-level flag before it
    answers --version, so this fails exactly when a container start would fail on the flags, and
    touches nothing (no sandbox, no state directory)."""
    return [RUNSC, *RUNTIME_ARGS, "--version"]
