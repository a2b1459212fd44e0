"""Running the real installer CLI in a subprocess against a host tree, as the demo and a provider do."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hostsim import inject
from hostsim.systemd import STATE_DIR

# Stand-in agents are healthy at once: a short settle window keeps the runs quick.
FAST = {inject.SETTLE_ENV: "0.2"}


def gpus_on_vfio(desc: dict[str, Any]) -> None:
    """The HGX with its GPUs already bound to vfio-pci: eight ready GPU units, no reboot needed."""
    for dev in desc["devices"]:
        if dev["id"] in ("10de:2330", "10de:22a3"):
            dev["driver"] = "vfio-pci"


def install(
    root: Path,
    *args: str,
    cp: Any = None,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`vectorlay-bootstrap install --root ROOT [--api ... --ca-file ...] ARGS`, token in the environment,
    on a simulating host (hostsim.inject); `env` adds to it (HOSTSIM_* settle window, fault points)."""
    argv = [sys.executable, "-m", "bootstrap.cli", "install", "--root", str(root)]
    if cp is not None:
        argv += ["--api", cp.url, "--ca-file", str(cp.ca_file)]
    full_env = inject.env({k: v for k, v in os.environ.items() if k != "VECTORLAY_TOKEN"})
    if token is not None:
        full_env["VECTORLAY_TOKEN"] = token
    full_env.update(env or {})
    return subprocess.run(
        [*argv, *args],
        env=full_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def stop_daemons(root: Path) -> None:
    """SIGKILL the stand-in agent daemons the systemctl simulator started for this tree (they run in
    their own sessions and outlive the installer process that started them)."""
    state = root / STATE_DIR.lstrip("/")
    for f in sorted(state.iterdir()) if state.is_dir() else []:
        words = f.read_text(errors="replace").split() if not f.name.endswith(".log") else []
        if len(words) > 1 and words[1].isdigit() and _runs_for(int(words[1]), root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(words[1]), signal.SIGKILL)


def _runs_for(pid: int, root: Path) -> bool:
    """The pid is a daemon started for this tree (not a recycled pid of someone else's process)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"VECTORLAY_ROOT={root.resolve()}".encode() in environ


@contextlib.contextmanager
def installed_demo_node(base: Path) -> Iterator[tuple[Any, Path, str]]:
    """The demo's node, installed: an HGX H100 (GPUs on nvidia, IOMMU off) taken through the first run,
    a simulated reboot and the second run. Yields (control plane, root, the token used); the control
    plane and the agents are stopped afterwards."""
    from controlplane import testing
    from hostsim import build_host
    from hostsim.agents import publish_agents
    from hostsim.demo import example_host
    from hostsim.kernel import simulated_reboot

    publish_agents(base / "artifacts")
    cp = testing.start(base / "cp", args=("--artifacts", str(base / "artifacts")))
    root = base / "host"
    try:
        cp.org("acme", provider=True)
        token = cp.token("acme")
        desc = example_host()
        build_host(root, desc)
        first = install(root, cp=cp, token=token, env=FAST)
        assert first.returncode == 3, first.stdout[-2000:] + first.stderr
        simulated_reboot(root, desc)
        second = install(root, cp=cp, token=token, env=FAST)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr
        yield cp, root, token
    finally:
        stop_daemons(root)
        testing.stop(cp)
