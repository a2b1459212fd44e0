"""`vectorlay-control-plane overlay-host`: identities for the control plane's own overlay hosts."""

from __future__ import annotations

import json
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bootstrap import nebula
from controlplane import cli

Run = Callable[..., subprocess.CompletedProcess[str]]


def _overlay_host(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        cli.main(["overlay-host", *args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_lighthouse_identity_that_the_real_nebula_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nebula_test: Callable[[Path], Any], nebula_cert: Run
) -> None:
    out = tmp_path / "lh"
    code, stdout, err = _overlay_host(
        capsys,
        "--state-dir",
        str(tmp_path / "state"),
        "--name",
        "lighthouse-1",
        "--overlay-ip",
        "100.64.0.1",
        "--out",
        str(out),
        "--lighthouse",
    )
    assert code == 0, err
    assert json.loads(stdout)["changed"] == ["host.key", "host.crt", "ca.crt", "config.yml"]
    assert stat.S_IMODE((out / "host.key").stat().st_mode) == 0o600
    proc = nebula_test(out / "config.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    config = yaml.safe_load((out / "config.yml").read_text())
    assert config["lighthouse"]["am_lighthouse"] is True
    assert config["listen"]["port"] == 4242
    assert config["firewall"]["inbound"] == [
        {"port": "any", "proto": "icmp", "host": "any"},
        {"port": "any", "proto": "any", "group": "vectorlay-control"},
    ]
    assert config["firewall"]["outbound"] == [{"port": "any", "proto": "any", "host": "any"}]
    nebula_cert("verify", "-ca", str(out / "ca.crt"), "-crt", str(out / "host.crt"))
    details = json.loads(nebula_cert("print", "-json", "-path", str(out / "host.crt")).stdout)["details"]
    assert (details["name"], details["ips"], details["groups"]) == (
        "lighthouse-1",
        ["100.64.0.1/10"],
        ["vectorlay-control"],
    )
    assert (out / "ca.crt").read_bytes() == (tmp_path / "state" / "nebula-ca.crt").read_bytes()


def test_re_running_keeps_the_key_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "--state-dir",
        str(tmp_path / "s"),
        "--name",
        "lh",
        "--overlay-ip",
        "100.64.0.1",
        "--out",
        str(tmp_path / "o"),
        "--lighthouse",
    ]
    assert _overlay_host(capsys, *args)[0] == 0
    key, crt = (tmp_path / "o" / "host.key").read_bytes(), (tmp_path / "o" / "host.crt").read_bytes()
    code, stdout, _ = _overlay_host(capsys, *args)
    assert code == 0 and json.loads(stdout)["changed"] == []
    assert (tmp_path / "o" / "host.key").read_bytes() == key
    assert (tmp_path / "o" / "host.crt").read_bytes() == crt
    # A new name re-signs the certificate, for the same key.
    code, stdout, _ = _overlay_host(capsys, *[a if a != "lh" else "lh-2" for a in args])
    assert code == 0 and json.loads(stdout)["changed"] == ["host.crt"]
    cert = nebula.parse_certificate_pem((tmp_path / "o" / "host.crt").read_bytes())
    assert cert.name == "lh-2" and cert.public_key == nebula.public_key_of_private_pem(key)


def test_a_server_host_points_at_its_lighthouses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nebula_test: Callable[[Path], Any]
) -> None:
    out = tmp_path / "server"
    code, _, err = _overlay_host(
        capsys,
        "--state-dir",
        str(tmp_path / "s"),
        "--name",
        "nomad-server-1",
        "--overlay-ip",
        "100.64.0.10",
        "--out",
        str(out),
        "--lighthouse-at",
        "100.64.0.1=203.0.113.7:4242",
        "--listen-port",
        "0",
    )
    assert code == 0, err
    config = yaml.safe_load((out / "config.yml").read_text())
    assert config["static_host_map"] == {"100.64.0.1": ["203.0.113.7:4242"]}
    assert config["lighthouse"] == {"am_lighthouse": False, "interval": 60, "hosts": ["100.64.0.1"]}
    proc = nebula_test(out / "config.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_nebula_test_notices_a_key_that_is_not_the_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nebula_test: Callable[[Path], Any]
) -> None:
    """The check above can fail: nebula -test does load and match the files."""
    out = tmp_path / "lh"
    args = [
        "--state-dir",
        str(tmp_path / "s"),
        "--name",
        "lh",
        "--overlay-ip",
        "100.64.0.1",
        "--out",
        str(out),
    ]
    assert _overlay_host(capsys, *args)[0] == 0
    (out / "host.key").write_bytes(nebula.generate_keypair()[0])
    proc = nebula_test(out / "config.yml")
    assert proc.returncode != 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--overlay-ip", "10.0.0.1"], "not a host address"),
        (["--overlay-ip", "100.64.0.0"], "not a host address"),
        (["--overlay-ip", "nope"], "bad overlay address"),
        (["--overlay-ip", "100.64.0.1", "--lighthouse-at", "100.64.0.1"], "OVERLAY_IP=HOST:PORT"),
        # A mistyped --db must not become an empty database whose blocklist unblocks every node.
        (["--overlay-ip", "100.64.0.1", "--db", "/nonexistent/cp.sqlite"], "no such file"),
        # str.isdigit() takes a superscript for a digit; nebula does not.
        (
            ["--overlay-ip", "100.64.0.1", "--lighthouse-at", "100.64.0.1=lh.example:424²"],
            "OVERLAY_IP=HOST:PORT",
        ),
    ],
)
def test_bad_input_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code, _, err = _overlay_host(
        capsys, "--state-dir", str(tmp_path / "s"), "--name", "lh", "--out", str(tmp_path / "o"), *extra
    )
    assert code == 1 and message in err and "Traceback" not in err
