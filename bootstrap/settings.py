"""Node settings: /etc/vectorlay/node.yaml, overridden by VECTORLAY_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bootstrap.errors import VectorlayError
from bootstrap.host import Host

SETTINGS_PATH = "/etc/vectorlay/node.yaml"
GPU_MODES = ("passthrough", "container", "none")


@dataclass(frozen=True)
class Settings:
    api: str | None = None
    gpu_mode: str | None = None  # None: decided by detection (passthrough on GPU boxes, else none)
    autoupdate: bool = True
    disk_path: str = "/var/lib/vectorlay"
    # Deployments may count further PCI vendors as GPUs (e.g. Intel 8086 data-centre GPUs) and
    # further NVSwitch device IDs; the built-in lists stay.
    extra_gpu_vendor_ids: tuple[str, ...] = ()
    extra_nvswitch_device_ids: tuple[str, ...] = ()
    # node-agent: seconds between heartbeats, and the load above which the node stops claiming
    # capacity (percent; the control plane never advertises above 90/85/90 whatever is set here).
    advertise_interval: int = 240
    cpu_threshold: float = 90.0
    memory_threshold: float = 85.0
    disk_threshold: float = 90.0
    source: str | None = field(default=None, compare=False)

    @property
    def thresholds(self) -> dict[str, float]:
        return {
            "cpu_percent": self.cpu_threshold,
            "memory_percent": self.memory_threshold,
            "disk_percent": self.disk_threshold,
        }


def _hex_ids(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise VectorlayError(f"{SETTINGS_PATH}: {key} must be a list of hex IDs", 'e.g. ["8086"]')
    out = []
    for item in value:
        s = str(item).lower().removeprefix("0x")
        if len(s) != 4 or any(c not in "0123456789abcdef" for c in s):
            raise VectorlayError(f"{SETTINGS_PATH}: {key} entry {item!r} is not a 4-digit hex ID")
        out.append(s)
    return tuple(out)


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise VectorlayError(f"{key}={value!r} is not a boolean", "use 1 or 0")


def _interval(value: Any, key: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if not 1 <= n <= 3600:
        raise VectorlayError(
            f"{key}={value!r} is not a heartbeat interval", "use whole seconds from 1 to 3600"
        )
    return n


def _percent(value: Any, key: str) -> float:
    try:
        f = float(str(value).strip())
    except ValueError:
        f = -1.0
    if not 1.0 <= f <= 100.0:
        raise VectorlayError(f"{key}={value!r} is not a percentage", "use a number from 1 to 100")
    return f


THRESHOLD_KEYS = ("cpu_percent", "memory_percent", "disk_percent")


def _thresholds(settings: Settings, value: Any) -> Settings:
    if value is None:
        return settings
    if not isinstance(value, dict) or set(value) - set(THRESHOLD_KEYS):
        raise VectorlayError(
            f"{SETTINGS_PATH}: thresholds must map {', '.join(THRESHOLD_KEYS)} to percentages",
            "e.g. thresholds: {cpu_percent: 90, memory_percent: 85, disk_percent: 90}",
        )
    for key in THRESHOLD_KEYS:
        if key in value:
            settings = _with_threshold(settings, key, _percent(value[key], f"thresholds.{key}"))
    return settings


def _with_threshold(settings: Settings, key: str, percent: float) -> Settings:
    if key == "cpu_percent":
        return replace(settings, cpu_threshold=percent)
    if key == "memory_percent":
        return replace(settings, memory_threshold=percent)
    return replace(settings, disk_threshold=percent)


def _gpu_mode(value: Any, key: str) -> str:
    s = str(value).strip().lower()
    if s not in GPU_MODES:
        raise VectorlayError(f"{key}={value!r} is not a GPU mode", "use passthrough, container or none")
    return s


def load_settings(host: Host, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    settings = Settings()
    text = host.read_text(SETTINGS_PATH, default="")
    if text.strip():
        # Imported here, not at the top: yaml costs ~10 ms of the doctor's benchmarked startup and is
        # only needed when node.yaml exists.
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise VectorlayError(
                f"{SETTINGS_PATH} is not valid YAML: {e}", "fix the file or re-run the install one-liner"
            ) from None
        if not isinstance(data, dict):
            raise VectorlayError(f"{SETTINGS_PATH} must be a mapping of settings")
        unknown = set(data) - {
            "api",
            "gpu_mode",
            "autoupdate",
            "disk_path",
            "extra_gpu_vendor_ids",
            "extra_nvswitch_device_ids",
            "advertise_interval",
            "thresholds",
        }
        if unknown:
            raise VectorlayError(f"{SETTINGS_PATH}: unknown setting(s) {', '.join(sorted(unknown))}")
        settings = replace(
            settings,
            api=data.get("api") or None,
            gpu_mode=_gpu_mode(data["gpu_mode"], "gpu_mode") if data.get("gpu_mode") else None,
            autoupdate=_bool(data.get("autoupdate", True), "autoupdate"),
            disk_path=str(data.get("disk_path") or settings.disk_path),
            extra_gpu_vendor_ids=_hex_ids(data.get("extra_gpu_vendor_ids"), "extra_gpu_vendor_ids"),
            extra_nvswitch_device_ids=_hex_ids(
                data.get("extra_nvswitch_device_ids"), "extra_nvswitch_device_ids"
            ),
            source=SETTINGS_PATH,
        )
        if data.get("advertise_interval") is not None:
            settings = replace(
                settings, advertise_interval=_interval(data["advertise_interval"], "advertise_interval")
            )
        settings = _thresholds(settings, data.get("thresholds"))
    if env.get("VECTORLAY_API"):
        settings = replace(settings, api=env["VECTORLAY_API"])
    if env.get("VECTORLAY_GPU_MODE"):
        settings = replace(settings, gpu_mode=_gpu_mode(env["VECTORLAY_GPU_MODE"], "VECTORLAY_GPU_MODE"))
    if env.get("NODE_AGENT_AUTOUPDATE"):
        settings = replace(settings, autoupdate=_bool(env["NODE_AGENT_AUTOUPDATE"], "NODE_AGENT_AUTOUPDATE"))
    if env.get("VECTORLAY_DISK_PATH"):
        settings = replace(settings, disk_path=env["VECTORLAY_DISK_PATH"])
    if env.get("VECTORLAY_EXTRA_GPU_VENDOR_IDS"):
        ids = [s for s in env["VECTORLAY_EXTRA_GPU_VENDOR_IDS"].replace(",", " ").split() if s]
        settings = replace(settings, extra_gpu_vendor_ids=_hex_ids(ids, "VECTORLAY_EXTRA_GPU_VENDOR_IDS"))
    if env.get("VECTORLAY_ADVERTISE_INTERVAL"):
        settings = replace(
            settings,
            advertise_interval=_interval(env["VECTORLAY_ADVERTISE_INTERVAL"], "VECTORLAY_ADVERTISE_INTERVAL"),
        )
    for var, key in (
        ("VECTORLAY_CPU_THRESHOLD", "cpu_percent"),
        ("VECTORLAY_MEMORY_THRESHOLD", "memory_percent"),
        ("VECTORLAY_DISK_THRESHOLD", "disk_percent"),
    ):
        if env.get(var):
            settings = _with_threshold(settings, key, _percent(env[var], var))
    return settings
