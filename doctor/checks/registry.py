"""The check registry and what every check shares: the Context (the host, its settings and the facts
computed once), the one record per check (`@check`), and the helpers several checks use."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import wraps
from typing import NamedTuple

from bootstrap import platform
from bootstrap.discovery import Inventory, discover
from bootstrap.host import Host
from bootstrap.settings import GPU_MODES, Settings
from doctor.model import CheckResult, Status, UnitHealth

INSTALL = "run the install one-liner"
REINSTALL = "re-run the install one-liner"

# Kernel log lines that mean a GPU fell off the bus this boot: the NVIDIA driver's Xid 79, the
# driver's plain-text report, and the PCI core failing to wake a device from D3cold. Compiled only
# where a kernel log is read (a node with GPUs), not by every run's import.
_KERNEL_LOG_PATTERN = (
    r"NVRM: Xid \([^)]*\): 79\b|fallen off the bus|Unable to change power state from D3cold to D0"
)


class Context:
    """What the checks share: the host, its settings, and facts computed once on first use."""

    # A plain class, not a dataclass: every doctor run creates this class at import, and a dataclass
    # compiles its generated methods then, for an object nobody compares or prints.
    __slots__ = ("_inventory", "_kernel_log", "_units", "host", "settings")

    def __init__(self, host: Host, settings: Settings) -> None:
        self.host = host
        self.settings = settings
        self._inventory: Inventory | None = None
        self._units: list[UnitHealth] | None = None
        self._kernel_log: list[str] | None = None

    def __repr__(self) -> str:
        return f"Context(host={self.host!r}, settings={self.settings!r})"

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            self._inventory = discover(self.host, self.settings)
        return self._inventory

    @property
    def mode(self) -> str:
        """passthrough | container | none: from the settings, or from detection before install."""
        if self.settings.gpu_mode:  # known without detection, which costs more
            return self.settings.gpu_mode
        return platform.gpu_mode(has_gpus=bool(self.inventory.gpus))

    def unit_health(self) -> list[UnitHealth]:
        """The GPU units for rent in this mode (IOMMU groups in passthrough, GPUs in container mode,
        none otherwise), each with its devices as sysfs shows them, its status and its reasons."""
        if self._units is None:
            if self.mode not in ("passthrough", "container"):
                self._units = []
            else:
                from bootstrap.enrolled import read_enrolled
                from doctor.units import build_units, load_baseline

                baseline = load_baseline(self.host)
                enrolled = read_enrolled(self.host)
                self._units = build_units(self.host, self.inventory, self.mode, enrolled, baseline)
        return self._units

    def record_unit_health(self) -> None:
        """Keep this run's AER counts as the next run's baseline (the node-agent's runs do)."""
        if self._units:
            from doctor.units import save_baseline

            save_baseline(self.host, self._units)

    def units(self) -> tuple[int, int]:
        """(ready, total) GPU units for rent in this mode; a degraded unit is still rented."""
        units = self.unit_health()
        return sum(1 for u in units if u.rentable), len(units)

    def kernel_log(self) -> list[str]:
        """This boot's kernel lines about GPUs falling off the bus ([] when the log is unreadable)."""
        if self._kernel_log is None:
            self._kernel_log = _read_kernel_log(self.host)
        return self._kernel_log


Check = Callable[[Context], CheckResult]


class CheckSpec(NamedTuple):
    """A check's one record: what the doctor runs, the renderer labels, preflight runs and
    --ignore-preflight-errors may waive all read it, so no list elsewhere names a check."""

    name: str  # stable: docs/contracts.md#vectorlay-node-doctor
    label: str  # the terminal line's
    run: Check
    modes: frozenset[str]  # the GPU modes it runs in unless asked for by name
    preflight: bool  # the installer's preflight runs it before changing anything
    waivable: bool  # --ignore-preflight-errors may let the run go on past its FAIL


# In the order the doctor runs and shows them: the order of the modules doctor.checks imports, and
# of the functions in each.
CHECKS: dict[str, CheckSpec] = {}


def check(
    name: str,
    label: str,
    *,
    modes: Iterable[str] = GPU_MODES,
    preflight: bool = False,
    waivable: bool = False,
) -> Callable[[Callable[[Context, str], CheckResult]], Check]:
    """Register the function below as check `name`; it is handed the name its results carry."""
    if name in CHECKS:
        raise ValueError(f"check {name} is registered twice")
    if waivable and not preflight:
        raise ValueError(f"check {name}: only a check preflight runs can be waived there")

    def register(fn: Callable[[Context, str], CheckResult]) -> Check:
        @wraps(fn)
        def run(ctx: Context) -> CheckResult:
            return fn(ctx, name)

        CHECKS[name] = CheckSpec(name, label, run, frozenset(modes), preflight, waivable)
        return run

    return register


def _read_kernel_log(host: Host) -> list[str]:
    for argv in (["journalctl", "-k", "-b", "--no-pager", "-q"], ["dmesg"]):
        res = host.run(argv, timeout=20)
        lines = [ln for ln in res.stdout.splitlines() if ln.strip() and not ln.startswith("-- ")]
        if res.ok and lines:
            pattern = re.compile(_KERNEL_LOG_PATTERN)
            return [ln.strip() for ln in lines if pattern.search(ln)]
    return []


def gpu_skip(ctx: Context, name: str) -> CheckResult | None:
    """The SKIP a GPU check returns on a node that serves no GPUs, else None."""
    if not ctx.inventory.gpus:
        return CheckResult(name, Status.SKIP, "no GPUs (CPU-only node)")
    if ctx.mode == "none":
        return CheckResult(name, Status.SKIP, "GPU mode is none: the node serves no GPUs")
    return None


def systemctl_states(ctx: Context, verb: str, units: Iterable[str]) -> tuple[dict[str, str], str]:
    """`systemctl is-active/is-enabled` answers per unit, or ({}, why systemd gave none)."""
    units = list(units)
    res = ctx.host.run(["systemctl", verb, *units], timeout=20)
    answers = res.stdout.splitlines()
    if len(answers) == len(units):
        return dict(zip(units, (a.strip() for a in answers), strict=True)), ""
    text = (res.stderr or res.stdout).strip().splitlines()
    return {}, text[0] if text else f"exit status {res.returncode}"


# A --root tree runs no command: its recorded `systemctl` answers nothing, which says nothing about
# the units (not "exit status 0"). What only a running systemd can answer is not judged there.
NO_SYSTEMD = "not checked: a --root tree runs no command, so there is no systemd to ask {}"
