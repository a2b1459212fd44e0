"""`--help` of the three command lines: a flag is shown as a flag, never followed by a type."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

import bootstrap.cli
import doctor.cli
import nodeagent.cli

BOOTSTRAP_COMMANDS = [
    "detect",
    "install",
    "uninstall",
    "update",
    "vfio-bind",
    "wait-overlay",
    "enroll",
    "decommission",
]
CASES: list[tuple[str, Callable[[list[str]], None], list[str], list[str]]] = [
    ("vectorlay-node-doctor", doctor.cli.main, [], ["--json"]),
    ("vectorlay-node-agent", nodeagent.cli.main, [], ["--once"]),
    ("vectorlay-bootstrap", bootstrap.cli.main, [], []),
    ("vectorlay-bootstrap install", bootstrap.cli.main, ["install"], ["--plan"]),
    ("vectorlay-bootstrap uninstall", bootstrap.cli.main, ["uninstall"], ["--plan"]),
    ("vectorlay-bootstrap detect", bootstrap.cli.main, ["detect"], ["--json"]),
    *((f"vectorlay-bootstrap {c}", bootstrap.cli.main, [c], []) for c in BOOTSTRAP_COMMANDS[3:]),
]


@pytest.mark.parametrize(("label", "main", "command", "flags"), CASES, ids=[c[0] for c in CASES])
def test_help_shows_flags_as_plain_flags(
    label: str,
    main: Callable[[list[str]], None],
    command: list[str],
    flags: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "Usage:" in out or "usage:" in out
    assert "<bool>" not in out
    # An option's own line, its short form (argparse's `-h, `) dropped.
    lines = [re.sub(r"^-\w, ", "", line.strip()) for line in out.splitlines()]
    for flag in [*flags, "--help"]:
        line = next(line for line in lines if line.startswith(f"{flag} "))
        # The flag, then its help text: no type, no metavar in between.
        assert not line[len(flag) :].strip().startswith("<"), line
