"""One guest connection to a service on this machine's loopback: QEMU's guestfwd `cmd:` runs this per
connection with the guest's stream on stdin/stdout; it copies bytes both ways until either side closes."""

from __future__ import annotations

import os
import selectors
import socket
import sys


def main(host: str, port: int) -> None:
    upstream = socket.create_connection((host, port), timeout=10)
    upstream.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    sel.register(upstream, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj == 0:
                data = os.read(0, 65536)
                if not data:
                    upstream.shutdown(socket.SHUT_WR)
                    sel.unregister(0)
                    continue
                upstream.sendall(data)
            else:
                data = upstream.recv(65536)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view) :]


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
