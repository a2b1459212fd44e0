"""Settings cannot inject into the files made from them: node.yaml and node-agent.yaml are written by
yaml.safe_dump, values are validated (absolute paths, no control characters, bounded lengths) with a
message naming the variable, and a node.yaml an older installer broke never blocks the run that
rewrites it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from bootstrap.errors import VectorlayError
from bootstrap.host import Host, TreeHost
from bootstrap.identity import load_identity
from bootstrap.paths import AGENT_CONFIG, SETTINGS_PATH
from bootstrap.plan import FileChange
from bootstrap.settings import Settings, load_settings
from bootstrap.stages.agents import desired
from bootstrap.stages.contract import Context
from bootstrap.state import RunState
from hostsim.snapshot import snapshot
from tests.hardening.helpers import enrolled_host
from tests.install.helpers import gpus_on_vfio, install

MakeTree = Callable[..., Path]
INJECTION = '/data\nplugin "raw_exec" {\n  config { enabled = true }\n}\n#"'


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (INJECTION, "contains a control character"),
        ("/data\x1b[2Jx", "contains a control character"),
        ("/data\u2028x", "contains a control character"),
        ("data/relative", "is not an absolute path"),
        ("/" + "a" * 5000, "characters long"),
    ],
    ids=["newline-and-quote", "escape", "line-separator", "relative", "too-long"],
)
@pytest.mark.slow
def test_a_bad_disk_path_is_refused_naming_the_variable_and_nothing_is_written(
    make_tree: MakeTree, value: str, why: str
) -> None:
    tree = make_tree("hgx-h100", gpus_on_vfio)
    before = snapshot(tree)
    res = install(tree, "--only", "gpu", env={"VECTORLAY_DISK_PATH": value})
    out = res.stdout + res.stderr
    assert "Traceback" not in out
    assert res.returncode == 1, out
    assert "error: VECTORLAY_DISK_PATH" in out and why in out
    assert snapshot(tree) == before


def test_a_control_character_in_the_api_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VectorlayError, match="VECTORLAY_API contains a control character"):
        load_settings(TreeHost(tmp_path), env={"VECTORLAY_API": "https://cp.example\r\nX-Evil: 1"})


def _written(host: Host, settings: Settings) -> dict[str, bytes]:
    ident = load_identity(host)
    assert ident is not None
    ctx = Context(host=host, settings=settings, state=RunState(), out=lambda _m: None)
    return {c.path: c.content for c in desired(ctx, ident, "none") if isinstance(c, FileChange)}


@pytest.mark.parametrize(
    "disk_path",
    [
        "/data: fast",
        "/mnt/a #b",
        "/srv/'quoted' \"too\"",
        "/x/{a: [b]}",
        "/ünïcode/✓",
        "/- item",
        "/&anchor *x",
    ],
)
def test_a_legal_path_with_yaml_syntax_in_it_reads_back_as_itself(tmp_path: Path, disk_path: str) -> None:
    host = enrolled_host(tmp_path, {})
    settings = Settings(api="https://cp.example", disk_path=disk_path, extra_gpu_vendor_ids=("1234",))
    files = _written(host, settings)
    p = host.path(SETTINGS_PATH)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(files[SETTINGS_PATH])
    again = load_settings(host, env={})
    assert again.disk_path == disk_path
    assert again == Settings(
        api="https://cp.example", gpu_mode="none", disk_path=disk_path, extra_gpu_vendor_ids=("1234",)
    )
    agent = yaml.safe_load(files[AGENT_CONFIG])
    assert set(agent) == {"api", "node_id", "org_id", "overlay_ip", "gpu_mode", "identity", "health"}


def test_enrollment_values_cannot_add_keys_to_node_agent_yaml(tmp_path: Path) -> None:
    host = enrolled_host(tmp_path, {})
    node_json = host.path("/etc/vectorlay/identity/node.json")
    node_json.write_text('{"node_id": "n1\\nevil: true", "org_id": "o: 1", "overlay_ip": "10.42.0.2"}')
    agent = yaml.safe_load(_written(host, Settings(api="https://cp.example"))[AGENT_CONFIG])
    assert "evil" not in agent
    assert agent["node_id"] == "n1\nevil: true" and agent["org_id"] == "o: 1"


# What an earlier installer wrote for VECTORLAY_DISK_PATH="/data: fast": valid for no YAML parser.
BRICKED = """# Managed by vectorlay-bootstrap: re-running the install one-liner rewrites this file.
api: https://cp.example
gpu_mode: passthrough
autoupdate: false
disk_path: /data: fast
"""


@pytest.mark.slow
def test_a_node_yaml_an_older_installer_broke_does_not_block_the_run_that_rewrites_it(
    make_tree: MakeTree,
) -> None:
    tree = make_tree("hgx-h100", gpus_on_vfio)
    (tree / "etc/vectorlay").mkdir(parents=True, exist_ok=True)
    (tree / "etc/vectorlay/node.yaml").write_text(BRICKED)
    # detect and the doctor say what is wrong (and that the one-liner fixes it) ...
    detect = subprocess.run(
        [sys.executable, "-m", "bootstrap.cli", "detect", "--root", str(tree)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert detect.returncode == 1 and "Traceback" not in detect.stderr
    assert "/etc/vectorlay/node.yaml is not valid YAML" in detect.stderr
    # ... and the install run goes on with the settings it can read, saying so.
    res = install(tree, "--only", "gpu")
    assert "Traceback" not in res.stdout + res.stderr
    assert res.returncode in (0, 3), res.stdout[-2000:] + res.stderr
    assert "warning: /etc/vectorlay/node.yaml is not valid YAML" in res.stdout
    assert "keeping api, autoupdate, disk_path, gpu_mode" in res.stdout
    settings = load_settings(TreeHost(tree), env={}, repair=True)
    assert (settings.disk_path, settings.autoupdate, settings.gpu_mode) == (
        "/data: fast",
        False,
        "passthrough",
    )


def test_a_broken_node_yaml_someone_else_wrote_is_still_an_error_for_the_install(make_tree: MakeTree) -> None:
    tree = make_tree("hgx-h100", gpus_on_vfio)
    (tree / "etc/vectorlay").mkdir(parents=True, exist_ok=True)
    (tree / "etc/vectorlay/node.yaml").write_text(BRICKED.split("\n", 1)[1])  # no marker line
    res = install(tree, "--only", "gpu")
    assert "Traceback" not in res.stdout + res.stderr
    assert res.returncode == 1
    assert "error: /etc/vectorlay/node.yaml is not valid YAML" in res.stderr


def test_settings_of_the_wrong_type_in_node_yaml_are_refused_without_unbounded_work(tmp_path: Path) -> None:
    p = tmp_path / "etc/vectorlay/node.yaml"
    p.parent.mkdir(parents=True)
    # A billion-laughs alias tree where a list of IDs belongs: 9**9 strings if anything expanded it.
    levels = ["&l0 [" + ", ".join(["x"] * 9) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    p.write_text("extra_gpu_vendor_ids: [" + ", ".join(levels) + "]\n")
    with pytest.raises(VectorlayError, match="is not a 4-digit hex ID"):
        load_settings(TreeHost(tmp_path), env={})
    p.write_text("disk_path: [1, 2]\n")
    with pytest.raises(VectorlayError, match="disk_path must be a string"):
        load_settings(TreeHost(tmp_path), env={})
