"""The stage contract's values: the change kinds that are not files (enroll, fetch, switch), the
provisioning token that never shows its secret, and that no stage module looks at --plan."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest

from bootstrap import stages
from bootstrap.host import Host, RecordingRunner, TreeHost
from bootstrap.plan import OFFERED, Enroll, Fetch, FileChange, Status, Switch, apply, compute, render
from bootstrap.provisioning import ProvisioningToken, TokenReader
from bootstrap.stages.contract import Facts
from bootstrap.stages.registry import BY_NAME
from hostsim.snapshot import snapshot

SHA = "ab12cd34ef56" + "0" * 52


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return TreeHost(tmp_path, RecordingRunner())


def test_the_actions_render_and_count_like_the_other_changes(host: Host) -> None:
    plan = compute(
        host,
        [
            FileChange("/etc/x.conf", b"x\n"),
            Enroll("https://api.example", "passthrough", reason="first enrollment"),
            Fetch("nebula", "1.9.5", 12345, SHA),
            Fetch("nomad", "1.8.4", 99, SHA, needed=False),
            Fetch("node-agent"),
            Switch("nebula", None, "1.9.5"),
            Switch("nomad", "1.8.4", "1.8.4"),
            Switch("node-agent", None, None),
        ],
    )
    lines = render(plan, diffs=True)
    assert "  changed  enroll   node with https://api.example (passthrough)  [first enrollment]" in lines
    assert "  changed  fetch    nebula 1.9.5 (12345 bytes, sha256 ab12cd34ef56…)" in lines
    assert "  ok       fetch    nomad 1.8.4 (99 bytes, sha256 ab12cd34ef56…)" in lines
    assert f"  changed  fetch    node-agent ({OFFERED})" in lines
    assert "  changed  switch   nebula none -> 1.9.5" in lines
    assert "  ok       switch   nomad 1.8.4 -> 1.8.4" in lines
    assert f"  changed  switch   node-agent none -> {OFFERED}" in lines
    assert lines[-1] == "  6 to change, 2 ok"
    # An action has no diff: only the file's lines are followed by one.
    assert sum(1 for line in lines if line.startswith("    +++ ")) == 1
    assert [i.status for i in plan.actions] == [Status.CHANGED] * 2 + [Status.OK] + [Status.CHANGED] * 2 + [
        Status.OK,
        Status.CHANGED,
    ]


def test_plan_apply_refuses_a_plan_with_an_action_before_writing_anything(host: Host) -> None:
    plan = compute(host, [FileChange("/etc/x.conf", b"x\n"), Fetch("nebula", "1.9.5", 1, SHA)])
    before = snapshot(host.root)
    with pytest.raises(
        TypeError, match=re.escape("plan.apply does not carry out Fetch: the stage's apply does")
    ):
        apply(host, plan)
    assert snapshot(host.root) == before
    # Without its actions the rest of the plan is applied as always.
    done = apply(host, plan.without_actions())
    assert done.written == ["/etc/x.conf"]
    assert compute(host, [FileChange("/etc/x.conf", b"x\n")]).empty


def test_the_provisioning_tokens_secret_is_in_no_repr_str_or_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "vtk_" + "q9" * 20
    token = ProvisioningToken(secret).introspected("valid", None)
    assert token.secret == secret and token.given and token.state == "valid"
    for text in (repr(token), str(token), f"{token}", repr(Facts(token=token))):
        assert secret not in text
        assert "[redacted]" in text
    with caplog.at_level(logging.INFO):
        logging.getLogger("bootstrap.test").info("holding %s", token)
    assert secret not in caplog.text
    spent = token.spent()
    assert spent.secret is None and spent.state == "used" and not spent.given


def test_the_token_is_read_once_and_a_plan_does_not_ask_for_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VECTORLAY_TOKEN", raising=False)
    # Not given: a plan run does not prompt, and has no secret to show.
    assert not TokenReader(prompt=False).read(enrolled=False).given
    path = tmp_path / "token"
    path.write_text("vtk_first0123456789abcdef\n")
    seen: list[str] = []
    reader = TokenReader(path, remember=seen.append)
    first = reader.read(enrolled=False)
    path.write_text("vtk_second0123456789abcdef\n")
    assert reader.read(enrolled=False) is first
    assert first.secret == "vtk_first0123456789abcdef" and seen == [first.secret]


def test_no_stage_module_looks_at_plan_mode() -> None:
    """Only the runner knows whether a run is a plan: a stage plans and applies the same way."""
    folder = Path(stages.__file__).parent
    for path in sorted(folder.glob("*.py")):
        names = {
            n.id if isinstance(n, ast.Name) else n.attr
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.Name, ast.Attribute))
        }
        assert not {n for n in names if re.search(r"plan_only", n)}, path.name
        module = BY_NAME.get(path.stem)
        if module is not None:
            assert callable(module.plan) and callable(module.apply), path.name
