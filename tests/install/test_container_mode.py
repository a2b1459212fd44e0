"""Container-GPU mode end to end: the real installer against the real control plane serving the real
gVisor runsc (Debian's, hostsim.runsc), that runsc run with the arguments the node gave docker, and
the daemon.json the node wrote loaded by Debian 12's real dockerd (hostsim.dockerd)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap.paths import RUNSC
from hostsim.agents import publish, publish_agents
from hostsim.demo import NVIDIA_CTK_DAEMON_JSON, build_container_host
from hostsim.dockerd import DockerdRefused, daemon_info
from hostsim.runsc import NVPROXY, PRE_NVPROXY, artifact_tarball
from tests.install.helpers import FAST, install, stop_daemons

pytestmark = pytest.mark.slow


def _node(
    tmp_path: Path, start_control_plane: Callable[..., Any], runsc_release: str, *, iommu: bool
) -> tuple[Any, Path, str]:
    art_dir = tmp_path / "artifacts"
    publish_agents(art_dir)
    publish(art_dir, "runsc", runsc_release, artifact_tarball(runsc_release))
    cp = start_control_plane(args=("--artifacts", str(art_dir)))
    root = tmp_path / "host"
    build_container_host(root, iommu=iommu)
    return cp, root, cp.token(cp.org("acme"))


def _docker_runsc(root: Path) -> tuple[Path, list[str]]:
    """The runsc docker was told about, inside the tree, and the arguments docker passes it."""
    entry = json.loads((root / "etc/docker/daemon.json").read_text())["runtimes"]["runsc"]
    assert entry["path"] == RUNSC
    return root / entry["path"].lstrip("/"), list(entry["runtimeArgs"])


@pytest.mark.parametrize("iommu", [False, True], ids=["iommu-off", "iommu-groups-not-on-vfio"])
def test_install_in_container_mode_ends_done_and_the_installed_runsc_accepts_dockers_arguments(
    tmp_path: Path,
    start_control_plane: Callable[..., Any],
    runsc_releases: dict[str, Path],
    dockerd: Path,
    iommu: bool,
) -> None:
    cp, root, token = _node(tmp_path, start_control_plane, NVPROXY, iommu=iommu)
    try:
        res = install(root, "--gpu-mode", "container", cp=cp, token=token, env=FAST, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    finally:
        stop_daemons(root)
    out = res.stdout
    assert "vectorlay-node: DONE" in out
    assert "✓ verify: doctor: PASS; 8/8 GPU unit(s) ready" in out
    assert "8/8 GPU(s) on the nvidia driver, shared through runsc" in out
    assert "runsc 0.0~20240729.0 accepts --nvproxy=true" in out
    # Container mode changes no IOMMU or VFIO setting and needs no reboot.
    assert not (root / "etc/default/grub.d").exists()
    assert not (root / "etc/modprobe.d/vectorlay-vfio.conf").exists()
    assert "gpu_mode: container" in (root / "etc/vectorlay/node.yaml").read_text()

    # Debian 12's dockerd starts on the file the node wrote and lists both runtimes as the node and
    # the NVIDIA Container Toolkit registered them.
    info = daemon_info((root / "etc/docker/daemon.json").read_bytes())
    assert info["Runtimes"]["runsc"] == {"path": RUNSC, "runtimeArgs": ["--nvproxy=true"]}
    assert info["Runtimes"]["nvidia"] == {"path": "nvidia-container-runtime"}
    assert info["ServerVersion"].startswith("20.10.")
    assert (root / "var/lib/vectorlay/backup/etc/docker/daemon.json").read_text() == NVIDIA_CTK_DAEMON_JSON

    binary, args = _docker_runsc(root)
    assert binary.resolve().read_bytes() == runsc_releases[NVPROXY].read_bytes()
    for probe in (["--version"], ["help"]):  # `help` also goes through runsc's config from the flags
        ran = subprocess.run([str(binary), *args, *probe], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
    version = subprocess.run([str(binary), *args, "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("runsc version 0.0~20240729.0\n")

    # Debian 12's own runsc refuses the same arguments: the regression the doctor's runsc check catches.
    old = subprocess.run(
        [str(runsc_releases[PRE_NVPROXY]), *args, "--version"], capture_output=True, text=True, timeout=60
    )
    assert old.returncode == 2
    assert "flag provided but not defined: -nvproxy" in old.stderr


def test_a_control_plane_serving_debian_12s_runsc_blocks_the_install_at_verify_naming_the_release_needed(
    tmp_path: Path, start_control_plane: Callable[..., Any], runsc_releases: dict[str, Path]
) -> None:
    cp, root, token = _node(tmp_path, start_control_plane, PRE_NVPROXY, iommu=False)
    try:
        res = install(root, "--gpu-mode", "container", cp=cp, token=token, env=FAST, timeout=300)
    finally:
        stop_daemons(root)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr
    assert "vectorlay-node: BLOCKED" in res.stdout
    assert "runsc: runsc 0.0~20221219.0 refuses --nvproxy=true (flag provided but not defined: -nvproxy)" in (
        res.stdout
    )
    assert "nvproxy needs gVisor release-20230529 or later" in res.stdout + res.stderr
    assert "Traceback" not in res.stderr


def test_debian_12s_dockerd_refuses_a_daemon_json_with_the_runtime_under_a_key_it_does_not_know(
    dockerd: Path,
) -> None:
    """The check above can fail: dockerd refuses a file whose runsc entry is misplaced, naming it."""
    with pytest.raises(DockerdRefused, match="don't match any configuration option: runsc"):
        daemon_info(json.dumps({"runtime": {"runsc": {"path": RUNSC}}}).encode())
    # ... and a runtimes entry of the wrong type.
    with pytest.raises(DockerdRefused, match="runtimeArgs"):
        daemon_info(json.dumps({"runtimes": {"runsc": {"path": RUNSC, "runtimeArgs": "--nvproxy"}}}).encode())
