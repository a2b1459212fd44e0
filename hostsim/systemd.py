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
"""

from __future__ import annotations

import os
from pathlib import Path

from bootstrap.host import CommandResult, Host, RecordingRunner

UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
STATE_DIR = "/run/hostsim/systemd"
ETC = "/etc/systemd/system"
_UNIT_SUFFIXES = (".service", ".timer", ".socket", ".target", ".path", ".mount")

# systemctl's exit codes (LSB): 3 = not running / not active, 4 = no such unit, 5 = not loaded.
EXIT_INACTIVE = 3
EXIT_NO_UNIT = 4
EXIT_NOT_LOADED = 5


def install(runner: RecordingRunner) -> RecordingRunner:
    """Register the simulator on `runner` (returned for chaining)."""
    runner.handlers["systemctl"] = systemctl
    return runner


def unit_name(name: str) -> str:
    return name if name.endswith(_UNIT_SUFFIXES) else f"{name}.service"


def unit_file(host: Host, unit: str) -> Path | None:
    for d in UNIT_DIRS:
        p = host.path(f"{d}/{unit}")
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
    p = host.path(f"{ETC}/{unit}")
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


def active_state(host: Host, unit: str) -> str:
    try:
        state = host.path(f"{STATE_DIR}/{unit}").read_text().strip()
    except OSError:
        return "inactive"
    # A unit whose file was removed while it ran keeps running until stopped, as on a real box.
    return state or "inactive"


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
            link = host.path(f"{ETC}/{target}{suffix}/{unit}")
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


def systemctl(host: Host, argv: tuple[str, ...]) -> CommandResult:
    args = [a for a in argv[1:] if a not in ("--no-pager", "--system", "--no-block", "--no-ask-password")]
    quiet = any(a in ("-q", "--quiet") for a in args)
    now = "--now" in args
    words = [a for a in args if not a.startswith("-")]
    if not words:
        return CommandResult(argv, 1, "", "hostsim systemctl: listing units is not simulated\n")
    verb, names = words[0], [unit_name(n) for n in words[1:]]
    out: list[str] = []
    err: list[str] = []

    if verb == "daemon-reload":
        return CommandResult(argv, 0)
    if not names:
        return CommandResult(argv, 1, "", "Too few arguments.\n")

    if verb == "is-active":
        states = [active_state(host, u) for u in names]
        out = [f"{s}\n" for s in states]
        rc = 0 if "active" in states else EXIT_INACTIVE
    elif verb == "is-failed":
        states = [active_state(host, u) for u in names]
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
                if now:
                    set_active_state(host, u, "active")
            elif verb == "disable":
                err.append(_disable(host, u))
                if now:
                    set_active_state(host, u, "inactive")
            elif verb == "mask":
                link = host.path(f"{ETC}/{u}")
                if link.exists() and not link.is_symlink():
                    err.append(f"Failed to mask unit: File {ETC}/{u} already exists.\n")
                    rc = 1
                    continue
                link.parent.mkdir(parents=True, exist_ok=True)
                link.unlink(missing_ok=True)
                os.symlink("/dev/null", link)
                err.append(f"Created symlink {ETC}/{u} → /dev/null.\n")
            elif _is_masked(host, u):
                host.path(f"{ETC}/{u}").unlink()
                err.append(f"Removed {ETC}/{u}.\n")
    elif verb in ("start", "restart", "reload-or-restart", "try-restart", "stop", "reload"):
        rc = 0
        for u in names:
            if verb == "stop":
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
            if verb == "try-restart" and active_state(host, u) != "active":
                continue
            set_active_state(host, u, "active")
    else:
        return CommandResult(argv, 1, "", f"hostsim systemctl: verb {verb!r} is not simulated\n")

    if quiet:
        out = []
    return CommandResult(argv, rc, "".join(out), "".join(err))
