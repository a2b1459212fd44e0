"""An enrollment killed at any point leaves the identity complete: the old one or the new one.

Each case forks, runs the real enroll() against the real control plane, and SIGKILLs itself at one
of the writer's fault points: no cleanup handler, no `finally`, exactly like a power cut or the OOM
killer. The parent then inspects the tree and checks the identity still works with the server.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap.api import ApiClient, ApiError, ClientCert
from bootstrap.enroll import ENROLL_POINTS, enroll
from bootstrap.fsutil import set_fault_hook
from bootstrap.host import TreeHost
from bootstrap.identity import WRITE_POINTS, load_identity
from bootstrap.paths import IDENTITY_DIR, IDENTITY_FILES

POINTS = ENROLL_POINTS + WRITE_POINTS
SWITCH = POINTS.index("switched")


def _api(cp: Any) -> ApiClient:
    return ApiClient(cp.url, ca_file=cp.ca_file, attempts=1)


def _enroll_killed_at(point: str, root: Path, cp: Any, token: str) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        try:

            def hook(reached: str) -> None:
                if reached == f"enroll {point}":
                    os.kill(os.getpid(), signal.SIGKILL)

            set_fault_hook(hook)
            enroll(TreeHost(root), _api(cp), token, gpu_mode="none", hardware={})
        finally:
            os._exit(3)  # reached only if the kill point was never hit
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _identity_files(root: Path) -> dict[str, bytes]:
    idir = root / IDENTITY_DIR.lstrip("/")
    return {p.name: p.read_bytes() for p in sorted(idir.iterdir())}


def _works(cp: Any, root: Path) -> str:
    """GET /v1/node/self with whatever identity is on disk; returns the node ID it proves."""
    ident = load_identity(TreeHost(root))
    assert ident is not None
    api = ApiClient(
        cp.url, ca_file=cp.ca_file, client_cert=ClientCert(ident.cert_file, ident.key_file), attempts=1
    )
    try:
        return str(api.request("GET", "/v1/node/self", bearer=ident.node_token())["node_id"])
    finally:
        api.close()


def test_the_fault_points_cover_request_to_cleanup_in_order(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    # The kill test below walks POINTS; it only proves something if a real re-enrollment reaches
    # every one of them, once each and in that order, from before the request to the old
    # generation's removal.
    control_plane.org("acme")
    root = make_tree("cpu-only")
    enroll(TreeHost(root), _api(control_plane), control_plane.token("acme"), gpu_mode="none", hardware={})
    reached: list[str] = []

    def hook(what: str) -> None:
        # The enrollment's own points, among the file writes and syncs every run passes.
        if what.startswith("enroll "):
            reached.append(what.removeprefix("enroll "))

    previous = set_fault_hook(hook)
    try:
        enroll(TreeHost(root), _api(control_plane), control_plane.token("acme"), gpu_mode="none", hardware={})
    finally:
        set_fault_hook(previous)
    assert tuple(reached) == POINTS
    assert reached[0] == "before-request" and reached[-1] == "old-removed"
    assert reached.index("response-received") < reached.index("generation-created") < SWITCH


@pytest.mark.slow
def test_killing_a_reenrollment_at_any_point_leaves_the_old_or_the_new_identity_and_both_work(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    control_plane.org("acme")
    root = make_tree("cpu-only")
    first = enroll(
        TreeHost(root), _api(control_plane), control_plane.token("acme"), gpu_mode="none", hardware={}
    )

    for i, point in enumerate(POINTS):
        before = _identity_files(root)
        assert _enroll_killed_at(point, root, control_plane, control_plane.token("acme")) == -signal.SIGKILL

        ident = load_identity(TreeHost(root))  # raises if incomplete or damaged
        assert ident is not None, point
        after = _identity_files(root)
        assert set(IDENTITY_FILES) <= set(after), point
        if i < SWITCH:
            assert after == before, f"killed at {point}: the identity changed before the switch"
        else:
            assert after != before and ident.node_token() != before["node-token"].decode().strip(), point
        assert ident.node_id == first.node_id
        # Whichever identity survived, the control plane still accepts it.
        assert _works(control_plane, root) == first.node_id, point

    # A normal run afterwards re-enrolls the same node and sweeps the debris of the killed runs.
    again = enroll(
        TreeHost(root), _api(control_plane), control_plane.token("acme"), gpu_mode="none", hardware={}
    )
    assert (again.node_id, again.overlay_ip, again.reenrolled) == (first.node_id, first.overlay_ip, True)
    base = root / "etc/vectorlay"
    assert [p.name for p in base.iterdir() if p.name.startswith(".identity-")] == [
        os.readlink(base / "identity")
    ]
    assert len(control_plane.admin.org_summary("acme")["nodes"]) == 1


@pytest.mark.parametrize("point", [POINTS[SWITCH - 1], "switched"])
def test_killing_a_first_enrollment_leaves_no_identity_or_a_complete_one(
    point: str, make_tree: Callable[..., Path], control_plane: Any
) -> None:
    control_plane.org("acme")
    root = make_tree("cpu-only")
    assert _enroll_killed_at(point, root, control_plane, control_plane.token("acme")) == -signal.SIGKILL
    ident = load_identity(TreeHost(root))
    if point == "switched":
        assert ident is not None and _works(control_plane, root) == ident.node_id
    else:
        assert ident is None and not (root / IDENTITY_DIR.lstrip("/")).exists()


def test_a_stale_identity_is_refused_rather_than_silently_replaced_by_a_new_node(
    make_tree: Callable[..., Path], control_plane: Any, tmp_path: Path
) -> None:
    control_plane.org("acme")
    root = make_tree("cpu-only")
    enroll(TreeHost(root), _api(control_plane), control_plane.token("acme"), gpu_mode="none", hardware={})
    stale = _identity_files(root)
    for _ in range(2):  # two completed rotations retire the saved pair for good
        enroll(TreeHost(root), _api(control_plane), control_plane.token("acme"), gpu_mode="none", hardware={})
    idir = root / IDENTITY_DIR.lstrip("/")
    for name, data in stale.items():
        (idir / name).write_bytes(data)
    token = control_plane.token("acme")
    with pytest.raises(Exception, match="no longer accepts this node's identity") as e:
        enroll(TreeHost(root), _api(control_plane), token, gpu_mode="none", hardware={})
    assert not isinstance(e.value, ApiError) or e.value.status == 401
    assert control_plane.admin.introspect(token)["valid"] is True
    assert _identity_files(root) == stale
