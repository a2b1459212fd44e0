"""Secrets stay secret: the provisioning token is in no file, no log line, no output; tokens are hashed."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap.cli import main
from bootstrap.enroll import read_token
from bootstrap.errors import VectorlayError
from bootstrap.host import TreeHost
from bootstrap.identity import load_identity


def _files_containing(base: Path, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(base):
        for name in names:
            p = Path(dirpath, name)
            if not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p.relative_to(base)))
    return hits


def test_the_provisioning_token_is_in_no_file_log_line_or_output_after_an_enrollment(
    make_tree: Callable[..., Path],
    control_plane: Any,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    control_plane.org("acme")
    root = make_tree("cpu-only")
    args = [
        "enroll",
        "--root",
        str(root),
        "--api",
        control_plane.url,
        "--ca-file",
        str(control_plane.ca_file),
    ]

    # 1. In-process, with every logger (ours, requests, urllib3) at DEBUG.
    token = control_plane.token("acme")
    monkeypatch.setenv("VECTORLAY_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    out, err = capsys.readouterr()
    assert "enrolled node" in out
    assert any("node_" in r.getMessage() for r in caplog.records)  # the log did say something
    assert token not in caplog.text and token not in out + err
    assert all(token not in str(r.args) for r in caplog.records)

    # 2. As a separate process (the console script), re-enrolling with a second token from stdin.
    token2 = control_plane.token("acme")
    env = {k: v for k, v in os.environ.items() if k != "VECTORLAY_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-c", "from bootstrap.cli import main; main()", *args, "--token-file", "-"],
        input=token2 + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("re-enrolled node ")
    assert token2 not in proc.stdout + proc.stderr

    for secret in (token, token2):
        assert _files_containing(root, secret.encode()) == []
        assert secret not in control_plane.log()
        # The control plane keeps hashes only (and the WAL may hold the latest pages).
        assert _files_containing(control_plane.db_path.parent, secret.encode()) == []

    # The durable node token, by contrast, is on disk exactly once: in the 0600 credential file.
    ident = load_identity(TreeHost(root))
    assert ident is not None
    node_token = ident.node_token()
    assert _files_containing(root, node_token.encode()) == [
        str((ident.path / "node-token").resolve().relative_to(root))
    ]
    assert _files_containing(control_plane.db_path.parent, node_token.encode()) == []


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_read_token_prefers_the_token_file_then_the_environment_then_stdin(tmp_path: Path) -> None:
    tok_a, tok_b, tok_c = ("vtk_" + c * 43 for c in "abc")
    f = tmp_path / "token"
    f.write_text(tok_a + "\n")
    env = {"VECTORLAY_TOKEN": tok_b}
    assert read_token(f, env=env, stdin=io.StringIO(tok_c)) == tok_a
    assert read_token(None, env=env, stdin=io.StringIO(tok_c)) == tok_b
    assert read_token(None, env={}, stdin=io.StringIO(tok_c + "\n")) == tok_c
    assert read_token(Path("-"), env=env, stdin=io.StringIO(tok_c)) == tok_c


def test_a_malformed_token_is_refused_without_echoing_it(tmp_path: Path) -> None:
    bad = "vtk-" + "s3cr3t" * 8
    with pytest.raises(VectorlayError) as e:
        read_token(None, env={"VECTORLAY_TOKEN": bad}, stdin=io.StringIO(""))
    assert "is not a vectorlay token" in e.value.message and "VECTORLAY_TOKEN" in e.value.message
    assert "s3cr3t" not in e.value.message + (e.value.hint or "")


def test_no_token_anywhere_says_where_a_token_can_come_from(tmp_path: Path) -> None:
    with pytest.raises(VectorlayError) as e:
        read_token(None, env={}, stdin=io.StringIO(""))
    assert e.value.message == "no provisioning token given"
    assert "VECTORLAY_TOKEN" in (e.value.hint or "") and "--token-file" in (e.value.hint or "")
    with pytest.raises(VectorlayError, match="cannot read the token file"):
        read_token(tmp_path / "missing", env={}, stdin=io.StringIO(""))


def test_on_a_terminal_the_token_is_prompted_for_without_echo(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts: list[str] = []

    def fake_getpass(prompt: str) -> str:
        prompts.append(prompt)
        return "vtk_" + "t" * 43

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    assert read_token(None, env={}, stdin=_Tty()) == "vtk_" + "t" * 43
    assert prompts == ["Provisioning token (vtk_..., from the dashboard; it is not shown as you type): "]
