"""A control plane whose answers are changed on the way: an HTTPS server on loopback (with the real
control plane's own server certificate, so the node trusts it as it would the control plane) that
forwards each request to the real control plane and hands its JSON answer to `tamper` first. What
`tamper` returns is sent instead: a JSON value, or bytes sent as they are. The node under test
talks to it through its real API client, as to any control plane."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Callable
from typing import Any

import requests

Tamper = Callable[[str, Any, Any], Any]


def unchanged(_path: str, _request: Any, answer: Any) -> Any:
    return answer


class TamperingControlPlane:
    def __init__(self, cp: Any, tamper: Tamper = unchanged) -> None:
        self.cp = cp
        self.tamper = tamper
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = json.loads(raw) if raw else None
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")
                }
                real = requests.request(
                    method,
                    outer.cp.url + self.path,
                    data=raw or None,
                    headers=headers,
                    verify=str(outer.cp.ca_file),
                    timeout=60,
                )
                try:
                    answer: Any = real.json()
                except ValueError:
                    answer = None
                out = outer.tamper(self.path, request, answer)
                body = out if isinstance(out, bytes) else json.dumps(out).encode()
                self.send_response(real.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self._forward("POST")

            def do_GET(self) -> None:
                self._forward("GET")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cp.state_dir / "server.crt"), str(cp.state_dir / "server.key"))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        # shutdown() waits for serve_forever's next poll: 0.5 s by default, at every test's teardown.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
