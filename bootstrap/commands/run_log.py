"""The install run's log: every line the run says, appended to /var/log/vectorlay/bootstrap.log
through a filter that redacts secrets (a plan run writes none)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from bootstrap.errors import VectorlayError, redact
from bootstrap.host import Host
from bootstrap.paths import LOG_PATH


class RedactSecrets(logging.Filter):
    """Rewrites every record (message, arguments and traceback text) with its secrets redacted."""

    def __init__(self, secrets: Callable[[], Iterable[str]] = tuple) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        known = [s for s in self.secrets() if s]
        record.msg = redact(record.getMessage(), known)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, known)
        return True


@contextlib.contextmanager
def run_log(host: Host, secrets: Callable[[], Iterable[str]]) -> Iterator[Path]:
    """Append this run's messages (bootstrap.* loggers) to the log file, secrets redacted."""
    path = host.path(LOG_PATH)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Non-blocking: opening a FIFO planted there for writing would wait for a reader forever.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o640)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
    except OSError as e:
        raise VectorlayError(
            f"cannot open the run log {LOG_PATH}: {e.strerror or e}",
            f"make {LOG_PATH} a plain file again (sudo rm -rf {LOG_PATH}), then re-run",
        ) from None
    stream = os.fdopen(fd, "a", encoding="utf-8")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets))
    logger = logging.getLogger("bootstrap")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
        stream.close()


@contextlib.contextmanager
def quiet_log(log: logging.Logger) -> Iterator[None]:
    """--plan writes no log: the run's own records (`log`'s) go nowhere (not to stderr through logging's
    last-resort handler); the libraries' warnings still do."""
    handler = logging.NullHandler()
    log.addHandler(handler)
    log.propagate = False
    try:
        yield None
    finally:
        log.removeHandler(handler)
        log.propagate = True
