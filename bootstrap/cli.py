"""`vectorlay-bootstrap`: the staged installer's command line (docs/contracts.md#command-line)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from bootstrap.errors import VectorlayError, exit_with

app = typer.Typer(
    name="vectorlay-bootstrap",
    help="Turn this box into a vectorlay provider node (run by the install one-liner).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # typer's rich help panel prints a type after every option, flags too (`--plan <bool>`); the
    # plain formatter, as the doctor uses, shows a flag as a flag.
    rich_markup_mode=None,
)


@app.callback()
def _group() -> None:
    """Turn this box into a vectorlay provider node (run by the install one-liner)."""


def need_root(root: Path) -> None:
    """Commands that change this machine say so before anything else (before the run lock under
    /run/vectorlay, before any file is read). A --root tree is the caller's own directory: there each
    command's own checks decide, as before."""
    if os.geteuid() != 0 and root.resolve() == Path("/"):
        raise VectorlayError("the installer must run as root", "re-run it with sudo")


RootOption = typer.Option(
    Path("/"),
    "--root",
    help="Host root to operate on; anything but / reads and writes only inside it and runs no command.",
    file_okay=False,
)


@app.command()
def detect(
    root: Path = RootOption,
    json_out: bool = typer.Option(
        False, "--json", help="Machine-readable output (fields: docs/contracts.md)."
    ),
) -> None:
    """List GPUs, NVSwitches, IOMMU state and GPU units."""
    from bootstrap.commands.detect import run_detect

    run_detect(root, json_out)


@app.command()
def install(
    root: Path = RootOption,
    plan: bool = typer.Option(False, "--plan", help="Print every change with unified diffs; change nothing."),
    only: str | None = typer.Option(None, "--only", help="Run one stage (and what it needs), e.g. gpu."),
    api: str | None = typer.Option(None, "--api", help="Control-plane URL."),
    ca_file: Path | None = typer.Option(None, "--ca-file", help="Trust this CA for the control plane."),
    gpu_mode: str | None = typer.Option(None, "--gpu-mode", help="passthrough, container or none."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="Read the provisioning token from FILE ('-': stdin); else VECTORLAY_TOKEN."
    ),
    ignore_preflight_errors: str | None = typer.Option(
        None,
        "--ignore-preflight-errors",
        help="Comma-separated checks (kvm, memory, disk) whose failure does not stop the run; for lab "
        "and test machines. Also VECTORLAY_IGNORE_PREFLIGHT_ERRORS.",
    ),
) -> None:
    """Run the installer's stages. Exit 0 done, 1 failed or blocked, 2 usage, 3 reboot required."""
    need_root(root)
    from bootstrap.commands.install import run_install

    code = run_install(
        root,
        plan_only=plan,
        only=only,
        api=api,
        ca_file=ca_file,
        gpu_mode=gpu_mode,
        token_file=token_file,
        ignore_preflight_errors=ignore_preflight_errors,
    )
    raise typer.Exit(code)


@app.command()
def uninstall(
    root: Path = RootOption,
    plan: bool = typer.Option(
        False, "--plan", help="Print what would be removed or restored; change nothing."
    ),
) -> None:
    """Remove what the installer owns and restore the files it replaced."""
    need_root(root)
    from bootstrap.commands.uninstall import run_uninstall

    raise typer.Exit(run_uninstall(root, plan_only=plan))


@app.command()
def update(root: Path = RootOption) -> None:
    """Update the agents from the signed manifest (node-agent-update.timer runs this)."""
    need_root(root)
    from bootstrap.commands.update import run_update

    raise typer.Exit(run_update(root))


@app.command("vfio-bind")
def vfio_bind(
    root: Path = RootOption,
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help="Seconds to wait for each sysfs step."),
) -> None:
    """Bind every passthrough GPU unit and NVSwitch to vfio-pci (vectorlay-vfio-bind.service runs this)."""
    need_root(root)
    from bootstrap.commands.vfio_bind import run_vfio_bind

    raise typer.Exit(run_vfio_bind(root, timeout=timeout))


@app.command("wait-overlay")
def wait_overlay(
    root: Path = RootOption,
    timeout: float = typer.Option(90.0, "--timeout", min=0.0, help="Seconds to wait before failing."),
) -> None:
    """Wait until nebula's device holds this node's overlay IP (nomad.service runs this first)."""
    need_root(root)
    from bootstrap.commands.wait_overlay import run_wait_overlay

    raise typer.Exit(run_wait_overlay(root, timeout=timeout))


@app.command()
def enroll(
    root: Path = RootOption,
    api: str | None = typer.Option(None, "--api", help="Control plane URL (https://...)."),
    ca_file: Path | None = typer.Option(
        None, "--ca-file", help="Trust this CA for the control plane (default: the system trust store)."
    ),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="Read the provisioning token from FILE ('-': stdin); else VECTORLAY_TOKEN."
    ),
) -> None:
    """Exchange a provisioning token for this node's durable identity (or re-enroll it)."""
    need_root(root)
    from bootstrap.commands.enroll import run_enroll

    run_enroll(root, api, ca_file, token_file)


@app.command()
def decommission(
    api: str = typer.Option(..., "--api", help="Control plane URL (https://...)."),
    org: str = typer.Option(..., "--org", help="Your org ID or name."),
    node: str = typer.Option(..., "--node", help="The node ID to remove."),
    ca_file: Path | None = typer.Option(None, "--ca-file", help="Trust this CA for the control plane."),
) -> None:
    """Mark a node removed (frees its GPU units); the API key comes from VL_KEY."""
    from bootstrap.commands.decommission import run_decommission

    run_decommission(api, org, node, ca_file)


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
        exit_with(e)
    except PermissionError as e:
        # What need_root cannot foresee (a file of root's in a --root tree): a message, not a traceback.
        where = f" {e.filename}" if e.filename else ""
        exit_with(VectorlayError(f"permission denied:{where}", "re-run it with sudo"))


if __name__ == "__main__":
    main()
