"""Fixtures for the VM tests (marker `vm`, run by `make test-vm`; `make test` leaves them out)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import TIMINGS, Vm
from image import DEFAULT_RELEASE, RELEASES, GuestImage, ensure_image
from product import installer_wheels

HOST_TOOLS = ("qemu-system-x86_64", "qemu-img", "mformat", "mmd", "mcopy", "mke2fs", "debugfs")


def _log(msg: str) -> None:
    print(msg, flush=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "every_guest: a scenario step every guest runs (the others run on the Debian 12 guest only)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The scenario runs whole on Debian 12; a second guest runs the steps marked every_guest (one-liner,
    reboot, one-liner, the agents under systemd), which keeps both within CI's time. Deselected, not
    skipped: the run's summary counts them as not selected."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        guest = callspec.params.get("guest") if callspec is not None else None
        if guest not in (None, DEFAULT_RELEASE) and item.get_closest_marker("every_guest") is None:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def guest_images() -> Callable[[str], GuestImage]:
    """The cached image of a release (RELEASES' keys), built on first use."""
    missing = [t for t in HOST_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing host tools {', '.join(missing)}: run `make test-vm`, which installs them")
    images: dict[str, GuestImage] = {}

    def _get(key: str) -> GuestImage:
        if key not in images:
            t0 = time.monotonic()
            image = ensure_image(RELEASES[key], _log)
            if image.build_seconds is not None:
                TIMINGS.add(f"{key} guest image build (cold)", image.build_seconds)
            else:
                TIMINGS.add(f"{key} guest image from cache ({image.dir.name})", time.monotonic() - t0)
            images[key] = image
        return images[key]

    return _get


@pytest.fixture(scope="session")
def product_wheels(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    t0 = time.monotonic()
    wheels = installer_wheels(tmp_path_factory.mktemp("dist"))
    TIMINGS.add("project wheel + dependency wheels for every supported Python", time.monotonic() - t0)
    return wheels


@pytest.fixture(scope="module")
def make_vm(
    guest_images: Callable[[str], GuestImage], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Vm]]:
    """Factory for guests (of `image=`, by default the Debian 12 one) that are shut down when the
    module's tests are done."""
    vms: list[Vm] = []

    def _make(image: GuestImage | None = None, **kw: Any) -> Vm:
        vm = Vm(image or guest_images(DEFAULT_RELEASE), tmp_path_factory.mktemp("vm"), log=_log, **kw)
        vms.append(vm)
        return vm

    yield _make
    for vm in vms:
        if vm.running:
            t0 = time.monotonic()
            vm.shutdown()
            TIMINGS.add(f"{vm.name} guest final shutdown", time.monotonic() - t0)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TIMINGS.entries:
        return
    terminalreporter.section("VM timings")
    for what, seconds in TIMINGS.entries:
        terminalreporter.write_line(f"{seconds:8.1f}s  {what}")
