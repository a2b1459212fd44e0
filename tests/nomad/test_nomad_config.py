"""The node's Nomad agent configuration, parsed by a real HCL parser (python-hcl2) and walked key by
key against Nomad's documented agent configuration; the `hcl` filter that quotes every value in it."""

from __future__ import annotations

import configparser
import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bootstrap.errors import VectorlayError
from bootstrap.host import Host, TreeHost
from bootstrap.identity import Identity, load_identity
from bootstrap.paths import IDENTITY_DIR
from bootstrap.resources import units_dir
from bootstrap.settings import load_settings
from bootstrap.templating import hcl_string

from .helpers import parse_hcl, render_nomad_config, template_parts

# --- What Nomad documents, per block --------------------------------------------------------------
# Each key maps to its documented type, or to the schema of the block it opens. "any" marks a key
# that is documented but that the node's config does not set (its type is not checked here).
#   Agent:      https://developer.hashicorp.com/nomad/docs/configuration ("General Parameters",
#               with addresses/advertise), plus the blocks with their own pages in that section
#               (telemetry, ui, autopilot, keyring, reporting, search)
#   client:     https://developer.hashicorp.com/nomad/docs/configuration/client ("client Parameters",
#               "drain_on_shutdown Block")
#   tls:        https://developer.hashicorp.com/nomad/docs/configuration/tls ("tls Parameters")
#   telemetry:  https://developer.hashicorp.com/nomad/docs/configuration/telemetry
#   plugin:     https://developer.hashicorp.com/nomad/docs/configuration/plugin (args, config)
#   docker:     https://developer.hashicorp.com/nomad/docs/deploy/task-driver/docker ("Plugin Options")
#   qemu:       https://developer.hashicorp.com/nomad/docs/deploy/task-driver/qemu ("Plugin Options")
# Read from the v1.10.x pages.
Schema = dict[str, Any]


def _unset(names: str) -> Schema:
    return dict.fromkeys(names.split(), "any")


ADDRESSES: Schema = {"http": "string", "rpc": "string", "serf": "string"}
DRAIN_ON_SHUTDOWN: Schema = {"deadline": "duration", "force": "bool", "ignore_system_jobs": "bool"}
CLIENT: Schema = {
    **_unset(
        "alloc_dir alloc_mounts_dir chroot_env max_kill_timeout disable_remote_exec network_interface "
        "preferred_address_family cpu_disable_dmidecode cpu_total_compute memory_total_mb disk_total_mb "
        "disk_free_mb min_dynamic_port max_dynamic_port node_max_allocs node_pool options reserved "
        "server_join state_dir gc_interval gc_disk_usage_threshold gc_inode_usage_threshold gc_max_allocs "
        "gc_parallel_destroys gc_volumes_on_node_gc no_host_uuid cni_path cni_config_dir "
        "bridge_network_name bridge_network_subnet bridge_network_subnet_ipv6 bridge_network_hairpin_mode "
        "artifact template host_volume host_volumes_dir host_volume_plugin_dir host_network cgroup_parent "
        "users"
    ),
    "enabled": "bool",
    "meta": "map(string)",
    "node_class": "string",
    "servers": "list(string)",
    "drain_on_shutdown": DRAIN_ON_SHUTDOWN,
}
TLS: Schema = {
    "ca_file": "string",
    "cert_file": "string",
    "key_file": "string",
    "http": "bool",
    "rpc": "bool",
    "rpc_upgrade_mode": "any",
    "tls_cipher_suites": "any",
    "tls_min_version": "any",
    "verify_https_client": "bool",
    "verify_server_hostname": "bool",
}
TELEMETRY: Schema = {
    **_unset(
        "in_memory_collection_interval in_memory_retention_period disable_hostname collection_interval "
        "use_node_name include_alloc_metadata_in_metrics allowed_metadata_keys_in_metrics filter_default "
        "prefix_filter disable_dispatched_job_summary_metrics disable_quota_utilization_metrics "
        "disable_allocation_hook_metrics statsite_address statsd_address datadog_address datadog_tags "
        "prometheus_metrics circonus_api_token circonus_api_app circonus_api_url "
        "circonus_submission_interval circonus_submission_url circonus_check_id "
        "circonus_check_force_metric_activation circonus_check_instance_id circonus_check_search_tag "
        "circonus_check_display_name circonus_check_tags circonus_broker_id "
        "circonus_broker_select_tag"
    ),
    "publish_allocation_metrics": "bool",
    "publish_node_metrics": "bool",
}
DOCKER_CONFIG: Schema = {
    **_unset(
        "endpoint allowed_modes pull_activity_timeout pids_limit allow_caps auth tls disable_log_collection "
        "extra_labels logging gc volumes infra_image infra_image_pull_timeout image_pull_timeout "
        "windows_allow_insecure_container_admin"
    ),
    "allow_privileged": "bool",
    "allow_runtimes": "list(string)",
    # Not on the docs page: the driver's own config spec (drivers/docker/config.go in
    # hashicorp/nomad, `"nvidia_runtime": hclspec.NewAttr("nvidia_runtime", "string", false)`,
    # default "nvidia") and the runtime its GPU tasks get (drivers/docker/driver.go).
    "nvidia_runtime": "string",
}
QEMU_CONFIG: Schema = {"image_paths": "list(string)", "args_allowlist": "list(string)"}
PLUGINS: dict[str, Schema] = {
    "docker": {"args": "any", "config": DOCKER_CONFIG},
    "qemu": {"args": "any", "config": QEMU_CONFIG},
}
AGENT: Schema = {
    **_unset(
        "acl audit consul disable_anonymous_signature disable_update_check enable_debug enable_syslog "
        "eventlog http_api_response_headers limits log_level log_include_location log_json log_file "
        "log_rotate_bytes log_rotate_duration log_rotate_max_files plugin_dir ports rpc sentinel server "
        "syslog_facility vault ui autopilot keyring reporting search"
    ),
    "addresses": ADDRESSES,
    "advertise": ADDRESSES,
    "bind_addr": "string",
    "client": CLIENT,
    "datacenter": "string",
    "data_dir": "string",
    "leave_on_interrupt": "bool",
    "leave_on_terminate": "bool",
    "name": "string",
    "plugin": PLUGINS,
    "region": "string",
    "telemetry": TELEMETRY,
    "tls": TLS,
}

_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")


def _check_value(where: str, kind: str, value: Any) -> list[str]:
    ok = {
        "string": isinstance(value, str),
        "bool": isinstance(value, bool),
        "duration": isinstance(value, str) and bool(_DURATION.match(value)),
        "list(string)": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "map(string)": isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
    }[kind]
    return [] if ok else [f"{where}: {value!r} is not a {kind}"]


def walk(where: str, body: dict[str, Any], schema: Schema) -> list[str]:
    """Every key of `body` that Nomad does not document for its block, or whose value has the
    wrong type; a labeled block (plugin) is checked against the schema of its label."""
    problems: list[str] = []
    for key, value in body.items():
        if key == "__is_block__":
            continue
        path = f"{where}.{key}" if where else key
        if key not in schema:
            problems.append(f"{path}: not a documented key")
            continue
        spec = schema[key]
        if spec == "any":
            problems.append(f"{path}: documented, but the node's config is not expected to set it")
        elif isinstance(spec, str):
            problems += _check_value(path, spec, value)
        elif spec is PLUGINS:
            # A labeled block: [{label: {...block...}}, ...]
            for block in value if isinstance(value, list) else [None]:
                if not isinstance(block, dict):
                    problems.append(f"{path}: must be a block")
                    continue
                for label, inner in block.items():
                    if not (isinstance(inner, dict) and inner.get("__is_block__")):
                        problems.append(f"{path} {label!r}: must be a block")
                    elif label not in PLUGINS:
                        problems.append(f"{path} {label!r}: no schema for this plugin")
                    else:
                        problems += walk(f"{path}.{label}", inner, PLUGINS[label])
        elif not (
            isinstance(value, list) and all(isinstance(b, dict) and b.get("__is_block__") for b in value)
        ):
            problems.append(f"{path}: must be a block")
        else:
            for block in value:
                problems += walk(path, block, spec)
    return problems


# --- Rendering the node's config through the agents stage -----------------------------------------


def _write_identity(tmp_path: Path, nomad: dict[str, Any], overlay_ip: str = "100.64.0.9") -> Identity:
    path = tmp_path / "identity"
    path.mkdir()
    (path / "enrollment.json").write_text(json.dumps({"nomad": nomad}))
    return Identity(path=path, node_id="node_test", org_id="org_test", overlay_ip=overlay_ip, api=None)


def _block(parsed: dict[str, Any], name: str) -> dict[str, Any]:
    (block,) = parsed[name]
    assert isinstance(block, dict)
    return block


ENROLLMENT_NOMAD = {
    "region": "global",
    "datacenter": "vectorlay",
    "servers": ["100.64.0.1:4647"],
    "node_class": "gpu",
    "meta": {"vectorlay_org": "org_test"},
    "certificate_pem": "-----BEGIN CERTIFICATE-----\n...",
    "ca_pem": "-----BEGIN CERTIFICATE-----\n...",
}


@pytest.mark.parametrize("mode", ["none", "passthrough", "container"])
@pytest.mark.slow
def test_every_key_of_the_rendered_config_is_in_nomads_documented_agent_configuration(
    make_host: Callable[..., Host], tmp_path: Path, mode: str
) -> None:
    host = make_host("cpu-only")
    parsed = parse_hcl(render_nomad_config(host, _write_identity(tmp_path, ENROLLMENT_NOMAD), mode))
    assert walk("", parsed, AGENT) == []
    assert [next(iter(b)) for b in parsed["plugin"]] == (["docker"] if mode == "container" else ["qemu"])


def test_the_walk_reports_an_undocumented_key_a_wrong_type_and_an_unknown_plugin() -> None:
    parsed = parse_hcl(
        'region = true\nclient {\n  drain_on_shutdown {\n    deadline = "soon"\n  }\n  draining = true\n}\n'
        'plugin "raw_exec" {\n  config {\n    enabled = true\n  }\n}\ntls = "yes"\n'
    )
    assert walk("", parsed, AGENT) == [
        "region: True is not a string",
        "client.drain_on_shutdown.deadline: 'soon' is not a duration",
        "client.draining: not a documented key",
        "plugin 'raw_exec': no schema for this plugin",
        "tls: must be a block",
    ]


def test_the_config_joins_the_servers_of_the_enrollment_with_verified_tls_in_its_region(
    make_host: Callable[..., Host], tmp_path: Path
) -> None:
    host = make_host("cpu-only")
    nomad = {**ENROLLMENT_NOMAD, "region": "eu-west", "servers": ["100.64.0.1:4647", "100.64.0.2:4647"]}
    text = render_nomad_config(host, _write_identity(tmp_path, nomad, overlay_ip="100.64.3.4"), "container")
    parsed = parse_hcl(text)
    assert (parsed["region"], parsed["datacenter"], parsed["bind_addr"]) == (
        "eu-west",
        "vectorlay",
        "100.64.3.4",
    )
    assert _block(parsed, "addresses") == {"http": "127.0.0.1 100.64.3.4", "__is_block__": True}
    assert {k: v for k, v in _block(parsed, "advertise").items() if k != "__is_block__"} == dict.fromkeys(
        ("http", "rpc", "serf"), "100.64.3.4"
    )
    client = _block(parsed, "client")
    assert client["servers"] == ["100.64.0.1:4647", "100.64.0.2:4647"]
    assert client["node_class"] == "gpu"
    assert client["meta"]["vectorlay_org"] == "org_test"
    assert client["meta"]["vectorlay_gpu_mode"] == "container"
    tls = _block(parsed, "tls")
    assert tls["verify_server_hostname"] is True and tls["verify_https_client"] is False
    assert tls["http"] is True and tls["rpc"] is True
    # The files the enrollment writes into the identity dir; the PEMs themselves stay out.
    assert (tls["ca_file"], tls["cert_file"], tls["key_file"]) == (
        f"{IDENTITY_DIR}/nomad-ca.crt",
        f"{IDENTITY_DIR}/nomad.crt",
        f"{IDENTITY_DIR}/nomad.key",
    )
    assert "BEGIN CERTIFICATE" not in text
    docker = _block(parsed, "plugin")["docker"]["config"][0]
    assert docker["allow_runtimes"] == ["runc", "runsc"]
    assert docker["nvidia_runtime"] == "runsc" and docker["nvidia_runtime"] in docker["allow_runtimes"]
    assert docker["allow_privileged"] is False


def test_an_enrollment_without_region_or_datacenter_gets_nomads_global_region(
    make_host: Callable[..., Host], tmp_path: Path
) -> None:
    host = make_host("cpu-only")
    parsed = parse_hcl(
        render_nomad_config(host, _write_identity(tmp_path, {"servers": ["100.64.0.1:4647"]}), "none")
    )
    assert (parsed["region"], parsed["datacenter"]) == ("global", "vectorlay")
    assert _block(parsed, "client")["node_class"] == "none"


def _seconds(duration: str) -> float:
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_the_node_drains_on_the_signal_systemd_stops_it_with_and_before_systemd_gives_up(
    make_host: Callable[..., Host], tmp_path: Path
) -> None:
    host = make_host("cpu-only")
    parsed = parse_hcl(render_nomad_config(host, _write_identity(tmp_path, ENROLLMENT_NOMAD), "passthrough"))
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((units_dir() / "nomad.service").read_text())
    service = unit["Service"]
    signal = service.get("KillSignal", "SIGTERM")
    leave = {"SIGINT": "leave_on_interrupt", "SIGTERM": "leave_on_terminate"}[signal]
    assert parsed[leave] is True
    drain = _block(parsed, "client")["drain_on_shutdown"][0]
    assert drain["force"] is True and drain["ignore_system_jobs"] is False
    raw = service["TimeoutStopSec"].strip()
    assert raw.isdigit(), f"TimeoutStopSec={raw}: this test reads plain seconds only"
    # The drain, then deregistering and exiting: a minute is left for those.
    assert _seconds(drain["deadline"]) + 60 <= int(raw)


HOSTILE_DISK_PATH = (
    '/srv/data"]\n  }\n}\nplugin "raw_exec" {\n  config {\n    enabled = true\n  }\n}\n# ${x} %{ if true }'
)


def test_a_disk_path_with_a_newline_and_a_quote_stays_one_string_in_the_one_plugin_block(
    make_host: Callable[..., Host], tmp_path: Path
) -> None:
    host = make_host("cpu-only")
    # The settings refuse such a path; the quoting must hold on its own all the same (a value can
    # reach the template by other ways than the settings' validation), so it is set directly here.
    with pytest.raises(VectorlayError, match="VECTORLAY_DISK_PATH contains a control character"):
        load_settings(host, env={"VECTORLAY_DISK_PATH": HOSTILE_DISK_PATH})
    settings = dataclasses.replace(load_settings(host, env={}), disk_path=HOSTILE_DISK_PATH)
    assert settings.disk_path == HOSTILE_DISK_PATH
    text = render_nomad_config(host, _write_identity(tmp_path, ENROLLMENT_NOMAD), "passthrough", settings)
    parsed = parse_hcl(text)
    assert len(parsed["plugin"]) == 1
    (label,) = parsed["plugin"][0]
    assert label == "qemu"
    assert parsed["plugin"][0]["qemu"]["config"][0]["image_paths"] == [HOSTILE_DISK_PATH + "/images"]
    assert template_parts(text) == []
    assert walk("", parsed, AGENT) == []


def test_hostile_enrollment_values_stay_strings_and_add_no_block(
    make_host: Callable[..., Host], tmp_path: Path
) -> None:
    host = make_host("cpu-only")
    evil = '"\n}\nplugin "raw_exec" { config { enabled = true } }\nx = "'
    nomad = {
        "region": evil,
        "datacenter": "dc\\",
        "servers": [evil, "100.64.0.1:4647"],
        "node_class": "${node.unique.id}",
        "meta": {evil: evil, "k": "%{ for x in y }${x}%{ endfor }"},
    }
    text = render_nomad_config(host, _write_identity(tmp_path, nomad), "container")
    parsed = parse_hcl(text)
    assert [next(iter(b)) for b in parsed["plugin"]] == ["docker"]
    assert parsed["region"] == evil and parsed["datacenter"] == "dc\\"
    client = _block(parsed, "client")
    assert client["servers"] == [evil, "100.64.0.1:4647"]
    assert client["node_class"] == "${node.unique.id}"
    assert client["meta"][evil] == evil
    assert client["meta"]["k"] == "%{ for x in y }${x}%{ endfor }"
    assert template_parts(text) == []


def test_a_meta_value_that_is_no_string_is_refused_with_a_clear_error(
    make_host: Callable[..., Host], tmp_path: Path
) -> None:
    host = make_host("cpu-only")
    ident = _write_identity(tmp_path, {**ENROLLMENT_NOMAD, "meta": {"rack": {"row": 1}}})
    with pytest.raises(VectorlayError, match=r"cannot write \{'row': 1\} \(dict\) into a configuration file"):
        render_nomad_config(host, ident, "none")


@pytest.mark.slow
def test_the_config_of_a_node_enrolled_through_the_product_passes_the_walk(
    make_tree: Callable[..., Path], start_control_plane: Callable[..., Any]
) -> None:
    cp = start_control_plane()
    cp.org("acme", provider=True)
    root = make_tree("cpu-only")
    res = cp.enroll(root, "acme")
    assert res.returncode == 0, res.stderr
    host = TreeHost(root)
    ident = load_identity(host)
    assert ident is not None
    parsed = parse_hcl(render_nomad_config(host, ident, "none"))
    assert walk("", parsed, AGENT) == []
    assert parsed["bind_addr"] == ident.overlay_ip and parsed["name"] == ident.node_id
    assert _block(parsed, "client")["servers"] == ident.enrollment()["nomad"]["servers"]


# --- The `hcl` filter ------------------------------------------------------------------------------

NASTY = [
    "plain",
    "",
    'a"b',
    "back\\slash",
    "trailing\\",
    "new\nline",
    "cr\rlf\n",
    "tab\t",
    "\x00\x01\x1b\x1f\x7f\x85",
    "\u2028\u2029",
    "${path.root}",
    "%{ if true }x%{ endif }",
    "$${x}",
    "%%{x}",
    "$",
    "%",
    "${",
    "%{",
    "$$$${{",
    "}",
    "\\u0024{x}",
    '\\"',
    "ü€😀",
    '"\n}\nplugin "raw_exec" {\n',
]


@pytest.mark.parametrize("value", NASTY, ids=[repr(v) for v in NASTY])
def test_hcl_string_reads_back_as_exactly_the_value_and_never_as_a_template(value: str) -> None:
    literal = hcl_string(value)
    text = f"v = {literal}\nafter = 1\n"
    assert parse_hcl(text) == {"v": value, "after": 1}
    assert template_parts(text) == []
    assert "\n" not in literal and "\r" not in literal


@given(st.text())
@pytest.mark.slow
def test_any_text_reads_back_exactly_from_its_hcl_string(value: str) -> None:
    text = f"v = {hcl_string(value)}\n"
    assert parse_hcl(text) == {"v": value}
    assert template_parts(text) == []


def test_hcl_string_writes_numbers_as_their_text_and_refuses_other_types() -> None:
    assert hcl_string(4647) == '"4647"'
    for bad in (True, None, ["a"], {"a": "b"}):
        with pytest.raises(VectorlayError):
            hcl_string(bad)
