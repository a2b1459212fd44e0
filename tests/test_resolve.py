"""The GPU mode and the control plane URL: one resolver each (bootstrap.resolve), one order of
sources (this run's option, node.yaml, what the node recorded at enrollment, detection), and every
command and stage acting on what it resolved. The tests named after a behaviour pin what changed
when the earlier fallbacks ("-", "passthrough", "none", detection; identity-first URLs) became this
one order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bootstrap import resolve
from bootstrap.commands.update import run_facts
from bootstrap.errors import VectorlayError
from bootstrap.host import Host, RecordingRunner, TreeHost
from bootstrap.identity import Identity, NewIdentity, OverlayFiles, load_identity, write_identity
from bootstrap.paths import AGENT_CONFIG, SETTINGS_PATH
from bootstrap.plan import Enroll, FileChange
from bootstrap.provisioning import TokenReader
from bootstrap.settings import Settings, load_settings
from bootstrap.stages import agents, detect, enroll
from bootstrap.stages.contract import Context, Facts
from bootstrap.state import RunState
from bootstrap.update import agent_names
from doctor.checks import Context as DoctorContext
from hostsim import build_host, load_topology
from nodeagent.agent import Agent

ENROLLED_API = "https://enrolled.example"


def _enrolled(root: Path, *, gpu_mode: str | None, api: str | None = ENROLLED_API) -> Host:
    """A tree whose identity recorded `gpu_mode` and `api` at enrollment."""
    host = TreeHost(root, RecordingRunner())
    node = {"node_id": "n1", "org_id": "o1", "overlay_ip": "10.42.0.2", **({"api": api} if api else {})}
    write_identity(
        host,
        NewIdentity(
            key_pem=b"key",
            cert_pem=b"crt",
            ca_pem=b"ca",
            node_token="vnt_" + "x" * 32,
            node=node,
            enrollment={**node, **({"gpu_mode": gpu_mode} if gpu_mode else {})},
            overlay=OverlayFiles(b"nkey", b"ncrt", b"nca", b"mkey", b"mcrt", b"mca"),
        ),
    )
    return host


def _gpu_box(tmp_path: Path, *, gpu_mode: str | None) -> Host:
    """An A100 cloud box (detection says passthrough) enrolled in `gpu_mode`."""
    root = build_host(tmp_path / "node", load_topology("cloud-a100"))
    return _enrolled(root, gpu_mode=gpu_mode)


def _never() -> bool:
    raise AssertionError("a later source was asked although an earlier one answered")


def _no_record() -> str | None:
    raise AssertionError("the enrollment was read although the run's setting answered")


# --- the resolvers ---------------------------------------------------------------------------------


def test_the_gpu_mode_is_the_first_of_the_setting_the_enrollment_and_detection() -> None:
    assert resolve.gpu_mode("none", recorded=_no_record, has_gpus=_never) == "none"
    assert resolve.gpu_mode(None, recorded=lambda: "container", has_gpus=_never) == "container"
    assert resolve.gpu_mode(None, recorded=lambda: None, has_gpus=lambda: True) == "passthrough"
    assert resolve.gpu_mode("", recorded=lambda: None, has_gpus=lambda: False) == "none"


def test_the_recorded_gpu_mode_is_the_enrollments_and_only_a_known_one(tmp_path: Path) -> None:
    assert resolve.recorded_gpu_mode(None) is None
    host = _enrolled(tmp_path / "a", gpu_mode="container")
    assert resolve.recorded_gpu_mode(load_identity(host)) == "container"
    ident = load_identity(host)
    assert ident is not None
    (ident.path / "enrollment.json").write_text(json.dumps({"gpu_mode": "turbo"}))
    assert resolve.recorded_gpu_mode(ident) is None
    (ident.path / "enrollment.json").write_text("[not an object")
    assert resolve.recorded_gpu_mode(ident) is None  # damaged: the identity check reports it


def test_a_damaged_or_missing_identity_gives_no_recorded_value(tmp_path: Path) -> None:
    assert resolve.identity_or_none(TreeHost(tmp_path / "never")) is None
    host = _enrolled(tmp_path / "n", gpu_mode="none")
    (host.path("/etc/vectorlay/identity") / "node.crt").unlink()
    assert resolve.identity_or_none(host) is None


def test_the_api_url_is_the_runs_or_node_yamls_before_the_identitys(tmp_path: Path) -> None:
    ident = Identity(tmp_path, "n1", "o1", "10.42.0.2", api=ENROLLED_API)
    assert resolve.api_url("https://chosen.example", ident) == "https://chosen.example"
    assert resolve.api_url(None, ident) == ENROLLED_API
    assert resolve.known_api_url(None, None) is None
    with pytest.raises(VectorlayError) as e:
        resolve.api_url(None, Identity(tmp_path, "n1", "o1", "10.42.0.2", api=None))
    assert e.value.message == "no control plane URL"
    assert e.value.hint is not None and "api=https://" in e.value.hint


# --- where they are used: the behaviour changes ----------------------------------------------------


def test_the_doctor_judges_a_node_by_its_enrolled_mode_when_node_yaml_names_none(tmp_path: Path) -> None:
    # Changed: detection (passthrough on this A100 box) came right after node.yaml.
    host = _gpu_box(tmp_path, gpu_mode="container")
    assert DoctorContext(host, Settings()).mode == "container"
    assert DoctorContext(host, Settings(gpu_mode="none")).mode == "none"
    assert DoctorContext(_gpu_box(tmp_path / "b", gpu_mode=None), Settings()).mode == "passthrough"


def test_an_install_run_resolves_the_mode_once_in_detect_from_the_enrollment(tmp_path: Path) -> None:
    # Changed: the gpu, enroll, artifacts, agents and verify stages each took node.yaml's mode,
    # else detection's; an enrolled container node whose node.yaml lost its mode was re-installed
    # as a passthrough node.
    host = _gpu_box(tmp_path, gpu_mode="container")
    ctx = Context(host=host, settings=Settings(), state=RunState(), out=lambda _m: None)
    assert detect.plan(ctx, Facts()).facts.gpu_mode == "container"
    chosen = Context(host=host, settings=Settings(gpu_mode="none"), state=RunState(), out=lambda _m: None)
    assert detect.plan(chosen, Facts()).facts.gpu_mode == "none"


def _enroll_change(ctx: Context, facts: Facts) -> Enroll:
    sp = enroll.plan(ctx, facts)
    changes = [i.change for i in sp.plan.actions if isinstance(i.change, Enroll)]
    assert len(changes) == 1
    return changes[0]


def test_the_enroll_plan_shows_the_runs_mode_where_it_showed_a_dash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VECTORLAY_TOKEN", raising=False)
    # Changed: a kept identity was shown as "node with ... (-)" when node.yaml named no mode.
    host = _gpu_box(tmp_path, gpu_mode="container")
    ctx = Context(host=host, settings=Settings(), state=RunState(), out=lambda _m: None)
    facts = detect.plan(ctx, Facts()).facts
    kept = _enroll_change(ctx, facts)
    assert (kept.gpu_mode, kept.api) == ("container", ENROLLED_API)
    # Changed: a node not enrolled yet, planned without a token, was shown "(-)" too.
    root = build_host(tmp_path / "fresh", load_topology("cloud-a100"))
    fresh = Context(
        host=TreeHost(root, RecordingRunner()),
        settings=Settings(),
        state=RunState(),
        api="https://api.example",
        out=lambda _m: None,
        tokens=TokenReader(prompt=False),
    )
    first = _enroll_change(fresh, detect.plan(fresh, Facts()).facts)
    assert (first.gpu_mode, first.api) == ("passthrough", "https://api.example")


def test_update_runs_the_container_agents_of_a_node_enrolled_in_container_mode(tmp_path: Path) -> None:
    # Changed: update took node.yaml's mode, else "none", and left runsc out.
    host = _gpu_box(tmp_path, gpu_mode="container")
    ident = load_identity(host)
    assert ident is not None
    api, mode = run_facts(host, load_settings(host), ident)
    assert (api, mode) == (ENROLLED_API, "container")
    assert "runsc" in agent_names(mode)
    host.path(SETTINGS_PATH).write_text("api: https://chosen.example\ngpu_mode: none\n")
    assert run_facts(host, load_settings(host), ident) == ("https://chosen.example", "none")


def _agent_configs(host: Host, api: str | None) -> tuple[object, object]:
    ident = load_identity(host)
    assert ident is not None
    ctx = Context(host=host, settings=Settings(api=api), state=RunState(), api=api, out=lambda _m: None)
    files = {c.path: c.content for c in agents.desired(ctx, ident, "none") if isinstance(c, FileChange)}
    agent_yaml, node_yaml = files[AGENT_CONFIG], files[SETTINGS_PATH]
    assert agent_yaml is not None and node_yaml is not None
    return yaml.safe_load(agent_yaml)["api"], yaml.safe_load(node_yaml)["api"]


def test_the_agents_configs_name_the_runs_control_plane_before_the_enrolled_one(tmp_path: Path) -> None:
    # Changed: node-agent.yaml and node.yaml took the identity's URL first, so a run with
    # api=https://chosen.example fetched the artifacts from it and then wrote the old one back.
    host = _enrolled(tmp_path / "n", gpu_mode="none")
    assert _agent_configs(host, "https://chosen.example") == ("https://chosen.example",) * 2
    assert _agent_configs(host, None) == (ENROLLED_API,) * 2


def test_the_node_agent_takes_node_yaml_before_the_identity(tmp_path: Path) -> None:
    # Changed: with node-agent.yaml naming no api, the identity's came before node.yaml's.
    host = _enrolled(tmp_path / "n", gpu_mode="none")
    ident = load_identity(host)
    assert ident is not None
    agent = Agent(host)
    host.path(AGENT_CONFIG).parent.mkdir(parents=True, exist_ok=True)
    host.path(AGENT_CONFIG).write_text("node_id: n1\n")
    assert agent.api_url(ident) == ENROLLED_API
    host.path(SETTINGS_PATH).write_text("api: https://node-yaml.example\n")
    assert agent.api_url(ident) == "https://node-yaml.example"
    host.path(AGENT_CONFIG).write_text("api: https://agent-yaml.example\n")
    assert agent.api_url(ident) == "https://agent-yaml.example"
