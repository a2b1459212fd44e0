"""IOMMU arguments on the kernel command line through a GRUB drop-in.

grub-mkconfig builds the kernel command line by sourcing /etc/default/grub and then every
/etc/default/grub.d/*.cfg in glob order, so the value that reaches the kernel is whatever the last
assignment left. Ubuntu cloud images ship 50-cloudimg-settings.cfg, which sets
GRUB_CMDLINE_LINUX_DEFAULT outright: an edit to /etc/default/grub would be silently lost there. The
drop-in 99-vectorlay-iommu.cfg is sourced last and appends, and only the arguments the effective value
does not already carry, so none is ever duplicated.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from bootstrap import platform
from bootstrap.errors import VectorlayError
from bootstrap.host import Host
from bootstrap.plan import Change, Command, FileChange, Removal, backup_path
from bootstrap.templating import render

DEFAULT_GRUB = "/etc/default/grub"
GRUB_D = "/etc/default/grub.d"
DROPIN = f"{GRUB_D}/99-vectorlay-iommu.cfg"
CMDLINE_VARS = ("GRUB_CMDLINE_LINUX", "GRUB_CMDLINE_LINUX_DEFAULT")

# systemd-boot records itself in this EFI variable (the Boot Loader Interface); GRUB does not.
SYSTEMD_BOOT_EFIVAR = "/sys/firmware/efi/efivars/LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
SYSTEMD_BOOT_CONFS = ("/boot/efi/loader/loader.conf", "/efi/loader/loader.conf", "/boot/loader/loader.conf")
GRUB_CFGS = ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg")
SBIN_DIRS = platform.SBIN_DIRS


def iommu_args(cpu_vendor: str | None, *, vfio_pci_builtin: bool = False) -> list[str]:
    """The arguments passthrough needs: AMD's IOMMU is on by default, Intel's must be asked for.

    With vfio-pci built into the kernel, modprobe.d options never apply to it, so its D3cold
    workaround has to travel on the command line instead.
    """
    args = platform.iommu_args(cpu_vendor)
    if vfio_pci_builtin:
        args.append("vfio_pci.disable_idle_d3=1")
    return args


# --- a small evaluator for the shell GRUB's defaults files are written in -----------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BLANK = " \t"


class _Shell:
    """Evaluates the assignments of a POSIX shell file the way `.` would, for the subset defaults
    files use: NAME=word, NAME+=word, `export`, '…' and "…" quoting, backslashes, $NAME and ${NAME}.
    Command substitutions are not run (they cannot matter for the kernel arguments we look for);
    a line that runs a command is skipped, and its prefix assignments do not persist, as in bash.
    """

    def __init__(self, text: str, env: dict[str, str]) -> None:
        self.s = text
        self.i = 0
        self.env = env

    def _peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def _skip_blanks(self) -> None:
        while True:
            c = self._peek()
            if c in _BLANK and c:
                self.i += 1
            elif c == "\\" and self.s.startswith("\\\n", self.i):
                self.i += 2
            else:
                return

    def _skip_comment(self) -> None:
        end = self.s.find("\n", self.i)
        self.i = len(self.s) if end < 0 else end

    def run(self) -> dict[str, str]:
        while self.i < len(self.s):
            self._statement()
        return self.env

    def _statement(self) -> None:
        self._skip_blanks()
        c = self._peek()
        if not c:
            return
        if c in "\n;":
            self.i += 1
            return
        if c == "#":
            self._skip_comment()
            return
        saved: dict[str, str | None] = {}
        assigned = False
        while True:
            self._skip_blanks()
            m = _NAME.match(self.s, self.i)
            if m and m.group() == "export" and self.s[m.end() : m.end() + 1] in (" ", "\t"):
                self.i = m.end()
                continue
            if m and (self.s.startswith("=", m.end()) or self.s.startswith("+=", m.end())):
                name = m.group()
                append = self.s[m.end()] == "+"
                self.i = m.end() + (2 if append else 1)
                value = self._word()
                saved.setdefault(name, self.env.get(name))
                self.env[name] = self.env.get(name, "") + value if append else value
                assigned = True
                continue
            break
        self._skip_blanks()
        c = self._peek()
        if c in ("", "\n", ";", "#"):
            if c == "#":
                self._skip_comment()
            return
        # A command follows: run nothing, and `A=b cmd` leaves A as it was.
        if assigned:
            for name, old in saved.items():
                if old is None:
                    self.env.pop(name, None)
                else:
                    self.env[name] = old
        while self._peek() not in ("", "\n", ";"):
            self._word()
            self._skip_blanks()

    def _expand(self) -> str:
        # at "$"
        self.i += 1
        c = self._peek()
        if c == "{":
            end = self.s.find("}", self.i)
            if end < 0:
                self.i = len(self.s)
                return ""
            name = self.s[self.i + 1 : end]
            self.i = end + 1
            return self.env.get(name, "") if _NAME.fullmatch(name) else ""
        if c == "(":
            depth = 0
            while self.i < len(self.s):
                ch = self.s[self.i]
                depth += ch == "("
                depth -= ch == ")"
                self.i += 1
                if depth == 0:
                    break
            return ""
        m = _NAME.match(self.s, self.i)
        if m:
            self.i = m.end()
            return self.env.get(m.group(), "")
        return "$"

    def _backtick(self) -> str:
        end = self.s.find("`", self.i + 1)
        self.i = len(self.s) if end < 0 else end + 1
        return ""

    def _word(self) -> str:
        out: list[str] = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\n;":
                break
            if c == "'":
                end = self.s.find("'", self.i + 1)
                end = len(self.s) if end < 0 else end
                out.append(self.s[self.i + 1 : end])
                self.i = end + 1
            elif c == '"':
                self.i += 1
                while self.i < len(self.s) and self.s[self.i] != '"':
                    d = self.s[self.i]
                    if d == "\\" and self.i + 1 < len(self.s):
                        nxt = self.s[self.i + 1]
                        if nxt == "\n":
                            self.i += 2
                        elif nxt in '$`"\\':
                            out.append(nxt)
                            self.i += 2
                        else:
                            out.append(d)
                            self.i += 1
                    elif d == "$":
                        out.append(self._expand())
                    elif d == "`":
                        out.append(self._backtick())
                    else:
                        out.append(d)
                        self.i += 1
                self.i += 1
            elif c == "\\":
                nxt = self.s[self.i + 1 : self.i + 2]
                if nxt != "\n":
                    out.append(nxt)
                self.i += 2
            elif c == "$":
                out.append(self._expand())
            elif c == "`":
                out.append(self._backtick())
            else:
                out.append(c)
                self.i += 1
        return "".join(out)


def evaluate_shell(text: str, env: dict[str, str] | None = None) -> dict[str, str]:
    return _Shell(text, dict(env or {})).run()


def sourced_files(host: Host) -> list[str]:
    """What grub-mkconfig sources, in its order: /etc/default/grub, then grub.d/*.cfg sorted."""
    files = [DEFAULT_GRUB] if host.path(DEFAULT_GRUB).is_file() else []
    try:
        names = sorted(os.listdir(host.path(GRUB_D)))
    except OSError:
        names = []
    files += [f"{GRUB_D}/{n}" for n in names if n.endswith(".cfg") and host.path(f"{GRUB_D}/{n}").is_file()]
    return files


def effective_values(host: Host, *, with_dropin: bool = False) -> dict[str, str]:
    """GRUB_CMDLINE_LINUX{,_DEFAULT} after sourcing everything but (by default) the drop-in's path:
    the installer's file there is what is being computed, and anyone else's is backed up and replaced.
    """
    env: dict[str, str] = {}
    for f in sourced_files(host):
        if f == DROPIN and not with_dropin:
            continue
        env = evaluate_shell(host.read_text(f), env)
    return {k: env.get(k, "") for k in CMDLINE_VARS}


def missing_args(host: Host, wanted: list[str]) -> list[str]:
    values = effective_values(host)
    present = set(" ".join(values.values()).split())
    return [a for a in wanted if a not in present]


def render_dropin(args: list[str]) -> bytes:
    return render("grub-iommu.cfg.j2", args=args).encode()


# --- boot loader ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootLoader:
    kind: str  # "grub", "systemd-boot" or "unknown"
    update: tuple[str, ...] | None  # the command that regenerates grub.cfg
    evidence: str


def _find_tool(host: Host, name: str) -> str | None:
    for d in SBIN_DIRS:
        p = host.path(f"{d}/{name}")
        if p.is_file() and os.access(p, os.X_OK):
            return f"{d}/{name}"
    return None


def detect_loader(host: Host) -> BootLoader:
    sd_conf = next((p for p in SYSTEMD_BOOT_CONFS if host.path(p).is_file()), None)
    if host.exists(SYSTEMD_BOOT_EFIVAR):
        return BootLoader("systemd-boot", None, "the LoaderInfo EFI variable names systemd-boot")
    grub_cfg = next((p for p in GRUB_CFGS if host.path(p).is_file()), None)
    if grub_cfg is not None and host.path(DEFAULT_GRUB).is_file():
        if grub_cfg == "/boot/grub/grub.cfg" and (tool := _find_tool(host, "update-grub")):
            return BootLoader("grub", (tool,), f"{grub_cfg} and {DEFAULT_GRUB}")
        for name in ("grub-mkconfig", "grub2-mkconfig"):
            if tool := _find_tool(host, name):
                return BootLoader("grub", (tool, "-o", grub_cfg), f"{grub_cfg} and {DEFAULT_GRUB}")
        return BootLoader("grub", None, f"{grub_cfg} but neither update-grub nor grub-mkconfig")
    if sd_conf is not None:
        return BootLoader("systemd-boot", None, f"{sd_conf}")
    return BootLoader("unknown", None, "no /boot/grub/grub.cfg with /etc/default/grub")


def blocked_message(loader: BootLoader, args: list[str]) -> VectorlayError:
    joined = " ".join(args)
    if loader.kind == "systemd-boot":
        return VectorlayError(
            f"this host boots with systemd-boot ({loader.evidence}); the installer only configures "
            "GRUB, so nothing was written",
            f"add '{joined}' to /etc/kernel/cmdline, run 'kernel-install add $(uname -r) "
            f"/boot/vmlinuz-$(uname -r)' (or your distribution's equivalent), reboot, then re-run",
        )
    if loader.kind == "grub":
        return VectorlayError(
            f"GRUB is installed ({loader.evidence}); nothing was written",
            "install the GRUB tools (apt-get install grub2-common) and re-run",
        )
    return VectorlayError(
        f"could not tell which boot loader starts this host ({loader.evidence}); nothing was written",
        f"add '{joined}' to the kernel command line through your boot loader, reboot, then re-run",
    )


def shell_problem(text: str) -> str | None:
    """What would make `source FILE` go wrong in grub-mkconfig: CRLF line endings (bash reads the
    carriage return into every value, e.g. GRUB_DEFAULT="0\r"), or a quote that is never closed
    (bash fails, and update-grub with it). None when the file is fine."""
    if "\r\n" in text:
        line = text[: text.index("\r\n")].count("\n") + 1
        return f"has Windows (CRLF) line endings (first at line {line})"
    i, n, quote, opened = 0, len(text), "", 0
    spans: int | None = None  # the first quoted value that runs past its line: where a quote is missing
    while i < n:
        c = text[i]
        if quote:
            if c == "\n" and spans is None:
                spans = opened
            if quote == "'":
                if c == "'":
                    quote = ""
            elif c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c == "\\":
            i += 1
        elif c == "#" and (i == 0 or text[i - 1] in " \t\n;"):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c in "'\"`":
            quote, opened = c, text[:i].count("\n") + 1
        i += 1
    if quote:
        return f"has a {quote} quote that is never closed (look at line {spans or opened})"
    return None


def check_sourced(host: Host) -> None:
    """Refuse, before anything is written, files grub-mkconfig could not source correctly."""
    for f in sourced_files(host):
        if f == DROPIN:
            continue
        # Bytes, not read_text(): universal newlines would hide the carriage returns.
        problem = shell_problem(host.path(f).read_bytes().decode(errors="replace"))
        if problem is not None:
            fix = (
                f"convert it (sudo sed -i 's/\\r$//' {f}) and re-run"
                if "CRLF" in problem
                else f"close the quote in {f} (check with: bash -n {f}) and re-run"
            )
            raise VectorlayError(f"{f} {problem}; nothing was written", fix)


def plan_changes(host: Host, loader: BootLoader, wanted: list[str]) -> list[Change]:
    """The drop-in (or its removal when every argument is already present) and the GRUB update."""
    assert loader.kind == "grub" and loader.update is not None
    check_sourced(host)
    missing = missing_args(host, wanted)
    changes: list[Change] = []
    if missing:
        changes.append(FileChange(DROPIN, render_dropin(missing), 0o644, reason="IOMMU kernel arguments"))
    else:
        present = set(" ".join(effective_values(host, with_dropin=True).values()).split())
        # Removing the drop-in would put back the backed-up foreign file it replaced, which undoes
        # the arguments again: once a foreign file was replaced, the neutral drop-in stays.
        replaced_foreign = host.exists(backup_path(DROPIN))
        if all(a in present for a in wanted) and not replaced_foreign:
            changes.append(Removal(DROPIN, reason="every IOMMU argument is already set elsewhere"))
        else:
            # Someone else's file at the drop-in's path undoes arguments set before it: it is backed
            # up and replaced by one that adds nothing.
            changes.append(FileChange(DROPIN, render_dropin([]), 0o644, reason="replaces a foreign file"))
    changes.append(Command(loader.update, after=(DROPIN,), reason="regenerate grub.cfg"))
    return changes


# --- what grub-mkconfig made ------------------------------------------------------------------------


def generated_cfg(loader: BootLoader) -> str:
    """The grub.cfg the loader's update command writes."""
    assert loader.update is not None
    argv = loader.update
    return argv[argv.index("-o") + 1] if "-o" in argv else GRUB_CFGS[0]


def linux_lines(text: str) -> list[list[str]]:
    """The kernel arguments of every `linux` (or `linuxefi`) line of a grub.cfg, image path left out."""
    out = []
    for raw in text.splitlines():
        words = raw.split()
        if len(words) >= 2 and words[0] in ("linux", "linuxefi", "linux16"):
            out.append(words[2:])
    return out


def takes_away(host: Host, wanted: list[str]) -> str | None:
    """The defaults file that last removed one of `wanted` from the kernel line, sourcing the files one
    by one in grub-mkconfig's order (None: none of them did; then a script in /etc/grub.d did)."""
    env: dict[str, str] = {}
    had: set[str] = set()
    culprit: str | None = None
    for f in sourced_files(host):
        env = evaluate_shell(host.read_text(f), env)
        now = set(" ".join(env.get(k, "") for k in CMDLINE_VARS).split()) & set(wanted)
        if had - now:
            culprit = f
        had = now
    return culprit


def verify_generated(host: Host, loader: BootLoader, wanted: list[str]) -> None:
    """After the update command: the generated grub.cfg's kernel lines must carry `wanted`, or a
    reboot would start the kernel without them. Raises naming the file that took them away."""
    cfg = generated_cfg(loader)
    try:
        lines = linux_lines(host.read_text(cfg))
    except OSError:
        return  # nothing generated to judge (the update command itself reports its failure)
    if not lines or any(all(a in line for a in wanted) for line in lines):
        return
    missing = [a for a in wanted if not any(a in line for line in lines)] or wanted
    culprit = takes_away(host, wanted)
    joined = " ".join(missing)
    if culprit is not None:
        raise VectorlayError(
            f"{cfg} was generated without {joined}: {culprit} is sourced after {DROPIN} and sets the "
            "kernel line again; a reboot would not turn the IOMMU on, so none is asked for",
            f"drop the reset from {culprit} (or rename it to sort before 99-vectorlay-iommu.cfg), "
            "then re-run the same command",
        )
    raise VectorlayError(
        f"{cfg} was generated without {joined}, although {DROPIN} adds it and no file in "
        f"{DEFAULT_GRUB} or {GRUB_D} takes it away; a reboot would not turn the IOMMU on",
        "look for a script in /etc/grub.d/ that writes its own 'linux' lines, then re-run",
    )
