"""A defaults file sourced after 99-vectorlay-iommu.cfg that sets the kernel line again takes the
IOMMU arguments away: the run reads the grub.cfg update-grub generated and stops with an error
naming that file, instead of asking for a reboot that would not help."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from bootstrap.commands.runner import step
from bootstrap.errors import VectorlayError
from bootstrap.host import CommandResult, Host
from bootstrap.settings import Settings
from bootstrap.stages.contract import Context, Facts
from bootstrap.stages.registry import BY_NAME
from bootstrap.state import RunState
from hostsim.kernel import simulated_host
from tests.install.helpers import install

MakeTree = Callable[..., Path]
GRUB_D = "etc/default/grub.d"
IOMMU = {"intel_iommu=on", "iommu=pt"}


def bash_step_by_step(root: Path) -> list[tuple[str, set[str]]]:
    """(file, kernel arguments after sourcing it) for each file grub-mkconfig sources, in a real bash."""
    script = (
        'cd "$1"; for x in ./etc/default/grub ./etc/default/grub.d/*.cfg; do [ -e "$x" ] || continue; '
        '. "$x"; printf "%s\\t%s %s\\n" "${x#.}" "$GRUB_CMDLINE_LINUX" "$GRUB_CMDLINE_LINUX_DEFAULT"; done'
    )
    out = subprocess.run(
        ["bash", "-c", script, "bash", str(root)],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    ).stdout
    return [(f, set(args.split())) for f, _, args in (line.partition("\t") for line in out.splitlines())]


def bash_culprit(root: Path) -> str | None:
    culprit: str | None = None
    had: set[str] = set()
    for f, args in bash_step_by_step(root):
        if (had & IOMMU) - args:
            culprit = f
        had = args
    return culprit


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("99-zz-reset.cfg", 'GRUB_CMDLINE_LINUX_DEFAULT="quiet splash"\n'),
        ("zz-local.cfg", "export GRUB_CMDLINE_LINUX_DEFAULT='console=ttyS0,115200'\n"),
        ("99-z.cfg", 'OPTS="quiet"\nGRUB_CMDLINE_LINUX_DEFAULT=$OPTS\n'),
    ],
    ids=["issue-example", "export-single-quotes", "through-a-variable"],
)
def test_a_later_drop_in_that_resets_the_line_stops_the_run_naming_it(
    make_tree: MakeTree, name: str, text: str
) -> None:
    tree = make_tree("iommu-off")  # without the reset this run asks for a reboot (exit 3)
    (tree / GRUB_D).mkdir(parents=True, exist_ok=True)
    (tree / GRUB_D / name).write_text(text)
    res = install(tree, "--only", "gpu")
    out = res.stdout + res.stderr
    assert "Traceback" not in out
    assert res.returncode == 1, out
    assert (
        f"/boot/grub/grub.cfg was generated without intel_iommu=on iommu=pt: /{GRUB_D}/{name}" in res.stderr
    )
    assert "reboot" not in res.stdout.lower().split("error")[0].splitlines()[-1]
    state = json.loads((tree / "var/lib/vectorlay/state.json").read_text())
    assert state.get("reboot_requested_boot_id") is None
    # The file named is the one real bash shows taking the arguments away.
    assert bash_culprit(tree) == f"/{GRUB_D}/{name}"


def test_a_later_drop_in_that_appends_is_fine(make_tree: MakeTree) -> None:
    tree = make_tree("iommu-off")
    (tree / GRUB_D).mkdir(parents=True, exist_ok=True)
    (tree / GRUB_D / "zz-local.cfg").write_text(
        'GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT quiet"\n'
    )
    res = install(tree, "--only", "gpu")
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr
    assert bash_culprit(tree) is None


def test_a_grub_cfg_without_the_args_and_no_defaults_file_to_blame_points_at_grub_d_scripts(
    make_tree: MakeTree,
) -> None:
    host, _sim, _services = simulated_host(make_tree("iommu-off"))

    def mkconfig_ignoring_defaults(h: Host, argv: tuple[str, ...]) -> CommandResult:
        # What a custom /etc/grub.d script that writes its own menu entries produces.
        h.path("/boot/grub/grub.cfg").write_text(
            "menuentry 'x' {\n\tlinux\t/boot/vmlinuz root=/dev/sda1 ro\n}\n"
        )
        return CommandResult(argv, 0)

    assert isinstance(host.runner.handlers, dict)  # type: ignore[attr-defined]
    host.runner.handlers["update-grub"] = mkconfig_ignoring_defaults  # type: ignore[attr-defined]
    ctx = Context(host=host, settings=Settings(), state=RunState(), out=lambda _m: None)
    with pytest.raises(VectorlayError) as err:
        step(ctx, BY_NAME["gpu"], Facts(), plan_only=False)
    assert "no file in /etc/default/grub or /etc/default/grub.d takes it away" in err.value.message
    assert err.value.hint is not None and "/etc/grub.d/" in err.value.hint
    assert ctx.state.reboot_requested_boot_id is None
