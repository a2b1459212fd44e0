"""Which systems install.sh and preflight accept: the supported releases by name, another Debian or
Ubuntu release with a WARN when it has what the node needs, anything else refused with what it lacks.
Both read the same files of a host tree holding each release's real /etc/os-release
(tests/os_trees.py); install.sh runs for real in bash, with apt and curl as stubs."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootstrap import platform
from bootstrap.errors import VectorlayError
from bootstrap.host import TreeHost
from bootstrap.stages import preflight
from tests.install.helpers import install
from tests.os_trees import ACCEPTED, REFUSED, WARNED, write_release

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "install.sh"


def test_install_sh_carries_the_list_platform_py_holds() -> None:
    text = SCRIPT.read_text()
    releases = " ".join(f"{i}:{v}" for i, v, _name in platform.SUPPORTED_RELEASES)
    assert f"    local supported_releases='{releases}'\n" in text
    names = platform.supported_names()
    python = "{}.{}".format(*platform.MIN_PYTHON)
    assert f"    local supported_names='{names}' min_python={python}\n" in text
    assert f"{platform.CAPABILITIES}" == f"systemd, Python {python} or newer, GRUB and the vfio modules"
    assert 'local capabilities="systemd, Python $min_python or newer, GRUB and the vfio modules"' in text


def _install_sh(tmp_path: Path, root: Path) -> subprocess.CompletedProcess[str]:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "apt-get").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "dpkg-query").write_text('#!/bin/sh\nprintf "install ok installed"\n')
    # The first download: past the OS check, the run stops here (exit 7: could not connect).
    (stubs / "curl").write_text("#!/bin/sh\nexit 7\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "VECTORLAY_ROOT": str(root),
        "VECTORLAY_TOKEN": "vtk_" + "a" * 40,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), "api=https://127.0.0.1:9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("release", ACCEPTED)
def test_install_sh_accepts_a_supported_release(tmp_path: Path, release: str) -> None:
    res = _install_sh(tmp_path, write_release(tmp_path / "root", release))
    assert "unsupported OS" not in res.stderr and "WARN" not in res.stderr, res.stderr
    assert "vectorlay-node installer: fetching the signed artifact manifest" in res.stdout, res.stderr
    assert res.stderr.startswith("error: could not fetch https://127.0.0.1:9/v1/artifacts/manifest")


@pytest.mark.parametrize("release", sorted(WARNED))
def test_install_sh_warns_about_another_debian_or_ubuntu_release(tmp_path: Path, release: str) -> None:
    res = _install_sh(tmp_path, write_release(tmp_path / "root", release))
    assert res.stderr.splitlines()[0] == (
        f"WARN: {WARNED[release]} is not a release vectorlay-node is tested on "
        f"({platform.supported_names()}); "
        f"it has {platform.CAPABILITIES}, so the install goes on"
    )
    assert "vectorlay-node installer: fetching the signed artifact manifest" in res.stdout
    assert res.returncode == 1 and "could not fetch" in res.stderr


@pytest.mark.parametrize("release", sorted(REFUSED))
def test_install_sh_refuses_anything_else_saying_what_is_missing(tmp_path: Path, release: str) -> None:
    res = _install_sh(tmp_path, write_release(tmp_path / "root", release))
    found, missing = REFUSED[release]
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        f"error: unsupported OS: {found}: " + "; ".join(missing),
        f"  fix: vectorlay-node supports {platform.supported_names()}, and other Debian or Ubuntu releases "
        f"with {platform.CAPABILITIES}",
    ]
    assert "fetching" not in res.stdout


def test_install_sh_names_each_missing_capability(tmp_path: Path) -> None:
    root = write_release(tmp_path / "root", "ubuntu-25.10")
    (root / "run/systemd/system").rmdir()
    for p in (root / "usr/lib/modules").rglob("modules.dep"):
        p.write_text("kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko.zst:\n")
    res = _install_sh(tmp_path, root)
    assert res.returncode == 1
    assert res.stderr.splitlines()[0] == (
        "error: unsupported OS: Ubuntu 25.10: systemd is not the running init (no /run/systemd/system); "
        "no vfio-pci kernel module for kernel 6.17.0-7-generic"
    )
    host = TreeHost(root)
    assert platform.os_support(host).missing == (
        "systemd is not the running init (no /run/systemd/system)",
        "no vfio-pci kernel module for kernel 6.17.0-7-generic",
    )


@pytest.mark.parametrize("release", ACCEPTED)
def test_preflight_accepts_a_supported_release(tmp_path: Path, release: str) -> None:
    support = preflight.check_os(TreeHost(write_release(tmp_path, release)))
    assert support.supported and not support.refused


@pytest.mark.parametrize("release", sorted(WARNED))
def test_preflight_warns_about_another_debian_or_ubuntu_release(tmp_path: Path, release: str) -> None:
    support = preflight.check_os(TreeHost(write_release(tmp_path, release)))
    assert not support.supported and support.missing == ()
    assert support.warning().startswith(f"{WARNED[release]} is not a release vectorlay-node is tested on")


@pytest.mark.parametrize("release", sorted(REFUSED))
def test_preflight_refuses_anything_else_saying_what_is_missing(tmp_path: Path, release: str) -> None:
    found, missing = REFUSED[release]
    with pytest.raises(VectorlayError) as e:
        preflight.check_os(TreeHost(write_release(tmp_path, release)))
    assert e.value.message == f"unsupported OS: {found}: " + "; ".join(missing)
    assert e.value.hint is not None
    assert re.search(r"supports Ubuntu 22\.04, .* and Debian 13, and other", e.value.hint)


@pytest.mark.slow
def test_the_installer_run_on_another_release_shows_the_warn_and_goes_on(
    make_tree: Callable[..., Path], control_plane: Any
) -> None:
    root = write_release(make_tree("cpu-only"), "ubuntu-25.10")
    token = control_plane.token(control_plane.org("acme", provider=True))
    res = install(root, "--only", "preflight", cp=control_plane, token=token)
    assert res.returncode == 0, res.stdout + res.stderr
    warning = (
        f"Ubuntu 25.10 is not a release vectorlay-node is tested on ({platform.supported_names()}); "
        f"it has {platform.CAPABILITIES}, so the install goes on"
    )
    assert f"preflight: Ubuntu 25.10\n  WARN: {warning}\n" in res.stdout
    assert "vectorlay-node: DONE" in res.stdout
    assert f"  left:\n    {warning}\n" in res.stdout  # and the final screen repeats it
