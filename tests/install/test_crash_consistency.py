"""Crash consistency: the install is SIGKILLed at every kill point, each in turn, then re-run with the
same command; every interrupted-then-resumed run must end in exactly the tree of an uninterrupted run,
and no credential is lost on the way.

Kill points are the fault points of bootstrap.fsutil (the hook hostsim.inject installs, killing at
N: HOSTSIM_FAULT_AT=N): every file and link
switch, every directory made durable (artifact unpacking, the identity generation), every command
that changes something, every step of the identity writer. An uninterrupted run lists them
(HOSTSIM_FAULT_LOG) and is the reference. Two nodes: a ready HGX H100 (IOMMU on, GPUs on vfio-pci),
so that one run goes through every stage (preflight, detect, gpu, enroll, artifacts, agents, verify),
and the demo's HGX (GPUs on nvidia, IOMMU off), whose first run ends in "reboot required".
`--kill-points=sample` (make check) kills at a fixed sample of the points instead of all of them
(tests/install/killpoints.py).

What may legitimately differ between two runs, and nothing else:
- the run log's text (timestamps; an interrupted run leaves its partial run in it);
- state.json's token_expires_at and reboot_requested_at: each case has its own token, minted at its
  own time, and asks for its reboot at its own time;
- the identity: each case is its own node, so node ID and overlay IP (wherever they appear), the
  key pairs, certificates (X.509, nebula, Nomad) and node token, and the generation directory's name
  (a timestamp).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootstrap.api import ApiClient, ClientCert
from bootstrap.host import TreeHost
from bootstrap.identity import load_identity
from bootstrap.paths import IDENTITY_DIR
from bootstrap.provisioning import PENDING_KEY
from controlplane import testing
from hostsim import build_host, inject, load_topology
from hostsim.agents import publish_agents
from tests.install import killpoints
from tests.install.helpers import gpus_on_vfio, install, stop_daemons

ENV = {inject.SETTLE_ENV: "0.2"}
LOG = "var/log/vectorlay/bootstrap.log"
STATE = "var/lib/vectorlay/state.json"
# Each case is its own node: its keys, certificates and token are its own (the CAs are shared).
SECRETS = ("node.key", "node.crt", "node-token", "nebula.key", "nebula.crt", "nomad.key", "nomad.crt")
WORKERS = max(1, min(4, os.cpu_count() or 1))
# Evenly spaced points a sample takes besides the first, the last and the first of each kind.
SPREAD = 4


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    # Short: the agents' health sockets live under each tree and socket paths stop at 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="vlc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cp(base: Path) -> Iterator[testing.RunningControlPlane]:
    publish_agents(base / "artifacts")
    plane = testing.start(base / "cp", args=("--artifacts", str(base / "artifacts")))
    plane.org("acme", provider=True)
    try:
        yield plane
    finally:
        testing.stop(plane)


SCENARIOS = {"ready": 0, "reboot": 3}  # the node, and the exit code its (resumed) run ends with


def _tree(base: Path, name: str, scenario: str) -> Path:
    if scenario == "ready":
        desc = load_topology("hgx-h100")
        gpus_on_vfio(desc)
    else:
        from hostsim.demo import example_host

        desc = example_host()
    return build_host(base / name, desc)


def normalized(root: Path) -> dict[str, tuple[Any, ...]]:
    """The tree as (type, mode, content) per path, with the legitimate differences taken out."""
    ident = load_identity(TreeHost(root))
    subs = []
    if ident is not None:
        generation = os.readlink(root / IDENTITY_DIR.lstrip("/"))
        subs = [
            (generation, "<generation>"),
            (ident.node_id, "<node-id>"),
            (ident.overlay_ip, "<overlay-ip>"),
        ]

    def sub(text: str) -> str:
        for old, new in subs:
            text = text.replace(old, new)
        return text

    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = os.path.relpath(dirpath, root)
        if here == ".":
            dirnames[:] = [d for d in dirnames if d != "run"]  # tmpfs: the daemons' runtime state
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = os.path.normpath(os.path.join(here, name))
            st = p.lstat()
            key = sub(rel)
            if p.is_symlink():
                out[key] = ("link", sub(os.readlink(p)))
            elif p.is_dir():
                out[key] = ("dir", st.st_mode)
            elif rel == LOG:
                out[key] = ("file", st.st_mode, "<log>")
            elif rel == STATE:
                state = json.loads(p.read_text())
                state.pop("token_expires_at")
                state.pop("reboot_requested_at")
                out[key] = ("file", st.st_mode, json.dumps(state, sort_keys=True))
            elif "/.identity-" in f"/{rel}" and name in SECRETS:
                out[key] = ("file", st.st_mode, "<secret>")
            else:
                data = sub(p.read_bytes().decode("latin-1"))
                out[key] = ("file", st.st_mode, hashlib.sha256(data.encode("latin-1")).hexdigest())
    return out


def _identity_works(plane: testing.RunningControlPlane, root: Path) -> str:
    ident = load_identity(TreeHost(root))
    assert ident is not None
    api = ApiClient(
        plane.url,
        ca_file=plane.ca_file,
        client_cert=ClientCert(ident.cert_file, ident.key_file),
        attempts=1,
    )
    try:
        return str(api.request("GET", "/v1/node/self", bearer=ident.node_token())["node_id"])
    finally:
        api.close()


def _credentials_intact(root: Path) -> str | None:
    """After a kill: the identity is absent or complete, and a kept key pair is private."""
    try:
        load_identity(TreeHost(root))
    except Exception as e:
        return f"identity damaged: {e}"
    pending = root / PENDING_KEY.lstrip("/")
    if pending.exists() and pending.stat().st_mode & 0o077:
        return f"{PENDING_KEY} is readable by others"
    return None


def _diff(ref: dict[str, tuple[Any, ...]], got: dict[str, tuple[Any, ...]]) -> list[str]:
    lines = [f"missing {k}" for k in sorted(ref.keys() - got.keys())]
    lines += [f"extra {k} {got[k]}" for k in sorted(got.keys() - ref.keys())]
    lines += [
        f"differs {k}: {ref[k]} != {got[k]}" for k in sorted(ref.keys() & got.keys()) if ref[k] != got[k]
    ]
    return lines


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_an_install_killed_at_any_point_and_resumed_ends_as_if_never_interrupted(
    base: Path,
    cp: testing.RunningControlPlane,
    capsys: pytest.CaptureFixture[str],
    pytestconfig: pytest.Config,
    scenario: str,
) -> None:
    expected = SCENARIOS[scenario]
    ref_root = _tree(base, f"{scenario}-ref", scenario)
    points_log = base / f"{scenario}-points"
    res = install(ref_root, cp=cp, token=cp.token("acme"), env={**ENV, inject.FAULT_LOG_ENV: str(points_log)})
    assert res.returncode == expected, res.stdout[-3000:] + res.stderr
    points = [line.split("\t", 1)[1] for line in points_log.read_text().splitlines()]
    reference = normalized(ref_root)
    kinds = {p.split(" ", 1)[0] for p in points}
    if scenario == "ready":
        assert "vectorlay-node: DONE" in res.stdout and "doctor: PASS, 8/8 GPU unit(s) ready" in res.stdout
        assert _identity_works(cp, ref_root)
        assert {"write", "link", "run", "sync", "remove", "enroll"} <= kinds
    else:
        assert "vectorlay-node: REBOOT REQUIRED" in res.stdout
        assert {"write", "link", "run"} <= kinds
    stop_daemons(ref_root)
    walk_all = killpoints.walk_all(pytestconfig)
    chosen = list(range(1, len(points) + 1)) if walk_all else killpoints.sample(points, SPREAD)
    tokens = {k: cp.token("acme") for k in chosen}

    def case(k: int) -> list[str]:
        root = _tree(base, f"{scenario}-k{k}", scenario)
        try:
            token = tokens[k]
            killed = install(root, cp=cp, token=token, env={**ENV, inject.FAULT_AT_ENV: str(k)})
            where = f"kill point {k} ({points[k - 1].replace(str(base), '')})"
            if killed.returncode != -9:
                return [f"{where}: not killed (exit {killed.returncode}): {killed.stderr[-500:]}"]
            damaged = _credentials_intact(root)
            if damaged:
                return [f"{where}: {damaged}"]
            resumed = install(root, cp=cp, token=token, env=ENV)
            if resumed.returncode != expected:
                return [f"{where}: the re-run failed (exit {resumed.returncode}): {resumed.stderr[-800:]}"]
            if expected == 0:
                _identity_works(cp, root)
            return [f"{where}: {line}" for line in _diff(reference, normalized(root))]
        finally:
            stop_daemons(root)
            shutil.rmtree(root, ignore_errors=True)

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        problems = [p for result in pool.map(case, chosen) for p in result]
    with capsys.disabled():
        walked = f"all {len(points)}" if walk_all else f"{len(chosen)} of {len(points)} (a sample)"
        print(f"\ncrash consistency ({scenario}): {walked} kill points, each killed and resumed")
    assert problems == [], "\n".join(problems)
    assert len(points) >= (60 if scenario == "ready" else 15)


@pytest.mark.parametrize("point", ["enroll before-request", "enroll response-received", "enroll switched"])
@pytest.mark.slow
def test_a_re_enrollment_killed_mid_way_keeps_the_node_and_completes_with_the_same_token(
    base: Path, cp: testing.RunningControlPlane, point: str
) -> None:
    root = _tree(base, f"reenroll-{point.split()[-1]}", "ready")
    try:
        assert install(root, "--only", "enroll", cp=cp, token=cp.token("acme"), env=ENV).returncode == 0
        first = load_identity(TreeHost(root))
        assert first is not None
        old_token = first.node_token()
        token = cp.token("acme")
        killed = install(root, "--only", "enroll", cp=cp, token=token, env={inject.FAULT_AT_ENV: point})
        assert killed.returncode == -9
        assert _credentials_intact(root) is None
        assert _identity_works(cp, root) == first.node_id  # whatever is on disk still works
        resumed = install(root, "--only", "enroll", cp=cp, token=token, env=ENV)
        assert resumed.returncode == 0, resumed.stderr
        after = load_identity(TreeHost(root))
        assert after is not None and (after.node_id, after.overlay_ip) == (first.node_id, first.overlay_ip)
        assert after.node_token() != old_token
        assert _identity_works(cp, root) == first.node_id
        assert not (root / PENDING_KEY.lstrip("/")).exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)
