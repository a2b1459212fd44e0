from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bootstrap.errors import VectorlayError
from bootstrap.host import Host, TreeHost
from bootstrap.settings import Settings, load_settings


def _host(tmp_path: Path, text: str | None) -> Host:
    if text is not None:
        p = tmp_path / "etc/vectorlay/node.yaml"
        p.parent.mkdir(parents=True)
        p.write_text(text)
    return TreeHost(tmp_path)


def test_defaults_without_a_settings_file(tmp_path: Path) -> None:
    assert load_settings(_host(tmp_path, None), env={}) == Settings()


def test_file_values_then_environment_overrides(tmp_path: Path) -> None:
    host = _host(
        tmp_path,
        "api: https://api.example\ngpu_mode: container\nautoupdate: false\n"
        "extra_gpu_vendor_ids: ['0x8086']\n",
    )
    s = load_settings(host, env={})
    assert (s.api, s.gpu_mode, s.autoupdate, s.extra_gpu_vendor_ids) == (
        "https://api.example",
        "container",
        False,
        ("8086",),
    )
    s = load_settings(host, env={"NODE_AGENT_AUTOUPDATE": "1", "VECTORLAY_GPU_MODE": "none"})
    assert (s.autoupdate, s.gpu_mode) == (True, "none")


def test_heartbeat_interval_and_thresholds_from_the_file_then_the_environment(tmp_path: Path) -> None:
    host = _host(tmp_path, "advertise_interval: 30\nthresholds: {cpu_percent: 80, memory_percent: 70}\n")
    s = load_settings(host, env={})
    assert (s.advertise_interval, s.thresholds) == (
        30,
        {"cpu_percent": 80.0, "memory_percent": 70.0, "disk_percent": 90.0},
    )
    s = load_settings(
        host,
        env={
            "VECTORLAY_ADVERTISE_INTERVAL": "5",
            "VECTORLAY_DISK_THRESHOLD": "50",
            "VECTORLAY_CPU_THRESHOLD": "60",
        },
    )
    assert (s.advertise_interval, s.thresholds) == (
        5,
        {"cpu_percent": 60.0, "memory_percent": 70.0, "disk_percent": 50.0},
    )
    assert Settings().advertise_interval == 240
    assert Settings().thresholds == {"cpu_percent": 90.0, "memory_percent": 85.0, "disk_percent": 90.0}


@pytest.mark.parametrize(
    ("text", "env", "fragment"),
    [
        ("gpu_mode: [", {}, "not valid YAML"),
        ("- a\n- b\n", {}, "must be a mapping"),
        ("colour: blue\n", {}, "unknown setting(s) colour"),
        ("gpu_mode: vgpu\n", {}, "not a GPU mode"),
        ("extra_gpu_vendor_ids: ['80866']\n", {}, "not a 4-digit hex ID"),
        ("", {"NODE_AGENT_AUTOUPDATE": "maybe"}, "not a boolean"),
        ("advertise_interval: 0\n", {}, "not a heartbeat interval"),
        ("advertise_interval: soon\n", {}, "not a heartbeat interval"),
        ("", {"VECTORLAY_ADVERTISE_INTERVAL": "86400"}, "not a heartbeat interval"),
        ("thresholds: {gpu_percent: 50}\n", {}, "thresholds must map"),
        ("thresholds: 90\n", {}, "thresholds must map"),
        ("thresholds: {memory_percent: 0}\n", {}, "not a percentage"),
        ("", {"VECTORLAY_CPU_THRESHOLD": "150"}, "not a percentage"),
        ("proxy: https://proxy:3128\n", {}, "is not an HTTP proxy URL"),
        ("proxy: socks5://proxy:1080\n", {}, "is not an HTTP proxy URL"),
        ("proxy: http://proxy:3128/path\n", {}, "is not an HTTP proxy URL"),
        ("", {"VECTORLAY_PROXY": "http://bob:secret@proxy:3128"}, "must not hold credentials"),
        ("proxy: 'http://proxy:3128 x'\n", {}, "contains white space"),
        ("proxy: 'http://p$x:3128'\n", {}, "contains a quote, backslash, $ or `"),
    ],
)
def test_bad_settings_get_a_clear_error(
    tmp_path: Path, text: str, env: dict[str, str], fragment: str
) -> None:
    with pytest.raises(VectorlayError) as e:
        load_settings(_host(tmp_path, text), env=env)
    assert fragment in e.value.message


@pytest.mark.parametrize(
    "extras",
    [
        {},
        {"extra_gpu_vendor_ids": ("1234",)},
        {"extra_gpu_vendor_ids": ("8086", "1234"), "extra_nvswitch_device_ids": ("2324",)},
        {"advertise_interval": 60, "cpu_threshold": 75.5, "memory_threshold": 70.0, "disk_threshold": 80.0},
        {"proxy": "http://proxy.dc.example:3128"},
        {"proxy": "10.0.0.1:8080"},
    ],
)
def test_the_node_yaml_the_installer_writes_reads_back_as_the_same_settings(
    tmp_path: Path, extras: dict[str, Any]
) -> None:
    from bootstrap.settings import settings_yaml

    wanted = Settings(api="https://api.example", gpu_mode="passthrough", autoupdate=False, **extras)
    text = settings_yaml(wanted, api=wanted.api, gpu_mode="passthrough").decode()
    assert load_settings(_host(tmp_path, text), env={}) == wanted


def test_the_proxy_comes_from_node_yaml_then_vectorlay_proxy(tmp_path: Path) -> None:
    host = _host(tmp_path, "proxy: http://from-file:3128\n")
    assert load_settings(host, env={}).proxy == "http://from-file:3128"
    assert (
        load_settings(host, env={"VECTORLAY_PROXY": "http://from-env:8080"}).proxy == "http://from-env:8080"
    )
