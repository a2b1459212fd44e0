"""Property tests over generated GRUB defaults files: idempotence, untouched foreign lines, exact
restore on uninstall, and the shell evaluator agreeing with a real bash."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootstrap import grub
from bootstrap.commands.install import run_install
from bootstrap.commands.uninstall import run_uninstall
from bootstrap.host import TreeHost
from hostsim import build_host, load_topology
from hostsim.snapshot import snapshot
from tests.test_grub import bash_effective

ARGS = [
    "quiet",
    "splash",
    "nomodeset",
    "console=ttyS0,115200n8",
    "intel_iommu=on",
    "iommu=pt",
    "amd_iommu=on",
    "mitigations=off",
    "vfio_pci.disable_idle_d3=1",
    "rd.driver.blacklist=nouveau",
]
VARS = ["GRUB_CMDLINE_LINUX_DEFAULT", "GRUB_CMDLINE_LINUX", "GRUB_TIMEOUT", "GRUB_DEFAULT"]

comment_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\n\r"), max_size=30
)


@st.composite
def assignment(draw: st.DrawFn) -> str:
    var = draw(st.sampled_from(VARS))
    args = draw(st.lists(st.sampled_from(ARGS), max_size=4))
    quote = draw(st.sampled_from(['"', "'", ""]))
    if quote == "" and len(args) > 1:
        quote = '"'
    body = " ".join(args)
    if quote == '"' and draw(st.booleans()):
        body = f"${{{var}}} {body}" if draw(st.booleans()) else f"${var} {body}"
    line = f"{var}={quote}{body}{quote}"
    if draw(st.booleans()):
        line = "export " + line
    if draw(st.booleans()):
        line = draw(st.sampled_from(["", "  ", "\t"])) + line
    if draw(st.booleans()):
        line += "  # " + draw(comment_text)
    return line


line = st.one_of(
    assignment(),
    comment_text.map(lambda t: "#" + t),
    st.sampled_from(["", "   ", "\t"]),
)


@st.composite
def defaults_file(draw: st.DrawFn) -> str:
    lines = draw(st.lists(line, max_size=10))
    return "\n".join(lines) + ("\n" if draw(st.booleans()) else "")


@st.composite
def grub_trees(draw: st.DrawFn) -> dict[str, Any]:
    files = {"/etc/default/grub": draw(defaults_file())}
    if draw(st.booleans()):
        files["/etc/default/grub.d/50-cloudimg-settings.cfg"] = draw(defaults_file())
    if draw(st.booleans()):
        files["/etc/default/grub.d/40-custom.cfg"] = draw(defaults_file())
    if draw(st.booleans()):
        # Someone else's file at the drop-in's path: backed up, replaced, restored on uninstall.
        files[grub.DROPIN] = draw(defaults_file())
    return {"files": files, "vendor": draw(st.sampled_from(["intel", "amd"]))}


def _build(tmp: Path, case: dict[str, Any]) -> Path:
    desc = load_topology("iommu-off")
    desc["cpu"]["vendor"] = case["vendor"]
    desc["files"] = dict(case["files"])
    return build_host(tmp / "host", desc)


def _quiet_install(root: Path) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return run_install(root, only="gpu")


def _etc_default(root: Path) -> dict[str, bytes]:
    base = root / "etc/default"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def _count(values: dict[str, str], arg: str) -> int:
    return (values["GRUB_CMDLINE_LINUX"].split() + values["GRUB_CMDLINE_LINUX_DEFAULT"].split()).count(arg)


FAST = settings(
    max_examples=int(os.environ.get("GRUB_PROPERTY_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FAST
@given(grub_trees())
@pytest.mark.slow
def test_applying_twice_equals_applying_once_and_foreign_lines_are_kept_byte_for_byte(
    case: dict[str, Any],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = _build(Path(tmp), case)
        original = _etc_default(root)
        host = TreeHost(root)
        before = grub.effective_values(host)
        before_with_foreign = grub.effective_values(host, with_dropin=True)
        assert _quiet_install(root) == 3
        once = snapshot(root, skip=("var/log",))
        assert _quiet_install(root) == 3
        assert snapshot(root, skip=("var/log",)) == once

        after = grub.effective_values(host, with_dropin=True)
        for arg in grub.iommu_args(case["vendor"]):
            # Present, and never duplicated by the installer. A foreign file at the drop-in's path
            # that takes nothing the kernel needs away is left alone, so the count may be either
            # side's (e.g. it resets GRUB_CMDLINE_LINUX_DEFAULT while GRUB_CMDLINE_LINUX has the arg).
            most = max(1, _count(before, arg), _count(before_with_foreign, arg))
            assert 1 <= _count(after, arg) <= most
        written = _etc_default(root)
        for name, data in original.items():
            if f"/etc/default/{name}" == grub.DROPIN and written[name] != data:
                backup = root / "var/lib/vectorlay/backup" / grub.DROPIN.lstrip("/")
                assert backup.read_bytes() == data
            else:
                assert written[name] == data


@FAST
@given(grub_trees())
@pytest.mark.slow
def test_uninstall_restores_the_original_bytes(case: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = _build(Path(tmp), case)
        original = _etc_default(root)
        _quiet_install(root)
        with contextlib.redirect_stdout(io.StringIO()):
            assert run_uninstall(root) == 0
        assert _etc_default(root) == original
        for name, data in original.items():
            mode = (root / "etc/default" / name).stat().st_mode & 0o777
            assert mode == 0o644, (name, data)


@settings(max_examples=40, deadline=None)
@given(defaults_file(), defaults_file())
def test_the_shell_evaluator_agrees_with_bash_on_generated_files(main: str, cloud: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "etc/default/grub.d").mkdir(parents=True)
        (root / "etc/default/grub").write_text(main)
        (root / "etc/default/grub.d/50-cloudimg-settings.cfg").write_text(cloud)
        assert grub.effective_values(TreeHost(root)) == bash_effective(root)
