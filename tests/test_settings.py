from __future__ import annotations

from pathlib import Path

import pytest

from bootstrap.errors import VectorlayError
from bootstrap.host import Host
from bootstrap.settings import Settings, load_settings


def _host(tmp_path: Path, text: str | None) -> Host:
    if text is not None:
        p = tmp_path / "etc/vectorlay/node.yaml"
        p.parent.mkdir(parents=True)
        p.write_text(text)
    return Host(tmp_path)


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


@pytest.mark.parametrize(
    ("text", "env", "fragment"),
    [
        ("gpu_mode: [", {}, "not valid YAML"),
        ("- a\n- b\n", {}, "must be a mapping"),
        ("colour: blue\n", {}, "unknown setting(s) colour"),
        ("gpu_mode: vgpu\n", {}, "not a GPU mode"),
        ("extra_gpu_vendor_ids: ['80866']\n", {}, "not a 4-digit hex ID"),
        ("", {"NODE_AGENT_AUTOUPDATE": "maybe"}, "not a boolean"),
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
    ],
)
def test_the_node_yaml_the_installer_writes_reads_back_as_the_same_settings(
    tmp_path: Path, extras: dict[str, tuple[str, ...]]
) -> None:
    from bootstrap.settings import settings_yaml

    wanted = Settings(api="https://api.example", gpu_mode="passthrough", autoupdate=False, **extras)
    text = settings_yaml(wanted, api=wanted.api, gpu_mode="passthrough").decode()
    assert load_settings(_host(tmp_path, text), env={}) == wanted
