"""Fixtures for the VM tests (marker `vm`, run by `make test-vm`; `make test` leaves them out)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import TIMINGS, Vm
from image import GuestImage, ensure_image
from product import build_project_wheel, ensure_wheelhouse

HOST_TOOLS = ("qemu-system-x86_64", "qemu-img", "mformat", "mmd", "mcopy", "mke2fs", "debugfs")


def _log(msg: str) -> None:
    print(msg, flush=True)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    missing = [t for t in HOST_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing host tools {', '.join(missing)}: run `make test-vm`, which installs them")
    t0 = time.monotonic()
    image = ensure_image(_log)
    if image.build_seconds is not None:
        TIMINGS.add("guest image build (cold)", image.build_seconds)
    else:
        TIMINGS.add(f"guest image from cache ({image.dir.name})", time.monotonic() - t0)
    return image


@pytest.fixture(scope="session")
def product_wheels(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    t0 = time.monotonic()
    wheel = build_project_wheel(tmp_path_factory.mktemp("dist"))
    house = ensure_wheelhouse(wheel)
    TIMINGS.add("project wheel + wheelhouse", time.monotonic() - t0)
    return [wheel, *sorted(house.glob("*.whl"))]


@pytest.fixture(scope="module")
def make_vm(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Vm]]:
    """Factory for guests that are shut down when the module's tests are done."""
    vms: list[Vm] = []

    def _make(**kw: Any) -> Vm:
        vm = Vm(guest_image, tmp_path_factory.mktemp("vm"), log=_log, **kw)
        vms.append(vm)
        return vm

    yield _make
    for vm in vms:
        t0 = time.monotonic()
        vm.shutdown()
        TIMINGS.add("guest final shutdown", time.monotonic() - t0)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TIMINGS.entries:
        return
    terminalreporter.section("VM timings")
    for what, seconds in TIMINGS.entries:
        terminalreporter.write_line(f"{seconds:8.1f}s  {what}")
