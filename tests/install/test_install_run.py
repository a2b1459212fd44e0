"""The install run end to end: the real CLI in a subprocess, a real control plane on loopback."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap.commands.run_log import RedactSecrets
from bootstrap.host import TreeHost
from bootstrap.identity import load_identity
from bootstrap.lock import run_lock
from bootstrap.paths import LOG_PATH
from hostsim import build_host, inject, load_topology
from tests.install.helpers import gpus_on_vfio, install, stop_daemons

pytestmark = pytest.mark.slow

MakeTree = Callable[..., Path]


@pytest.fixture
def ready_tree(make_tree: MakeTree) -> Path:
    return make_tree("hgx-h100", gpus_on_vfio)


def all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and not str(p).startswith(str(root / "sys")):
            out.append((p, p.read_bytes()))
    return out


def test_enrolling_writes_the_token_to_no_file_and_no_log_line(ready_tree: Path, control_plane: Any) -> None:
    token = control_plane.token(control_plane.org("acme"))
    res = install(ready_tree, "--only", "enroll", cp=control_plane, token=token)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "enroll: enrolled node node_" in res.stdout
    log = (ready_tree / LOG_PATH.lstrip("/")).read_text()
    assert "enrolled node node_" in log and "install run ended: DONE (exit 0" in log
    leaks = [p for p, data in all_bytes(ready_tree) if token.encode() in data]
    assert leaks == []
    assert token not in res.stdout + res.stderr
    assert not (ready_tree / "etc/vectorlay/.enroll-pending.key").exists()
    mode = (ready_tree / LOG_PATH.lstrip("/")).stat().st_mode & 0o777
    assert mode & 0o007 == 0


def test_the_log_filter_redacts_tokens_bearer_headers_keys_and_tracebacks() -> None:
    secret = "vtk_" + "s3cr3t" * 5
    odd = "not-shaped-like-a-token-123"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets(lambda: [odd]))
    logger = logging.getLogger("bootstrap.test-redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("token %s, header Authorization: Bearer vnt_abcdef0123, value %s", secret, odd)
        logger.warning("-----BEGIN PRIVATE KEY-----\nMIGHAgEA\n-----END PRIVATE KEY-----")
        try:
            raise ValueError(f"server rejected {secret}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert secret not in text and "vnt_abcdef0123" not in text and odd not in text and "MIGHAgEA" not in text
    assert text.count("[redacted]") == 5
    assert "ValueError: server rejected [redacted]" in text


def test_a_second_run_is_refused_and_names_the_pid_and_start_time_of_the_first(ready_tree: Path) -> None:
    with run_lock(TreeHost(ready_tree)):
        res = install(ready_tree, "--only", "gpu")
    assert res.returncode == 1
    assert f"another vectorlay-bootstrap run is in progress (pid {os.getpid()}, started 20" in res.stderr
    assert "Traceback" not in res.stderr
    assert install(ready_tree, "--only", "gpu").returncode == 0  # and the lock is free again


def test_a_run_lock_that_cannot_be_made_is_an_operator_message(ready_tree: Path) -> None:
    run = ready_tree / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.write_text("")  # /run a file: /run/vectorlay cannot be made (ENOTDIR)
    res = install(ready_tree, "--only", "gpu")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.splitlines()[-2:] == [
        "error: cannot take the run lock /run/vectorlay/bootstrap.lock: Not a directory",
        "  fix: check /run/vectorlay (a directory on a writable /run), then re-run",
    ]


def test_an_enrolled_node_runs_without_a_token_and_keeps_its_identity(
    ready_tree: Path, control_plane: Any
) -> None:
    token = control_plane.token(control_plane.org("acme"))
    assert install(ready_tree, "--only", "enroll", cp=control_plane, token=token).returncode == 0
    first = load_identity(TreeHost(ready_tree))
    assert first is not None
    res = install(ready_tree, "--only", "enroll", cp=control_plane)
    assert res.returncode == 0, res.stderr
    assert f"enroll: skipped; node {first.node_id}" in res.stdout
    assert "keeps its identity: no provisioning token given" in res.stdout
    again = load_identity(TreeHost(ready_tree))
    assert again == first and again.node_token() == first.node_token()
    # The spent token is no error either: the node keeps what it has.
    res = install(ready_tree, "--only", "enroll", cp=control_plane, token=token)
    assert res.returncode == 0 and "the provisioning token is already used" in res.stdout


def test_a_new_token_re_enrolls_with_the_same_node_id_and_a_new_node_token(
    ready_tree: Path, control_plane: Any
) -> None:
    org = control_plane.org("acme")
    assert (
        install(ready_tree, "--only", "enroll", cp=control_plane, token=control_plane.token(org)).returncode
        == 0
    )
    first = load_identity(TreeHost(ready_tree))
    assert first is not None
    old_token = first.node_token()
    res = install(ready_tree, "--only", "enroll", cp=control_plane, token=control_plane.token(org))
    assert res.returncode == 0, res.stderr
    assert f"enroll: re-enrolled node {first.node_id}" in res.stdout
    again = load_identity(TreeHost(ready_tree))
    assert again is not None and again.overlay_ip == first.overlay_ip
    assert again.node_token() != old_token


def test_the_token_can_come_from_a_file(ready_tree: Path, control_plane: Any, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(control_plane.token(control_plane.org("acme")) + "\n")
    token_file.chmod(0o600)
    res = install(ready_tree, "--only", "enroll", "--token-file", str(token_file), cp=control_plane)
    assert res.returncode == 0, res.stderr
    assert "enroll: enrolled node" in res.stdout


def test_a_preflight_reports_the_tokens_expiry_and_records_it(ready_tree: Path, control_plane: Any) -> None:
    token = control_plane.token(control_plane.org("acme"))
    res = install(ready_tree, "--only", "preflight", cp=control_plane, token=token)
    assert res.returncode == 0, res.stderr
    assert "preflight: Ubuntu 22.04" in res.stdout or "preflight: ubuntu 22.04" in res.stdout.lower()
    assert "provisioning token valid until " in res.stdout
    state = (ready_tree / "var/lib/vectorlay/state.json").read_text()
    assert '"token_expires_at": "20' in state
    assert token not in state


def test_the_node_is_never_enrolled_while_its_gpus_cannot_be_passed_through(
    make_tree: MakeTree, control_plane: Any
) -> None:
    root = make_tree("hgx-h100")  # GPUs still on the nvidia driver
    token = control_plane.token(control_plane.org("acme"))
    res = install(root, "--only", "enroll", cp=control_plane, token=token)
    assert res.returncode == 1
    assert "GPU passthrough is not working yet: 0/8 GPU unit(s) ready; not enrolling" in res.stderr
    assert not (root / "etc/vectorlay/identity").exists()
    # The token was not spent: it still introspects as valid.
    ok = install(root, "--only", "preflight", cp=control_plane, token=token)
    assert "provisioning token valid until" in ok.stdout


def test_exit_codes_done_reboot_blocked_and_usage(make_tree: MakeTree, ready_tree: Path) -> None:
    assert install(ready_tree, "--only", "gpu").returncode == 0
    assert install(make_tree("iommu-off"), "--only", "gpu").returncode == 3
    blocked = install(make_tree("cpu-only"))
    assert blocked.returncode == 1 and "no control plane URL" in blocked.stderr
    assert install(ready_tree, "--gpu-mode", "vfio").returncode == 2
    assert install(ready_tree, "--no-such-option").returncode == 2


def test_the_final_screen_says_what_was_done_what_is_left_and_where_the_log_is(
    make_tree: MakeTree, control_plane: Any
) -> None:
    root = make_tree("iommu-off")
    token = control_plane.token(control_plane.org("acme"))
    start = time.time()
    res = install(root, cp=control_plane, token=token)
    assert res.returncode == 3, res.stderr
    out = res.stdout
    screen = out[out.index("vectorlay-node: REBOOT REQUIRED") :]
    assert "  done:\n    preflight  provisioning token valid until " in screen
    assert "    gpu        configured; takes effect after a reboot\n" in screen
    assert "  left:\n    reboot, then re-run the same command within the hour (your token expires" in screen
    assert "not run yet: enroll" in screen
    assert "doctor: not run" in screen
    assert f"log: {root / LOG_PATH.lstrip('/')}" in screen
    assert time.time() - start < 60


def test_a_terminal_gets_rich_progress_and_a_pipe_plain_numbered_lines(ready_tree: Path) -> None:
    from bootstrap.commands.install import run_install

    rich_out, plain_out = io.StringIO(), io.StringIO()
    assert run_install(ready_tree, only="gpu", stream=rich_out, rich=True) == 0
    assert run_install(ready_tree, only="gpu", stream=plain_out) == 0
    plain = plain_out.getvalue()
    assert "[1/2] detect: PCI devices, GPUs, NVSwitches, IOMMU groups, GPU units\n" in plain
    assert "\n✓ gpu: 8/8 GPU unit(s) ready for passthrough\n" in plain
    fancy = rich_out.getvalue()
    assert "✓ gpu: 8/8 GPU unit(s) ready for passthrough" in fancy
    assert "[1/2] detect:" not in fancy  # the stage heading lives in the status line, not the scrollback


def test_a_full_plan_on_the_demo_host_shows_every_stage_and_writes_nothing(
    tmp_path: Path, control_plane: Any
) -> None:
    from hostsim import build_host
    from hostsim.demo import example_host
    from hostsim.snapshot import snapshot

    root = build_host(tmp_path / "host", example_host())
    before = snapshot(root)
    token = control_plane.token(control_plane.org("acme"))
    res = install(root, "--plan", cp=control_plane, token=token)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert "+GRUB_CMDLINE_LINUX_DEFAULT=" in res.stdout
    assert "~ enroll: would enroll after the reboot the gpu stage asks for" in res.stdout
    assert "vectorlay-node: PLAN ONLY: nothing was changed" in res.stdout
    assert snapshot(root) == before
    # The token was only looked at: a real run can still use it.
    assert (
        "provisioning token valid until"
        in install(root, "--only", "preflight", cp=control_plane, token=token).stdout
    )


def test_a_failed_check_the_operator_accepts_is_reported_but_does_not_stop_the_run(
    make_tree: MakeTree, start_control_plane: Callable[..., Any], tmp_path: Path
) -> None:
    from hostsim.agents import publish_agents

    publish_agents(tmp_path / "artifacts")
    control_plane = start_control_plane(args=("--artifacts", str(tmp_path / "artifacts")))

    def small(desc: dict[str, Any]) -> None:
        gpus_on_vfio(desc)
        desc["memory_gb"] = 16  # a lab box below the 32 GB floor

    # The agents' health sockets need a short root (unix socket paths: 108 bytes at most).
    base = Path(tempfile.mkdtemp(prefix="vl", dir="/tmp"))
    desc = load_topology("hgx-h100")
    small(desc)
    root = build_host(base / "r", desc)
    token = control_plane.token(control_plane.org("acme"))
    fast = {inject.SETTLE_ENV: "0.2"}
    refused = install(root, cp=control_plane, token=token, env=fast)
    assert refused.returncode == 1
    assert "this box cannot be a node yet: memory: " in refused.stderr
    assert load_identity(TreeHost(root)) is None

    try:
        res = install(root, "--ignore-preflight-errors", "memory", cp=control_plane, token=token, env=fast)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "memory: FAIL ignored on request (--ignore-preflight-errors)" in res.stdout
        assert "enroll: enrolled node node_" in res.stdout
        # The doctor still says FAIL; the run's verdict names what was waived.
        assert "GB RAM, below the 32 GB minimum" in res.stdout
        assert "(failed checks ignored on request: memory)" in res.stdout
        assert "vectorlay-node: DONE" in res.stdout
    finally:
        stop_daemons(root)
        shutil.rmtree(base, ignore_errors=True)
    # Only the floors a lab box may lack can be waived, never e.g. the IOMMU or identity checks.
    other = make_tree("hgx-h100", small)
    bad = install(other, "--ignore-preflight-errors", "iommu", cp=control_plane, token=token)
    assert bad.returncode == 2 and "iommu cannot be ignored" in bad.stderr
