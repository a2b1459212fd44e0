#!/usr/bin/python3
"""The test guest's command server: newline-delimited JSON over a virtio-serial port.

Runs inside the guest as vm-agent.service (the guest's own python3, stdlib only). It is the only way
the harness reaches the guest: there is no ssh and no network path to it. Requests are served one at a
time; every reply carries the request's id so a host that timed out can discard late answers.

Requests (one JSON object per line):
  {"id": 1, "op": "ping"}
  {"id": 2, "op": "run", "argv": [...], "timeout": 60, "env": {...}, "input": "<base64>", "cwd": "/"}
  {"id": 3, "op": "put", "path": "/x", "data": "<base64>", "mode": 420, "append": false}
  {"id": 4, "op": "get", "path": "/x"}
Replies: {"id": n, "ok": true, ...} or {"id": n, "ok": false, "error": "..."}.
On start the agent announces itself with {"event": "hello", "boot_id": "..."}.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

PORT = "/dev/virtio-ports/org.vectorlay.agent"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def op_run(req: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(req.get("env") or {})
    data = base64.b64decode(req["input"]) if req.get("input") else b""
    try:
        proc = subprocess.run(
            req["argv"],
            input=data,
            capture_output=True,
            timeout=req.get("timeout") or None,
            env=env,
            cwd=req.get("cwd") or "/",
            check=False,
        )
    except FileNotFoundError as e:
        return {"ok": True, "rc": 127, "stdout": "", "stderr": b64(str(e).encode()), "timed_out": False}
    except subprocess.TimeoutExpired as e:
        return {
            "ok": True,
            "rc": 124,
            "stdout": b64(e.stdout or b""),
            "stderr": b64(e.stderr or b""),
            "timed_out": True,
        }
    return {"ok": True, "rc": proc.returncode, "stdout": b64(proc.stdout), "stderr": b64(proc.stderr)}


def op_put(req: dict[str, Any]) -> dict[str, Any]:
    path = req["path"]
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    with open(path, "ab" if req.get("append") else "wb") as f:
        f.write(base64.b64decode(req["data"]))
    if req.get("mode") is not None:
        os.chmod(path, req["mode"])
    return {"ok": True}


def op_get(req: dict[str, Any]) -> dict[str, Any]:
    with open(req["path"], "rb") as f:
        return {"ok": True, "data": b64(f.read())}


OPS = {
    "ping": lambda req: {"ok": True, "boot_id": boot_id()},
    "run": op_run,
    "put": op_put,
    "get": op_get,
}


def serve(port: str) -> None:
    fd = os.open(port, os.O_RDWR)
    rx = os.fdopen(fd, "rb", buffering=0)
    tx = os.fdopen(os.dup(fd), "wb", buffering=0)

    def send(obj: dict[str, Any]) -> None:
        view = memoryview(json.dumps(obj).encode() + b"\n")
        while view:
            view = view[tx.write(view) or 0 :]

    send({"event": "hello", "boot_id": boot_id()})
    parts: list[bytes] = []
    while True:
        chunk = rx.read(1 << 20)
        if not chunk:
            # Nobody is connected on the host side; virtio-serial reads EOF until someone is.
            time.sleep(0.2)
            continue
        # Only the new chunk is scanned: a multi-megabyte put arrives as one line.
        while True:
            i = chunk.find(b"\n")
            if i < 0:
                parts.append(chunk)
                break
            parts.append(chunk[:i])
            line, parts, chunk = b"".join(parts), [], chunk[i + 1 :]
            if line.strip():
                handle(line, send)


def handle(line: bytes, send: Callable[[dict[str, Any]], None]) -> None:
    try:
        req = json.loads(line)
    except ValueError:
        send({"event": "bad_request"})
        return
    try:
        reply = OPS[req["op"]](req)
    except Exception as e:  # the agent must outlive any one bad request
        reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    reply["id"] = req.get("id")
    send(reply)


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else PORT)
