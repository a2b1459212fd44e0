"""Where install.sh takes the token from when none is in the environment: token-file=FILE, else the
terminal; with neither it stops before anything is installed. Real bash, apt and curl as stubs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.os_trees import write_release

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    root = write_release(tmp_path / "root", "debian-13")
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    log = tmp_path / "stub.log"
    for name, exit_code in (("apt-get", 0), ("dpkg-query", 0), ("curl", 7)):
        (stubs / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexit {exit_code}\n')
        (stubs / name).chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path), "VECTORLAY_ROOT": str(root)}
    # A new session: no controlling terminal, as under cron, cloud-init or an ssh command without -t.
    return subprocess.run(
        ["bash", str(REPO / "install.sh"), "api=https://127.0.0.1:9", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
        check=False,
    )


def test_no_token_and_no_terminal_stops_before_anything_is_installed(tmp_path: Path) -> None:
    res = _run(tmp_path)
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        "error: no provisioning token, and no terminal to ask for one",
        "  fix: run the one-liner in a terminal (it asks for the token), or add token-file=FILE",
    ]
    assert not (tmp_path / "stub.log").exists()


def test_a_token_file_that_cannot_be_read_is_a_usage_error(tmp_path: Path) -> None:
    res = _run(tmp_path, f"token-file={tmp_path / 'missing'}")
    assert res.returncode == 2
    assert res.stderr.splitlines()[0] == f"error: token-file={tmp_path / 'missing'} is not a readable file"
    assert not (tmp_path / "stub.log").exists()


def test_a_token_file_stands_for_the_token_and_the_run_goes_on(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("vtk_" + "f" * 40 + "\n")
    token_file.chmod(0o600)
    res = _run(tmp_path, f"token-file={token_file}")
    assert "no provisioning token" not in res.stderr
    assert res.stderr.startswith("error: could not fetch https://127.0.0.1:9/v1/artifacts/manifest")
    assert "vtk_" not in (tmp_path / "stub.log").read_text()
