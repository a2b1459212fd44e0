"""A download of install.sh cut short anywhere runs no command (docs/contracts.md#the-install-one-liner).

Every prefix, cut at each line and at each byte of the last line, is executed by a real bash with
PATH holding only recording stubs: a stub notes its name and arguments in a log, so any external
command the prefix ran is seen.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = (REPO / "install.sh").read_bytes()
PROGRAMS = [
    "apt-get",
    "awk",
    "base64",
    "cat",
    "chmod",
    "cp",
    "curl",
    "dpkg-query",
    "grep",
    "id",
    "jq",
    "ln",
    "mkdir",
    "mktemp",
    "mv",
    "openssl",
    "python3",
    "rm",
    "sha256sum",
    "stat",
    "sudo",
    "tar",
    "uname",
    "unzip",
]


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("stubs")
    for prog in PROGRAMS:
        out = {"uname": "x86_64", "python3": "cpython 3 11"}.get(prog, "")
        (d / prog).write_text(f'#!/bin/bash\nprintf "%s\\n" "{prog} $*" >> "$STUB_LOG"\nprintf "{out}"\n')
        (d / prog).chmod(0o755)
    return d


def _run(prefix: bytes, tmp_path: Path, stubs: Path, args: list[str]) -> tuple[list[str], str]:
    script = tmp_path / "install-prefix.sh"
    script.write_bytes(prefix)
    log = tmp_path / "stub.log"
    log.write_text("")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/os-release").write_text('ID=ubuntu\nVERSION_ID="22.04"\nPRETTY_NAME="Ubuntu 22.04.5 LTS"\n')
    env = {
        "PATH": str(stubs),
        "STUB_LOG": str(log),
        "VECTORLAY_ROOT": str(root),
        "VECTORLAY_TOKEN": "vtk_" + "a" * 40,
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(
        ["/bin/bash", str(script), *args], env=env, capture_output=True, text=True, timeout=20, check=False
    )
    return [line for line in log.read_text().splitlines() if line], proc.stdout


def _cuts() -> list[int]:
    line_ends = [i + 1 for i, b in enumerate(SCRIPT) if b == ord("\n")]
    last_line_start = SCRIPT.rstrip(b"\n").rfind(b"\n") + 1
    byte_cuts = list(range(last_line_start, len(SCRIPT.rstrip(b"\n"))))  # the full line is no cut
    return sorted({0, *line_ends[:-1], *byte_cuts})


def test_the_whole_script_does_run_commands(tmp_path: Path, stubs: Path) -> None:
    commands, out = _run(SCRIPT, tmp_path, stubs, ["api=https://127.0.0.1:9"])
    assert commands[0] == "uname -m"
    assert any(c.startswith("dpkg-query") for c in commands)
    assert out.startswith("vectorlay-node installer: starting\n")


@pytest.mark.slow
def test_every_truncated_prefix_runs_no_command(tmp_path: Path, stubs: Path) -> None:
    cuts = _cuts()
    assert len(cuts) > 200
    ran = {}
    for cut in cuts:
        commands, out = _run(SCRIPT[:cut], tmp_path, stubs, ["api=https://127.0.0.1:9"])
        if commands or out:
            ran[cut] = (SCRIPT[max(0, cut - 40) : cut].decode(errors="replace"), commands, out)
    assert ran == {}


def test_the_script_is_shellcheck_clean() -> None:
    proc = subprocess.run(
        ["shellcheck", str(REPO / "install.sh")], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout


def test_an_unknown_argument_is_refused_before_anything_runs(tmp_path: Path, stubs: Path) -> None:
    commands, _ = _run(SCRIPT, tmp_path, stubs, ["gpus=1"])
    assert commands == []
    proc = subprocess.run(
        ["/bin/bash", str(REPO / "install.sh"), "gpus=1"],
        env={"PATH": str(stubs), "STUB_LOG": os.devnull},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown argument gpus=1" in proc.stderr and "fix: use token=vtk_..." in proc.stderr


def test_an_unsupported_os_is_refused_naming_what_was_found(tmp_path: Path, stubs: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text('ID=centos\nVERSION_ID="7"\nPRETTY_NAME="CentOS Linux 7 (Core)"\n')
    proc = subprocess.run(
        ["/bin/bash", str(REPO / "install.sh"), "api=https://127.0.0.1:9"],
        env={
            "PATH": str(stubs),
            "STUB_LOG": os.devnull,
            "VECTORLAY_ROOT": str(root),
            "VECTORLAY_TOKEN": "vtk_x",
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "unsupported OS: CentOS Linux 7 (Core)" in proc.stderr
