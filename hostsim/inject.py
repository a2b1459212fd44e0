"""What the tests and the demo hand the product from outside: the simulating host, the fault hook,
a shorter settle window and the guard against the real `/`.

The product reads none of it from the environment. In-process, tests install these through the
product's own setters (bootstrap.host.set_host_factory, bootstrap.fsutil.set_fault_hook,
bootstrap.update.DEFAULT_SETTLE). A subprocess that runs the product's real entry point (the crash
harness's `vectorlay-bootstrap install`, the venv install.sh builds, the demo) gets them from `env()`:
it puts hostsim/_site on PYTHONPATH, whose sitecustomize.py calls `install_from_env()` at interpreter
start-up with the HOSTSIM_* variables below, before the entry point runs. The agents' launcher runs
Python with -E, which hides PYTHONPATH: the node-agent release hostsim builds installs the same
itself where hostsim is importable (hostsim.agents), and runs without it in install.sh's venv.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bootstrap import fsutil
from bootstrap.host import Host, LiveHost, set_host_factory

SIMULATE_ENV = "HOSTSIM_SIMULATE"  # "1": tree hosts get hostsim.kernel's simulators
FAULT_AT_ENV = "HOSTSIM_FAULT_AT"  # N, or a point's name: killed there (SIGKILL)
FAULT_KIND_ENV = "HOSTSIM_FAULT_KIND"  # "enospc": that write fails as on a full disk instead
FAULT_LOG_ENV = "HOSTSIM_FAULT_LOG"  # FILE: every point as it passes, "N<TAB>name"
SETTLE_ENV = "HOSTSIM_HEALTH_SETTLE"  # seconds: the agents' settle window
FORBID_LIVE_ENV = "HOSTSIM_FORBID_LIVE_ROOT"  # "1": building a host on the real / raises
FAULT_ENV = (FAULT_AT_ENV, FAULT_KIND_ENV, FAULT_LOG_ENV)
ALL_ENV = (SIMULATE_ENV, *FAULT_ENV, SETTLE_ENV, FORBID_LIVE_ENV)

SITE_DIR = Path(__file__).resolve().parent / "_site"


class LiveRootForbidden(RuntimeError):
    """Raised under the test suite when code reaches for the real `/` without being told to."""


def simulating_host(root: Path | str) -> Host:
    """A tree host whose kernel, boot tools and systemd (really running the agents' daemons) are
    simulated, for the real CLI run against a tree; the live root gets the plain live host."""
    if Path(root).resolve() == Path("/"):
        return LiveHost()
    from hostsim.host import SimHost
    from hostsim.kernel import simulate

    host = SimHost(root)
    simulate(host)
    return host


class FaultPoints:
    """The crash harness's fault hook: counts the points, logs them, and kills the process at the
    N-th (or the first one named `at`), or makes that write fail with ENOSPC."""

    def __init__(self, at: str | None = None, kind: str | None = None, log: str | None = None) -> None:
        self.at, self.kind, self.log = at, kind, log
        self.count = 0

    def __call__(self, what: str) -> None:
        self.count += 1
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{self.count}\t{what}\n")
        at = self.at
        if at is not None and (at == what if not at.isdigit() else int(at) == self.count):
            if self.kind == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what.partition(" ")[2])
            os.kill(os.getpid(), signal.SIGKILL)


def guarded_init(original: Callable[..., None]) -> Callable[..., None]:
    """LiveHost.__init__ refusing: code that forgets --root fails loudly under the tests."""

    @functools.wraps(original)
    def __init__(self: LiveHost, *args: Any, **kwargs: Any) -> None:
        raise LiveRootForbidden(
            "this code reached for the real host root '/' under the test suite; pass a --root tree"
        )

    return __init__


def install_from_env(environ: Mapping[str, str] = os.environ) -> None:
    """Install what the HOSTSIM_* variables ask for (sitecustomize calls this at start-up)."""
    if environ.get(FORBID_LIVE_ENV) == "1":
        setattr(LiveHost, "__init__", guarded_init(LiveHost.__init__))  # noqa: B010 - mypy refuses the assignment
    if environ.get(SIMULATE_ENV) == "1":
        set_host_factory(simulating_host)
    settle = environ.get(SETTLE_ENV)
    if settle:
        # Imported only when asked for: it brings the manifest's crypto, which most runs never need.
        from bootstrap import update

        with contextlib.suppress(ValueError):
            update.DEFAULT_SETTLE = float(settle)
    at, log = environ.get(FAULT_AT_ENV), environ.get(FAULT_LOG_ENV)
    if at is not None or log:
        fsutil.set_fault_hook(FaultPoints(at, environ.get(FAULT_KIND_ENV), log))


def env(
    base: Mapping[str, str] | None = None,
    *,
    simulate: bool = True,
    settle: float | None = None,
    forbid_live: bool | None = None,
) -> dict[str, str]:
    """`base` (default: this process's environment) for a subprocess that runs the product with the
    test machinery: hostsim/_site first on PYTHONPATH, the HOSTSIM_* variables asked for. Faults are
    asked for by adding FAULT_AT_ENV / FAULT_KIND_ENV / FAULT_LOG_ENV to the result. `forbid_live`
    None keeps the guard as `base` has it (the test suite's conftest sets it for every test)."""
    out = dict(os.environ if base is None else base)
    inherited_guard = out.get(FORBID_LIVE_ENV) == "1"
    for key in ALL_ENV:
        out.pop(key, None)
    site = str(SITE_DIR)
    rest = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != site]
    out["PYTHONPATH"] = os.pathsep.join([site, *rest])
    if simulate:
        out[SIMULATE_ENV] = "1"
    if settle is not None:
        out[SETTLE_ENV] = str(settle)
    if inherited_guard if forbid_live is None else forbid_live:
        out[FORBID_LIVE_ENV] = "1"
    return out


# --- hardware faults in a host tree, as the kernel would show them -------------------------------


def _device_dir(root: Path | str, address: str) -> Path:
    link = Path(root) / "sys/bus/pci/devices" / address
    if not link.is_symlink():
        raise FileNotFoundError(f"no PCI device {address} in {root}")
    return link.resolve()


def train_link(root: Path | str, address: str, *, width: int | None = None, speed: str | None = None) -> None:
    """The device's link trained below its maximum (a loose riser, a bad slot, a BIOS Gen setting):
    `width` lanes and/or `speed` as the kernel prints it ("2.5 GT/s PCIe")."""
    ddir = _device_dir(root, address)
    if width is not None:
        (ddir / "current_link_width").write_text(f"{width}\n")
    if speed is not None:
        (ddir / "current_link_speed").write_text(f"{speed}\n")


def add_aer_errors(root: Path | str, address: str, severity: str, name: str, count: int = 1) -> None:
    """The device reported `count` more AER errors of type `name` ("DLP", "RxErr"...) of `severity`
    (correctable | nonfatal | fatal): that line and the TOTAL_ line grow, as the kernel counts them."""
    from hostsim.builder import AER_FILES, AER_NAMES, aer_text

    path = _device_dir(root, address) / AER_FILES[severity]
    names, total = AER_NAMES[severity]
    if name not in names:
        raise ValueError(f"{name} is not a {severity} AER error the kernel counts ({', '.join(names)})")
    counts = {}
    for line in path.read_text().splitlines():
        key, _, value = line.rpartition(" ")
        if key != total:
            counts[key] = int(value)
    counts[name] = counts.get(name, 0) + count
    path.write_text(aer_text(severity, counts))


def empty_reset_method(root: Path | str, address: str) -> None:
    """`echo "" > reset_method`: every reset method disabled; the kernel then prints nothing."""
    (_device_dir(root, address) / "reset_method").write_text("")


def remove_device(root: Path | str, address: str) -> None:
    """The device left the bus (hot removal, a dead card after a reboot): gone from /sys/bus/pci,
    from its IOMMU group and from its driver, its directory removed."""
    import shutil

    base = Path(root)
    ddir = _device_dir(root, address)
    groups = list((base / "sys/kernel/iommu_groups").glob(f"*/devices/{address}"))
    for link in (
        base / "sys/bus/pci/devices" / address,
        *groups,
        *(base / "sys/bus/pci/drivers").glob(f"*/{address}"),
    ):
        link.unlink()
    shutil.rmtree(ddir)
    for member in groups:
        if not any(member.parent.iterdir()):  # the kernel frees a group with no device left
            shutil.rmtree(member.parent.parent)
