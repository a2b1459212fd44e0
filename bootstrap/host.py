"""The host model: one root directory and one command runner through which everything is done.

`Host` is what the product asks of a machine. `LiveHost` is this one: the root is `/` and commands
run for real. `TreeHost` is any other root (the demo, `--root DIR`): nothing on this machine is read,
written or run, paths resolve inside the tree and the runner records commands instead of running
them. The test machinery's simulating host (hostsim.host) is a TreeHost with its seams added.
"""

from __future__ import annotations

import _thread  # threading's lock without threading's import, which every doctor run would pay
import os
import shlex
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple, Protocol

from bootstrap.errors import VectorlayError
from bootstrap.fsutil import NotRegularFile, fault_point, read_regular

# Above any machine (x86-64's 52-bit physical address space is 4 PiB): a garbled figure.
_MAX_SANE_MEMORY = 1 << 52
# Linux's own limit (MAXSYMLINKS): a loop of links is an error, not a hang.
_MAX_LINK_HOPS = 40


def resolve_in_root(root: Path, p: str, *, follow: bool = True) -> Path:
    """`p` (absolute, as seen on the host) inside `root`, as a chroot at `root` would resolve it."""
    todo = [c for c in reversed(p.split("/")) if c and c != "."]
    out: list[str] = []
    hops = 0
    base = str(root)
    while todo:
        name = todo.pop()
        if name == "..":
            if out:
                out.pop()
            continue
        if not todo and not follow:
            out.append(name)
            break
        candidate = os.path.join(base, *out, name)
        try:
            st = os.lstat(candidate)
        except OSError:
            # Missing (or under a non-directory): nothing below it can be a link either.
            out.append(name)
            continue
        if not stat.S_ISLNK(st.st_mode):
            out.append(name)
            continue
        hops += 1
        if hops > _MAX_LINK_HOPS:
            raise VectorlayError(
                f"{p}: too many levels of symbolic links in the tree {root}",
                "remove the symlink loop and re-run",
            )
        target = os.readlink(candidate)
        if target.startswith("/"):
            out = []
        todo.extend(c for c in reversed(target.split("/")) if c and c != ".")
    return root.joinpath(*out)


class CommandResult(NamedTuple):
    """What a command returned: its exit code and its two output streams."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Runner(Protocol):
    @property
    def executes(self) -> bool:
        """The commands really execute on some machine (and their answers are its answers)."""
        ...

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult: ...


class SubprocessRunner:
    """Runs commands on this machine. Only ever used with the root `/`."""

    executes = True

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        # Imported here: the doctor on a node without agents, and every tree root, runs no command.
        import subprocess

        full_env = None if env is None else {**os.environ, **env}
        try:
            proc = subprocess.run(
                list(argv),
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=full_env,
                check=False,
            )
        except FileNotFoundError:
            return CommandResult(tuple(argv), 127, "", f"{argv[0]}: command not found")
        except subprocess.TimeoutExpired:
            return CommandResult(tuple(argv), 124, "", f"{argv[0]}: timed out after {timeout}s")
        return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


Handler = Callable[["Host", tuple[str, ...]], CommandResult]


@dataclass
class RecordingRunner:
    """Records every command instead of running it.

    `handlers` maps a program name (argv[0]'s basename) to a function that simulates it against the
    host tree; a command without a handler "succeeds" with no output. Tests and the demo register
    simulators (systemctl, modprobe, ...) where a stage needs an answer.
    """

    # Not a field: what a recording runner is, not a setting of one.
    executes: ClassVar[bool] = False

    host: Host | None = None
    handlers: dict[str, Handler] = field(default_factory=dict)
    commands: list[tuple[str, ...]] = field(default_factory=list)
    _lock: _thread.LockType = field(default_factory=_thread.allocate_lock, repr=False)

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        cmd = tuple(argv)
        with self._lock:
            self.commands.append(cmd)
        handler = self.handlers.get(os.path.basename(cmd[0]))
        if handler is not None and self.host is not None:
            return handler(self.host, cmd)
        return CommandResult(cmd, 0, "", "")

    def render(self) -> list[str]:
        return [shlex.join(c) for c in self.commands]


# Queries change nothing: killing the run at one is the same as killing it after the change before,
# and their number varies with timing (health polls), so they are not fault points. The VM-attach
# probe's QEMU (bootstrap.vmprobe) leaves nothing behind that a re-run would have to repair.
_QUERY_PROGRAMS = frozenset({"journalctl", "dmesg", "ping", "qemu-system-x86_64"})
_SYSTEMCTL_QUERIES = frozenset(
    {"is-active", "is-enabled", "is-failed", "is-system-running", "show", "status", "cat", "list-units"}
)


def _changes_something(argv: Sequence[str]) -> bool:
    prog = os.path.basename(argv[0]) if argv else ""
    if prog in _QUERY_PROGRAMS:
        return False
    if prog == "ip":
        return "show" not in argv[1:]
    if prog == "systemctl":
        verb = next((a for a in argv[1:] if not a.startswith("-")), "")
        return verb not in _SYSTEMCTL_QUERIES
    return True


class Host(Protocol):
    """What the product asks of the machine it works on: one root, every path through `path()`,
    every command through `run()`. `LiveHost` is this machine; `TreeHost` a directory standing for
    one (tests, the demo, `--root DIR`), where nothing outside the tree is read, written or run."""

    @property
    def root(self) -> Path: ...

    @property
    def runner(self) -> Runner: ...

    @property
    def is_live(self) -> bool:
        """The root is this machine's own `/`: its device nodes, udev database and hostname are real."""
        ...

    @property
    def runs_commands(self) -> bool:
        """Commands really execute (and answer), instead of being recorded."""
        ...

    @property
    def root_uid(self) -> int:
        """The uid that plays root: the owner a root-owned file has on this host."""
        ...

    def path(self, p: str | os.PathLike[str], *, follow: bool = True) -> Path: ...

    def to_host(self, real: Path) -> str: ...

    def exists(self, p: str) -> bool: ...

    def read_text(self, p: str, default: str | None = None) -> str: ...

    def readlink_name(self, p: str) -> str | None: ...

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult: ...

    def sysfs_write(self, p: str, data: str) -> None: ...

    def memory_total_bytes(self) -> int: ...

    def disk_free_bytes(self, p: str) -> int: ...


class _RootedHost:
    """What both hosts share once `path()` is defined: reads, commands, memory and disk figures."""

    runner: Runner

    def path(self, p: str | os.PathLike[str], *, follow: bool = True) -> Path:
        raise NotImplementedError

    def exists(self, p: str) -> bool:
        return self.path(p).exists()

    def read_text(self, p: str, default: str | None = None) -> str:
        """The file at host path `p` (bounded; a FIFO or a directory there is not read). With a
        `default`, a missing, unreadable or non-regular file gives the default."""
        try:
            return read_regular(self.path(p)).decode(errors="replace")
        except (FileNotFoundError, NotADirectoryError, PermissionError, NotRegularFile, IsADirectoryError):
            if default is None:
                raise
            return default

    def readlink_name(self, p: str) -> str | None:
        """Basename of a symlink's target (sysfs `driver`, `iommu_group`), or None if absent."""
        try:
            return os.path.basename(os.readlink(self.path(p, follow=False)))
        except (FileNotFoundError, NotADirectoryError, OSError):
            return None

    @property
    def runs_commands(self) -> bool:
        return self.runner.executes

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        if _changes_something(argv):
            fault_point("run " + shlex.join(argv))
        return self.runner.run(argv, input=input, timeout=timeout, env=env)

    def _write_attribute(self, p: str, flags: int, data: str) -> None:
        # One write() call, unbuffered: sysfs takes an attribute's value from a single write.
        fd = os.open(self.path(p), flags)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    # Memory comes from <root>/proc/meminfo exactly as on a live box (MemTotal is what psutil and
    # free(1) report as total).
    def memory_total_bytes(self) -> int:
        """MemTotal in bytes. Raises ValueError when /proc/meminfo does not hold a sane one."""
        text = self.read_text("/proc/meminfo")
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key != "MemTotal":
                continue
            words = rest.split()
            if len(words) == 2 and words[1] == "kB" and words[0].isascii() and words[0].isdigit():
                total = int(words[0]) * 1024
                if 0 < total < _MAX_SANE_MEMORY:
                    return total
            raise ValueError(f"/proc/meminfo: MemTotal is not a size in kB: {rest.strip()[:40]!r}")
        raise ValueError("/proc/meminfo has no MemTotal line")

    def disk_free_bytes(self, p: str) -> int:
        """Free bytes on the filesystem holding host path `p` (its nearest existing ancestor)."""
        real = self.path(p)
        while not real.exists() and real != real.parent:
            real = real.parent
        # What df and psutil call "available": blocks an unprivileged writer may still use. statvfs
        # directly: importing psutil alone costs the doctor ~40 ms on every run.
        st = os.statvfs(real)
        return st.f_bavail * st.f_frsize


class LiveHost(_RootedHost):
    """This machine: the root `/`, commands run with subprocess, sysfs writes reach the kernel."""

    is_live = True
    root_uid = 0

    def __init__(self, runner: Runner | None = None) -> None:
        self.root = Path("/")
        self.runner = runner if runner is not None else SubprocessRunner()

    def __repr__(self) -> str:
        return "LiveHost()"

    def path(self, p: str | os.PathLike[str], *, follow: bool = True) -> Path:
        s = os.fspath(p)
        if not s.startswith("/"):
            raise ValueError(f"host paths are absolute, got {s!r}")
        return Path(s)

    def to_host(self, real: Path) -> str:
        return str(real)

    def sysfs_write(self, p: str, data: str) -> None:
        """Write a sysfs attribute (`driver_override`, `drivers_probe`, ...): the kernel acts on it."""
        self._write_attribute(p, os.O_WRONLY, data)


class TreeHost(_RootedHost):
    """A directory standing for a whole host. Paths resolve inside it as in a chroot, and commands
    go to `runner`: by default a RecordingRunner, so that nothing on this machine is run."""

    is_live = False

    def __init__(self, root: Path | str, runner: Runner | None = None) -> None:
        resolved = Path(root).resolve()
        if resolved == Path("/"):
            # A tree at / would be this machine with its commands silently dropped.
            raise ValueError("a tree host needs a directory other than '/'; the real root is LiveHost")
        self.root = resolved
        if runner is None:
            runner = RecordingRunner()
        if isinstance(runner, RecordingRunner) and runner.host is None:
            runner.host = self
        self.runner = runner

    def __repr__(self) -> str:
        return f"TreeHost(root={str(self.root)!r})"

    @property
    def root_uid(self) -> int:
        # The tree stands for a whole host whose files were created by whoever owns the tree.
        return self.root.stat().st_uid

    def path(self, p: str | os.PathLike[str], *, follow: bool = True) -> Path:
        """Map an absolute host path such as `/etc/default/grub` into the root.

        The path is resolved the way the kernel resolves it inside a chroot: a symlink's absolute
        target starts again at the root and `..` stops at it, so no link planted in the tree
        (`etc/modprobe.d -> /etc/modprobe.d`) leads a write, an append or a removal out of it. The
        result holds no symlink, except the last component when `follow` is False: what a rename, an
        unlink or a readlink of the link itself needs.
        """
        s = os.fspath(p)
        if not s.startswith("/"):
            raise ValueError(f"host paths are absolute, got {s!r}")
        return resolve_in_root(self.root, s, follow=follow)

    def to_host(self, real: Path) -> str:
        """The inverse of path(): a path inside the tree back to its host form."""
        return "/" + str(Path(real).relative_to(self.root))

    def sysfs_write(self, p: str, data: str) -> None:
        """A tree has no kernel behind its sysfs: the data just lands in the file."""
        self._write_attribute(p, os.O_WRONLY | os.O_TRUNC, data)


def host_for(root: Path | str, runner: Runner | None = None) -> Host:
    """The plain host for `root`: this machine for `/`, a tree for any other directory."""
    if Path(root).resolve() == Path("/"):
        return LiveHost(runner)
    return TreeHost(root, runner)


HostFactory = Callable[[Path], Host]

# What the commands open their --root with: a plain host, live or tree. hostsim replaces it to hand
# the real CLI, run against a tree by a test or the demo, a host whose systemctl, modprobe and sysfs
# writes are answered the way a booted box would answer them.
_host_factory: HostFactory = host_for


def set_host_factory(factory: HostFactory | None) -> HostFactory:
    """Make `open_host` build hosts with `factory` (None: `host_for`); returns the one it replaces."""
    global _host_factory
    previous, _host_factory = _host_factory, factory or host_for
    return previous


def open_host(root: Path | str) -> Host:
    """The host a command works on for --root `root`."""
    return _host_factory(Path(root))
