"""A stand-in for the Nomad client agent, for what the node relies on, as Nomad documents it.

Shipped as `bin/nomad` in the stand-in release (hostsim.agents embeds this file's source, run by the
system's python3, so it imports nothing outside the standard library). Each behaviour below comes
from a page of Nomad's documentation; `DOCS` quotes the sentence and tests/nomad/test_standin_nomad.py
pins the behaviour to it, so the stand-in does what Nomad does, not what the product would like.

- Stop signals (docs/configuration "leave_on_interrupt", "leave_on_terminate"; docs/deploy/nomad-agent
  "Stop an agent"): by default SIGINT and SIGTERM make the agent exit after committing its state;
  the allocations keep running. With `leave_on_interrupt` (SIGINT) or `leave_on_terminate` (SIGTERM)
  set and a `client { drain_on_shutdown {} }` block, the client drains first: every allocation is
  stopped. Without the block it leaves without draining (docs/configuration/client,
  "drain_on_shutdown Block").
- Exit status: 1 when it exits without leaving (command/agent/command.go, handleSignals), 0 after a
  graceful leave; systemd's `Restart=on-failure` therefore brings a client stopped with a plain
  signal back.
- SIGHUP reloads the configuration, SIGUSR1 prints metrics "without stopping the agent"
  (docs/deploy/nomad-agent "Signal handling"). Neither drains, neither writes any file.
- Restarting in place re-attaches to the running allocations (docs/upgrade "In Place: ... Running
  allocations will continue running uninterrupted").

Allocations are simulated VMs: real child processes (`hostsim-vm <alloc> <root>`) in their own
session, as Nomad's executors outlive the agent under `KillMode=process`. A test places one by
writing `<data_dir>/hostsim/placed/<alloc>` (what a server's placement is to a real client); the
client's state (alloc -> pid) lives in `<data_dir>/hostsim/state.json`, written atomically, as the
client's state database survives its restarts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

NAME, VERSION, BROKEN = "nomad", "0.0.0", False  # replaced when hostsim.agents builds a release

# The sentences each behaviour comes from (page -> quote), pinned by the stand-in's tests.
DOCS = {
    "leave_on_interrupt": (
        "https://developer.hashicorp.com/nomad/docs/configuration#leave_on_interrupt",
        "By default, any stop signal to an agent (interrupt or terminate) will cause the agent to exit "
        "after ensuring its internal state is committed to disk as needed.",
        "If this value is set to true on a client agent and the client is configured with "
        "drain_on_shutdown, the client will drain its workloads before shutting down.",
    ),
    "drain_on_shutdown": (
        "https://developer.hashicorp.com/nomad/docs/configuration/client#drain_on_shutdown-block",
        "By default drain_on_shutdown is not configured and clients will not drain on any signal.",
        "If drain_on_shutdown is configured, the node will drain itself when receiving the appropriate "
        "signal (SIGINT for leave_on_interrupt or SIGTERM on leave_on_terminate).",
    ),
    "signals": (
        "https://developer.hashicorp.com/nomad/docs/deploy/nomad-agent#signal-handling",
        "SIGHUP causes Nomad to reload its configuration.",
        "SIGUSR1 causes Nomad to print its metrics without stopping the agent.",
    ),
    "in_place_upgrade": (
        "https://developer.hashicorp.com/nomad/docs/upgrade",
        "In Place: The Nomad binary can be updated on existing hosts. Running allocations will "
        "continue running uninterrupted.",
    ),
    "task_kill_signal": (
        "https://developer.hashicorp.com/nomad/docs/job-declare/exit-signals",
        "Before Nomad terminates an application, it will send the SIGINT signal to the process.",
    ),
}

# Nomad's default task kill_timeout (docs/job-specification/task: `kill_timeout` "5s").
KILL_TIMEOUT = 5.0

# A simulated VM: runs until its task is killed (SIGINT, Nomad's default kill signal, or SIGTERM).
VM = """
import signal, sys, time
signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(3600)
"""
VM_MARK = "hostsim-vm"


def strip_comments(text: str) -> str:
    """HCL's comments (#, //, /* */) removed, outside quoted strings."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif c == "#" or text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _block(text: str, name: str) -> str | None:
    """The body of the first top-level-or-nested block `name { ... }`, braces balanced."""
    m = re.search(r"(?m)^\s*" + re.escape(name) + r"\s*\{", text)
    if m is None:
        return None
    depth, i = 1, m.end()
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[m.end() : i - 1]


def _top_level(text: str) -> str:
    """`text` with every block's body removed: what is left are the agent's own keys."""
    out, depth = [], 0
    for c in text:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth == 0:
            out.append(c)
    return "".join(out)


def settings(text: str) -> dict[str, object]:
    """What the agent takes from its configuration: the two leave_on_* flags (default false),
    whether the client block has drain_on_shutdown, and data_dir."""
    text = strip_comments(text)
    top = _top_level(text)

    def flag(key: str) -> bool:
        m = re.search(r"(?m)^\s*" + key + r"\s*=\s*(true|false)\b", top)
        return m is not None and m.group(1) == "true"

    data_dir = re.search(r'(?m)^\s*data_dir\s*=\s*"([^"]*)"', top)
    client = _block(text, "client")
    return {
        "leave_on_interrupt": flag("leave_on_interrupt"),
        "leave_on_terminate": flag("leave_on_terminate"),
        "drain_on_shutdown": client is not None and _block(client, "drain_on_shutdown") is not None,
        "data_dir": data_dir.group(1) if data_dir else None,
    }


def _config_text(path: str) -> str:
    """-config names a file or a directory (its *.hcl and *.json files, in lexical order)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith((".hcl", ".json")))
        return "\n".join(open(os.path.join(path, n)).read() for n in names)
    with open(path) as f:
        return f.read()


def _alive(pid: int, alloc: str) -> bool:
    """The allocation's process still runs (and the pid was not reused by something else)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, IndexError):
        return False
    return VM_MARK.encode() in argv and alloc.encode() in argv


class Client:
    def __init__(self, root: str, config_path: str) -> None:
        self.root = root
        self.config_path = config_path
        self.load_config()
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.allocs: dict[str, int] = {}

    def host(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def load_config(self) -> None:
        self.conf = settings(_config_text(self.host(self.config_path)))
        data_dir = self.conf["data_dir"] or "/var/lib/nomad"
        self.dir = self.host(os.path.join(str(data_dir), "hostsim"))

    def log(self, msg: str) -> None:
        print(f"nomad {VERSION}: {msg}", flush=True)

    def save(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        tmp = os.path.join(self.dir, "state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.allocs, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, "state.json"))

    def restore(self) -> None:
        """Re-attach to the allocations the previous agent ran (the client's state database)."""
        try:
            with open(os.path.join(self.dir, "state.json")) as f:
                saved = json.load(f)
        except FileNotFoundError:
            saved = {}
        for alloc, pid in sorted(saved.items()):
            if _alive(pid, alloc):
                self.allocs[alloc] = pid
                self.log(f"alloc {alloc}: re-attached to pid {pid}")
            else:
                self.log(f"alloc {alloc}: task is gone (pid {pid})")
        self.save()

    def place_new(self) -> None:
        inbox = os.path.join(self.dir, "placed")
        for alloc in sorted(os.listdir(inbox)) if os.path.isdir(inbox) else []:
            if alloc not in self.allocs:
                proc = subprocess.Popen(
                    [sys.executable, "-c", VM, VM_MARK, alloc, self.root],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                self.children[proc.pid] = proc
                self.allocs[alloc] = proc.pid
                self.save()
                self.log(f"alloc {alloc}: started pid {proc.pid}")
            os.unlink(os.path.join(inbox, alloc))
        for proc in self.children.values():
            proc.poll()  # reap a task that ended on its own

    def drain(self) -> None:
        """Stop every allocation: its kill signal (SIGINT), then SIGKILL after kill_timeout."""
        self.log("draining node")
        for pid in self.allocs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + KILL_TIMEOUT
        for alloc, pid in sorted(self.allocs.items()):
            while _alive(pid, alloc) and time.monotonic() < deadline:
                if pid in self.children:
                    self.children[pid].poll()
                time.sleep(0.02)
            if _alive(pid, alloc):
                os.kill(pid, signal.SIGKILL)
            if pid in self.children:
                self.children[pid].wait()
            self.log(f"alloc {alloc}: stopped by the drain")
        self.allocs.clear()
        self.save()
        self.log("drain complete")


def main(argv: list[str]) -> int:
    if "--version" in argv or argv[1:2] == ["version"]:
        print(f"Nomad v{VERSION}")
        return 0
    if BROKEN:
        sys.stderr.write(f"{NAME} {VERSION}: fatal: cannot start\n")
        return 1
    if argv[1:2] != ["agent"] or "-config" not in argv:
        sys.stderr.write("usage: nomad agent -config <path> [--root <tree>]\n")
        return 1
    config = argv[argv.index("-config") + 1]
    root = argv[argv.index("--root") + 1] if "--root" in argv else os.environ.get("VECTORLAY_ROOT", "/")
    client = Client(root, config)
    received: list[int] = []
    for handled in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(handled, lambda signum, _frame: received.append(signum))
    client.log("client started")
    client.restore()
    while True:
        client.place_new()
        while received:
            sig = received.pop(0)
            if sig == signal.SIGHUP:
                client.load_config()
                client.log("reloaded configuration")
                continue
            if sig == signal.SIGUSR1:
                sys.stderr.write(
                    f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] nomad.client.allocations.running: "
                    f"{len(client.allocs)}\n"
                )
                sys.stderr.flush()
                continue
            leave = client.conf["leave_on_interrupt" if sig == signal.SIGINT else "leave_on_terminate"]
            if not leave:
                client.save()
                client.log(f"caught {signal.Signals(sig).name}; exiting without leaving")
                return 1
            client.log(f"caught {signal.Signals(sig).name}; gracefully shutting down agent")
            if client.conf["drain_on_shutdown"]:
                client.drain()
            client.log("left the cluster")
            return 0
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main(sys.argv))


# --- For the tests that run it (on the host tree's root) -------------------------------------------


def place(root: str, data_dir: str, alloc: str, timeout: float = 10.0) -> int:
    """Place allocation `alloc` on the running client and return its task's pid once it runs."""
    base = os.path.join(root, data_dir.lstrip("/"), "hostsim")
    os.makedirs(os.path.join(base, "placed"), exist_ok=True)
    open(os.path.join(base, "placed", alloc), "w").close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = allocations(root, data_dir).get(alloc)
        if pid is not None:
            return pid
        time.sleep(0.02)
    raise TimeoutError(f"the stand-in nomad under {root} did not start allocation {alloc}")


def allocations(root: str, data_dir: str) -> dict[str, int]:
    """The allocations the client's state holds (alloc -> task pid)."""
    try:
        with open(os.path.join(root, data_dir.lstrip("/"), "hostsim", "state.json")) as f:
            saved: dict[str, int] = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return saved


def running_tasks(root: str) -> dict[str, int]:
    """Every simulated VM of the tree `root` that runs, found in /proc (alloc -> pid)."""
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if VM_MARK.encode() in argv and root.encode() in argv:
            alloc = argv[argv.index(VM_MARK.encode()) + 1].decode()
            if _alive(int(entry), alloc):
                found[alloc] = int(entry)
    return found


def kill_tasks(root: str) -> None:
    """A test's teardown: no simulated VM of `root` outlives it."""
    for pid in running_tasks(root).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
