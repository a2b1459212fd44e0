from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bootstrap.host import Host, LiveHost, TreeHost
from hostsim import build_host, inject, load_topology
from tests.install import killpoints


def pytest_addoption(parser: pytest.Parser) -> None:
    killpoints.add_option(parser)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A program the tests run that is not installed fails its test with what to do, not with
    `FileNotFoundError: [Errno 2] No such file or directory: 'go'` and a traceback through subprocess."""
    outcome = yield
    report = outcome.get_result()
    e = call.excinfo.value if call.excinfo is not None else None
    if (
        report.failed
        and isinstance(e, FileNotFoundError)
        and e.errno == errno.ENOENT
        and isinstance(e.filename, str)
        and os.sep not in e.filename
    ):
        report.longrepr = (
            f"{e.filename}: not installed on this machine, and this test runs it.\n"
            "Install what the tests need with `make deps` (tests/deps.sh: apt-get as root, else it names "
            "the packages and the command)."
        )


@pytest.fixture(autouse=True)
def _forbid_live_root(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[None]:
    """Code that forgets --root and reaches for the real / fails, unless the test is marked `live`:
    here by guarding the LiveHost constructor, in the product's subprocesses through hostsim.inject.env()
    (which hands the variable on)."""
    if request.node.get_closest_marker("live") is None:
        monkeypatch.setattr(LiveHost, "__init__", inject.guarded_init(LiveHost.__init__))
        monkeypatch.setenv(inject.FORBID_LIVE_ENV, "1")
    yield


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[..., Path]:
    """Build a named topology (optionally changed by `edit`) under a fresh directory."""
    counter = iter(range(1_000_000))

    def _make(name: str, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
        desc = load_topology(name)
        if edit is not None:
            edit(desc)
        return build_host(tmp_path / f"{name}-{next(counter)}", desc)

    return _make


@pytest.fixture
def make_host(make_tree: Callable[..., Path]) -> Callable[..., Host]:
    def _make(name: str, edit: Callable[[dict[str, Any]], None] | None = None) -> Host:
        return TreeHost(make_tree(name, edit))

    return _make


@pytest.fixture
def start_control_plane(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start real control planes on loopback (fresh port, database, state dir); stopped afterwards."""
    from controlplane import testing

    started: list[testing.RunningControlPlane] = []
    counter = iter(range(1_000_000))

    def _start(**kwargs: Any) -> testing.RunningControlPlane:
        cp = testing.start(tmp_path / f"control-plane-{next(counter)}", **kwargs)
        started.append(cp)
        return cp

    yield _start
    for cp in started:
        testing.stop(cp)


@pytest.fixture
def control_plane(start_control_plane: Callable[..., Any]) -> Any:
    return start_control_plane()


@pytest.fixture(scope="session")
def dockerd() -> Path:
    """Debian 12's dockerd, containerd and runc, unpacked from Debian's archive into the cache
    (hostsim.dockerd; .ci/run fetches them first). Without them the daemon.json a container-mode node
    writes meets no real dockerd, so the tests fail rather than skip."""
    from hostsim import dockerd as real

    try:
        return real.fetch()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        pytest.fail(f"cannot get Debian's dockerd ({e}); run: python -m hostsim.dockerd fetch")


@pytest.fixture(scope="session")
def runsc_releases() -> dict[str, Path]:
    """The real runsc binaries (gVisor release -> path), from Debian's archive into the cache
    (hostsim.runsc; .ci/run fetches them first). Without them the container-mode tests cannot show
    anything, so they fail rather than skip."""
    from hostsim import runsc

    try:
        return runsc.fetch()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        pytest.fail(
            f"cannot get the real runsc from Debian's archive ({e}); run: python -m hostsim.runsc fetch"
        )


@pytest.fixture(scope="session")
def promtool() -> Path:
    """Prometheus' promtool, from Debian's prometheus package into the cache (hostsim.promtool; .ci/run
    fetches it first). Without it the doctor's metrics meet no real linter, so the test fails rather
    than skips."""
    from hostsim import promtool as real

    try:
        return real.fetch()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        pytest.fail(f"cannot get Debian's promtool ({e}); run: python -m hostsim.promtool fetch")
