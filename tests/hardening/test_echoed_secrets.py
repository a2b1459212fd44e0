"""A control plane that echoes a secret back (the provisioning token in an error, the node token in a
heartbeat's error or its `reason`): no output of the node's tools repeats it. The terminal, the final
error line, the run log, the journal (the agent's stderr) and status.json (0644, readable by anyone)
are all redacted, not only the log file.

The stand-in is an HTTPS server with the reference control plane's own certificate whose answers are
the documented error shape (`{"error": {"code", "message"}}`) with the secret in the message: what a
careless control plane or a debugging proxy in front of it would send.
"""

from __future__ import annotations

import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bootstrap.agent_status import STATUS_PATH
from bootstrap.api import ApiClient
from bootstrap.enroll import enroll
from bootstrap.host import TreeHost
from bootstrap.identity import load_identity
from bootstrap.paths import LOG_PATH
from hostsim import inject
from tests.install.helpers import install

pytestmark = pytest.mark.slow

MakeTree = Callable[..., Path]


class _Echo:
    """Answers every request with `answer(path, token_in_body, bearer) -> (status, body)`."""

    def __init__(self, cp: Any, answer: Callable[[str, str, str], tuple[int, dict[str, Any]]]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    token = str(json.loads(raw).get("token", ""))
                except (ValueError, AttributeError):
                    token = ""
                bearer = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                status, body = answer(self.path, token, bearer)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cp.state_dir / "server.crt"), str(cp.state_dir / "server.key"))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def echo(control_plane: Any) -> Iterator[Callable[..., _Echo]]:
    made: list[_Echo] = []

    def _make(answer: Callable[[str, str, str], tuple[int, dict[str, Any]]]) -> _Echo:
        made.append(_Echo(control_plane, answer))
        return made[-1]

    yield _make
    for e in made:
        e.close()


def _everything_written(root: Path) -> bytes:
    out = b""
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                out += p.read_bytes()
    return out


def test_a_provisioning_token_echoed_in_an_error_is_on_no_terminal_line_nor_in_the_log(
    make_tree: MakeTree, control_plane: Any, echo: Callable[..., _Echo]
) -> None:
    control_plane.org("acme")
    token = control_plane.token("acme")

    def answer(path: str, sent: str, _bearer: str) -> tuple[int, dict[str, Any]]:
        return 401, {"error": {"code": "TOKEN_UNKNOWN", "message": f"no such token {sent!r} here"}}

    server = echo(answer)
    root = make_tree("cpu-only")
    res = install(root, cp=SimpleNamespace(url=server.url, ca_file=control_plane.ca_file), token=token)
    assert res.returncode == 1
    out = res.stdout + res.stderr
    # The final error line and the stage's line say what happened, with the secret taken out.
    assert (
        "error: " in res.stderr and "401 bad, missing or expired token (TOKEN_UNKNOWN: no such" in res.stderr
    )
    assert "[redacted]" in res.stderr and "✗ preflight: " in res.stdout
    assert token not in out and "vtk_" not in out.replace("vtk_...", "")
    log = (root / LOG_PATH.lstrip("/")).read_text()
    assert "TOKEN_UNKNOWN" in log and token not in log
    assert token.encode() not in _everything_written(root)


def test_a_node_token_echoed_by_the_heartbeat_answer_is_not_in_status_json_nor_the_journal(
    make_tree: MakeTree, control_plane: Any, echo: Callable[..., _Echo]
) -> None:
    control_plane.org("acme")
    root = make_tree("cpu-only")
    enroll(
        TreeHost(root),
        ApiClient(control_plane.url, ca_file=control_plane.ca_file, attempts=1),
        control_plane.token("acme"),
        gpu_mode="none",
        hardware={},
    )
    ident = load_identity(TreeHost(root))
    assert ident is not None
    node_token = ident.node_token()
    answers = {
        # An error that quotes the credential it refused.
        "error": lambda bearer: (401, {"error": {"code": "BAD_NODE_TOKEN", "message": f"refused {bearer}"}}),
        # A delivered heartbeat whose reason (shown in the journal, status.json, the doctor) quotes it.
        "reason": lambda bearer: (
            200,
            {"status": "active", "advertised_units": 0, "reason": f"saw {bearer}"},
        ),
    }
    status_file = root / STATUS_PATH.lstrip("/")
    for kind, make in answers.items():
        server = echo(lambda path, _sent, bearer, make=make: make(bearer))
        (root / "etc/vectorlay/node-agent.yaml").write_text(f"api: {server.url}\n")
        res = subprocess.run(
            [sys.executable, "-m", "nodeagent.cli", "--root", str(root), "--once"],
            capture_output=True,
            text=True,
            timeout=60,
            env=inject.env(),
            check=False,
        )
        assert res.returncode == (1 if kind == "error" else 0), res.stderr
        assert "[redacted]" in res.stdout + res.stderr, kind
        assert node_token not in res.stdout + res.stderr, kind
        text = status_file.read_text()
        status = json.loads(text)
        # What status.json holds: the control plane's view of the node, nothing secret.
        assert node_token not in text and "vnt_" not in text, kind
        assert status["node_id"] == ident.node_id
        field = status["last_error"] if kind == "error" else status["reason"]
        assert "[redacted]" in field, (kind, status)
        assert oct(status_file.stat().st_mode & 0o777) == "0o644"


def test_an_api_key_echoed_by_the_control_plane_is_not_printed_by_decommission(
    control_plane: Any, echo: Callable[..., _Echo]
) -> None:
    key = "vlk_" + "k3y" * 15

    def answer(_path: str, _sent: str, bearer: str) -> tuple[int, dict[str, Any]]:
        return 401, {"error": {"code": "BAD_KEY", "message": f"Authorization: Bearer {bearer} refused"}}

    server = echo(answer)
    env = {k: v for k, v in os.environ.items() if k != "VL_KEY"}
    argv = ["decommission", "--api", server.url, "--org", "acme", "--node", "node_x"]
    res = subprocess.run(
        [sys.executable, "-m", "bootstrap.cli", *argv, "--ca-file", str(control_plane.ca_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "VL_KEY": key},
        check=False,
    )
    assert res.returncode == 1 and "BAD_KEY" in res.stderr, res.stderr
    assert key not in res.stdout + res.stderr and "[redacted]" in res.stderr
