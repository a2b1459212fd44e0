from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bootstrap.host import Host, LiveHost, TreeHost
from hostsim import build_host, inject, load_topology


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
