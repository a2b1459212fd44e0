"""The doctor's hand-parsed argv (its start-up fast path) against typer, which stays the reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from doctor import cli

Outcome = tuple[Any, list[tuple[Path, bool, Path | None]], str, str]


def _outcome(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Outcome:
    calls: list[tuple[Path, bool, Path | None]] = []

    def fake_run(
        root: Path, json_out: bool, prometheus: Path | None, host: object = None, probe_units: bool = False
    ) -> int:
        assert not probe_units, "only test_probe_units_is_left_to_typer_and_reaches_run asks for the probe"
        calls.append((root, json_out, prometheus))
        return 1

    monkeypatch.setattr(cli, "run", fake_run)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, calls, out, err


def _both(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[Outcome, Outcome]:
    fast = _outcome(argv, capsys, monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(cli, "_parse_fast", lambda args: None)
        typer_only = _outcome(argv, capsys, monkeypatch)
    return fast, typer_only


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tree").mkdir()
    (tmp_path / "textfile").mkdir()
    (tmp_path / "a-file").write_text("")
    return {
        "TREE": str(tmp_path / "tree"),
        "PROM": str(tmp_path / "textfile" / "vectorlay.prom"),
        "DIR": str(tmp_path / "textfile"),
        "FILE": str(tmp_path / "a-file"),
        "MISSING": str(tmp_path / "missing"),
    }


def _fill(argv: list[str], paths: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for key, value in paths.items():
            a = a.replace(key, value)
        out.append(a)
    return out


DOCUMENTED = [
    [],
    ["--json"],
    ["--prometheus", "PROM"],
    ["--json", "--prometheus", "PROM"],
    ["--root", "TREE"],
    ["--root", "TREE", "--json", "--prometheus", "PROM"],
    ["--prometheus=PROM", "--root=TREE"],
    ["--json", "--json"],
    ["--root", "MISSING", "--root", "TREE"],  # the last one wins
    ["--prometheus", "FILE"],  # an existing file is replaced, like any other
    ["--root", "TREE/"],
]


@pytest.mark.parametrize("argv", DOCUMENTED, ids=lambda a: " ".join(a) or "no-args")
def test_the_documented_forms_skip_typer_and_run_what_typer_would_run(
    argv: list[str],
    paths: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = _fill(argv, paths)
    assert cli._parse_fast(argv) is not None
    fast, typer_only = _both(argv, capsys, monkeypatch)
    assert fast == typer_only
    assert fast[0] == 1 and len(fast[1]) == 1


UNUSUAL = [
    ["--help"],
    ["--json", "--help"],
    ["--bogus"],
    ["--root"],
    ["--root="],
    ["--prometheus"],
    ["--json=1"],
    ["--root", "MISSING"],
    ["--root", "FILE"],
    ["--prometheus", "DIR"],
    ["--root", "--json"],
    ["--", "--json"],
    ["extra-argument"],
    ["--jso"],
    ["-h"],
]


@pytest.mark.parametrize("argv", UNUSUAL, ids=lambda a: " ".join(a))
def test_everything_else_is_left_to_typer(argv: list[str], paths: dict[str, str]) -> None:
    # Help and usage errors (and their messages and exit codes) then come from typer alone.
    assert cli._parse_fast(_fill(argv, paths)) is None


def test_probe_units_is_left_to_typer_and_reaches_run(
    paths: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = _fill(["--root", "TREE", "--probe-units", "--json"], paths)
    assert cli._parse_fast(argv) is None
    calls: list[tuple[Path, bool, Path | None, bool]] = []

    def fake_run(
        root: Path, json_out: bool, prometheus: Path | None, host: object = None, probe_units: bool = False
    ) -> int:
        calls.append((root, json_out, prometheus, probe_units))
        return 0

    monkeypatch.setattr(cli, "run", fake_run)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    assert calls == [(Path(paths["TREE"]), True, None, True)]
