"""A `systemctl` simulator for host trees, registered as a RecordingRunner handler.

Unit state lives in the tree, the way systemd keeps it, so anything that reads the tree directly
agrees with what `systemctl` answers:

- a unit is *installed* when its file exists in /etc/systemd/system, /run/systemd/system,
  /usr/lib/systemd/system or /lib/systemd/system;
- *enabled* when a `<target>.wants/` (or `.requires/`) symlink to it exists under /etc/systemd/system,
  *masked* when /etc/systemd/system/<unit> is a symlink to /dev/null, *static* when it has no
  [Install] section;
- *active* when /run/hostsim/systemd/<unit> says so: the simulator's stand-in for the manager's
  runtime state, which a real box keeps in PID 1's memory and loses at reboot just like /run.

Exit codes and messages follow systemd 252 (Debian 12).

`Systemd` is the handler object: per-unit start hooks (the kernel simulator makes restarting
vectorlay-vfio-bind.service run the real bind code) and, with `spawn=True`, real daemons: starting a
service whose ExecStart binary exists in the tree runs it (with VECTORLAY_ROOT pointing at the tree),
`is-active` asks whether that process still lives, `stop` and `kill --signal=` signal it.
`stop` (and the stop half of `restart`) follows the unit's KillSignal= (default SIGTERM) and sends
SIGKILL once TimeoutStopSec= runs out (capped for tests), as systemd.kill(5) says. Only the main
process is signalled, which is KillMode=process (nomad.service's: the tasks it supervises outlive
it); the other units' daemons run no children of their own here.
A process that exits after `systemctl kill` is brought back when the unit's Restart= says so for
its exit (systemd.service(5): on-failure restarts on an unclean exit code or an unclean signal;
SIGHUP, SIGINT, SIGTERM and SIGPIPE are clean), at once instead of after RestartSec=;
`show -p MainPID --value` names the process systemd tracks (0 when none).
A spawned daemon is told its root on its command line (`--root <tree>`, appended to ExecStart; the
stand-ins also find it in VECTORLAY_ROOT, which marks the processes started for a tree), and runs
on the Python of this simulation as the node's /opt/vectorlay/venv when the tree has none of its own
(install.sh builds it on a real node).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bootstrap.host import CommandResult, Host, RecordingRunner
from hostsim import switches

UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
STATE_DIR = "/run/hostsim/systemd"
ETC = "/etc/systemd/system"
_UNIT_SUFFIXES = (".service", ".timer", ".socket", ".target", ".path", ".mount")

# systemctl's exit codes (LSB): 3 = not running / not active, 4 = no such unit, 5 = not loaded.
EXIT_INACTIVE = 3
EXIT_NO_UNIT = 4
EXIT_NOT_LOADED = 5


# A start hook returns None when the unit started, or the failing CommandResult.
StartHook = Callable[[Host, tuple[str, ...]], "CommandResult | None"]


@dataclass
class Systemd:
    hooks: dict[str, StartHook] = field(default_factory=dict)
    spawn: bool = False
    _procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    # Units whose main process was signalled by `systemctl kill`: an exit is judged by Restart=.
    _killed: set[str] = field(default_factory=set, repr=False)

    def __call__(self, host: Host, argv: tuple[str, ...]) -> CommandResult:
        return systemctl(host, argv, self)

    def pid_alive(self, pid: int) -> bool:
        proc = self._procs.get(pid)
        if proc is not None:
            return proc.poll() is None
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False

    def start(self, host: Host, unit: str, argv: tuple[str, ...]) -> CommandResult | None:
        hook = self.hooks.get(unit)
        if hook is not None:
            failed = hook(host, argv)
            if failed is not None:
                return failed
        if not self.spawn:
            return None
        exec_start = _exec_start(host, unit)
        if exec_start is None or not host.path(exec_start[0]).exists():
            return None
        self.stop(host, unit)
        _provide_venv(host)
        env = _service_env(host, unit)
        log = host.path(f"{STATE_DIR}/{unit}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [str(host.path(exec_start[0])), *exec_start[1:], "--root", str(host.root)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self._procs[proc.pid] = proc
        set_active_state(host, unit, f"active {proc.pid}")
        return None

    def stop(self, host: Host, unit: str, sig: int | None = None, wait: float | None = None) -> None:
        self._killed.discard(unit)
        pid = _pid(host, unit)
        if pid is None or not self.pid_alive(pid):
            return
        os.kill(pid, kill_signal(host, unit) if sig is None else sig)
        deadline = time.monotonic() + (min(stop_timeout(host, unit), MAX_STOP_WAIT) if wait is None else wait)
        while self.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        proc = self._procs.pop(pid, None)
        if proc is not None:
            proc.wait()

    def kill(self, host: Host, unit: str, sig: int) -> None:
        pid = _pid(host, unit)
        if pid is not None and self.pid_alive(pid):
            self._killed.add(unit)
            os.kill(pid, sig)

    def settle(self, host: Host, unit: str) -> None:
        """Restart= after `systemctl kill`: a main process that exited is started again when the
        unit's policy covers how it exited."""
        if unit not in self._killed:
            return
        pid = _pid(host, unit)
        if pid is None:
            self._killed.discard(unit)
            return
        if self.pid_alive(pid):
            return
        self._killed.discard(unit)
        proc = self._procs.pop(pid, None)
        code = proc.wait() if proc is not None else None
        if code is not None and restarts(unit_value(host, unit, "Restart") or "no", code):
            self.start(host, unit, ("systemctl", "start", unit))

    def stop_all(self, host: Host) -> None:
        """End every daemon this simulator started (a test's teardown, a simulated power-off)."""
        state_dir = host.path(STATE_DIR)
        for f in sorted(state_dir.iterdir()) if state_dir.is_dir() else []:
            if not f.name.endswith(".log"):
                self.stop(host, f.name)


VENV = "/opt/vectorlay/venv"


def _provide_venv(host: Host) -> None:
    venv = host.path(VENV, follow=False)
    if venv.exists() or venv.is_symlink():
        return
    venv.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(sys.prefix, venv)


PROXY_VARIABLES = (
    "https_proxy",
    "HTTPS_PROXY",
    "http_proxy",
    "HTTP_PROXY",
    "no_proxy",
    "NO_PROXY",
    "all_proxy",
)


def _environment_files(host: Host, unit: str) -> dict[str, str]:
    """The variables of the unit's EnvironmentFile= lines, read as systemd.exec(5) says: one
    KEY=VALUE per line, empty lines and lines starting with # or ; ignored, a value in double or
    single quotes unquoted, and a file name prefixed with "-" skipped when the file does not exist."""
    path = unit_file(host, unit)
    out: dict[str, str] = {}
    if path is None:
        return out
    for raw in path.read_text(errors="replace").splitlines():
        key, sep, value = raw.strip().partition("=")
        if not sep or key.strip() != "EnvironmentFile":
            continue
        name = value.strip()
        optional = name.startswith("-")
        try:
            text = host.path(name.lstrip("-")).read_text()
        except FileNotFoundError:
            if optional:
                continue
            raise
        for line in text.splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            k, eq, v = line.partition("=")
            if eq:
                v = v.strip()
                if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
                    v = v[1:-1]
                out[k.strip()] = v
    return out


def _service_env(host: Host, unit: str | None = None) -> dict[str, str]:
    """The environment a service starts with: the caller's, without hostsim's sitecustomize (the
    agents' Python runs with -E and ignores it anyway; the stand-in daemons' would not) and without
    the installer's fault points, which count the installer's own steps. The simulator stays asked
    for: the node-agent release hostsim builds takes it where hostsim is importable (hostsim.agents)."""
    # A service never inherits the proxy variables of whoever ran systemctl: only what its unit gives.
    env = {k: v for k, v in os.environ.items() if k not in switches.FAULT_ENV and k not in PROXY_VARIABLES}
    if unit is not None:
        env.update(_environment_files(host, unit))
    env["VECTORLAY_ROOT"] = str(host.root)
    site = str(switches.SITE_DIR)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != site]
    if rest:
        env["PYTHONPATH"] = os.pathsep.join(rest)
    else:
        env.pop("PYTHONPATH", None)
    return env


def unit_value(host: Host, unit: str, key: str) -> str | None:
    """The last value the unit file gives `key` (drop-ins are not read: none of ours sets a key
    this simulator looks at)."""
    path = unit_file(host, unit)
    if path is None:
        return None
    found = None
    for raw in path.read_text(errors="replace").splitlines():
        k, sep, value = raw.strip().partition("=")
        if sep and k.strip() == key:
            found = value.strip()
    return found


def _exec_start(host: Host, unit: str) -> list[str] | None:
    value = unit_value(host, unit, "ExecStart")
    if value is None:
        return None
    words = shlex.split(value.lstrip("-@:+!"))
    return words or None


# A test's wait for a stopping daemon; a real TimeoutStopSec= (nomad's 300 s) is longer.
MAX_STOP_WAIT = 30.0


def kill_signal(host: Host, unit: str) -> int:
    """KillSignal= (systemd.kill(5): "Defaults to SIGTERM")."""
    name = unit_value(host, unit, "KillSignal") or "SIGTERM"
    return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])


def stop_timeout(host: Host, unit: str) -> float:
    """TimeoutStopSec= in seconds (plain seconds or `<n>min`; DefaultTimeoutStopSec=90s otherwise)."""
    value = (unit_value(host, unit, "TimeoutStopSec") or "90").strip()
    if value.endswith("min"):
        return float(value[:-3]) * 60
    return float(value.rstrip("s"))


# Exits Restart=on-failure counts as clean (systemd.service(5)): status 0 and these signals.
_CLEAN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})


def restarts(policy: str, returncode: int) -> bool:
    """Whether Restart=`policy` starts a service again after it exited with `returncode`
    (Popen's: negative for a signal)."""
    clean = returncode == 0 or (returncode < 0 and -returncode in _CLEAN_SIGNALS)
    if policy == "always":
        return True
    if policy == "on-failure":
        return not clean
    if policy == "on-abnormal":
        return returncode < 0 and not clean
    return False


def _pid(host: Host, unit: str) -> int | None:
    try:
        words = host.path(f"{STATE_DIR}/{unit}").read_text().split()
    except OSError:
        return None
    return int(words[1]) if len(words) > 1 and words[1].isdigit() else None


def install(runner: RecordingRunner, sim: Systemd | None = None) -> RecordingRunner:
    """Register the simulator on `runner` (returned for chaining)."""
    runner.handlers["systemctl"] = sim or Systemd()
    return runner


def unit_name(name: str) -> str:
    return name if name.endswith(_UNIT_SUFFIXES) else f"{name}.service"


def unit_file(host: Host, unit: str) -> Path | None:
    for d in UNIT_DIRS:
        p = host.path(f"{d}/{unit}", follow=False)
        if p.is_symlink() or p.exists():
            return p
    return None


def _install_section(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section != "Install" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).extend(value.split())
    return out


def _is_masked(host: Host, unit: str) -> bool:
    p = host.path(f"{ETC}/{unit}", follow=False)
    return p.is_symlink() and os.readlink(p) == "/dev/null"


def _wants_links(host: Host, unit: str) -> list[Path]:
    etc = host.path(ETC)
    try:
        dirs = [d for d in etc.iterdir() if d.name.endswith((".wants", ".requires")) and d.is_dir()]
    except OSError:
        return []
    return [d / unit for d in dirs if (d / unit).is_symlink() or (d / unit).exists()]


def enabled_state(host: Host, unit: str) -> str | None:
    """What `systemctl is-enabled` prints, or None when there is no such unit file."""
    if _is_masked(host, unit):
        return "masked"
    path = unit_file(host, unit)
    if path is None:
        return None
    if _wants_links(host, unit):
        return "enabled"
    install_keys = _install_section(path.read_text(errors="replace"))
    if not any(install_keys.get(k) for k in ("WantedBy", "RequiredBy", "Also", "Alias")):
        return "static"
    return "disabled"


def active_state(host: Host, unit: str, sim: Systemd | None = None) -> str:
    try:
        words = host.path(f"{STATE_DIR}/{unit}").read_text().split()
    except OSError:
        return "inactive"
    # A unit whose file was removed while it ran keeps running until stopped, as on a real box.
    if not words:
        return "inactive"
    if len(words) > 1 and words[1].isdigit():
        # A spawned daemon: active while its process lives; one that exited on its own failed.
        pid = int(words[1])
        alive = sim.pid_alive(pid) if sim is not None else Systemd().pid_alive(pid)
        return words[0] if alive else "failed"
    return words[0]


def active_units(host: Host) -> set[str]:
    state_dir = host.path(STATE_DIR)
    if not state_dir.is_dir():
        return set()
    return {
        f.name
        for f in state_dir.iterdir()
        if not f.name.endswith(".log") and active_state(host, f.name) == "active"
    }


def set_active_state(host: Host, unit: str, state: str) -> None:
    path = host.path(f"{STATE_DIR}/{unit}")
    if state == "inactive":
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(state + "\n")


def _enable(host: Host, unit: str) -> tuple[bool, str]:
    path = unit_file(host, unit)
    if path is None:
        return False, f"Failed to enable unit: Unit file {unit} does not exist.\n"
    if _is_masked(host, unit):
        return False, f"Failed to enable unit: Unit file {ETC}/{unit} is masked.\n"
    install_keys = _install_section(path.read_text(errors="replace"))
    messages = []
    for key, suffix in (("WantedBy", ".wants"), ("RequiredBy", ".requires")):
        for target in install_keys.get(key, []):
            link = host.path(f"{ETC}/{target}{suffix}/{unit}", follow=False)
            if link.is_symlink():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(host.to_host(path), link)
            messages.append(f"Created symlink {ETC}/{target}{suffix}/{unit} → {host.to_host(path)}.\n")
    return True, "".join(messages)


def _disable(host: Host, unit: str) -> str:
    messages = []
    for link in _wants_links(host, unit):
        link.unlink()
        messages.append(f"Removed {host.to_host(link)}.\n")
    return "".join(messages)


def systemctl(host: Host, argv: tuple[str, ...], sim: Systemd | None = None) -> CommandResult:
    sim = sim or Systemd()
    signame = next((a.split("=", 1)[1] for a in argv if a.startswith(("--signal=", "-s="))), "SIGTERM")
    args = [a for a in argv[1:] if a not in ("--no-pager", "--system", "--no-block", "--no-ask-password")]
    quiet = any(a in ("-q", "--quiet") for a in args)
    now = "--now" in args
    # Options that take their value as the next word (`-p MainPID`) do not name units.
    words = [
        a
        for i, a in enumerate(args)
        if not a.startswith("-") and (i == 0 or args[i - 1] not in ("-p", "--property"))
    ]
    if not words:
        return CommandResult(argv, 1, "", "hostsim systemctl: listing units is not simulated\n")
    verb, names = words[0], [unit_name(n) for n in words[1:]]
    out: list[str] = []
    err: list[str] = []

    if verb == "daemon-reload":
        return CommandResult(argv, 0)
    if verb == "is-system-running":
        return CommandResult(argv, 0, "" if quiet else "running\n")
    if not names:
        return CommandResult(argv, 1, "", "Too few arguments.\n")
    for u in names:
        sim.settle(host, u)

    if verb == "show":
        props = [a.split("=", 1)[1] for a in args if a.startswith("--property=")]
        props += [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-p", "--property")]
        if props != ["MainPID"] or "--value" not in args or len(names) != 1:
            return CommandResult(argv, 1, "", "hostsim systemctl: only `show -p MainPID --value UNIT`\n")
        pid = _pid(host, names[0])
        alive = pid is not None and sim.pid_alive(pid)
        return CommandResult(argv, 0, f"{pid if alive else 0}\n")

    if verb == "is-active":
        states = [active_state(host, u, sim) for u in names]
        out = [f"{s}\n" for s in states]
        rc = 0 if "active" in states else EXIT_INACTIVE
    elif verb == "is-failed":
        states = [active_state(host, u, sim) for u in names]
        out = [f"{s}\n" for s in states]
        rc = 0 if "failed" in states else 1
    elif verb == "is-enabled":
        rc = 1
        for u in names:
            state = enabled_state(host, u)
            if state is None:
                err.append(f"Failed to get unit file state for {u}: No such file or directory\n")
                continue
            out.append(f"{state}\n")
            if state in ("enabled", "static", "alias", "indirect", "generated"):
                rc = 0
    elif verb in ("enable", "disable", "mask", "unmask"):
        rc = 0
        for u in names:
            if verb == "enable":
                ok, msg = _enable(host, u)
                err.append(msg)
                if not ok:
                    rc = 1
                    continue
                if now and active_state(host, u, sim) != "active":
                    failed = sim.start(host, u, argv)
                    if failed is not None:
                        set_active_state(host, u, "failed")
                        err.append(failed.stderr)
                        rc = 1
                    elif _pid(host, u) is None:
                        set_active_state(host, u, "active")
            elif verb == "disable":
                err.append(_disable(host, u))
                if now:
                    sim.stop(host, u)
                    set_active_state(host, u, "inactive")
            elif verb == "mask":
                link = host.path(f"{ETC}/{u}", follow=False)
                if link.exists() and not link.is_symlink():
                    err.append(f"Failed to mask unit: File {ETC}/{u} already exists.\n")
                    rc = 1
                    continue
                link.parent.mkdir(parents=True, exist_ok=True)
                link.unlink(missing_ok=True)
                os.symlink("/dev/null", link)
                err.append(f"Created symlink {ETC}/{u} → /dev/null.\n")
            elif _is_masked(host, u):
                host.path(f"{ETC}/{u}", follow=False).unlink()
                err.append(f"Removed {ETC}/{u}.\n")
    elif verb == "reset-failed":
        rc = 0
        for u in names:
            if active_state(host, u, sim) == "failed":
                set_active_state(host, u, "inactive")
    elif verb == "kill":
        rc = 0
        for u in names:
            sim.kill(host, u, getattr(signal, signame if signame.startswith("SIG") else f"SIG{signame}"))
    elif verb in ("start", "restart", "reload-or-restart", "try-restart", "stop", "reload"):
        rc = 0
        for u in names:
            if verb == "stop":
                sim.stop(host, u)
                set_active_state(host, u, "inactive")
                continue
            if unit_file(host, u) is None:
                err.append(f"Failed to {verb} {u}: Unit {u} not found.\n")
                rc = EXIT_NOT_LOADED
                continue
            if _is_masked(host, u):
                err.append(f"Failed to {verb} {u}: Unit {u} is masked.\n")
                rc = 1
                continue
            if verb == "try-restart" and active_state(host, u, sim) != "active":
                continue
            if verb == "start" and active_state(host, u, sim) == "active":
                continue  # starting an active unit does nothing
            if verb == "reload" and active_state(host, u, sim) == "active":
                continue
            failed = sim.start(host, u, argv)
            if failed is not None:
                set_active_state(host, u, "failed")
                err.append(failed.stderr)
                rc = failed.returncode or 1
                continue
            if _pid(host, u) is None:
                set_active_state(host, u, "active")
    else:
        return CommandResult(argv, 1, "", f"hostsim systemctl: verb {verb!r} is not simulated\n")

    if quiet:
        out = []
    return CommandResult(argv, rc, "".join(out), "".join(err))
