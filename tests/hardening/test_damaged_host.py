"""A damaged host tree: files of the wrong kind or type, garbage where the kernel's files belong, a
FIFO where a sysfs attribute belongs, a decompression bomb in a signed artifact. Each gives a clear
message (or a clean degraded result), no traceback, in bounded time and size, and damages nothing."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bootstrap import artifacts
from bootstrap.artifacts import UnpackLimits
from bootstrap.errors import VectorlayError
from bootstrap.host import Host, TreeHost
from bootstrap.identity import IdentityError
from bootstrap.manifest import Artifact, verify_manifest
from bootstrap.settings import Settings
from bootstrap.stages.agents import desired
from bootstrap.stages.contract import Context
from bootstrap.state import RunState, load_state
from doctor.checks import Context as DoctorContext
from doctor.checks.resources import check_memory
from hostsim.snapshot import snapshot
from tests.agents.artifact_helpers import DirectoryDownloader, manifest_for
from tests.hardening.helpers import enrolled_host
from tests.install.helpers import gpus_on_vfio, install

MakeTree = Callable[..., Path]
# Bounded: a hang (a FIFO read, an unbounded unpack) fails the test instead of stalling the suite.
TIMEOUT = 60


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _clean(res: subprocess.CompletedProcess[str]) -> str:
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    return out


@pytest.fixture
def ready_tree(make_tree: MakeTree) -> Path:
    return make_tree("hgx-h100", gpus_on_vfio)


# --- node.yaml --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["directory", "fifo"])
@pytest.mark.slow
def test_a_node_yaml_that_is_not_a_file_is_a_clear_error_everywhere(ready_tree: Path, kind: str) -> None:
    p = ready_tree / "etc/vectorlay/node.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    if kind == "directory":
        p.mkdir()
    else:
        os.mkfifo(p)
    before = snapshot(ready_tree, skip=("run", "var/log"))
    for argv in (
        ("bootstrap.cli", "detect", "--root", str(ready_tree)),
        ("doctor.cli", "--root", str(ready_tree)),
        ("bootstrap.cli", "install", "--root", str(ready_tree), "--only", "gpu"),
    ):
        res = _cli(*argv)
        out = _clean(res)
        assert res.returncode == 1, out
        assert "error: /etc/vectorlay/node.yaml is not a regular file" in out
    assert snapshot(ready_tree, skip=("run", "var/log")) == before


# --- state.json -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        [],
        {"pending_commands": "update-grub"},
        {"pending_commands": [["update-grub", 7]]},
        {"pending_commands": [["update-grub", ["-v"]]]},
        {"stage": {"a": {"b": [1, 2, 3]}}},
        {"reboot_requested_boot_id": 12},
    ],
    ids=["list", "str-commands", "number-in-command", "list-in-command", "nested-stage", "number"],
)
@pytest.mark.slow
def test_a_state_json_of_the_wrong_types_is_a_clear_error_and_left_as_it_is(
    ready_tree: Path, state: object
) -> None:
    p = ready_tree / "var/lib/vectorlay/state.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(state))
    before = snapshot(ready_tree, skip=("run", "var/log"))
    res = install(ready_tree, "--only", "gpu")
    out = _clean(res)
    assert res.returncode == 1, out
    assert "error: /var/lib/vectorlay/state.json" in out
    assert "mv /var/lib/vectorlay/state.json" in out
    assert snapshot(ready_tree, skip=("run", "var/log")) == before


def test_a_state_json_of_the_right_types_still_loads(tmp_path: Path) -> None:
    (tmp_path / "var/lib/vectorlay").mkdir(parents=True)
    # "versions" was written by earlier releases and is no longer read: it must not stop a run.
    (tmp_path / "var/lib/vectorlay/state.json").write_text(
        json.dumps({"stage": "gpu", "pending_commands": [["update-grub"]], "versions": {"nebula": "1"}})
    )
    state = load_state(TreeHost(tmp_path))
    assert state == RunState(stage="gpu", pending_commands=[["update-grub"]])


# --- enrollment.json --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "enrollment",
    [
        [1, 2],
        "{not json",
        {"nebula": [1, 2]},
        {"nomad": "servers"},
        {"manifest_keys": [{"k": 1}]},
        {"nomad": {"servers": 5}},
        {"nomad": {"meta": ["a"]}},
        {"nebula": {"lighthouses": 3}},
        "[" * 100_000,
    ],
    ids=[
        "list",
        "not-json",
        "nebula-list",
        "nomad-str",
        "keys-objects",
        "servers-number",
        "meta-list",
        "lighthouses-number",
        "nested-deep",
    ],
)
def test_an_enrollment_json_of_the_wrong_shape_is_an_identity_error(
    tmp_path: Path, enrollment: object
) -> None:
    host = enrolled_host(tmp_path, enrollment)
    from bootstrap.identity import load_identity

    ident = load_identity(host)
    assert ident is not None
    ctx = Context(host=host, settings=Settings(), state=RunState(), out=lambda _m: None)
    with pytest.raises(IdentityError) as err:
        desired(ctx, ident, "none")
    assert "enrollment.json" in err.value.message
    assert err.value.hint is not None and "re-enroll" in err.value.hint


# --- /proc/meminfo ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "meminfo",
    [
        b"\x00\xff\xfe garbage\n",
        b"MemTotal: lots kB\n",
        b"MemTotal: 99999999999999999999999999 kB\n",
        b"MemTotal: -5 kB\n",
        b"MemTotal:\n",
        b"",
        b"MemTotal: \xd9\xa3\xd9\xa3 kB\n",  # Arabic-Indic digits: isdigit() but not a kernel figure
    ],
    ids=["binary", "word", "huge", "negative", "empty-value", "empty", "unicode-digits"],
)
def test_garbage_in_proc_meminfo_is_a_memory_fail_not_a_traceback(ready_tree: Path, meminfo: bytes) -> None:
    (ready_tree / "proc/meminfo").write_bytes(meminfo)
    result = check_memory(DoctorContext(TreeHost(ready_tree), Settings()))
    assert result.status.value == "FAIL"
    assert "/proc/meminfo" in result.message and result.hint
    res = _cli("doctor.cli", "--root", str(ready_tree), "--json")
    _clean(res)
    assert res.returncode == 1
    memory = next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "memory")
    assert memory["status"] == "FAIL"


# --- a FIFO in sysfs --------------------------------------------------------------------------------


@pytest.mark.parametrize("attr", ["vendor", "class", "config", "power_state"])
@pytest.mark.slow
def test_a_fifo_in_sysfs_does_not_hang_detect_or_the_doctor(ready_tree: Path, attr: str) -> None:
    dev = (ready_tree / "sys/bus/pci/devices/0000:19:00.0").resolve()
    (dev / attr).unlink()
    os.mkfifo(dev / attr)
    for argv in (
        ("bootstrap.cli", "detect", "--root", str(ready_tree), "--json"),
        ("doctor.cli", "--root", str(ready_tree), "--json"),
    ):
        res = _cli(*argv)  # a hang is a TimeoutExpired here
        _clean(res)
        assert res.returncode in (0, 1)
        json.loads(res.stdout)


def test_a_fifo_for_proc_cmdline_or_cpuinfo_does_not_hang_the_doctor(ready_tree: Path) -> None:
    for name in ("proc/cmdline", "proc/cpuinfo"):
        (ready_tree / name).unlink()
        os.mkfifo(ready_tree / name)
    res = _cli("doctor.cli", "--root", str(ready_tree), "--json")
    _clean(res)
    assert res.returncode in (0, 1)


# --- a decompression bomb in a signed artifact ------------------------------------------------------


def _signed(mirror: DirectoryDownloader, name: str, blob: bytes) -> Artifact:
    key = Ed25519PrivateKey.generate()
    mirror.put(name, "1", blob)
    return verify_manifest(manifest_for({(name, "1"): blob}, key), [key.public_key()]).get(name)


def _zeros_tarball(size: int, members: int = 1) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(members):
            info = tarfile.TarInfo(f"bin/zeros-{i}")
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
    return buf.getvalue()


def _assert_refused(
    host: Host, mirror: DirectoryDownloader, art: Artifact, limits: UnpackLimits | None
) -> None:
    with pytest.raises(VectorlayError, match=r"502 ARTIFACT.*(unpacks to more than|more than .* members)"):
        artifacts.install(host, mirror, art, limits)
    base = host.path(f"/opt/vectorlay/releases/{art.name}")
    assert not (base / "1").exists()
    assert [p.name for p in base.iterdir()] == []  # no staging directory, no download left


def test_a_gzip_bomb_is_refused_before_it_is_unpacked(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    host, mirror = TreeHost(tmp_path / "root"), DirectoryDownloader(tmp_path / "mirror")
    blob = _zeros_tarball(64 << 20)  # 64 MiB of zeros: ~64 KiB on the wire
    assert len(blob) < 200_000
    _assert_refused(host, mirror, _signed(mirror, "bomb", blob), UnpackLimits(max_bytes=16 << 20))


def test_an_archive_declaring_a_huge_member_is_refused_by_the_default_limits(tmp_path: Path) -> None:
    # A header claiming 1 TiB followed by no data: the default limit refuses it on the header alone.
    info = tarfile.TarInfo("bin/huge")
    info.size = 1 << 40
    blob = gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024))
    (tmp_path / "root").mkdir()
    host, mirror = TreeHost(tmp_path / "root"), DirectoryDownloader(tmp_path / "mirror")
    _assert_refused(host, mirror, _signed(mirror, "huge", blob), None)


def test_an_archive_of_too_many_members_is_refused(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    host, mirror = TreeHost(tmp_path / "root"), DirectoryDownloader(tmp_path / "mirror")
    blob = _zeros_tarball(0, members=300)
    _assert_refused(host, mirror, _signed(mirror, "many", blob), UnpackLimits(max_members=100))
