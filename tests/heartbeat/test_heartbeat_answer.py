"""The node-agent holds the heartbeat's answer to its contract (bootstrap.answers.heartbeat) before
status.json keeps any of it: a wrong type, a huge number or an unbounded string is a HeartbeatError
saying what was wrong, never a crash and never written. (The agent's loop with a control plane that
answers garbage is tests/heartbeat/test_agent_e2e.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.agent import HeartbeatError, _check_answer, describe

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


WITHHELD = [
    {"id": "24", "reasons": ["GPU 0000:18:00.0 does not answer (config space reads 0xffff)"]},
    {"id": "99", "reasons": ["not among the enrolled units"]},
]


def test_the_withheld_units_are_kept_and_shown_on_the_status_line() -> None:
    answer = _check_answer({**GOOD, "advertised_units": 7, "withheld": WITHHELD})
    assert answer["withheld"] == WITHHELD
    assert describe({**answer, "reason": "1 ready unit(s) not among the enrolled units (99)"}) == (
        "active, 7 GPU unit(s) advertised (1 ready unit(s) not among the enrolled units (99)); withheld: "
        "24 (GPU 0000:18:00.0 does not answer (config space reads 0xffff)), 99 (not among the enrolled units)"
    )
    # An older control plane's answer has none: the line is as before.
    assert describe(_check_answer(dict(GOOD))) == "active, 8 GPU unit(s) advertised"


def test_a_long_withheld_list_stays_one_bounded_line() -> None:
    many = [{"id": str(g), "reasons": ["node draining"]} for g in range(64)]
    line = describe(_check_answer({**GOOD, "advertised_units": 0, "reason": "draining", "withheld": many}))
    assert line.endswith("3 (node draining) and 60 more") and len(line) < 300


def test_a_secret_echoed_in_a_withheld_reason_is_redacted() -> None:
    token = "vnt_" + "s" * 43
    answer = _check_answer({**GOOD, "withheld": [{"id": "24", "reasons": [f"bad token {token}"]}]})
    assert token not in str(answer) and answer["withheld"][0]["reasons"][0].startswith("bad token ")


@pytest.mark.parametrize(
    ("withheld", "message"),
    [
        ("24", "withheld is '24', not a list"),
        ([{"id": "24", "reasons": ["x"]}] * 65, "withheld must hold 0-64 entries, not 65"),
        ([["24"]], "withheld[0] is a list, not an object"),
        ([{"id": "../24", "reasons": []}], "withheld[0].id '../24' is not of the expected form"),
        ([{"id": 24, "reasons": []}], "withheld[0].id is 24, not a string"),
        ([{"id": "24", "reasons": "wedged"}], "withheld[0].reasons is 'wedged', not a list"),
        ([{"id": "24", "reasons": ["r"] * 33}], "withheld[0].reasons must hold 0-32 entries, not 33"),
        ([{"id": "24", "reasons": ["wedged\x1b[2J"]}], "withheld[0].reasons[0] holds a control character"),
        ([{"id": "24", "reasons": ["r" * 501]}], "withheld[0].reasons[0] must be 1-500 characters, not 501"),
    ],
)
def test_a_wrong_withheld_list_is_a_heartbeat_error(withheld: Any, message: str) -> None:
    with pytest.raises(HeartbeatError) as refused:
        _check_answer({**GOOD, "withheld": withheld})
    assert message in refused.value.message
