"""Each doctor check has exactly one record (doctor.checks.CHECKS), and everything that names a
check (the renderer's labels, the modes, preflight, --ignore-preflight-errors) reads it."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest

from bootstrap.commands.doctor_port import doctor_port
from bootstrap.commands.install import parse_ignored_checks
from bootstrap.errors import UsageError
from bootstrap.host import Host
from bootstrap.settings import GPU_MODES, Settings
from doctor import checks
from doctor.checks import CHECKS, PREFLIGHT, WAIVABLE, Context, check, run_checks
from doctor.render import render_text

Make = Callable[..., Host]


def test_every_check_function_has_a_record_and_every_record_a_check_function() -> None:
    functions = {
        name: obj
        for module in checks.MODULES
        for name, obj in vars(module).items()
        if name.startswith("check_") and inspect.isfunction(obj) and obj.__module__ == module.__name__
    }
    assert {f"check_{name}" for name in CHECKS} == set(functions)
    # The order they run and show in: the modules' order, then the functions' in each module.
    in_source = sorted(
        functions.values(),
        key=lambda f: (checks.MODULES.index(inspect.getmodule(f)), inspect.getsourcelines(f)[1]),
    )
    assert [f"check_{name}" for name in CHECKS] == [f.__name__ for f in in_source]
    for name, spec in CHECKS.items():
        assert spec.name == name
        assert spec.run is functions[f"check_{name}"]


def test_every_record_has_a_label_that_fits_the_aligned_column() -> None:
    for spec in CHECKS.values():
        assert spec.label.strip() and len(spec.label) < 15, spec.name
        assert spec.modes and spec.modes <= set(GPU_MODES), spec.name


@pytest.mark.parametrize("fixture", ["cpu-only", "hgx-h100"])
def test_each_check_names_its_results_as_its_record_does(sim_host: Make, fixture: str) -> None:
    host = sim_host(fixture)
    report = run_checks(host, env={}, only=list(CHECKS))
    assert [r.name for r in report.results] == list(CHECKS)
    ctx = Context(host, Settings())
    assert [spec.run(ctx).name for spec in CHECKS.values()] == list(CHECKS)
    text = render_text(report)
    assert all(f"  {spec.label}:" in text for spec in CHECKS.values())


def test_preflight_and_the_waiver_read_the_records() -> None:
    assert PREFLIGHT == ("kvm", "disk", "memory") == WAIVABLE
    assert doctor_port().preflight_checks == PREFLIGHT
    assert parse_ignored_checks("kvm, memory disk") == frozenset(WAIVABLE)
    with pytest.raises(UsageError, match="iommu cannot be ignored") as raised:
        parse_ignored_checks("iommu")
    assert raised.value.hint == "only kvm, disk, memory can (for lab and test machines)"


def test_a_check_registered_twice_or_waivable_outside_preflight_is_refused() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        check("kvm", "KVM again")
    with pytest.raises(ValueError, match="only a check preflight runs"):
        check("new_check", "New", waivable=True)
    assert "new_check" not in CHECKS
