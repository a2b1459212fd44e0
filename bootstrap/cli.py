"""`vectorlay-bootstrap`: the staged installer's command line (DESIGN.md section 5)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from bootstrap.errors import VectorlayError

app = typer.Typer(
    name="vectorlay-bootstrap",
    help="Turn this box into a vectorlay provider node (run by the install one-liner).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _group() -> None:
    """Turn this box into a vectorlay provider node (run by the install one-liner)."""


RootOption = typer.Option(
    Path("/"),
    "--root",
    help="Host root to operate on; anything but / reads and writes only inside it and runs no command.",
    file_okay=False,
)


@app.command()
def detect(
    root: Path = RootOption,
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output (DESIGN.md section 5)."),
) -> None:
    """List GPUs, NVSwitches, IOMMU state and GPU units."""
    from bootstrap.commands.detect import run_detect

    run_detect(root, json_out)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: operator errors become a message and an exit code, never a traceback.

    typer's standalone mode already turns usage errors into exit code 2; commands signal their own
    exit codes with typer.Exit.
    """
    try:
        app(args=argv, prog_name="vectorlay-bootstrap")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except VectorlayError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  fix: {e.hint}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
