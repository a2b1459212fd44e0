"""Node settings: /etc/vectorlay/node.yaml, overridden by VECTORLAY_* environment variables."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

from bootstrap.errors import VectorlayError
from bootstrap.fsutil import read_regular
from bootstrap.host import Host
from bootstrap.paths import SETTINGS_PATH as SETTINGS_PATH  # still importable from here

GPU_MODES = ("passthrough", "container", "none")
T = TypeVar("T")
Parser = Callable[[Any, str], Any]  # (value, the name to show in an error) -> the value to keep


# node.yaml is a handful of lines; anything near this is not a settings file.
SETTINGS_LIMIT = 64 << 10
MAX_PATH = 4096  # PATH_MAX
MAX_URL = 2048
FILE_FIX = f"fix {SETTINGS_PATH} or move it away (sudo mv {SETTINGS_PATH} {SETTINGS_PATH}.bad) and re-run"


def _control_char(s: str) -> str | None:
    for c in s:
        if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029":
            return repr(c)
    return None


def _text(value: Any, key: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise VectorlayError(f"{key} must be a string, not {type(value).__name__}")
    if len(value) > max_len:
        raise VectorlayError(f"{key} is {len(value)} characters long (at most {max_len})")
    bad = _control_char(value)
    if bad is not None:
        raise VectorlayError(f"{key} contains a control character ({bad})", f"set {key} without it")
    return value


def _abs_path(value: Any, key: str) -> str:
    s = _text(value, key, MAX_PATH)
    if not s.startswith("/"):
        raise VectorlayError(f"{key}={s!r} is not an absolute path", f"set {key} to a path like /data")
    return s


def _url(value: Any, key: str) -> str:
    s = _text(value, key, MAX_URL)
    if any(c.isspace() for c in s):
        raise VectorlayError(f"{key}={s!r} contains white space", f"set {key} to the control plane's URL")
    return s


def _proxy(value: Any, key: str) -> str:
    s = _url(value, key)
    text = s if "://" in s else "http://" + s
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise VectorlayError(
            f"{key}={s[:80]!r} is not an HTTP proxy URL",
            "use http://host:port (the proxy is asked for CONNECT tunnels only)",
        )
    if parts.username is not None or parts.password is not None:
        raise VectorlayError(
            f"{key} must not hold credentials (node.yaml is readable by every user)",
            "give an authenticating proxy as https_proxy=http://user:password@host:port in the "
            "environment instead; the agents get it in a 0600 file",
        )
    if any(c in s for c in "\"'\\$`"):
        raise VectorlayError(f"{key}={s[:80]!r} contains a quote, backslash, $ or `", "use http://host:port")
    del port
    return s


def _hex_ids(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise VectorlayError(f"{key} must be a list of hex IDs", 'e.g. ["8086"]')
    out = []
    for item in value:
        # Scalars only: str() of a nested (or aliased) structure is unbounded work.
        s = str(item).lower().removeprefix("0x") if isinstance(item, (str, int)) else ""
        if len(s) != 4 or any(c not in "0123456789abcdef" for c in s):
            shown = repr(item) if isinstance(item, (str, int)) else type(item).__name__
            raise VectorlayError(f"{key} entry {shown[:40]} is not a 4-digit hex ID")
        out.append(s)
    return tuple(out)


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower() if isinstance(value, (str, int)) else ""
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    shown = repr(value)[:40] if isinstance(value, (str, int)) else type(value).__name__
    raise VectorlayError(f"{key}={shown} is not a boolean", "use 1 or 0")


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


def _gpu_mode(value: Any, key: str) -> str:
    s = value.strip().lower() if isinstance(value, str) else ""
    if s not in GPU_MODES:
        shown = repr(value)[:40] if isinstance(value, (str, int)) else type(value).__name__
        raise VectorlayError(f"{key}={shown} is not a GPU mode", "use passthrough, container or none")
    return s


def setting(default: T, *, env: str | None, parse: Parser, key: str = "", when_set: bool = False) -> T:
    """A field of Settings that is a setting: its node.yaml key (the field's name unless `key`, where
    `group.name` nests it under `group:`), the variable that overrides it, its parser, its default.
    `when_set`: written into node.yaml only when it holds something (lists always are)."""
    meta = {"env": env, "parse": parse, "key": key, "when_set": when_set or isinstance(default, tuple)}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """The node's settings: node.yaml, then the environment over it. Each is one line here, from which
    loading, the overrides and the node.yaml the installer writes are all derived (ROWS)."""

    api: str | None = setting(None, env="VECTORLAY_API", parse=_url)
    # None: decided by detection (passthrough on GPU boxes, else none)
    gpu_mode: str | None = setting(None, env="VECTORLAY_GPU_MODE", parse=_gpu_mode)
    autoupdate: bool = setting(True, env="NODE_AGENT_AUTOUPDATE", parse=_bool)
    disk_path: str = setting("/var/lib/vectorlay", env="VECTORLAY_DISK_PATH", parse=_abs_path)
    # Deployments may count further PCI vendors as GPUs (e.g. Intel 8086 data-centre GPUs) and
    # further NVSwitch device IDs; the built-in lists stay.
    extra_gpu_vendor_ids: tuple[str, ...] = setting((), env="VECTORLAY_EXTRA_GPU_VENDOR_IDS", parse=_hex_ids)
    extra_nvswitch_device_ids: tuple[str, ...] = setting((), env=None, parse=_hex_ids)
    # node-agent: seconds between heartbeats, and the load above which the node stops claiming
    # capacity (percent; the control plane never advertises above 90/85/90 whatever is set here).
    advertise_interval: int = setting(240, env="VECTORLAY_ADVERTISE_INTERVAL", parse=_interval)
    cpu_threshold: float = setting(
        90.0, env="VECTORLAY_CPU_THRESHOLD", parse=_percent, key="thresholds.cpu_percent"
    )
    memory_threshold: float = setting(
        85.0, env="VECTORLAY_MEMORY_THRESHOLD", parse=_percent, key="thresholds.memory_percent"
    )
    disk_threshold: float = setting(
        90.0, env="VECTORLAY_DISK_THRESHOLD", parse=_percent, key="thresholds.disk_percent"
    )
    # An HTTP proxy for the node's HTTPS (install.sh's proxy=): used when the environment names none
    # (https_proxy), and written into the agents' environment. Never a password: this file is 0644.
    proxy: str | None = setting(None, env="VECTORLAY_PROXY", parse=_proxy, when_set=True)
    source: str | None = field(default=None, compare=False)
    # What `repair` loading set aside of a damaged node.yaml (the install run rewrites the file).
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def thresholds(self) -> dict[str, float]:
        return {row.sub: getattr(self, row.field) for row in ROWS if row.group == "thresholds"}


class Row(NamedTuple):
    """One setting, as Settings declares it."""

    field: str
    group: str  # its node.yaml key, or the mapping it sits in
    sub: str  # its key in that mapping ("" at the top level)
    env: str | None
    parse: Parser
    default: Any
    when_set: bool  # written into node.yaml only when it holds something

    @property
    def key(self) -> str:
        return f"{self.group}.{self.sub}" if self.sub else self.group


def _row(f: Field[Any]) -> Row:
    group, _, sub = (f.metadata["key"] or f.name).partition(".")
    meta = f.metadata
    return Row(f.name, group, sub, meta["env"], meta["parse"], f.default, meta["when_set"])


ROWS = tuple(_row(f) for f in fields(Settings) if "parse" in f.metadata)
# node.yaml's top-level keys, in the order Settings declares them.
KNOWN = tuple(dict.fromkeys(row.group for row in ROWS))
_GROUPS = {g: tuple(r for r in ROWS if r.group == g and r.sub) for g in KNOWN}


def _value(key: str, value: Any) -> Any:
    """A top-level node.yaml value, validated: a setting's, or a mapping of its group's."""
    rows = _GROUPS[key]
    if not rows:
        return next(r for r in ROWS if r.group == key).parse(value, key)
    subs = [r.sub for r in rows]
    if not isinstance(value, dict) or set(value) - set(subs):
        what = "percentages" if all(r.parse is _percent for r in rows) else "values"
        example = ", ".join(f"{r.sub}: {r.default:g}" for r in rows)
        raise VectorlayError(f"{key} must map {', '.join(subs)} to {what}", f"e.g. {key}: {{{example}}}")
    return {r.sub: r.parse(value[r.sub], r.key) for r in rows if r.sub in value}


def _is_list(key: str) -> bool:
    return any(isinstance(r.default, tuple) for r in ROWS if r.group == key)


def _fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """Settings' fields from node.yaml's validated top-level values."""
    out = {}
    for row in ROWS:
        if row.group in values:
            value = values[row.group]
            if not row.sub:
                out[row.field] = value
            elif row.sub in value:
                out[row.field] = value[row.sub]
    return out


def _read_file(host: Host) -> str | None:
    """node.yaml's text, None when there is none. Never blocks (a FIFO) and never reads without bound."""
    real = host.path(SETTINGS_PATH)
    try:
        st = real.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise VectorlayError(f"cannot read {SETTINGS_PATH}: {e.strerror}", FILE_FIX) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO, socket or device"
        raise VectorlayError(f"{SETTINGS_PATH} is not a regular file (it is {kind})", FILE_FIX)
    if st.st_size > SETTINGS_LIMIT:
        raise VectorlayError(f"{SETTINGS_PATH} is {st.st_size} bytes (at most {SETTINGS_LIMIT})", FILE_FIX)
    try:
        return read_regular(real, SETTINGS_LIMIT).decode("utf-8")
    except UnicodeDecodeError:
        raise VectorlayError(f"{SETTINGS_PATH} is not UTF-8 text", FILE_FIX) from None
    except PermissionError:
        raise VectorlayError(f"cannot read {SETTINGS_PATH}: permission denied", "run with sudo") from None
    except OSError as e:
        raise VectorlayError(f"cannot read {SETTINGS_PATH}: {e.strerror}", FILE_FIX) from None


def _parse(text: str) -> dict[str, Any]:
    # Imported here, not at the top: yaml costs ~10 ms of the doctor's benchmarked startup and is
    # only needed when node.yaml exists.
    import yaml

    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:
        raise VectorlayError(f"{SETTINGS_PATH} is not valid YAML: {str(e)[:300]}", FILE_FIX) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VectorlayError(f"{SETTINGS_PATH} must be a mapping of settings", FILE_FIX)
    unknown = [str(k)[:40] for k in data if k not in KNOWN]
    if unknown:
        raise VectorlayError(f"{SETTINGS_PATH}: unknown setting(s) {', '.join(sorted(unknown))}", FILE_FIX)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if value is None or value == "":
            continue
        try:
            out[key] = _value(key, value)
        except VectorlayError as e:
            raise VectorlayError(f"{SETTINGS_PATH}: {e.message}", FILE_FIX) from None
    return out


def _salvage(text: str) -> tuple[dict[str, Any], list[str]]:
    """The settings of a node.yaml this installer wrote that no longer parses.

    Older versions wrote one `key: value` line per setting without quoting, so a value holding ": "
    or a quote made the whole file invalid. Each known key's first line still holds its value; what
    does not validate is dropped (and reported) rather than failing every later run.
    """
    import yaml

    out: dict[str, Any] = {}
    dropped: list[str] = []
    for line in text.splitlines():
        key, sep, rest = line.partition(": ")
        if not sep or key not in KNOWN or key in out:
            continue
        raw: Any = rest.strip()
        if _is_list(key):
            try:
                raw = yaml.safe_load(raw)
            except (yaml.YAMLError, RecursionError):
                dropped.append(key)
                continue
        try:
            out[key] = _value(key, raw)
        except VectorlayError:
            dropped.append(key)
    return out, dropped


def load_settings(host: Host, env: Mapping[str, str] | None = None, *, repair: bool = False) -> Settings:
    """node.yaml, then the VECTORLAY_* variables over it; every value validated.

    `repair` (the install run, which rewrites node.yaml): a file of the installer's own that no longer
    parses is read line by line instead, with a warning, so that it never blocks the run that would
    fix it. A file someone else wrote, or one that is not a file at all, is always an error.
    """
    env = os.environ if env is None else env
    settings = Settings()
    text = _read_file(host)
    warnings: list[str] = []
    if text is not None and text.strip():
        try:
            values = _parse(text)
        except VectorlayError as e:
            # bootstrap.plan (and all it imports) only here and in settings_yaml: the doctor and the
            # node-agent read node.yaml on every run and never write it.
            from bootstrap.plan import MARKER

            # Earlier versions put the marker and a note on one line.
            if not (repair and text.startswith(MARKER)):
                raise
            values, dropped = _salvage(text)
            warnings.append(
                f"{e.message}; this run rewrites it, keeping "
                + (", ".join(sorted(values)) or "no setting")
                + (f" (dropped: {', '.join(dropped)})" if dropped else "")
            )
        settings = replace(settings, **_fields(values), source=SETTINGS_PATH)
    overrides: dict[str, Any] = {}
    for row in ROWS:
        if row.env and env.get(row.env):
            raw: Any = env[row.env]
            if isinstance(row.default, tuple):  # a list in a variable: comma- or space-separated
                raw = [s for s in raw.replace(",", " ").split() if s]
            overrides[row.field] = row.parse(raw, row.env)
    settings = replace(settings, **overrides)
    return replace(settings, warnings=tuple(warnings))


def settings_yaml(settings: Settings, *, api: str | None, gpu_mode: str) -> bytes:
    """node.yaml as the install run writes it: serialised by yaml.safe_dump, so no value can break
    the file or add a key, whatever it holds."""
    import yaml

    from bootstrap.plan import MARKER

    settings = replace(settings, api=api, gpu_mode=gpu_mode)
    data: dict[str, Any] = {}
    # Lists last; they and the other `when_set` rows only when they hold something: the file reads
    # as it always has.
    for row in sorted(ROWS, key=lambda r: isinstance(r.default, tuple)):
        value = getattr(settings, row.field)
        if row.when_set and not value:
            continue
        if isinstance(row.default, tuple):
            data[row.group] = list(value)
        elif row.sub:
            data.setdefault(row.group, {})[row.sub] = value
        else:
            data[row.group] = value
    header = (
        f"{MARKER}\n# Re-running the install one-liner rewrites this file.\n"
        "# Environment variables VECTORLAY_API, VECTORLAY_GPU_MODE, NODE_AGENT_AUTOUPDATE,\n"
        "# VECTORLAY_DISK_PATH, VECTORLAY_ADVERTISE_INTERVAL, VECTORLAY_{CPU,MEMORY,DISK}_THRESHOLD and\n"
        "# VECTORLAY_PROXY override these settings (an https_proxy variable wins over proxy:).\n"
        "# advertise_interval: seconds between the node-agent's heartbeats;\n"
        "# thresholds: the load (percent) above which the node's units are not advertised.\n"
    )
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=False, width=4096)
    return (header + body).encode()
