"""A renewal killed at any point leaves a working identity, and the next run converges.

Each case forks, runs the node-agent's real renewal against the real control plane, and SIGKILLs
itself at one of its fault points (no cleanup handler, no `finally`: a power cut or the OOM killer).
The parent checks that the identity on disk is complete, that the control plane accepts it, and that
a renewal afterwards succeeds and leaves nebula and Nomad told about the identity in force.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap.api import ApiClient, ClientCert
from bootstrap.enroll import RENEW_POINTS, enroll
from bootstrap.fsutil import set_fault_hook
from bootstrap.host import RecordingRunner, TreeHost
from bootstrap.identity import WRITE_POINTS, load_identity
from bootstrap.paths import IDENTITY_DIR, IDENTITY_FILES
from nodeagent.renewal import RELOAD_UNITS, RELOADED_FILE, Renewer

IDENTITY_POINTS = tuple(f"enroll {p}" for p in (*RENEW_POINTS, *WRITE_POINTS))
SWITCH = IDENTITY_POINTS.index("enroll switched")


def _reload_points(root: Path) -> tuple[str, ...]:
    return (
        *(f"run systemctl reload {unit}" for unit in RELOAD_UNITS),
        f"write {root / RELOADED_FILE.lstrip('/')}",
    )


def _renewer(root: Path, cp: Any) -> Renewer:
    return Renewer(TreeHost(root, RecordingRunner()), lambda _ident: str(cp.url), timeout=20.0)


def _renew_killed_at(point: str, root: Path, cp: Any) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        try:

            def hook(reached: str) -> None:
                if reached == point:
                    os.kill(os.getpid(), signal.SIGKILL)

            set_fault_hook(hook)
            _renewer(root, cp).renew()
        finally:
            os._exit(3)  # reached only if the kill point was never hit
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _identity_files(root: Path) -> dict[str, bytes]:
    idir = root / IDENTITY_DIR.lstrip("/")
    return {p.name: p.read_bytes() for p in sorted(idir.iterdir())}


def _works(cp: Any, root: Path) -> dict[str, Any]:
    ident = load_identity(TreeHost(root))
    assert ident is not None
    api = ApiClient(
        cp.url, ca_file=cp.ca_file, client_cert=ClientCert(ident.cert_file, ident.key_file), attempts=1
    )
    try:
        answer: dict[str, Any] = api.request("GET", "/v1/node/self", bearer=ident.node_token())
        return answer
    finally:
        api.close()


def test_a_renewal_passes_every_fault_point_in_order(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    control_plane.org("acme")
    root = make_tree("cpu-only")
    enroll(
        TreeHost(root),
        ApiClient(control_plane.url, ca_file=control_plane.ca_file),
        control_plane.token("acme"),
        gpu_mode="none",
        hardware={},
    )
    reached: list[str] = []
    wanted = set(IDENTITY_POINTS) | set(_reload_points(root))
    previous = set_fault_hook(lambda what: reached.append(what) if what in wanted else None)
    try:
        _renewer(root, control_plane).renew()
    finally:
        set_fault_hook(previous)
    assert tuple(reached) == IDENTITY_POINTS + _reload_points(root)


@pytest.mark.slow
def test_killing_a_renewal_at_any_point_leaves_a_working_identity_and_the_next_run_converges(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    control_plane.org("acme")
    root = make_tree("cpu-only")
    first = enroll(
        TreeHost(root),
        ApiClient(control_plane.url, ca_file=control_plane.ca_file),
        control_plane.token("acme"),
        gpu_mode="none",
        hardware={},
    )
    _renewer(root, control_plane).renew()  # nebula and Nomad told about the enrolled identity
    reloaded = root / RELOADED_FILE.lstrip("/")
    link = root / IDENTITY_DIR.lstrip("/")

    for i, point in enumerate(IDENTITY_POINTS + _reload_points(root)):
        before = _identity_files(root)
        assert _renew_killed_at(point, root, control_plane) == -signal.SIGKILL, point

        ident = load_identity(TreeHost(root))  # raises if incomplete or damaged
        assert ident is not None, point
        after = _identity_files(root)
        assert set(IDENTITY_FILES) <= set(after), point
        if i < SWITCH:
            assert after == before, f"killed at {point}: the identity changed before the switch"
        else:
            assert after["node-token"] != before["node-token"], point
        assert (ident.node_id, ident.overlay_ip) == (first.node_id, first.overlay_ip), point
        assert _works(control_plane, root)["node_id"] == first.node_id, point
        switched = reloaded.read_text().strip() != link.readlink().name

        # The next run (the agent restarted by systemd) repairs what the kill left undone.
        renewer = _renewer(root, control_plane)
        runner = renewer.host.runner
        assert isinstance(runner, RecordingRunner)
        renewer.tick()  # not due: only the reload a kill after the switch left owed
        told = [c for c in runner.commands if c[1] == "reload"]
        assert bool(told) == switched, point
        assert reloaded.read_text().strip() == link.readlink().name, point

    again = _renewer(root, control_plane).renew()
    assert (again.node_id, again.overlay_ip) == (first.node_id, first.overlay_ip)
    assert _works(control_plane, root)["node_id"] == first.node_id
    base = root / "etc/vectorlay"
    assert [p.name for p in base.iterdir() if p.name.startswith(".identity-")] == [os.readlink(link)]
    assert len(control_plane.admin.org_summary("acme")["nodes"]) == 1
