"""The node's Nomad config read by HCL 1, the parser Nomad itself reads agent configuration with
(command/agent/config_parse.go uses github.com/hashicorp/hcl v1), built from Debian's
golang-github-hashicorp-hcl-dev: it must read every value exactly as HCL 2 (python-hcl2) does."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap.errors import VectorlayError
from bootstrap.host import Host
from bootstrap.settings import load_settings
from bootstrap.templating import hcl_string

from .helpers import parse_hcl, render_nomad_config
from .test_nomad_config import ENROLLMENT_NOMAD, HOSTILE_DISK_PATH, NASTY, _write_identity

GOPATH = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages put Go sources
SOURCE = Path(__file__).with_name("hcl1json") / "main.go"


@pytest.fixture(scope="session")
def hcl1(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """`hcl1(text)`: `text` decoded by HCL 1, as JSON data."""
    out = tmp_path_factory.mktemp("hcl1json")
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": str(GOPATH),
        "GOCACHE": str(out / "cache"),
        "GOFLAGS": "",
    }
    build = subprocess.run(
        ["go", "build", "-o", str(out / "hcl1json"), str(SOURCE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, (
        f"building hcl1json (needs golang-go, golang-github-hashicorp-hcl-dev): {build.stderr}"
    )

    def _decode(text: str) -> Any:
        res = subprocess.run(
            [str(out / "hcl1json")], input=text, capture_output=True, text=True, timeout=60, check=False
        )
        assert res.returncode == 0, f"HCL 1 refused the text: {res.stderr}\n{text}"
        return json.loads(res.stdout)

    return _decode


def _canon(value: Any) -> Any:
    """One shape for both parsers' output: blocks and objects as lists of maps (HCL 1 decodes
    them so), python-hcl2's block markers dropped."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k == "__is_block__":
                continue
            c = _canon(v)
            out[k] = [c] if isinstance(c, dict) else c
        return out
    if isinstance(value, list):
        return [_canon(v) for v in value]
    return value


def test_hcl1_reads_every_quoted_value_exactly(hcl1: Callable[[str], Any]) -> None:
    values = [*NASTY, *(chr(c) for c in range(0x300)), *(chr(c) + "{" for c in range(0x80))]
    values += ["\u2028", "\ufeff", "\U0001f600${", "a\\u0024{b}"]
    text = "".join(f"v{i} = {hcl_string(v)}\n" for i, v in enumerate(values))
    decoded = hcl1(text)
    assert decoded == {f"v{i}": v for i, v in enumerate(values)}


@pytest.mark.parametrize("mode", ["none", "passthrough", "container"])
def test_hcl1_and_hcl2_read_the_same_config(
    hcl1: Callable[[str], Any], make_host: Callable[..., Host], tmp_path: Path, mode: str
) -> None:
    host = make_host("cpu-only")
    text = render_nomad_config(host, _write_identity(tmp_path, ENROLLMENT_NOMAD), mode)
    assert _canon(hcl1(text)) == _canon(parse_hcl(text))


def test_hcl1_reads_a_hostile_disk_path_and_enrollment_as_plain_strings(
    hcl1: Callable[[str], Any], make_host: Callable[..., Host], tmp_path: Path
) -> None:
    host = make_host("cpu-only")
    evil = '"\n}\nplugin "raw_exec" { config { enabled = true } }\nx = "${'
    nomad = {**ENROLLMENT_NOMAD, "node_class": evil, "servers": [evil], "meta": {evil: "%{ if x }"}}
    # The settings refuse such a path; the quoting must hold on its own all the same (a value can
    # reach the template by other ways than the settings' validation), so it is set directly here.
    with pytest.raises(VectorlayError, match="VECTORLAY_DISK_PATH contains a control character"):
        load_settings(host, env={"VECTORLAY_DISK_PATH": HOSTILE_DISK_PATH})
    settings = dataclasses.replace(load_settings(host, env={}), disk_path=HOSTILE_DISK_PATH)
    text = render_nomad_config(host, _write_identity(tmp_path, nomad), "passthrough", settings)
    decoded = hcl1(text)
    assert _canon(decoded) == _canon(parse_hcl(text))
    assert [list(b) for b in decoded["plugin"]] == [["qemu"]]
    assert decoded["plugin"][0]["qemu"][0]["config"][0]["image_paths"] == [HOSTILE_DISK_PATH + "/images"]
    client = decoded["client"][0]
    assert (client["node_class"], client["servers"]) == (evil, [evil])
    assert client["meta"][0][evil] == "%{ if x }"
