"""A program run on a pseudo-terminal of its own, as a person runs it from a shell: the terminal is
its controlling terminal (so /dev/tty and getpass reach it), its standard output and error go to it,
and its standard input is either the terminal too or a pipe (`curl ... | sudo bash`: the script)."""

from __future__ import annotations

import os
import pty
import select
import threading
import time
from collections.abc import Mapping, Sequence


class Terminal:
    def __init__(self, argv: Sequence[str], env: Mapping[str, str], stdin_data: bytes | None = None) -> None:
        pipe = os.pipe() if stdin_data is not None else None
        pid, fd = pty.fork()
        if pid == 0:  # the child: only async-signal-safe calls until exec
            try:
                if pipe is not None:
                    os.dup2(pipe[0], 0)
                    os.close(pipe[0])
                    os.close(pipe[1])
                os.execve(argv[0], list(argv), dict(env))
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.output = b""
        self.status: int | None = None
        if pipe is not None:
            os.close(pipe[0])
            assert stdin_data is not None
            threading.Thread(target=self._feed, args=(pipe[1], stdin_data), daemon=True).start()

    @staticmethod
    def _feed(fd: int, data: bytes) -> None:
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return b""
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal (it exited)
            chunk = b""
        if not chunk:
            raise EOFError
        self.output += chunk
        return chunk

    def expect(self, text: bytes, timeout: float) -> int:
        """Read until `text` is in the output; its end offset."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{text!r} not seen; output so far: {self.output[-2000:]!r}")
            try:
                self._read(min(left, 1.0))
            except EOFError:
                raise AssertionError(f"exited before {text!r}; output: {self.output[-2000:]!r}") from None
        return self.output.index(text) + len(text)

    def quiet_for(self, seconds: float) -> bytes:
        """What the program writes during `seconds` (nothing, while it waits for an answer)."""
        got = b""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got += self._read(left)
            except EOFError:
                break
        return got

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float) -> int:
        """Read to the end of the output; the exit code."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._read(max(0.0, min(1.0, deadline - time.monotonic())))
            except EOFError:
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
                raise TimeoutError(f"still running; output: {self.output[-3000:]!r}")
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.status = os.waitstatus_to_exitcode(status)
        return self.status
