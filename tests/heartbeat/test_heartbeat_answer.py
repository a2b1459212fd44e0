"""The node-agent holds the heartbeat's answer to its contract (bootstrap.answers.heartbeat) before
status.json keeps any of it: a wrong type, a huge number or an unbounded string is a HeartbeatError
saying what was wrong, never a crash and never written. (The agent's loop with a control plane that
answers garbage is tests/heartbeat/test_agent_e2e.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.agent import HeartbeatError, _check_answer

GOOD = {"status": "active", "advertised_units": 8, "next_heartbeat_s": 240, "reason": None}


def test_a_good_answer_is_kept_as_it_came() -> None:
    assert _check_answer(dict(GOOD)) == GOOD


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"status": {"active": True}}, "status is an object, not active or removed"),
        ({"advertised_units": "8"}, "advertised_units is '8', not a whole number from 0 to 100000"),
        ({"advertised_units": 10**30}, "advertised_units is a huge number"),
        ({"advertised_units": -1}, "advertised_units is -1"),
        ({"advertised_units": True}, "advertised_units is True"),
        ({"next_heartbeat_s": "soon"}, "next_heartbeat_s is 'soon'"),
        ({"next_heartbeat_s": 0}, "next_heartbeat_s is 0"),
        ({"reason": {"why": "x"}}, "reason is an object, not a string"),
        ({"reason": "r" * 1_000_000}, "reason must be 1-500 characters, not 1000000"),
        ({"reason": "stale\x1b[2J"}, "reason holds a control character"),
    ],
)
def test_a_wrong_answer_is_a_heartbeat_error_saying_what_was_wrong(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(HeartbeatError) as refused:
        _check_answer({**GOOD, **change})
    assert message in refused.value.message and len(refused.value.message) < 400
