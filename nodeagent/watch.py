"""Between heartbeats: what changes within seconds when a GPU fails, watched cheaply.

The heartbeat (minutes apart) runs the doctor, which marks a wedged GPU's unit not ready; until it
runs, the control plane keeps advertising that unit. So the agent watches, every POLL_S, what a GPU
falling off the bus changes at once, and asks for a heartbeat as soon as one of them changes:

- each watched GPU/NVSwitch function's config space: a device that fell off the bus answers every
  config read with all ones, so its vendor ID reads 0xffff (sysfs keeps the IDs it cached);
- each watched function's driver binding (the `driver` symlink): a unit unbound from vfio-pci, or
  bound back, is a different unit for the doctor;
- the kernel log (/dev/kmsg), read from its end, for the NVIDIA driver's Xid 79 and "fallen off
  the bus" lines, the same lines the doctor's wedged check looks for.

The kernel's Documentation/ABI/testing/dev-kmsg: every read() returns one record,
"<prio>,<seq>,<usec>,<flags>[,...];<message>\\n" followed by continuation lines starting with a
space; lseek(fd, 0, SEEK_END) moves to after the last record; O_NONBLOCK reads answer EAGAIN when
there is none; EPIPE says records were overwritten before they were read (the next read goes on
with the oldest left); poll() says when a new record is there. On a host tree (--root) /dev/kmsg is
the tree's plain file, read the same way from its end.

A change only asks: the Debounce decides when the heartbeat goes, so a flapping device cannot make
a heartbeat storm.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from bootstrap.fsutil import read_regular
from bootstrap.host import Host
from bootstrap.pci import PCI_DEVICES
from bootstrap.settings import Settings

log = logging.getLogger("node-agent")

KMSG = "/dev/kmsg"
POLL_S = 0.5  # sysfs reads: a few syscalls per watched function, twice a second
READ_SIZE = 8192  # larger than any /dev/kmsg record (the kernel's own per-reader buffer is 8 KiB)
# At most one heartbeat a second on top of the interval, at most BURST of them in a row, then one
# every REFILL_S while the device keeps flapping.
MIN_GAP_S = 1.0
BURST = 5
REFILL_S = 5.0
_ROLES_WITH_CONFIG = ("gpu", "nvswitch")
_KMSG_HEADER = re.compile(rb"^[0-9]+,[0-9]+,[0-9]+,[^;]*;")


class Device(NamedTuple):
    """A function to watch; `config` when it is a GPU or NVSwitch, whose config space says wedged."""

    address: str
    config: bool


class _State(NamedTuple):
    present: bool
    wedged: bool
    driver: str | None


def watched_devices(doctor: Mapping[str, Any] | None, host: Host, settings: Settings) -> tuple[Device, ...]:
    """The functions of the node's GPU units, from the last doctor report: its per-unit `units`
    (every device, GPUs and NVSwitches with their config space) when it has them, else the same
    set from detection (the units' devices in passthrough, the GPUs in container mode)."""
    units = doctor.get("units") if isinstance(doctor, Mapping) else None
    if isinstance(units, list):
        found: dict[str, bool] = {}
        for unit in units:
            devices = unit.get("devices") if isinstance(unit, dict) else None
            for dev in devices if isinstance(devices, list) else ():
                if isinstance(dev, dict) and isinstance(dev.get("address"), str):
                    addr = dev["address"]
                    found[addr] = found.get(addr, False) or dev.get("role") in _ROLES_WITH_CONFIG
        return tuple(Device(a, c) for a, c in sorted(found.items()))
    return _from_inventory(host, settings)


def _from_inventory(host: Host, settings: Settings) -> tuple[Device, ...]:
    from bootstrap.discovery import discover

    if settings.gpu_mode == "none":
        return ()
    inv = discover(host, settings, with_names=False)
    anchors = {d.address for d in inv.gpus + inv.nvswitches}
    addrs = set(anchors)
    if settings.gpu_mode != "container":
        for unit in inv.units + inv.nvswitch_units:
            addrs.update(unit.devices)
    return tuple(Device(a, a in anchors) for a in sorted(addrs))


class KernelLog:
    """/dev/kmsg opened non-blocking at its end; `matches()` counts the new records about a GPU
    falling off the bus."""

    def __init__(self, fd: int, pollable: bool, pattern: re.Pattern[str]) -> None:
        self.fd = fd
        self.pollable = pollable  # the real device: poll() says when a record came
        self._pattern = pattern
        self._partial = b""  # a tree's plain file may end in the middle of a line

    @classmethod
    def open(cls, host: Host) -> KernelLog | None:
        """None (and one log line) when the kernel log cannot be read: the sysfs polling goes on."""
        # The doctor's lines, in one place: what makes its wedged check WARN or FAIL.
        from doctor.checks.registry import KERNEL_LOG_PATTERN

        path = host.path(KMSG)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            log.warning(
                "watch: cannot read the kernel log (%s: %s): watching the GPUs' sysfs only",
                KMSG,
                e.strerror or e,
            )
            return None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISCHR(mode) or stat.S_ISREG(mode)):
                raise OSError(errno.EINVAL, "not the kernel log device")
            os.lseek(fd, 0, os.SEEK_END)
        except OSError as e:
            os.close(fd)
            log.warning(
                "watch: cannot read the kernel log (%s: %s): watching the GPUs' sysfs only",
                KMSG,
                e.strerror or e,
            )
            return None
        return cls(fd, stat.S_ISCHR(mode), re.compile(KERNEL_LOG_PATTERN))

    def matches(self) -> list[str]:
        """The new records' messages that match, reading until there is nothing left. OSError
        (other than "nothing yet" and "records overwritten") is the caller's to handle."""
        found: list[str] = []
        for _ in range(1024):  # bounded: a log flooding faster than we read waits for next time
            try:
                chunk = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.EPIPE:
                    continue  # the oldest unread records were overwritten; the rest follow
                raise
            if not chunk:
                break
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()[-READ_SIZE:]
            for line in lines:
                if line.startswith(b" "):
                    continue  # a record's KEY=value continuation
                header = _KMSG_HEADER.match(line)
                text = line[header.end() :] if header else line
                message = text.decode(errors="replace")
                if self._pattern.search(message):
                    found.append(message.strip())
        return found

    def close(self) -> None:
        os.close(self.fd)


class Watcher:
    """The watched functions' state against the state of the last heartbeat, and the kernel log."""

    def __init__(self, host: Host, clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.clock = clock
        self.devices: tuple[Device, ...] = ()
        self._baseline: dict[str, _State] = {}
        self._sysfs_due = 0.0
        self.kmsg = KernelLog.open(host)

    def fileno(self) -> int | None:
        """The kernel log's fd when poll() can wait on it, else None (a plain file, or none)."""
        return self.kmsg.fd if self.kmsg is not None and self.kmsg.pollable else None

    def _state(self, dev: Device, before: _State | None) -> _State:
        base = f"{PCI_DEVICES}/{dev.address}"
        if not self.host.path(base).exists():
            return _State(False, False, None)
        driver = self.host.readlink_name(f"{base}/driver")
        wedged = False
        if dev.config:
            runtime = self.host.read_text(f"{base}/power/runtime_status", default="").strip()
            if runtime == "suspended":
                # A config read wakes a runtime-suspended device's upstream bridge (the kernel's
                # pci_config_pm_runtime_get): an idle GPU would never sleep. It is read again once
                # it is awake, which is also when a renter could notice it gone.
                wedged = before.wedged if before is not None else False
            else:
                try:
                    head = read_regular(self.host.path(f"{base}/config"), 2)
                except OSError:
                    head = b""
                wedged = head == b"\xff\xff"
        return _State(True, wedged, driver)

    def mark(self) -> None:
        """The state a heartbeat about to run will report: changes from here on ask for another."""
        self._baseline = {d.address: self._state(d, self._baseline.get(d.address)) for d in self.devices}

    def watch(self, devices: Iterable[Device]) -> None:
        """Watch these functions from now on; those already watched keep their marked state."""
        self.devices = tuple(devices)
        self._baseline = {
            d.address: self._baseline.get(d.address) or self._state(d, None) for d in self.devices
        }

    def poll(self) -> str | None:
        """What changed since the last mark, in words, or None."""
        lines = self._kernel_lines()
        if lines:
            return f"kernel log: {lines[-1][:200]}"
        # Every kernel log record wakes the agent; sysfs is read at most every POLL_S all the same.
        at = self.clock()
        if at < self._sysfs_due:
            return None
        self._sysfs_due = at + 0.9 * POLL_S  # a wait that ends a little early skips no round
        for dev in self.devices:
            before = self._baseline.get(dev.address)
            now = self._state(dev, before)
            if before is None or now == before:
                continue
            if now.present != before.present:
                return f"{dev.address} {'appeared on' if now.present else 'is gone from'} the bus"
            if now.wedged != before.wedged:
                says = "reads 0xffff (fell off the bus)" if now.wedged else "answers again"
                return f"{dev.address} config space {says}"
            return f"{dev.address} driver {before.driver or 'none'} -> {now.driver or 'none'}"
        return None

    def _kernel_lines(self) -> list[str]:
        if self.kmsg is None:
            return []
        try:
            return self.kmsg.matches()
        except OSError as e:
            log.warning(
                "watch: reading the kernel log failed (%s): watching the GPUs' sysfs only",
                e.strerror or e,
            )
            self.kmsg.close()
            self.kmsg = None
            return []

    def close(self) -> None:
        if self.kmsg is not None:
            self.kmsg.close()
            self.kmsg = None


class Debounce:
    """When an extra heartbeat may go: MIN_GAP_S after the last one, from a bucket of BURST that
    refills one every REFILL_S."""

    def __init__(
        self,
        gap: float = MIN_GAP_S,
        burst: int = BURST,
        refill: float = REFILL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gap, self.burst, self.refill, self.clock = gap, burst, refill, clock
        self._tokens = float(burst)
        self._at = clock()
        self._last: float | None = None

    def _fill(self, now: float) -> None:
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) / self.refill)
        self._at = now

    def ready_in(self) -> float:
        """Seconds until an extra heartbeat may go (0: now)."""
        now = self.clock()
        self._fill(now)
        wait = 0.0 if self._last is None else self._last + self.gap - now
        if self._tokens < 1:
            wait = max(wait, (1 - self._tokens) * self.refill)
        return max(0.0, wait)

    def beat(self) -> None:
        """A heartbeat went (any: the regular ones count for the gap, the extra ones spend)."""
        self._last = self.clock()

    def spend(self) -> None:
        self._fill(self.clock())
        self._tokens -= 1
