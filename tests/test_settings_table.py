"""The settings table (Settings' fields, bootstrap.settings.ROWS) is the one home of each setting:
loading node.yaml, the environment's overrides and the node.yaml the installer writes all follow it."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import yaml

from bootstrap.host import TreeHost
from bootstrap.plan import MARKER
from bootstrap.settings import KNOWN, ROWS, Settings, load_settings, settings_yaml

# One non-default value per setting, as node.yaml holds it and as a variable gives it.
CHANGED = {
    "api": ("https://api.example", "https://api.example"),
    "gpu_mode": ("container", "container"),
    "autoupdate": (False, "0"),
    "disk_path": ("/data", "/data"),
    "extra_gpu_vendor_ids": (["8086"], "8086"),
    "extra_nvswitch_device_ids": (["22a3"], None),
    "advertise_interval": (60, "60"),
    "cpu_threshold": (70.0, "70"),
    "memory_threshold": (60.0, "60"),
    "disk_threshold": (50.0, "50"),
    "proxy": ("http://proxy.example:3128", "http://proxy.example:3128"),
}


def test_every_setting_is_one_row_and_only_settings_are() -> None:
    declared = [f.name for f in fields(Settings) if f.name not in ("source", "warnings")]
    assert [row.field for row in ROWS] == declared
    assert set(CHANGED) == set(declared), "give each new setting a value in CHANGED above"
    envs = [row.env for row in ROWS if row.env]
    assert len(envs) == len(set(envs))


def test_each_row_is_read_from_node_yaml_and_from_its_variable(tmp_path: Path) -> None:
    host = TreeHost(tmp_path)
    (tmp_path / "etc/vectorlay").mkdir(parents=True)
    for row in ROWS:
        value, variable = CHANGED[row.field]
        doc = {row.group: {row.sub: value}} if row.sub else {row.group: value}
        (tmp_path / "etc/vectorlay/node.yaml").write_text(yaml.safe_dump(doc))
        loaded = getattr(load_settings(host, env={}), row.field)
        assert loaded != row.default and loaded == (tuple(value) if isinstance(value, list) else value)
        if row.env:
            (tmp_path / "etc/vectorlay/node.yaml").unlink()
            assert getattr(load_settings(host, env={row.env: str(variable)}), row.field) == loaded


def test_node_yaml_written_from_the_table_reads_back_the_same_settings(tmp_path: Path) -> None:
    changed: dict[str, Any] = {f: (tuple(v) if isinstance(v, list) else v) for f, (v, _) in CHANGED.items()}
    settings = Settings(**changed)
    text = settings_yaml(settings, api=settings.api, gpu_mode="container")
    (tmp_path / "etc/vectorlay").mkdir(parents=True)
    (tmp_path / "etc/vectorlay/node.yaml").write_bytes(text)
    assert load_settings(TreeHost(tmp_path), env={}) == settings
    body = yaml.safe_load(text)
    assert list(body) == [
        *(k for k in KNOWN if not k.startswith("extra_")),
        "extra_gpu_vendor_ids",
        "extra_nvswitch_device_ids",
    ]
    assert text.decode().startswith(MARKER)


def test_empty_lists_are_not_written(tmp_path: Path) -> None:
    body = yaml.safe_load(settings_yaml(Settings(), api=None, gpu_mode="none"))
    assert body == {
        "api": None,
        "gpu_mode": "none",
        "autoupdate": True,
        "disk_path": "/var/lib/vectorlay",
        "advertise_interval": 240,
        "thresholds": {"cpu_percent": 90.0, "memory_percent": 85.0, "disk_percent": 90.0},
    }


def test_each_default_is_a_value_its_row_accepts(tmp_path: Path) -> None:
    # node.yaml is written with the defaults and read back by every later run: a default its own
    # parser refuses would break the node on its next start.
    (tmp_path / "etc/vectorlay").mkdir(parents=True)
    (tmp_path / "etc/vectorlay/node.yaml").write_bytes(settings_yaml(Settings(), api=None, gpu_mode="none"))
    assert load_settings(TreeHost(tmp_path), env={}) == replace(Settings(), gpu_mode="none")
