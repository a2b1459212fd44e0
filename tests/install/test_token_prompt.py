"""`vectorlay-bootstrap install` with no token and a terminal asks for it there: the question stays on
the screen (the live progress line steps aside instead of redrawing over it), the answer is not echoed,
and the run goes on with the token. Run on a pseudo-terminal against the reference control plane."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from hostsim import build_host, inject, load_topology
from tests.terminal import Terminal

QUESTION = b"Provisioning token (vtk_..., from the dashboard; it is not shown as you type): "


@pytest.mark.slow
def test_the_installer_asks_for_the_token_on_the_terminal_and_goes_on(
    tmp_path: Path, control_plane: Any
) -> None:
    root = build_host(tmp_path / "host", load_topology("cpu-only"))
    token = control_plane.token(control_plane.org("acme", provider=True))
    env = inject.env(
        {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TERM": "xterm-256color", "LANG": "C.UTF-8"}
    )
    argv = [sys.executable, "-m", "bootstrap.cli", "install", "--root", str(root), "--only", "preflight"]
    argv += ["--api", control_plane.url, "--ca-file", str(control_plane.ca_file)]
    term = Terminal(argv, env)
    term.expect(QUESTION, timeout=60)
    # Waiting for the answer, the program writes nothing: a live status line would be redrawn here
    # (rich refreshes it 12.5 times a second), erasing the question.
    assert term.quiet_for(1.5) == b""
    term.type(token + "\r")
    code = term.wait(timeout=120)
    out = term.output.decode(errors="replace")
    after = term.output[term.output.index(QUESTION) + len(QUESTION) :].decode(errors="replace")
    assert code == 0, out[-3000:]
    assert token not in out  # not echoed, nor shown anywhere after
    assert "provisioning token valid until" in after
    assert "vectorlay-node: DONE" in after
