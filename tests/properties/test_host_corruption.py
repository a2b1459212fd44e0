"""Random corruptions of a host tree (sysfs attributes, /proc files, node.yaml, state.json,
enrollment.json, node.json): `detect`, the doctor and `install --plan` answer each with a result or a
clear error (VectorlayError), never a traceback, within the example deadline, and touch nothing
outside the tree (a sentinel directory beside it, which planted links point at, stays as it was)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootstrap.commands.install import run_install
from bootstrap.commands.runner import InternalError
from bootstrap.discovery import discover
from bootstrap.errors import VectorlayError
from bootstrap.host import Host, TreeHost
from bootstrap.identity import load_identity
from bootstrap.plan import compute
from bootstrap.settings import load_settings
from bootstrap.stages import agents
from bootstrap.stages.contract import Context
from bootstrap.state import RunState
from doctor.checks import run_checks
from hostsim import build_host, load_topology
from hostsim.snapshot import snapshot
from tests.hardening.helpers import enrolled_host

pytestmark = pytest.mark.slow

DEVICE = "/sys/bus/pci/devices/0000:01:00.0"
TARGETS = (
    f"{DEVICE}/vendor",
    f"{DEVICE}/device",
    f"{DEVICE}/class",
    f"{DEVICE}/config",
    f"{DEVICE}/power_state",
    f"{DEVICE}/driver_override",
    "/proc/meminfo",
    "/proc/cmdline",
    "/proc/cpuinfo",
    "/etc/vectorlay/node.yaml",
    "/var/lib/vectorlay/state.json",
    "/etc/vectorlay/identity/enrollment.json",
    "/etc/vectorlay/identity/node.json",
    "/etc/default/grub",
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
# Keys the readers look for, so that a random object is often almost right (the hard case).
near_json = st.dictionaries(
    st.sampled_from(
        [
            "stage",
            "pending_commands",
            "node_id",
            "org_id",
            "overlay_ip",
            "nebula",
            "nomad",
            "manifest_keys",
            "lighthouses",
            "servers",
            "meta",
            "api",
            "gpu_mode",
        ]
    ),
    json_values,
    max_size=5,
)
yaml_like = st.lists(
    st.tuples(
        st.sampled_from(["api", "gpu_mode", "autoupdate", "disk_path", "extra_gpu_vendor_ids", "x"]),
        st.text(max_size=30),
    ),
    max_size=5,
).map(lambda kv: "".join(f"{k}: {v}\n" for k, v in kv))

contents = st.one_of(
    st.binary(max_size=300).map(lambda b: ("bytes", b)),
    st.text(max_size=300).map(lambda t: ("bytes", t.encode("utf-8", "surrogatepass"))),
    json_values.map(lambda v: ("bytes", json.dumps(v).encode())),
    near_json.map(lambda v: ("bytes", json.dumps(v).encode())),
    yaml_like.map(lambda t: ("bytes", t.encode())),
    st.integers(1, 5000).map(lambda n: ("bytes", b"[" * n)),
    st.sampled_from([("dir", b""), ("fifo", b""), ("link-out", b""), ("missing", b"")]),
)
corruptions = st.lists(st.tuples(st.sampled_from(TARGETS), contents), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A consumer workstation (one GPU, small tree), enrolled, with node.yaml and state.json."""
    root = tmp_path_factory.mktemp("template") / "host"
    build_host(root, load_topology("workstation-consumer"))
    enrolled_host(root, {"nebula": {}, "nomad": {"servers": ["10.42.0.1:4647"]}})
    (root / "etc/vectorlay/node.yaml").write_text("gpu_mode: passthrough\n")
    (root / "var/lib/vectorlay").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/vectorlay/state.json").write_text('{"stage": "gpu"}\n')
    assert (root / DEVICE.lstrip("/")).exists()
    return root


@contextlib.contextmanager
def corrupted(template: Path, changes: list[tuple[str, tuple[str, bytes]]]) -> Iterator[tuple[Host, Path]]:
    base = Path(tempfile.mkdtemp(prefix="vlprop"))
    try:
        root, outside = base / "host", base / "outside"
        shutil.copytree(template, root, symlinks=True)
        outside.mkdir()
        (outside / "sentinel").write_text("the machine's own file\n")
        for target, (kind, data) in changes:
            # The parent is resolved (sysfs device paths are links inside the tree), the last name is
            # not: an earlier change may have made it a link out of the tree, which is replaced.
            rel = root / target.lstrip("/")
            p = Path(os.path.realpath(rel.parent)) / rel.name
            assert root in p.parents
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
            p.parent.mkdir(parents=True, exist_ok=True)
            if kind == "bytes":
                p.write_bytes(data)
            elif kind == "dir":
                p.mkdir()
            elif kind == "fifo":
                os.mkfifo(p)
            elif kind == "link-out":
                os.symlink(outside / "sentinel", p)
        yield TreeHost(root), outside
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _clean(fn: Any, *args: Any, **kwargs: Any) -> None:
    """A result or an operator error: anything else is the traceback this suite exists to catch."""
    try:
        fn(*args, **kwargs)
    except InternalError as e:  # a stage crashed: the install run's own word for a traceback
        raise AssertionError(e.message) from e
    except VectorlayError as e:
        assert e.message
    except SystemExit as e:  # CLI paths end this way on an operator error
        assert e.code in (0, 1, 2, 3)


@settings(
    max_examples=40,
    deadline=20_000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(changes=corruptions)
def test_detect_doctor_and_plan_survive_any_corruption(template: Path, changes: Any) -> None:
    with corrupted(template, changes) as (host, outside):
        before_outside = snapshot(outside)

        def detect() -> None:
            discover(host, load_settings(host, env={}))

        def doctor() -> None:
            run_checks(host, env={})

        def plan(only: str | None) -> None:
            before = snapshot(host.root)
            with contextlib.redirect_stdout(io.StringIO()):
                run_install(host.root, plan_only=True, only=only, host=host, stream=io.StringIO(), rich=False)
            assert snapshot(host.root) == before, "install --plan wrote to the tree"

        def agents_plan() -> None:
            # What the agents stage makes of the identity and enrollment.json, without a control plane.
            ident = load_identity(host)
            if ident is not None:
                settings = load_settings(host, env={}, repair=True)
                ctx = Context(host=host, settings=settings, state=RunState(), out=lambda _m: None)
                compute(host, agents.desired(ctx, ident, "passthrough"))

        _clean(detect)
        _clean(doctor)
        _clean(plan, None)
        _clean(plan, "gpu")
        _clean(agents_plan)
        assert snapshot(outside) == before_outside
