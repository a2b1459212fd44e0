"""The install run's progress on the terminal: a rich status line on a terminal, plain numbered lines
otherwise."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from bootstrap.stages.contract import Outcome, StageResult
from bootstrap.stages.registry import AnyStage

if TYPE_CHECKING:
    from rich.status import Status


class Display:
    """Stage progress: a rich status line on a terminal, plain numbered lines otherwise."""

    def __init__(self, total: int, stream: TextIO | None = None, rich: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.total = total
        self.rich = self.stream.isatty() and os.environ.get("TERM") != "dumb" if rich is None else rich
        self._status: Status | None = None
        if self.rich:
            from rich.console import Console

            self.console = Console(file=self.stream, highlight=False)

    def line(self, text: str) -> None:
        if self.rich:
            self.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def start(self, index: int, stage: AnyStage) -> None:
        head = f"[{index}/{self.total}] {stage.name}: {stage.summary}"
        if self.rich:
            if self._status is None:
                self._status = self.console.status(head)
                self._status.start()
            else:
                self._status.update(head)
        else:
            self.line(head)

    def finish(self, stage: AnyStage, result: StageResult | None, error: str | None = None) -> None:
        mark = {
            Outcome.OK: ("✓", "green"),
            Outcome.SKIPPED: ("-", "yellow"),
            Outcome.PLANNED: ("~", "cyan"),
            Outcome.REBOOT: ("↻", "yellow"),
        }
        if result is None:
            symbol, colour, text = "✗", "red", error or "failed"
        else:
            symbol, colour = mark[result.outcome]
            text = result.message or result.outcome.value
        if self.rich:
            from rich.markup import escape

            self.console.print(f"[{colour}]{symbol}[/] [bold]{stage.name}[/]: {escape(text)}")
        else:
            self.line(f"{symbol} {stage.name}: {text}")

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No live status line while the run asks something on the terminal: rich redraws (and so
        erases) the line it is on several times a second, the question with it."""
        status = self._status
        if status is not None:
            status.stop()
        try:
            yield
        finally:
            if status is not None:
                status.start()
