"""A QEMU test guest: real kernel, emulated Intel IOMMU, stand-in GPUs, driven over virtio-serial.

    vm = Vm(image, workdir)
    vm.boot()                                  # direct kernel boot, IOMMU arguments on
    rc, out, err = vm.run("lspci -nn", timeout=30)
    vm.put_file("/etc/vectorlay/node.yaml", text)
    vm.get_file("/proc/cmdline")
    vm.reboot(via_grub=True)                   # the guest reboots itself; OVMF + the guest's own grub.cfg
    vm.shutdown()

The guest's only network is QEMU user networking with `restrict=on`: it reaches nothing but the
forwards given (`forwards={"10.0.2.100:443": ("127.0.0.1", port)}`), each a per-connection relay to a
service on this machine's loopback. TCG, not KVM: KVM hung early in boot on the nested machines this
was built on, and TCG is what makes the emulated IOMMU behave the same everywhere.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from image import GuestImage

from bootstrap.host import CommandResult

HERE = Path(__file__).resolve().parent
AGENT_PORT = "org.vectorlay.agent"
GUEST_MAC = "52:54:00:12:34:56"
CONSOLE_ARGS = "console=ttyS0,115200"
# What a direct boot passes besides the root: the same console GRUB's defaults in the guest give.
BASE_APPEND = f"root=LABEL=root ro {CONSOLE_ARGS}"
IOMMU_ARGS = "intel_iommu=on iommu=pt"
OVMF_CANDIDATES = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
)


@dataclass(frozen=True)
class StandIn:
    """A QEMU display device standing in for a GPU (vendor 1234), and what the guest should make of it."""

    address: str  # the guest's PCI address for it
    device: str  # QEMU device model: VGA (class 0300) or secondary-vga (class 0380)
    unit: str  # name of the IOMMU group it is expected to share (several stand-ins may share one)


# The stand-in hardware. Group shapes were checked against what the guest kernel really forms with
# QEMU's intel-iommu: a device on the root bus or alone behind a root port gets its own group; the
# functions of one multi-function slot share one; everything behind a PCIe-to-PCI bridge shares the
# bridge's group (conventional PCI has no requester ID per device).
STAND_INS = (
    StandIn("0000:00:01.0", "VGA", "alone-root-bus"),
    StandIn("0000:01:00.0", "secondary-vga", "alone-root-port"),
    StandIn("0000:02:00.0", "secondary-vga", "with-companion-function"),
    StandIn("0000:04:01.0", "secondary-vga", "with-nic"),
    StandIn("0000:06:01.0", "secondary-vga", "two-gpus-behind-bridge"),
    StandIn("0000:06:02.0", "secondary-vga", "two-gpus-behind-bridge"),
)
# The other functions sharing a stand-in's group, per group name: an `edu` device as the second
# function of the stand-in's slot (like a GPU's HD-audio function), and an e1000 NIC behind the same
# PCIe-to-PCI bridge (which makes that group not isolatable).
COMPANIONS = {"with-companion-function": ("0000:02:00.1",)}
BLOCKERS = {"with-nic": ("0000:04:02.0",)}
BRIDGES = {"with-nic": "0000:03:00.0", "two-gpus-behind-bridge": "0000:05:00.0"}
EXPECTED_STATUS_BEFORE_BINDING = {
    "alone-root-bus": "needs_binding",
    "alone-root-port": "needs_binding",
    "with-companion-function": "needs_binding",
    "with-nic": "not_isolatable",
    "two-gpus-behind-bridge": "needs_binding",
}


def hardware_args(blocker_netdev: str) -> list[str]:
    """QEMU arguments for the stand-in GPUs and their neighbours, at fixed addresses."""
    return [
        "-device", "VGA,addr=01.0",
        "-device", "pcie-root-port,id=rp1,chassis=1,slot=1,addr=02.0",
        "-device", "secondary-vga,bus=rp1",
        "-device", "pcie-root-port,id=rp2,chassis=2,slot=2,addr=03.0",
        "-device", "secondary-vga,bus=rp2,addr=00.0,multifunction=on",
        "-device", "edu,bus=rp2,addr=00.1",
        "-device", "pcie-root-port,id=rp3,chassis=3,slot=3,addr=04.0",
        "-device", "pcie-pci-bridge,id=br1,bus=rp3",
        "-device", "secondary-vga,bus=br1,addr=01.0",
        "-device", f"e1000,bus=br1,addr=02.0,netdev={blocker_netdev}",
        "-device", "pcie-root-port,id=rp4,chassis=4,slot=4,addr=05.0",
        "-device", "pcie-pci-bridge,id=br2,bus=rp4",
        "-device", "secondary-vga,bus=br2,addr=01.0",
        "-device", "secondary-vga,bus=br2,addr=02.0",
    ]  # fmt: skip


class BootStalled(RuntimeError):
    """The guest's console stopped moving before its agent said hello (see Vm.boot)."""


class _ConsoleWatch:
    """Whether a booting guest's console has stood still for STALL_SECONDS."""

    STALL_SECONDS = 75.0  # a whole boot takes 20-60 s here; a healthy kernel is never that quiet

    def __init__(self, path: Path) -> None:
        self.path = path
        self.t0 = time.monotonic()
        self._size = self._stat()
        self._moved = self.t0

    def _stat(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def stalled(self) -> bool:
        now, size = time.monotonic(), self._stat()
        if size != self._size:
            self._size, self._moved = size, now
        return now - self._moved > self.STALL_SECONDS

    def last_line(self) -> str:
        lines = self.path.read_text(errors="replace").strip().splitlines()
        return f"console silent for {self.STALL_SECONDS:.0f} s after: {lines[-1] if lines else ''}"


class VmError(RuntimeError):
    pass


class RunResult(NamedTuple):
    rc: int
    stdout: str
    stderr: str

    def check(self, what: str = "command") -> RunResult:
        if self.rc != 0:
            raise VmError(f"{what} failed in the guest (rc={self.rc}):\n{self.stdout}\n{self.stderr}")
        return self


@dataclass
class BootRecord:
    mode: str  # "direct" or "grub"
    append: str | None
    iommu_device: bool
    seconds: float
    cmdline: str = ""


@dataclass
class Timings:
    entries: list[tuple[str, float]] = field(default_factory=list)

    def add(self, what: str, seconds: float) -> None:
        self.entries.append((what, seconds))


TIMINGS = Timings()


def find_ovmf() -> tuple[Path, Path]:
    for code, vars_ in OVMF_CANDIDATES:
        if os.path.exists(code) and os.path.exists(vars_):
            return Path(code), Path(vars_)
    raise VmError("no OVMF firmware found (apt-get install ovmf)")


# --- QEMU's lifetime: never longer than the harness's -------------------------------------------------

PR_SET_PDEATHSIG = 1
_running: set[subprocess.Popen[bytes]] = set()


# Looked up before any fork: the child runs only this call between fork and exec (no dlopen there,
# which could deadlock on a lock another thread of the harness held at the fork).
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: the kernel SIGKILLs it when the harness dies, however it dies (a CI
    timeout's SIGKILL runs no cleanup of ours). The check after it covers a parent that died before
    prctl took effect. (The signal follows the forking thread: launch from a thread that lives as
    long as the harness, as the tests do.)"""
    if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(126)
    if os.getppid() != parent:
        os._exit(0)


def launch_qemu(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start QEMU in its own process group (its guestfwd relays with it), dying with this process:
    by the parent-death signal when the harness is killed, by a group kill when it exits."""
    parent = os.getpid()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: _die_with_parent(parent),
    )
    _running.add(proc)
    return proc


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        # QEMU is gone; a relay it started may still hold the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    _running.discard(proc)


@atexit.register
def _kill_all() -> None:
    for proc in list(_running):
        kill_group(proc)


def _on_sigterm(signum: int, _frame: Any) -> None:
    # A CI timeout usually sends SIGTERM first: the guests go, then the harness exits as asked.
    _kill_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
    signal.SIG_DFL,
    None,
):
    signal.signal(signal.SIGTERM, _on_sigterm)


class Vm:
    def __init__(
        self,
        image: GuestImage,
        workdir: Path,
        *,
        memory_mb: int = 1024,
        smp: int = 2,
        forwards: Mapping[str, tuple[str, int]] | None = None,
        log: Any = None,
    ) -> None:
        self.image = image
        self.name = image.release.key  # what the timings call this guest
        self.workdir = workdir
        self.memory_mb = memory_mb
        self.smp = smp
        self.forwards = dict(forwards or {})
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.boots: list[BootRecord] = []
        self.boot_id: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stall: _ConsoleWatch | None = None
        self._sock: socket.socket | None = None
        self._parts: list[bytes] = []  # an incomplete line from the agent
        self._lines: list[bytes] = []  # complete lines not yet looked at
        self._next_id = 1
        workdir.mkdir(parents=True, exist_ok=True)
        self.disk = workdir / "disk.qcow2"
        self.console_log = workdir / "console.log"
        # Copy-on-write over the cached image: the image stays pristine and each VM starts clean.
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.disk), str(self.disk)],
            check=True,
        )
        code, vars_template = find_ovmf()
        self.ovmf_code = code
        self.ovmf_vars = workdir / "OVMF_VARS.fd"  # this machine's NVRAM, kept across its reboots
        shutil.copyfile(vars_template, self.ovmf_vars)

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def qemu_argv(self, *, via_grub: bool, append: str | None, iommu_device: bool) -> list[str]:
        sock = self.workdir / "agent.sock"
        netdev = "user,id=net0,restrict=on"
        relay = HERE / "relay.py"
        for guest, (host_addr, host_port) in self.forwards.items():
            # `cmd:` starts one relay per guest connection; a chardev target would carry only one.
            netdev += f",guestfwd=tcp:{guest}-cmd:{sys.executable} {relay} {host_addr} {host_port}"
        argv = [
            "qemu-system-x86_64",
            "-name", "vectorlay-test",
            "-machine", "q35,accel=tcg,kernel-irqchip=split",
            # An Intel CPU to go with the Intel IOMMU, as on real hardware (the product picks the
            # IOMMU arguments by CPU vendor). TCG emulates no VMX, so the guest has no /dev/kvm.
            "-cpu", "max,vendor=GenuineIntel",
            "-m", str(self.memory_mb),
            "-smp", str(self.smp),
            # The IOMMU comes before the PCI devices it translates for.
            *(["-device", "intel-iommu,intremap=on"] if iommu_device else []),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", f"file,id=console,path={self.console_log},append=on",
            "-serial", "chardev:console",
            "-drive", f"file={self.disk},format=qcow2,if=none,id=root,cache=unsafe",
            # With a boot order OVMF connects only the devices in it: the root disk must be listed
            # too, or GRUB does not see it.
            "-device", "virtio-blk-pci,drive=root,addr=0a.0" + (",bootindex=1" if via_grub else ""),
            "-drive", f"file={self.image.esp},format=raw,if=none,id=esp,snapshot=on",
            # Firmware boots the ESP's GRUB; a direct boot's loader takes boot index 0 itself.
            "-device", "virtio-blk-pci,drive=esp,addr=0b.0" + (",bootindex=0" if via_grub else ""),
            "-netdev", netdev,
            "-device", f"virtio-net-pci,netdev=net0,mac={GUEST_MAC},addr=0c.0",
            "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser,addr=0d.0",
            "-device", f"virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT}",
            # The NIC in the not-isolatable group gets a network of its own that reaches nothing.
            "-netdev", "user,id=blocknet,restrict=on",
            *hardware_args("blocknet"),
        ]  # fmt: skip
        if via_grub:
            argv += [
                "-drive", f"if=pflash,format=raw,readonly=on,file={self.ovmf_code}",
                "-drive", f"if=pflash,format=raw,file={self.ovmf_vars}",
            ]  # fmt: skip
        else:
            argv += [
                "-kernel", str(self.image.kernel),
                "-initrd", str(self.image.initrd),
                "-append", append if append is not None else f"{BASE_APPEND} {IOMMU_ARGS}",
            ]  # fmt: skip
        return argv

    def boot(
        self,
        *,
        via_grub: bool = False,
        append: str | None = None,
        iommu_device: bool = True,
        timeout: float = 180,
    ) -> BootRecord:
        """Start QEMU and return once the guest's agent answers and systemd has finished booting.

        Direct boot passes `append` (default: the base arguments plus the IOMMU ones) as the kernel
        command line. `via_grub` boots OVMF and the GRUB EFI image, which reads the guest's own
        /boot/grub/grub.cfg: the harness then has no say over the kernel arguments.
        `iommu_device=False` leaves out the emulated IOMMU, like a box with VT-d off in its firmware.
        """
        if self.running:
            raise VmError("the guest is already running")
        if via_grub and append is not None:
            raise VmError("a GRUB boot takes its kernel arguments from the guest's grub.cfg, not from append")
        argv = self.qemu_argv(via_grub=via_grub, append=append, iommu_device=iommu_device)
        mode = "grub" if via_grub else "direct"
        # TCG with two vCPUs on a loaded two-core host now and then freezes a guest kernel early in
        # its boot (seen in CI: the console stops after "sched_clock: Marking stable" and nothing
        # follows for minutes). That is the emulator, not the product: a boot whose kernel console
        # stands still before the guest agent says hello is killed and started once more, and the
        # timings say so. A second stall fails the test.
        for attempt in (1, 2):
            try:
                return self._boot_once(argv, mode, append, iommu_device, timeout, stall_check=attempt == 1)
            except BootStalled as e:
                what = f"{self.name} boot {len(self.boots) + 1} ({mode}) stalled, started again"
                TIMINGS.add(what, e.args[1])
                self.log(f"guest boot stalled ({e.args[0]}); starting it once more")
        raise AssertionError("unreachable")

    def _boot_once(
        self,
        argv: list[str],
        mode: str,
        append: str | None,
        iommu_device: bool,
        timeout: float,
        stall_check: bool,
    ) -> BootRecord:
        sock_path = self.workdir / "agent.sock"
        sock_path.unlink(missing_ok=True)
        with open(self.console_log, "a") as f:
            f.write(f"\n===== boot {len(self.boots) + 1} ({mode}) {shlex.join(argv)}\n")
        t0 = time.monotonic()
        # Only a direct boot without "quiet" has a kernel that talks all the way to userspace.
        talks = mode == "direct" and "quiet" not in (append or "").split()
        self._stall = _ConsoleWatch(self.console_log) if stall_check and talks else None
        self._proc = launch_qemu(argv)
        try:
            return self._finish_boot(mode, append, iommu_device, t0, t0 + timeout)
        except BaseException:
            self.kill()  # a guest that did not come up is of no further use, and must not linger
            raise
        finally:
            self._stall = None

    def _finish_boot(
        self, mode: str, append: str | None, iommu_device: bool, t0: float, deadline: float
    ) -> BootRecord:
        sock_path = self.workdir / "agent.sock"
        self._connect(sock_path, deadline)
        hello = self._wait_for(lambda m: m.get("event") == "hello", deadline, "the guest agent's hello")
        self.boot_id = str(hello["boot_id"])
        self._stall = None  # userspace is up: from here on a quiet console is normal
        # The agent starts early in multi-user.target; wait for the rest of the boot to settle.
        rest = max(5.0, deadline - time.monotonic())
        state = self.run(["systemctl", "is-system-running", "--wait"], timeout=rest).stdout.strip()
        if state not in ("running", "degraded"):
            raise VmError(f"the guest finished booting in state {state!r}\n{self.console_tail()}")
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"]).stdout
            self.log(f"guest booted degraded; failed units:\n{failed}")
        record = BootRecord(mode, append, iommu_device, time.monotonic() - t0)
        record.cmdline = self.cmdline()
        self.boots.append(record)
        TIMINGS.add(f"{self.name} boot {len(self.boots)} ({mode})", record.seconds)
        self.log(f"guest boot {len(self.boots)} ({mode}) took {record.seconds:.1f}s: {record.cmdline}")
        return record

    def reboot(
        self,
        *,
        via_grub: bool = False,
        append: str | None = None,
        iommu_device: bool = True,
        timeout: float = 180,
    ) -> BootRecord:
        """The guest reboots itself (`systemctl reboot`); QEMU exits at the reset and is started again
        with the boot path asked for: the disk, NVRAM and hardware stay the same."""
        old = self.boot_id
        t0 = time.monotonic()
        self._request_shutdown("reboot", timeout)
        TIMINGS.add(f"{self.name} guest shutdown", time.monotonic() - t0)
        rec = self.boot(via_grub=via_grub, append=append, iommu_device=iommu_device, timeout=timeout)
        if self.boot_id == old:
            raise VmError("the guest came back with the same boot id: it did not reboot")
        return rec

    def shutdown(self, timeout: float = 120) -> None:
        """Power the guest off cleanly; kill QEMU if that does not work (it never outlives the test)."""
        try:
            if self.running:
                self._request_shutdown("poweroff", timeout)
        except Exception as e:
            self.log(f"clean shutdown failed ({e}); killing QEMU")
        finally:
            self.kill()

    def kill(self) -> None:
        if self._proc is not None:
            kill_group(self._proc)
        self._close()

    def _request_shutdown(self, verb: str, timeout: float) -> None:
        if not self.running:
            raise VmError("the guest is not running")
        # systemd may stop the agent before its reply leaves, so none is waited for: QEMU exiting (at
        # the guest's reset with -no-reboot, or at its power-off) is the proof that counts.
        self._send("run", argv=["systemctl", "--no-block", verb], timeout=30)
        assert self._proc is not None
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VmError(f"the guest did not {verb} within {timeout}s\n{self.console_tail()}") from None
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._parts, self._lines = [], []

    # -- agent protocol ----------------------------------------------------------------------------

    def _connect(self, path: Path, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive()
            if path.exists():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(path))
                except OSError:
                    s.close()
                else:
                    self._sock = s
                    return
            time.sleep(0.05)
        raise VmError("QEMU did not open the agent socket in time")

    def _check_alive(self) -> None:
        if self._proc is None:
            raise VmError("the guest is not running")
        if self._proc.poll() is not None:
            out = self._proc.stdout.read().decode(errors="replace") if self._proc.stdout else ""
            raise VmError(f"QEMU exited with {self._proc.returncode}: {out}\n{self.console_tail()}")

    def _wait_for(self, match: Any, deadline: float, what: str) -> dict[str, Any]:
        assert self._sock is not None
        while True:
            while self._lines:
                line = self._lines.pop(0)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and match(msg):
                    return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VmError(f"timed out waiting for {what}\n{self.console_tail()}")
            self._check_alive()
            if self._stall is not None and self._stall.stalled():
                raise BootStalled(self._stall.last_line(), time.monotonic() - self._stall.t0)
            self._sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                self._check_alive()
                raise VmError(f"the agent connection closed while waiting for {what}")
            # Only the new chunk is scanned: a large get_file arrives as one long line.
            while (i := chunk.find(b"\n")) >= 0:
                self._parts.append(chunk[:i])
                self._lines.append(b"".join(self._parts))
                self._parts, chunk = [], chunk[i + 1 :]
            if chunk:
                self._parts.append(chunk)

    def _send(self, op: str, wait: float = 60, **fields: Any) -> int:
        if self._sock is None:
            raise VmError("the guest is not running")
        rid = self._next_id
        self._next_id += 1
        self._sock.settimeout(wait)  # sendall's timeout bounds the whole send
        self._sock.sendall(json.dumps({"id": rid, "op": op, **fields}).encode() + b"\n")
        return rid

    def request(self, op: str, wait: float, **fields: Any) -> dict[str, Any]:
        """One request to the guest agent; `wait` bounds the wait for its reply."""
        if self._sock is None:
            raise VmError("the guest is not running")
        rid = self._send(op, wait, **fields)
        reply = self._wait_for(lambda m: m.get("id") == rid, time.monotonic() + wait, f"the reply to {op}")
        if not reply.get("ok"):
            raise VmError(f"guest agent: {op} failed: {reply.get('error')}")
        return reply

    # -- the API tests use -------------------------------------------------------------------------

    def run(
        self,
        cmd: str | Sequence[str],
        timeout: float = 120,
        *,
        env: Mapping[str, str] | None = None,
        input: str | bytes | None = None,
    ) -> RunResult:
        """Run a command in the guest as root. A string runs through `sh -c`."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        data = input.encode() if isinstance(input, str) else input
        reply = self.request(
            "run",
            timeout + 15,
            argv=argv,
            timeout=timeout,
            env=dict(env or {}),
            input=base64.b64encode(data).decode() if data else None,
        )
        out = base64.b64decode(reply["stdout"]).decode(errors="replace")
        err = base64.b64decode(reply["stderr"]).decode(errors="replace")
        if reply.get("timed_out"):
            err += f"\n[harness] timed out after {timeout}s in the guest"
        return RunResult(int(reply["rc"]), out, err)

    def put_file(self, path: str, data: bytes | str, mode: int = 0o644, chunk: int = 1 << 20) -> None:
        raw = data.encode() if isinstance(data, str) else data
        first = True
        for off in range(0, max(len(raw), 1), chunk):
            piece = raw[off : off + chunk]
            self.request(
                "put",
                120,
                path=path,
                data=base64.b64encode(piece).decode(),
                mode=mode,
                append=not first,
            )
            first = False

    def get_file(self, path: str) -> bytes:
        return base64.b64decode(self.request("get", 120, path=path)["data"])

    def cmdline(self) -> str:
        return self.get_file("/proc/cmdline").decode().strip()

    def runner(self) -> GuestRunner:
        return GuestRunner(self)

    def console_tail(self, lines: int = 60) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "----- guest console (tail) -----\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class GuestRunner:
    """bootstrap.host.Runner that runs commands in the guest: the product's own code can drive it."""

    vm: Vm
    executes: ClassVar[bool] = True

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        res = self.vm.run(list(argv), timeout=timeout or 3600, env=env, input=input)
        return CommandResult(tuple(argv), res.rc, res.stdout, res.stderr)
