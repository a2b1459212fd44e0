"""`install --plan` shows the whole run: the enrollment, the artifact fetches and the version switches
are planned changes like the files, and a plan writes nothing. The real CLI in a subprocess, a real
control plane on loopback."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hostsim.agents import agent_tarball, publish
from hostsim.demo import build_container_host
from hostsim.snapshot import snapshot
from tests.install.helpers import gpus_on_vfio, install, installed_demo_node

pytestmark = pytest.mark.slow

MakeTree = Callable[..., Path]
AGENTS = ("nebula", "nomad", "node-agent")
OFFERED = "the version the signed manifest offers"


def _lines(out: str, status: str, kind: str) -> list[str]:
    return re.findall(rf"^  {status} +{kind} +(.*?)(?:  \[.*\])?$", out, re.M)


def _assert_fresh_plan(out: str, api: str, mode: str, agents: tuple[str, ...]) -> None:
    assert _lines(out, "changed", "enroll") == [f"node with {api} ({mode})"], out
    assert _lines(out, "changed", "fetch") == [f"{n} ({OFFERED})" for n in agents], out
    assert _lines(out, "changed", "switch") == [f"{n} none -> {OFFERED}" for n in agents], out
    assert "vectorlay-node: PLAN ONLY: nothing was changed" in out


def test_a_plan_on_a_fresh_gpu_box_lists_enrollment_fetches_and_switches_and_writes_nothing(
    make_tree: MakeTree, control_plane: Any
) -> None:
    root = make_tree("hgx-h100", gpus_on_vfio)
    before = snapshot(root)
    token = control_plane.token(control_plane.org("acme"))
    res = install(root, "--plan", cp=control_plane, token=token)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr == ""
    _assert_fresh_plan(res.stdout, control_plane.url, "passthrough", AGENTS)
    assert snapshot(root) == before
    # Only introspected: a real run can still enroll with the token.
    assert (
        "provisioning token valid until"
        in install(root, "--only", "preflight", cp=control_plane, token=token).stdout
    )


def test_a_plan_in_container_mode_also_fetches_runsc(tmp_path: Path, control_plane: Any) -> None:
    root = tmp_path / "host"
    build_container_host(root)
    before = snapshot(root)
    token = control_plane.token(control_plane.org("acme"))
    res = install(root, "--plan", "--gpu-mode", "container", cp=control_plane, token=token)
    assert res.returncode == 0, res.stdout + res.stderr
    _assert_fresh_plan(res.stdout, control_plane.url, "container", (*AGENTS, "runsc"))
    assert snapshot(root) == before


def test_a_plan_on_an_enrolled_node_shows_the_actions_ok_and_a_newer_manifest_as_one_fetch_and_switch() -> (
    None
):
    # The agents' health sockets need a short root (unix socket paths: 108 bytes at most).
    with (
        tempfile.TemporaryDirectory(prefix="vl", dir="/tmp") as base,
        installed_demo_node(Path(base)) as (
            cp,
            root,
            _token,
        ),
    ):
        skip = ("run", "proc")
        before = snapshot(root, skip=skip)
        res = install(root, "--plan", cp=cp)
        assert res.returncode == 0, res.stdout + res.stderr
        out = res.stdout
        assert not re.search(r"^  changed  (enroll|fetch|switch) ", out, re.M), out
        assert _lines(out, "ok", "enroll") == [f"node with {cp.url} (passthrough)"], out
        fetched = [line.split(" (")[0] for line in _lines(out, "ok", "fetch")]
        assert fetched == [f"{n} 1.0.0" for n in AGENTS], out
        assert _lines(out, "ok", "switch") == [f"{n} 1.0.0 -> 1.0.0" for n in AGENTS], out
        assert snapshot(root, skip=skip) == before

        new = publish(Path(base) / "artifacts", "nebula", "1.1.0", agent_tarball("nebula", "1.1.0"))
        res = install(root, "--plan", cp=cp)
        assert res.returncode == 0, res.stdout + res.stderr
        out = res.stdout
        fetch = f"nebula 1.1.0 ({new.size} bytes, sha256 {new.sha256[:12]}…)"
        assert _lines(out, "changed", "fetch") == [fetch], out
        assert _lines(out, "changed", "switch") == ["nebula 1.0.0 -> 1.1.0"], out
        assert _lines(out, "ok", "switch") == ["nomad 1.0.0 -> 1.0.0", "node-agent 1.0.0 -> 1.0.0"], out
        assert not _lines(out, "changed", "enroll")
        assert snapshot(root, skip=skip) == before
