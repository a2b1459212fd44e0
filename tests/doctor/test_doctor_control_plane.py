"""The doctor's `control_plane` check, from the node-agent's status.json (the agent end to end is in
tests/nodeagent)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from bootstrap.agent_status import STATUS_PATH, iso
from bootstrap.host import Host
from bootstrap.settings import Settings
from doctor.checks import Context
from doctor.checks.enrollment import check_control_plane
from doctor.model import CheckResult, Status

Make = Callable[..., Host]


def _check(host: Host, status: dict[str, object] | str | None) -> CheckResult:
    host.path("/etc/vectorlay/identity").mkdir(parents=True, exist_ok=True)
    path = host.path(STATUS_PATH)
    if status is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(status if isinstance(status, str) else json.dumps(status))
    return check_control_plane(Context(host, Settings()))


def _answer(age: float, **extra: object) -> dict[str, object]:
    return {
        "status": "active",
        "advertised_units": 8,
        "reason": None,
        "heartbeat_at": iso(time.time() - age),
        "interval_s": 240,
        "last_error": None,
        **extra,
    }


def test_a_node_that_is_not_enrolled_has_nothing_to_report(make_host: Make) -> None:
    host = make_host("cpu-only")
    result = check_control_plane(Context(host, Settings()))
    assert (result.status, result.message) == (
        Status.SKIP,
        "not enrolled: nothing to report to the control plane",
    )


def test_a_fresh_heartbeat_passes_with_the_units_advertised_and_its_age(make_host: Make) -> None:
    result = _check(make_host("cpu-only"), _answer(40))
    assert result.status is Status.PASS
    assert result.message in {f"8 GPU unit(s) advertised (heartbeat {s} s ago)" for s in (40, 41)}


def test_the_control_planes_reason_for_advertising_less_is_shown(make_host: Make) -> None:
    result = _check(make_host("cpu-only"), _answer(3, advertised_units=0, reason="memory 90% over 85%"))
    assert result.status is Status.PASS
    assert result.message.startswith("0 GPU unit(s) advertised (heartbeat ")
    assert result.message.endswith(" s ago): memory 90% over 85%")


def test_no_heartbeat_yet_warns_and_says_where_to_look(make_host: Make) -> None:
    statuses: tuple[dict[str, object] | str | None, ...] = (
        None,
        {"last_error": "could not reach https://cp/v1/node/heartbeat"},
    )
    for status in statuses:
        result = _check(make_host("cpu-only"), status)
        assert result.status is Status.WARN, status
        assert result.message.startswith("no heartbeat")
        assert result.hint is not None and "journalctl -u node-agent" in result.hint
    failed = _check(make_host("cpu-only"), {"last_error": "boom 500"})
    assert failed.message == "no heartbeat delivered yet: boom 500"
    # What the agent never writes (it replaces the file atomically) is named as such.
    garbage = _check(make_host("cpu-only"), "not json")
    assert garbage.status is Status.WARN and garbage.message.startswith(
        "/run/vectorlay/node-agent/status.json is not a status the node-agent wrote"
    )


def test_a_heartbeat_older_than_three_intervals_warns(make_host: Make) -> None:
    result = _check(make_host("cpu-only"), _answer(3 * 240 + 10, last_error="returned 500"))
    assert result.status is Status.WARN
    assert result.message.startswith("last heartbeat 73")
    assert result.message.endswith(
        "more than 3 intervals (720 s): nothing advertised; last attempt: returned 500"
    )


def test_a_removed_node_fails_with_the_way_back(make_host: Make) -> None:
    result = _check(make_host("cpu-only"), _answer(5, status="removed", advertised_units=0))
    assert result.status is Status.FAIL
    assert result.message == "the control plane removed this node: none of its GPU units are advertised"
    assert result.hint == "re-run the install one-liner with a new token to bring it back"


def test_a_secret_in_an_old_status_file_is_not_shown(make_host: Make) -> None:
    # Written by hand, or by an agent from before status.json was redacted as written.
    secret = "vnt_" + "s3cr3t" * 7
    failed = _check(make_host("cpu-only"), {"last_error": f"401 refused {secret}"})
    assert failed.message == "no heartbeat delivered yet: 401 refused [redacted]"
    shown = _check(make_host("cpu-only"), _answer(3, reason=f"token {secret}"))
    assert secret not in shown.message and shown.message.endswith(": token [redacted]")
