"""The VM-attach probe: QEMU started with a unit's devices on vfio-pci, no guest OS.

VFIO calling a group viable does not mean a VM can start with it: QEMU must also open the group and
its container, map the devices' BARs, map the VM's memory for DMA through the IOMMU, and reset the
devices. Those fail on real nodes (a BAR the firmware left out of its MMIO window with "Above 4G
decoding" off, a device that cannot be reset, an IOMMU that refuses a mapping) and only a real QEMU
finds out. So the probe starts `qemu-system-x86_64` (the OS's `qemu-system-x86` package) stopped
(`-S`), with each function of the unit as `-device vfio-pci,host=ADDR`, asks it over QMP to reset
the machine and to list its PCI bus, then quits it; all within one deadline, killed past it.

A unit rented at the moment is never touched: its group is open in the renter's QEMU (a VFIO group
is single-open, so opening /dev/vfio/N gives EBUSY), and it is skipped as in use.

Results are kept in UNIT_PROBES (the record the doctor's unit health reads): a unit counts as
proven only while its device list is the one probed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import IO, Any

from bootstrap.discovery import Inventory, Unit, UnitStatus, discover
from bootstrap.fsutil import atomic_write, read_regular
from bootstrap.host import Host
from bootstrap.paths import UNIT_PROBES
from bootstrap.settings import Settings

QEMU = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
INSTALL_QEMU = f"sudo apt-get install {QEMU_PACKAGE}"
RECORD_VERSION = 1
# The whole probe of one unit: start, QMP exchange and exit. A healthy probe takes about a second
# (KVM) to a few (TCG); what is still running at the deadline is killed.
PROBE_TIMEOUT = 30.0
# Enough RAM for the DMA mapping to be a real one (the IOMMU maps all of it), small enough that
# pinning it costs a node nothing.
PROBE_RAM_MB = 128
# q35's default 64-bit PCI window (QEMU's Q35_PCI_HOST_HOLE64_SIZE_DEFAULT): a unit whose BARs need
# more gets a window sized for them, as the VM that rents it needs.
DEFAULT_HOLE64 = 1 << 35
ERROR_LIMIT = 500  # characters of QEMU's error kept in a record
STDERR_LIMIT = 64 << 10  # bytes of QEMU's stderr read back
QMP_LIMIT = 4 << 20  # bytes of QMP answers read, all answers together
RECORD_LIMIT = 1 << 20
_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_UNIT_ID = re.compile(r"^[0-9]{1,6}$")

# <linux/ioport.h>: the flags of a `resource` line.
_IORESOURCE_MEM = 0x200
_IORESOURCE_MEM_64 = 0x00100000


class Outcome(str, Enum):
    ATTACHED = "attached"  # QEMU started with the devices, reset them and showed them on its bus
    FAILED = "failed"  # it did not: QEMU's error and a hint
    IN_USE = "in_use"  # rented at the moment (the group is held): skipped, nothing touched
    CANNOT_RUN = "cannot_run"  # no QEMU on this machine, or not a machine the probe can run on
    RECORDED = "recorded"  # a host tree: the command was recorded, not run


@dataclass(frozen=True)
class ProbeResult:
    unit: str
    devices: tuple[str, ...]
    outcome: Outcome
    message: str
    error: str | None = None
    hint: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "devices": list(self.devices),
            "outcome": self.outcome.value,
            "message": self.message,
            "error": self.error,
            "hint": self.hint,
            "seconds": round(self.seconds, 3),
        }


# --- what is probed -------------------------------------------------------------------------------


def unit_devices(inventory: Inventory, unit: Unit) -> tuple[str, ...]:
    """The functions of `unit` a VM is given (its group's members less the bridges), sorted: the
    device list a probe record is kept for and compared with."""
    out = []
    for addr in unit.devices:
        dev = inventory.devices.get(addr)
        if dev is not None and dev.is_bridge:
            continue
        out.append(addr)
    return tuple(sorted(out))


def probe_targets(inventory: Inventory) -> list[tuple[str, tuple[str, ...]]]:
    """(unit id, devices) of every unit the probe can try: passthrough units whose whole group is
    on vfio-pci. The others are not ready by the other rules already, and QEMU could not open them."""
    return [
        (u.iommu_group, unit_devices(inventory, u))
        for u in inventory.units
        if u.status is UnitStatus.READY and u.iommu_group is not None
    ]


# --- records ---------------------------------------------------------------------------------------


def load_records(host: Host) -> dict[str, dict[str, Any]]:
    """The valid records of UNIT_PROBES by unit id; a missing or garbled file, or a garbled record, is
    no record (the unit is then unproven, never proven by accident)."""
    try:
        data = json.loads(read_regular(host.path(UNIT_PROBES), RECORD_LIMIT))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
        return {}
    units = data.get("units")
    if not isinstance(units, dict):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for uid, rec in units.items():
        if not (isinstance(uid, str) and _UNIT_ID.match(uid) and isinstance(rec, dict)):
            continue
        devices = rec.get("devices")
        if not (
            isinstance(devices, list)
            and 0 < len(devices) <= 64
            and all(isinstance(d, str) and _ADDRESS.match(d) for d in devices)
            and isinstance(rec.get("ok"), bool)
            and isinstance(rec.get("at"), str)
            and all(rec.get(k) is None or isinstance(rec.get(k), str) for k in ("error", "hint"))
        ):
            continue
        out[uid] = {
            "devices": list(devices),
            "ok": rec["ok"],
            "at": rec["at"][:40],
            "error": None if rec.get("error") is None else rec["error"][:ERROR_LIMIT],
            "hint": None if rec.get("hint") is None else rec["hint"][:ERROR_LIMIT],
        }
    return out


def current_record(
    records: Mapping[str, Mapping[str, Any]], unit_id: str, devices: Iterable[str]
) -> Mapping[str, Any] | None:
    """The record of `unit_id` if it was made for exactly these devices (else the unit changed)."""
    rec = records.get(unit_id)
    if rec is None or sorted(rec["devices"]) != sorted(devices):
        return None
    return rec


def save_records(host: Host, results: Iterable[ProbeResult], now: datetime | None = None) -> None:
    """Merge the results that prove or disprove a unit into UNIT_PROBES (atomically, 0644). An in-use
    unit keeps its previous record; one with none is proven by the VM holding its group, which
    started with exactly these devices (a node updated to a release with the probe would otherwise
    withhold every rented unit until the renter leaves and a probe runs)."""
    records = load_records(host)
    settled = [
        r
        for r in results
        if r.outcome in (Outcome.ATTACHED, Outcome.FAILED)
        or (r.outcome is Outcome.IN_USE and current_record(records, r.unit, r.devices) is None)
    ]
    if not settled:
        return
    at = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    for r in settled:
        records[r.unit] = {
            "devices": list(r.devices),
            "ok": r.outcome is not Outcome.FAILED,
            "at": at,
            "error": None if r.error is None else r.error[:ERROR_LIMIT],
            "hint": r.hint,
        }
    body = {"version": RECORD_VERSION, "units": dict(sorted(records.items(), key=lambda kv: int(kv[0])))}
    atomic_write(host.path(UNIT_PROBES), json.dumps(body, indent=2) + "\n", mode=0o644)


# --- hints -----------------------------------------------------------------------------------------

HINT_BAR = (
    "a BAR does not fit the MMIO window: enable Above 4G decoding and large-BAR / MMIO above 4G "
    "settings in the BIOS/UEFI, then reboot"
)
HINT_RESET = (
    "the device could not be reset, so it cannot pass from one tenant to the next: power-cycle the "
    "host; if it stays, reseat or RMA the card"
)
HINT_DMA = (
    "the IOMMU refused to map the VM's memory for DMA: check `journalctl -k` for DMAR/AMD-Vi errors "
    "and that the IOMMU is on in BIOS/UEFI"
)
HINT_NOT_VIABLE = (
    "QEMU cannot use the unit's IOMMU group: every device in it must be on vfio-pci: "
    "sudo systemctl restart vectorlay-vfio-bind or re-run the bootstrap"
)
HINT_GONE = "the device is not on the bus: power-cycle the host; if it stays gone, reseat or RMA the card"
HINT_TIMEOUT = (
    "QEMU hung with the unit's devices: check `journalctl -k` for vfio errors, power-cycle the host"
)
HINT_OTHER = "QEMU could not start a VM with the unit's devices: see its error and `journalctl -k`"

# QEMU's (hw/vfio) and the kernel's words for each cause, most specific first.
_CAUSES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"not viable|failed to open /dev/vfio/[0-9]", re.I), HINT_NOT_VIABLE),
    (re.compile(r"no such host device|vfio-pci: .*No such file", re.I), HINT_GONE),
    (re.compile(r"BAR ?\d|mmap.*BAR|BAR.*(fit|mmap|region|size)|region.*too large", re.I), HINT_BAR),
    (re.compile(r"reset", re.I), HINT_RESET),
    (re.compile(r"dma_map|MAP_DMA|DMA map|memory listener|setup container|IOMMU", re.I), HINT_DMA),
)
# Lines QEMU prints on every healthy start on some machines; never a reason to fail a unit.
_NOISE = re.compile(
    r"host doesn't support requested feature|Could not access KVM|failed to initialize kvm", re.I
)
# vfio's own warnings that a started QEMU goes on past, but that leave the VM unusable.
_FATAL_WARNINGS = re.compile(r"Cannot reset device|Failed to mmap .*BAR|vfio_dma_map|VFIO_MAP_DMA", re.I)


def hint_for(error: str) -> str:
    for pattern, hint in _CAUSES:
        if pattern.search(error):
            return hint
    return HINT_OTHER


def _errors_of(stderr: str) -> list[str]:
    """QEMU's error lines, each once (it repeats a device's reset failure at every machine reset)."""
    lines = (line.strip() for line in stderr.splitlines())
    return list(dict.fromkeys(line for line in lines if line and not _NOISE.search(line)))


# --- running QEMU ----------------------------------------------------------------------------------


def _bar_bytes(host: Host, address: str) -> int:
    """The sum of a function's 64-bit memory BARs, from its sysfs `resource` (BARs 0-5)."""
    total = 0
    text = host.read_text(f"/sys/bus/pci/devices/{address}/resource", default="")
    for line in text.splitlines()[:6]:
        try:
            start, end, flags = (int(w, 16) for w in line.split())
        except ValueError:
            continue
        if flags & _IORESOURCE_MEM and flags & _IORESOURCE_MEM_64 and end > start:
            total += end - start + 1
    return total


def qemu_argv(host: Host, devices: Iterable[str], qmp: str) -> list[str]:
    """The probe's QEMU command line for `devices`, its QMP server at `qmp` (a unix socket path)."""
    devices = list(devices)
    need = sum(_bar_bytes(host, a) for a in devices)
    hole = DEFAULT_HOLE64
    while hole < 2 * need:
        hole <<= 1
    # KVM where this machine has it; TCG otherwise (QEMU tries the -accel options in order), which
    # also starts the devices: the probe runs no guest code, so TCG's speed does not matter.
    accel = ["-accel", "kvm", "-accel", "tcg"] if host.exists("/dev/kvm") else ["-accel", "tcg"]
    argv = [
        QEMU,
        "-machine",
        "q35",
        *accel,
        "-cpu",
        "max",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        "-m",
        f"{PROBE_RAM_MB}M",
        "-global",
        f"q35-pcihost.pci-hole64-size={hole}",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
    ]
    for i, addr in enumerate(devices):
        argv += ["-device", f"vfio-pci,host={addr},id=probe{i}"]
    return argv


def group_busy(host: Host, group: str) -> bool:
    """The unit's group is held by another process (a renter's VM): VFIO groups are single-open."""
    try:
        fd = os.open(host.path(f"/dev/vfio/{group}"), os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return e.errno == errno.EBUSY
    os.close(fd)
    return False


class _QmpError(Exception):
    pass


class _Qmp:
    """A QMP client on a connected unix socket: one command at a time, answers bounded in size."""

    def __init__(self, sock: Any, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = b""
        self.read = 0

    def _line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _QmpError("QEMU closed its QMP connection")
            self.read += len(chunk)
            if self.read > QMP_LIMIT:
                raise _QmpError(f"QEMU's QMP answers passed {QMP_LIMIT} bytes")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise _QmpError(f"QEMU's QMP sent a line that is not JSON: {line[:80]!r}") from None
        if not isinstance(msg, dict):
            raise _QmpError("QEMU's QMP sent JSON that is not an object")
        return msg

    def greeting(self) -> None:
        if "QMP" not in self._line():
            raise _QmpError("QEMU's QMP did not greet")

    def execute(self, command: str) -> Any:
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        while True:
            msg = self._line()
            if "event" in msg:
                continue
            if "error" in msg:
                err = msg["error"]
                desc = err.get("desc") if isinstance(err, dict) else err
                raise _QmpError(f"{command}: {desc}")
            if "return" in msg:
                return msg["return"]


def _on_bus(answer: Any) -> dict[str, tuple[int, int]]:
    """qdev id -> (vendor, device) of every device in a query-pci answer, bridges' buses included."""
    out: dict[str, tuple[int, int]] = {}

    def walk(devices: Any) -> None:
        if not isinstance(devices, list):
            return
        for d in devices:
            if not isinstance(d, dict):
                continue
            ids = d["id"] if isinstance(d.get("id"), dict) else {}
            if isinstance(d.get("qdev_id"), str) and d["qdev_id"]:
                out[d["qdev_id"]] = (ids.get("vendor", -1), ids.get("device", -1))
            bridge = d.get("pci_bridge")
            if isinstance(bridge, dict):
                walk(bridge.get("devices"))

    for bus in answer if isinstance(answer, list) else []:
        if isinstance(bus, dict):
            walk(bus.get("devices"))
    return out


def _sysfs_id(host: Host, address: str, name: str) -> int:
    try:
        return int(host.read_text(f"/sys/bus/pci/devices/{address}/{name}", default="").strip(), 16)
    except ValueError:
        return -1


def _read_head(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read(STDERR_LIMIT).decode(errors="replace")


def _failed(
    unit: str, devices: tuple[str, ...], error: str, t0: float, hint: str | None = None
) -> ProbeResult:
    error = error.strip()[:ERROR_LIMIT] or "QEMU failed without a message"
    return ProbeResult(
        unit,
        devices,
        Outcome.FAILED,
        f"QEMU could not attach the unit: {error.splitlines()[0][:200]}",
        error,
        hint or hint_for(error),
        time.monotonic() - t0,
    )


def _exchange(
    host: Host, unit: str, devices: tuple[str, ...], sock_path: str, proc: Any, deadline: float, t0: float
) -> ProbeResult | str:
    """The QMP part of a probe: the result, or QEMU's failure to read from its stderr (a string)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # QEMU listens on its QMP socket early, but greets only once the devices are realised; a
        # device it cannot open makes it exit with the reason on stderr (and close the connection).
        while True:
            if proc.poll() is not None:
                return "exited"
            try:
                sock.connect(sock_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise TimeoutError from None
                time.sleep(0.05)
        qmp = _Qmp(sock, deadline)
        qmp.greeting()
        qmp.execute("qmp_capabilities")
        # A machine reset resets every vfio device (FLR, or the bus or slot reset the host allows).
        qmp.execute("system_reset")
        seen = _on_bus(qmp.execute("query-pci"))
        with contextlib.suppress(_QmpError):  # QEMU may close the connection as it quits
            qmp.execute("quit")
    except TimeoutError:
        raise
    except _QmpError as e:
        return str(e)
    except OSError as e:  # the connection reset by a QEMU that exits
        return f"QEMU's QMP connection failed: {e.strerror or e}"
    finally:
        sock.close()
    missing = []
    for i, addr in enumerate(devices):
        got = seen.get(f"probe{i}")
        want = (_sysfs_id(host, addr, "vendor"), _sysfs_id(host, addr, "device"))
        if got is None:
            missing.append(f"{addr} is not on QEMU's PCI bus")
        elif got != want:
            missing.append(f"{addr} shows as {got[0]:04x}:{got[1]:04x} on QEMU's PCI bus")
    if missing:
        return "; ".join(missing)
    return ProbeResult(
        unit,
        devices,
        Outcome.ATTACHED,
        f"attached: QEMU opened group {unit}, reset and listed {len(devices)} function(s)",
        seconds=time.monotonic() - t0,
    )


def probe_unit(
    host: Host, unit: str, devices: tuple[str, ...], timeout: float = PROBE_TIMEOUT
) -> ProbeResult:
    """Start QEMU with `devices` (the functions of IOMMU group `unit`) and see them attached."""
    t0 = time.monotonic()
    if not host.is_live:
        argv = qemu_argv(host, devices, f"/run/vectorlay/probe-{unit}.qmp")
        if host.runs_commands:
            return ProbeResult(unit, devices, Outcome.CANNOT_RUN, "the probe runs QEMU on this machine only")
        host.run(argv, timeout=timeout)
        return ProbeResult(unit, devices, Outcome.RECORDED, "recorded, not run (host tree)")
    if group_busy(host, unit):
        return ProbeResult(unit, devices, Outcome.IN_USE, f"in use, skipped (group {unit} is held by a VM)")

    import shutil
    import signal
    import subprocess
    import tempfile

    if shutil.which(QEMU) is None:
        return ProbeResult(
            unit,
            devices,
            Outcome.CANNOT_RUN,
            f"cannot run: {QEMU} not found (package {QEMU_PACKAGE})",
            hint=INSTALL_QEMU,
        )
    deadline = t0 + timeout
    with tempfile.TemporaryDirectory(prefix="vectorlay-probe-") as tmp, tempfile.TemporaryFile() as err:
        sock_path = os.path.join(tmp, "qmp.sock")
        proc = subprocess.Popen(
            qemu_argv(host, devices, sock_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        try:
            try:
                got = _exchange(host, unit, devices, sock_path, proc, deadline, t0)
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except (TimeoutError, subprocess.TimeoutExpired):
                got = f"QEMU did not finish within {timeout:g} s (killed)"
                return _failed(unit, devices, got + _tail(_read_head(err)), t0, HINT_TIMEOUT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stderr = _read_head(err)
    errors = _errors_of(stderr)
    fatal = [line for line in errors if _FATAL_WARNINGS.search(line)]
    if isinstance(got, ProbeResult) and not fatal:
        return got
    if "Device or resource busy" in stderr and not fatal:
        # Rented between the look at the group and QEMU's open of it: nothing was touched.
        return ProbeResult(unit, devices, Outcome.IN_USE, f"in use, skipped (group {unit} is held by a VM)")
    text = "\n".join(fatal or errors)
    # QEMU's own error, when it exited with one, says more than the closed QMP connection it caused.
    if isinstance(got, str) and got != "exited" and not (proc.returncode and errors):
        text = f"{got}\n{text}" if text else got
    return _failed(unit, devices, text, t0)


def _tail(stderr: str) -> str:
    errors = _errors_of(stderr)
    return ("\n" + "\n".join(errors)) if errors else ""


def probe_units(
    host: Host, inventory: Inventory, *, unproven_only: bool = False, timeout: float = PROBE_TIMEOUT
) -> list[ProbeResult]:
    """Probe the units that can be probed (every one, or those without a current passing record),
    one after the other, and keep the results in UNIT_PROBES."""
    records = load_records(host) if unproven_only else {}
    results = []
    for unit, devices in probe_targets(inventory):
        rec = current_record(records, unit, devices)
        if rec is not None and rec["ok"]:
            continue
        results.append(probe_unit(host, unit, devices, timeout))
    save_records(host, results)
    return results


def probe_unproven(host: Host, settings: Settings, out: Callable[[str], None]) -> list[ProbeResult]:
    """Probe every unit with no current passing record, detected afresh (devices may have been bound
    to vfio-pci since the run's detection), one line each to `out`: what the install's verify stage
    and `vectorlay-bootstrap update` run, so that no unit stays unproven after either."""
    inventory = discover(host, settings, with_names=False)
    results = probe_units(host, inventory, unproven_only=True)
    for r in results:
        hint = f" ({r.hint})" if r.hint and r.outcome is not Outcome.ATTACHED else ""
        out(f"probe: unit {r.unit}: {r.message}{hint}")
    return results
