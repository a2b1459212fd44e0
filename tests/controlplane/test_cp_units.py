"""Per-unit advertising against the real control plane over real TLS: a heartbeat carrying the
doctor's `units` gets exactly its ready and degraded units among those it enrolled with advertised,
and the answer and the provider listing say why each other unit is withheld. An agent that sends
no units keeps the node-level count rule."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controlplane import testing
from controlplane.db import SCHEMA_VERSION
from hostsim.demo import build_container_host
from tests.controlplane import test_cp_heartbeat
from tests.controlplane.test_cp_heartbeat import GOOD, Node, only_node
from tests.controlplane.unit_bodies import LINK_X8, WEDGED, unit, with_units

pytestmark = pytest.mark.slow
enrolled = test_cp_heartbeat.enrolled  # the fixture: a node enrolled through the real CLI

# hgx-h100 (hostsim/topologies): its eight GPUs sit alone in IOMMU groups 24 to 31, the units it
# enrolls with; 99 is a group it never enrolled.
ENROLLED = [str(g) for g in range(24, 32)]
EIGHT_AND_A_STRANGER = [
    unit("24", "not_ready", [WEDGED]),
    unit("25", "degraded", [LINK_X8]),
    *(unit(g) for g in ENROLLED[2:]),
    unit("99"),
]


def _units(seen: dict[str, Any]) -> dict[str, tuple[bool, list[str]]]:
    return {u["id"]: (u["advertised"], u["reasons"]) for u in seen["units"]}


def test_only_the_ready_and_degraded_enrolled_units_are_advertised_and_the_rest_say_why(
    control_plane: testing.RunningControlPlane, enrolled: Callable[..., Node]
) -> None:
    control_plane.org("acme")
    key = control_plane.api_key("acme")
    node = enrolled(control_plane, "acme")
    r = node.beat(with_units(EIGHT_AND_A_STRANGER))
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "active",
        "advertised_units": 7,
        "next_heartbeat_s": 240,
        "reason": "1 ready unit(s) not among the enrolled units (99)",
        "withheld": [
            {"id": "24", "reasons": [WEDGED["message"]]},
            {"id": "99", "reasons": ["not among the enrolled units"]},
        ],
    }
    seen = only_node(control_plane, "acme", key)
    assert seen["gpu_units"] == {"ready": 8, "total": 9, "enrolled": 8, "advertised": 7}
    assert seen["reason"] == "1 ready unit(s) not among the enrolled units (99)"
    assert seen["units"][:2] == [
        {"id": "24", "status": "not_ready", "advertised": False, "reasons": [WEDGED["message"]]},
        # Degraded is still rented, and the listing shows what degrades it.
        {"id": "25", "status": "degraded", "advertised": True, "reasons": [LINK_X8["message"]]},
    ]
    assert _units(seen) == {
        "24": (False, [WEDGED["message"]]),
        "25": (True, [LINK_X8["message"]]),
        **{g: (True, []) for g in ENROLLED[2:]},
        "99": (False, ["not among the enrolled units"]),
    }
    assert sum(u["advertised"] for u in seen["units"]) == seen["gpu_units"]["advertised"]


def test_a_draining_node_withholds_every_unit_saying_so(
    control_plane: testing.RunningControlPlane, enrolled: Callable[..., Node]
) -> None:
    control_plane.org("acme")
    key = control_plane.api_key("acme")
    node = enrolled(control_plane, "acme")
    r = node.beat(with_units(EIGHT_AND_A_STRANGER, draining=True))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["advertised_units"], answer["reason"]) == (0, "draining")
    assert [w["id"] for w in answer["withheld"]] == [*ENROLLED, "99"]
    assert all(w["reasons"][-1] == "node draining" for w in answer["withheld"])
    seen = only_node(control_plane, "acme", key)
    assert seen["gpu_units"]["advertised"] == 0 and seen["draining"] is True
    units = _units(seen)
    assert units["26"] == (False, ["node draining"])
    assert units["24"] == (False, [WEDGED["message"], "node draining"])
    assert units["25"] == (False, [LINK_X8["message"], "node draining"])
    assert units["99"] == (False, ["not among the enrolled units", "node draining"])
    # Every node-level rule withholds every unit: a FAIL verdict, the load over a threshold.
    failing = with_units(EIGHT_AND_A_STRANGER)
    failing["doctor"]["verdict"] = "FAIL"
    assert node.beat(failing).json()["advertised_units"] == 0
    assert _units(only_node(control_plane, "acme", key))["26"] == (False, ["node verdict FAIL"])
    loaded = with_units(EIGHT_AND_A_STRANGER)
    loaded["resources"]["memory_percent"] = 90
    assert node.beat(loaded).json()["reason"] == "memory 90% over 85%"
    assert _units(only_node(control_plane, "acme", key))["26"] == (False, ["node memory 90% over 85%"])


def test_an_agent_that_sends_no_units_keeps_the_count_rule_and_its_answer(
    control_plane: testing.RunningControlPlane, enrolled: Callable[..., Node]
) -> None:
    control_plane.org("acme")
    key = control_plane.api_key("acme")
    node = enrolled(control_plane, "acme")
    assert only_node(control_plane, "acme", key)["units"] is None  # no heartbeat yet
    assert node.beat(with_units(EIGHT_AND_A_STRANGER)).json()["advertised_units"] == 7
    # The same node's agent downgraded: its per-unit state is gone, the count rule is back.
    r = node.beat(GOOD)
    assert r.json() == {"status": "active", "advertised_units": 8, "next_heartbeat_s": 240, "reason": None}
    seen = only_node(control_plane, "acme", key)
    assert seen["units"] is None
    assert seen["gpu_units"] == {"ready": 8, "total": 8, "enrolled": 8, "advertised": 8}
    # A count over the enrolled hardware stays capped for an old agent.
    over = {**GOOD, "doctor": {**GOOD["doctor"], "gpu_units": {"ready": 12, "total": 12}}}
    r = node.beat(over)
    assert (r.json()["advertised_units"], r.json()["reason"]) == (
        8,
        "capped at the enrolled hardware (8 GPU unit(s))",
    )
    assert "withheld" not in r.json()


def test_a_node_enrolled_without_gpus_advertises_none_of_the_units_it_reports(
    control_plane: testing.RunningControlPlane, enrolled: Callable[..., Node]
) -> None:
    control_plane.org("acme")
    key = control_plane.api_key("acme")
    node = enrolled(control_plane, "acme", gpus=False)
    r = node.beat(with_units([unit(g) for g in ENROLLED]))
    assert r.status_code == 200, r.text
    assert r.json()["advertised_units"] == 0
    assert r.json()["reason"] == (
        "8 ready unit(s) not among the enrolled units (24, 25, 26, 27, 28, 29, 30, 31)"
    )
    seen = only_node(control_plane, "acme", key)
    assert seen["gpu_units"] == {"ready": 8, "total": 8, "enrolled": 0, "advertised": 0}
    assert list(_units(seen).values()) == [(False, ["not among the enrolled units"])] * 8


def test_a_container_mode_node_advertises_its_units_up_to_the_gpus_it_enrolled_with(
    tmp_path: Path, control_plane: testing.RunningControlPlane
) -> None:
    """Container mode enrolls GPUs, not IOMMU groups: its units (one per GPU, named by its PCI
    address) are held against the number of GPUs it enrolled with, in the node's order."""
    control_plane.org("acme")
    key = control_plane.api_key("acme")
    root = tmp_path / "container-node"
    build_container_host(root)
    assert control_plane.enroll(root, "acme", gpu_mode="container").returncode == 0
    node = Node(control_plane, root)
    addresses = [f"0000:{b:02x}:00.0" for b in range(0x18, 0x18 + 9)]
    units = [unit(addresses[0], "not_ready", [WEDGED]), *(unit(a) for a in addresses[1:])]
    r = node.beat(with_units(units))
    assert r.status_code == 200, r.text
    cap = "capped at the enrolled hardware (8 GPU unit(s))"
    assert (r.json()["advertised_units"], r.json()["reason"]) == (8, None)
    assert r.json()["withheld"] == [{"id": addresses[0], "reasons": [WEDGED["message"]]}]
    nine = [*units[1:], unit("0000:c1:00.0")]
    r = node.beat(with_units(nine))
    assert (r.json()["advertised_units"], r.json()["reason"]) == (8, cap)
    assert r.json()["withheld"] == [{"id": "0000:c1:00.0", "reasons": [cap]}]
    seen = only_node(control_plane, "acme", key)
    assert seen["gpu_units"] == {"ready": 9, "total": 9, "enrolled": 8, "advertised": 8}


def test_a_database_from_before_per_unit_state_is_migrated_and_its_nodes_keep_their_listing(
    tmp_path: Path, enrolled: Callable[..., Node]
) -> None:
    """A control plane upgraded over a schema-3 database (node_heartbeats without `units`): its
    nodes' last heartbeats are listed by the count rule, and a per-unit heartbeat is taken at once."""
    with testing.running(tmp_path / "cp") as cp:
        cp.org("acme")
        key = cp.api_key("acme")
        node = enrolled(cp, "acme")
        assert node.beat(GOOD).json()["advertised_units"] == 8
    conn = sqlite3.connect(tmp_path / "cp" / "cp.sqlite")
    conn.executescript("ALTER TABLE node_heartbeats DROP COLUMN units; PRAGMA user_version = 3;")
    conn.close()
    with testing.running(tmp_path / "cp") as cp:
        node.cp = cp
        seen = only_node(cp, "acme", key)
        assert (seen["gpu_units"]["advertised"], seen["units"]) == (8, None)
        assert node.beat(with_units(EIGHT_AND_A_STRANGER)).json()["advertised_units"] == 7
        assert only_node(cp, "acme", key)["units"][0]["reasons"] == [WEDGED["message"]]
    conn = sqlite3.connect(tmp_path / "cp" / "cp.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
