"""The built wheel carries templates/ and units/ and finds them when installed (not editable)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # No build isolation (hatchling comes from the dev venv), so the test needs no network.
    from hostsim.wheelhouse import project_wheel

    whl = project_wheel(out)
    return whl


def test_wheel_contains_packages_templates_and_units_but_not_hostsim(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "bootstrap/cli.py" in names and "doctor/cli.py" in names
    assert "bootstrap/_data/templates/grub-iommu.cfg.j2" in names
    assert "nodeagent/cli.py" in names and "nodeagent/agent.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "vectorlay-node-agent = nodeagent.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert any(n.startswith("bootstrap/_data/units/") for n in names)
    assert not any(n.startswith(("hostsim/", "tests/", "controlplane/")) for n in names)
    assert "vectorlay-control-plane" not in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_control_plane_is_a_wheel_of_its_own_with_install_sh(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(repo / "controlplane-dist")],
        check=True,
    )  # fmt: skip
    (whl,) = tmp_path.glob("vectorlay_control_plane-*.whl")
    z = zipfile.ZipFile(whl)
    names = z.namelist()
    assert {"controlplane/cli.py", "controlplane/heartbeat.py", "controlplane/_data/install.sh"} <= set(names)
    assert z.read("controlplane/_data/install.sh") == (repo / "install.sh").read_bytes()
    assert not any(n.startswith(("bootstrap/", "doctor/", "nodeagent/", "hostsim/", "tests/")) for n in names)
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: vectorlay-node" in meta
    entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "vectorlay-control-plane = controlplane.cli:main" in entry_points


@pytest.mark.slow
def test_installed_wheel_finds_its_data_and_runs_detect(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin/python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # Third-party dependencies come from this test run's environment through a .pth line (which
    # does not process that directory's own .pth files, so the editable checkout stays invisible).
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    probe = (
        "import bootstrap, bootstrap.resources as r;"
        "print(bootstrap.__file__); print(r.templates_dir()); print(r.units_dir())"
    )
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    pkg, templates, units = out.stdout.split()
    assert pkg.startswith(site) and templates.startswith(site) and units.startswith(site)
    assert Path(templates, "grub-iommu.cfg.j2").is_file()
    for absent in ("controlplane", "hostsim", "tests"):
        res = subprocess.run(
            [str(py), "-c", f"import {absent}"], capture_output=True, text=True, cwd=tmp_path
        )
        assert res.returncode == 1 and "ModuleNotFoundError" in res.stderr, absent

    tree = tmp_path / "host"
    (tree / "proc").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [str(venv / "bin/vectorlay-bootstrap"), "detect", "--root", str(tree), "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert '"gpus": []' in res.stdout
    assert (venv / "bin/vectorlay-node-doctor").exists()
