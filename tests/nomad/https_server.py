"""A small HTTPS server for the tests: what the Nomad client's HTTP API (:4646) looks like to a TLS peer.

`python https_server.py --cert C --key K ADDR [ADDR...]` binds every ADDR on one port (any free one,
chosen on the first), prints that port, and answers `ok` to every GET until it is terminated. It
binds the addresses the node's Nomad config gives its HTTP API, presenting the certificate that
the config names.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import ssl
import sys
import threading


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("addresses", nargs="+")
    args = parser.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    port = 0
    servers: list[http.server.ThreadingHTTPServer] = []
    for addr in args.addresses:
        server = http.server.ThreadingHTTPServer((addr, port), _Ok)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        port = server.server_address[1]
        servers.append(server)
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(port, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        servers[0].serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
