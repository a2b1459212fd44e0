"""How long the plan engine takes to compare a stage's worth of files with a tree (make bench)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bootstrap.host import RecordingRunner, TreeHost
from bootstrap.plan import MARKER, FileChange, apply, compute


def test_planning_fifty_unchanged_files(benchmark: Any, tmp_path: Path) -> None:
    host = TreeHost(tmp_path, RecordingRunner())
    changes = [FileChange(f"/etc/bench/{i}.conf", f"{MARKER}\nvalue={i}\n".encode()) for i in range(50)]
    apply(host, compute(host, changes))
    assert benchmark(lambda: len(compute(host, changes).changes)) == 0
