"""The doctor's `overlay` check: nebula's device, the overlay IP, and the lighthouse answering."""

from __future__ import annotations

from collections.abc import Callable

from bootstrap.host import Host
from doctor.checks import run_checks
from doctor.model import CheckResult, Status
from hostsim import network

Make = Callable[..., Host]


def _overlay(host: Host) -> CheckResult:
    return run_checks(host, env={}, only=["overlay"]).get("overlay")


def test_an_enrolled_node_with_nebula_up_passes_with_the_lighthouses_round_trip(sim_host: Make) -> None:
    host = sim_host("cpu-only")
    network.enroll_overlay(host)
    result = _overlay(host)
    assert (result.status, result.message, result.hint) == (
        Status.PASS,
        "overlay up: vectorlay0 holds 100.64.0.2, lighthouse 100.64.0.1 answered in 12 ms",
        None,
    )


def test_not_enrolled_is_a_skip(sim_host: Make) -> None:
    result = _overlay(sim_host("cpu-only"))
    assert (result.status, result.message) == (Status.SKIP, "not enrolled (no overlay IP yet)")


def test_nebula_not_running_fails_with_where_to_look(sim_host: Make) -> None:
    host = sim_host("cpu-only")
    network.enroll_overlay(host, nebula_running=False)
    result = _overlay(host)
    assert (result.status, result.message) == (
        Status.FAIL,
        "vectorlay0 does not exist: nebula is not running",
    )
    assert result.hint == "systemctl status nebula; journalctl -u nebula -n 50"


def test_a_device_that_is_down_fails(sim_host: Make) -> None:
    host = sim_host("cpu-only")
    network.enroll_overlay(host)
    assert host.run(["ip", "link", "set", "dev", "vectorlay0", "down"]).ok
    result = _overlay(host)
    assert (result.status, result.message) == (Status.FAIL, "vectorlay0 is down")
    assert result.hint is not None and "journalctl -u nebula" in result.hint


def test_a_certificate_for_another_address_fails_naming_both(sim_host: Make) -> None:
    host = sim_host("cpu-only")
    network.enroll_overlay(host, overlay_ip="100.64.0.9")
    node_json = host.path("/etc/vectorlay/identity/node.json")
    node_json.write_text(node_json.read_text().replace("100.64.0.9", "100.64.0.2"))
    result = _overlay(host)
    assert result.status is Status.FAIL
    assert result.message == "vectorlay0 holds 100.64.0.9, not the node's overlay IP 100.64.0.2"


def test_a_lighthouse_that_does_not_answer_warns_about_the_udp_port(sim_host: Make) -> None:
    host = sim_host("cpu-only")
    network.enroll_overlay(host)
    network.block_underlay(host)
    result = _overlay(host)
    assert result.status is Status.WARN
    assert (
        result.message == "vectorlay0 holds 100.64.0.2, but lighthouse 100.64.0.1 did not answer within 2 s"
    )
    assert result.hint is not None and result.hint.startswith(
        "outbound UDP to 203.0.113.10:4242 must be open"
    )
    pings = [c for c in host.runner.commands if c[0] == "ping"]  # type: ignore[attr-defined]
    assert pings == [("ping", "-n", "-c", "1", "-W", "2", "-I", "vectorlay0", "100.64.0.1")]


def test_no_lighthouse_in_the_config_warns(sim_host: Make) -> None:
    host = sim_host("cpu-only")
    network.enroll_overlay(host, lighthouses={})
    result = _overlay(host)
    assert result.status is Status.WARN and "knows no lighthouse" in result.message
