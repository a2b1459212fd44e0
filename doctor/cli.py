"""`vectorlay-node-doctor [--root DIR] [--json] [--prometheus FILE] [--probe-units]`.

Start-up time is part of the product (it is benchmarked against virt-host-validate, and the node-agent
and the textfile timer run the doctor often): heavy modules (rich, yaml, cryptography, requests) are
never imported on the common path. Importing typer costs more than the checks themselves (its parser,
and pydantic for every path option), so `main` parses the documented options by hand and hands argv to
typer only when typer has something to say: `--help`, a usage error, or a spelling the hand parser
does not take (a value starting with `-`, `--`, anything unknown), which typer then answers as before.
"""

from __future__ import annotations

import gc
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bootstrap.errors import VectorlayError, exit_with

if TYPE_CHECKING:
    import typer

    from bootstrap.host import Host
    from bootstrap.vmprobe import ProbeResult


def run(
    root: Path, json_out: bool, prometheus: Path | None, host: Host | None = None, probe_units: bool = False
) -> int:
    """Run the checks (after the VM-attach probe, if asked), print, write the metrics file if asked;
    return the exit code."""
    if host is None and os.geteuid() != 0 and root.resolve() == Path("/"):
        # The node's identity (0700), the node token and the agents' state are root's alone: as
        # another user half the checks would fail for a reason that is not the node's.
        raise VectorlayError(
            "vectorlay-node-doctor must run as root", "re-run it with sudo: sudo vectorlay-node-doctor"
        )
    from bootstrap.host import open_host
    from doctor.checks import run_checks
    from doctor.render import render_json, render_prometheus, render_text, use_colour

    host = host or open_host(root)
    probes = _probe(host) if probe_units else None
    report = run_checks(host)
    if json_out:
        text = render_json(report)
        if probes is not None:
            import json

            data = json.loads(text)
            data["probes"] = [p.to_json() for p in probes]
            text = json.dumps(data, indent=2) + "\n"
        sys.stdout.write(text)
    else:
        if probes is not None:
            sys.stdout.write(_probe_text(probes))
        sys.stdout.write(render_text(report, colour=use_colour(sys.stdout)))
    sys.stdout.flush()
    if prometheus is not None:
        from bootstrap.fsutil import atomic_write

        try:
            # Not durable: the textfile timer rewrites it on every run, so a crash that brings back
            # the previous run's (complete) file loses nothing, and the directory's sync was the
            # slowest step of a --prometheus run.
            atomic_write(prometheus, render_prometheus(report), mode=0o644, durable=False)
        except OSError as e:
            raise VectorlayError(
                f"cannot write {prometheus}: {e.strerror}",
                "point --prometheus at node_exporter's textfile directory, writable by this user",
            ) from None
    return report.exit_code


def _probe(host: Host) -> list[ProbeResult]:
    """The VM-attach probe of every unit whose group is on vfio-pci (rented ones skipped); its records
    are what the checks then read."""
    from bootstrap.discovery import discover
    from bootstrap.settings import load_settings
    from bootstrap.vmprobe import probe_units

    return probe_units(host, discover(host, load_settings(host), with_names=False))


def _probe_text(probes: list[ProbeResult]) -> str:
    from bootstrap.vmprobe import Outcome

    if not probes:
        return "VM-attach probe: no unit has its IOMMU group on vfio-pci; nothing to probe\n\n"
    lines = []
    for p in probes:
        lines.append(f"VM-attach probe: unit {p.unit} ({', '.join(p.devices)}): {p.message}")
        if p.outcome is Outcome.FAILED and p.error and p.error.splitlines()[0] not in p.message:
            lines.append(f"  error: {p.error}")
        if p.hint and p.outcome is not Outcome.ATTACHED:
            lines.append(f"  fix: {p.hint}")
    return "\n".join(lines) + "\n\n"


_HELP = "Check this provider node's health: PASS/WARN/FAIL per check and a final verdict."


def _parse_fast(args: list[str]) -> tuple[Path, bool, Path | None] | None:
    """(root, json, prometheus) when typer would accept `args` as they are; else None, and typer decides.

    Mirrors typer: the last --root / --prometheus wins, `--opt=value` is the same as `--opt value`, and
    the values pass typer's own path checks (--root: a readable directory; --prometheus: not a
    directory, readable if it exists). Whatever would fail those checks is left to typer, so that
    every error message and exit code stays typer's.
    """
    root, json_out, prometheus = "/", False, None
    rest = iter(args)
    for arg in rest:
        if arg == "--json":
            json_out = True
            continue
        name, eq, value = arg.partition("=")
        if name not in ("--root", "--prometheus"):
            return None
        if not eq:
            value = next(rest, "")
        if not value or value.startswith("-"):
            return None
        if name == "--root":
            root = value
        else:
            prometheus = value
    try:
        st = os.stat(root)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or not os.access(root, os.R_OK):
        return None
    if prometheus is not None:
        try:
            st = os.stat(prometheus)
        except OSError:
            pass  # typer's path option does not need it to exist
        else:
            if stat.S_ISDIR(st.st_mode) or not os.access(prometheus, os.R_OK):
                return None
    return Path(root), json_out, None if prometheus is None else Path(prometheus)


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
        probe_units: bool = typer.Option(
            False,
            "--probe-units",
            help="First start QEMU (package qemu-system-x86) with each unit's devices on vfio-pci, "
            "no guest OS, to prove a VM can attach them; units in use are skipped. "
            "With --json the results are in `probes`.",
        ),
    ) -> None:
        if not root.is_dir():
            raise typer.BadParameter(f"{root} is not a directory", param_hint="'--root'")
        raise typer.Exit(run(root, json_out, prometheus, probe_units=probe_units))

    return app


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: errors become a message and an exit code, never a traceback."""
    args = sys.argv[1:] if argv is None else argv
    # The run allocates thousands of objects (modules, classes, functions) and frees almost none
    # before it exits: the collector's passes over them are start-up time spent finding nothing.
    # Restored on the way out, for callers (tests) that call main() in their own process.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        parsed = _parse_fast(args)
        if parsed is not None:
            sys.exit(run(*parsed))
        _app()(args=args, prog_name="vectorlay-node-doctor")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except VectorlayError as e:
        exit_with(e)
    except PermissionError as e:  # a --root tree with files of root's, read by another user
        where = f" {e.filename}" if e.filename else ""
        exit_with(VectorlayError(f"permission denied:{where}", "re-run it with sudo"))
    except Exception as e:  # a doctor must still answer: report the bug, not a traceback
        print(f"error: the doctor crashed: {type(e).__name__}: {e}", file=sys.stderr)
        print("  fix: report this with the output of: vectorlay-node-doctor --json", file=sys.stderr)
        sys.exit(1)
    finally:
        if gc_was_enabled:
            gc.enable()


if __name__ == "__main__":
    main()
