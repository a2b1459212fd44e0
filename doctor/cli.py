"""`vectorlay-node-doctor [--root DIR] [--json] [--prometheus FILE]`.

Start-up time is part of the product (it is benchmarked against virt-host-validate): heavy modules
(rich, yaml, cryptography, requests) are never imported on the common path. typer itself costs
~60 ms since it coerces every non-flag option through pydantic, so `main` skips it when there is
nothing to parse (`sudo vectorlay-node-doctor`, optionally with `--json`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bootstrap.errors import VectorlayError, exit_with

if TYPE_CHECKING:
    import typer

    from bootstrap.host import Host

_FLAGS_ONLY = frozenset({"--json"})


def run(root: Path, json_out: bool, prometheus: Path | None, host: Host | None = None) -> int:
    """Run the checks, print, write the metrics file if asked; return the exit code."""
    from bootstrap.host import open_host
    from doctor.checks import run_checks
    from doctor.render import render_json, render_prometheus, render_text, use_colour

    report = run_checks(host or open_host(root))
    if json_out:
        sys.stdout.write(render_json(report))
    else:
        sys.stdout.write(render_text(report, colour=use_colour(sys.stdout)))
    sys.stdout.flush()
    if prometheus is not None:
        from bootstrap.fsutil import atomic_write

        try:
            atomic_write(prometheus, render_prometheus(report), mode=0o644)
        except OSError as e:
            raise VectorlayError(
                f"cannot write {prometheus}: {e.strerror}",
                "point --prometheus at node_exporter's textfile directory, writable by this user",
            ) from None
    return report.exit_code


_HELP = "Check this provider node's health: PASS/WARN/FAIL per check and a final verdict."


def _app() -> typer.Typer:
    import typer

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

    @app.command(help=_HELP)
    def doctor(
        root: Path = typer.Option(
            Path("/"),
            "--root",
            help="Host root to check; anything but / reads only inside it and runs no command.",
            file_okay=False,
        ),
        json_out: bool = typer.Option(
            False, "--json", help="Machine-readable output (fields: docs/contracts.md)."
        ),
        prometheus: Path | None = typer.Option(
            None,
            "--prometheus",
            help="Also write node_exporter textfile-collector metrics to FILE (atomically); "
            "a path on this machine, also with --root.",
            metavar="FILE",
            dir_okay=False,
        ),
    ) -> None:
        if not root.is_dir():
            raise typer.BadParameter(f"{root} is not a directory", param_hint="'--root'")
        raise typer.Exit(run(root, json_out, prometheus))

    return app


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: errors become a message and an exit code, never a traceback."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if set(args) <= _FLAGS_ONLY:
            sys.exit(run(Path("/"), "--json" in args, None))
        _app()(args=args, prog_name="vectorlay-node-doctor")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except VectorlayError as e:
        exit_with(e)
    except Exception as e:  # a doctor must still answer: report the bug, not a traceback
        print(f"error: the doctor crashed: {type(e).__name__}: {e}", file=sys.stderr)
        print("  fix: report this with the output of: vectorlay-node-doctor --json", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
