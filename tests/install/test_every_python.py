"""The installer artifact installs and runs with every supported CPython, offline.

The artifact is built as the control plane serves it (hostsim.wheelhouse.installer_tarball, one
tarball of wheels for Python 3.10 to 3.14), unpacked as install.sh unpacks it, and installed the way
install.sh installs it (`python3 -m venv`, then `pip install --no-index --find-links`) by each CPython
3.10 to 3.13 of this machine's pyenv (the python3 of Ubuntu 22.04, Debian 12, Ubuntu 24.04, Debian
13), each venv with the pip that release's python3-venv puts in it (22.0.2 to 25.1.1). Each venv
then runs `vectorlay-bootstrap --help`, `detect` and the doctor on the demo's HGX H100 tree, and
must answer exactly as this checkout does. 3.14 (Ubuntu 26.04) has no interpreter here:
its wheels are checked by resolving its requirements from the artifact's wheels alone. And the
build itself, run by CPython 3.10 and its pip 23, picks the same files for every target.

A pyenv build that is missing skips here but fails in CI (CI=true), where the same builds exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostsim import build_host, load_topology
from hostsim.wheelhouse import (
    DEFAULT_CACHE,
    REPO,
    TARGETS,
    dependency_wheels,
    installer_tarball,
    missing_requirements,
    runtime_requirements,
)
from tests.install.pythons import RELEASE_PIP, release_pip, require_python

pytestmark = pytest.mark.slow

PYTHONS = ("3.10", "3.11", "3.12", "3.13")
# The compiled dependencies, each by a module that exists only in its compiled form.
COMPILED_PROBE = (
    "import sys, yaml, psutil._psutil_linux, markupsafe._speedups, _cffi_backend;"
    "from cryptography.hazmat.bindings._rust import openssl;"
    "assert yaml.__with_libyaml__;"
    "print('%d.%d' % sys.version_info[:2])"
)


def _clean_env() -> dict[str, str]:
    """No pip configuration (a find-links or an index from this machine's environment would make
    the install less offline than a node's), no PYTHONPATH (the checkout must stay invisible)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "PYTHON")) and k not in ("VIRTUAL_ENV", "PYENV_VERSION")
    }


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installer artifact, unpacked the way install.sh unpacks it."""
    work = tmp_path_factory.mktemp("artifact")
    (work / "installer.tar.gz").write_bytes(installer_tarball(work / "build"))
    out = work / "wheelhouse"
    out.mkdir()
    with tarfile.open(work / "installer.tar.gz") as tar:
        tar.extractall(out, filter="data")
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's host before its first install: an HGX H100, GPUs on the nvidia driver."""
    return build_host(tmp_path_factory.mktemp("demo") / "root", load_topology("hgx-h100"))


@pytest.fixture(scope="module")
def reference(tree: Path) -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    """What this checkout answers, run by the test's own Python."""
    runs = {
        "detect": [sys.executable, "-m", "bootstrap.cli", "detect", "--root", str(tree), "--json"],
        "doctor": [
            sys.executable,
            "-c",
            "from doctor.cli import main; main()",
            "--root",
            str(tree),
            "--json",
        ],
    }
    yield {
        k: subprocess.run(v, capture_output=True, text=True, timeout=120, check=False)
        for k, v in runs.items()
    }


def test_the_artifact_holds_wheels_for_every_target_and_each_file_once(wheelhouse: Path) -> None:
    wheels = sorted(wheelhouse.glob("*.whl"))
    reqs = runtime_requirements()
    for target in TARGETS:
        assert missing_requirements(reqs, wheels, target) == [], target.version
    assert [t.version for t in TARGETS] == ["3.10", "3.11", "3.12", "3.13", "3.14"]
    names = [w.name for w in wheels]
    for compiled in ("pyyaml", "markupsafe", "cffi"):
        tags = {n.split("-")[2] for n in names if n.lower().startswith(compiled + "-")}
        assert tags == {"cp310", "cp311", "cp312", "cp313", "cp314"}, compiled
    # cryptography and psutil publish abi3 wheels: a handful of files serve all five Pythons.
    assert len([n for n in names if n.startswith("cryptography-")]) <= 2
    assert len([n for n in names if n.startswith("psutil-")]) == 1
    assert all("-abi3-" in n for n in names if n.startswith(("cryptography-", "psutil-")))


def _wheel(d: Path, filename: str, *requires: str) -> Path:
    name, version = filename.split("-")[:2]
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(d / filename, "w") as z:
        z.writestr(
            f"{name}-{version}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}",
        )
    return d / filename


def test_the_closure_check_sees_what_only_one_python_needs(tmp_path: Path) -> None:
    """What stops a wheelhouse that one Python cannot install from, as pip --no-index would."""
    py310, py311, py314 = TARGETS[0], TARGETS[1], TARGETS[4]
    app = _wheel(tmp_path, "app-1.0-py3-none-any.whl", "backport>=2 ; python_version < '3.11'", "fast")
    fast = [_wheel(tmp_path, f"fast-1.0-{t}-{t}-manylinux_2_17_x86_64.whl") for t in ("cp310", "cp311")]
    old_backport = _wheel(tmp_path, "backport-1.0-py3-none-any.whl")
    assert missing_requirements(["app"], [app, *fast], py311) == []
    assert missing_requirements(["app"], [app, *fast], py310) == ['backport>=2; python_version < "3.11"']
    assert missing_requirements(["app"], [app, *fast, old_backport], py310) != []
    assert missing_requirements(["app"], [app, *fast], py314) == ["fast"]
    # A wheel for a newer glibc than the artifact allows does not count.
    too_new = _wheel(tmp_path, "fast-1.0-cp314-cp314-manylinux_2_34_x86_64.whl")
    assert missing_requirements(["app"], [app, *fast, too_new], py314) == ["fast"]
    abi3 = _wheel(tmp_path, "fast-1.0-cp39-abi3-manylinux_2_28_x86_64.whl")
    assert missing_requirements(["app"], [app, abi3], py314) == []


@pytest.mark.parametrize("version", PYTHONS)
def test_the_artifact_installs_offline_and_runs_with(
    version: str,
    wheelhouse: Path,
    tree: Path,
    reference: dict[str, subprocess.CompletedProcess[str]],
    tmp_path: Path,
) -> None:
    python = require_python(version)
    env = _clean_env()
    venv = tmp_path / "venv"

    def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
            check=False,
        )

    # What `python3 -m venv` makes on that release: the interpreter with the release's own pip.
    made = run(python, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    pip_wheel = release_pip(version, DEFAULT_CACHE)
    got_pip = run(
        venv / "bin/python", pip_wheel / "pip", "install", "--isolated", "-q", "--no-index", pip_wheel
    )
    assert got_pip.returncode == 0, got_pip.stderr
    assert run(venv / "bin/python", "-m", "pip", "--version").stdout.startswith(
        f"pip {RELEASE_PIP[version]} "
    )
    pip = run(
        venv / "bin/python", "-m", "pip", "install", "--isolated", "--quiet", "--disable-pip-version-check",
        "--no-index", "--find-links", wheelhouse, "vectorlay-node",
    )  # fmt: skip
    assert pip.returncode == 0, pip.stdout + pip.stderr

    probe = run(venv / "bin/python", "-c", COMPILED_PROBE)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == version

    helped = run(venv / "bin/vectorlay-bootstrap", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "detect" in helped.stdout and "install" in helped.stdout

    detect = run(venv / "bin/vectorlay-bootstrap", "detect", "--root", tree, "--json")
    assert detect.returncode == 0, detect.stderr
    assert reference["detect"].returncode == 0, reference["detect"].stderr
    assert json.loads(detect.stdout) == json.loads(reference["detect"].stdout)
    assert len(json.loads(detect.stdout)["gpus"]) == 8

    doctor = run(venv / "bin/vectorlay-node-doctor", "--root", tree, "--json")
    assert "Traceback" not in doctor.stderr, doctor.stderr
    report, expected = json.loads(doctor.stdout), json.loads(reference["doctor"].stdout)
    # Messages may differ where they measure this machine (free disk space); results may not.
    assert [(c["name"], c["status"]) for c in report["checks"]] == [
        (c["name"], c["status"]) for c in expected["checks"]
    ]
    assert report["verdict"] == expected["verdict"] == "FAIL"  # not enrolled, GPUs still on nvidia
    assert doctor.returncode == reference["doctor"].returncode == 1
    gpu_units = next(c for c in report["checks"] if c["name"] == "gpu_units")
    assert gpu_units["message"] == "0/8 GPU unit(s) ready to rent"


def test_a_build_on_another_python_picks_the_same_wheels_for_every_target(
    wheelhouse: Path, tmp_path: Path
) -> None:
    """The control plane's side: the build does not depend on the Python (or the pip) that runs it.

    CPython 3.10 with its own pip 23 builds the dependency wheels again, offline from the artifact's
    own wheels; for every target it must pick exactly the files this test's Python picked.
    """
    python = require_python("3.10")
    venv = tmp_path / "venv"
    env = _clean_env()
    subprocess.run([python, "-m", "venv", venv], env=env, check=True, timeout=300)
    # packaging and vectorlay-node's metadata from this test's environment (pure Python, read only);
    # the venv's own pip comes first on the path.
    site = subprocess.run(
        [venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, env=env,
    ).stdout.strip()  # fmt: skip
    Path(site, "checkout-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env |= {
        "PYTHONPATH": str(REPO),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheelhouse),
    }
    script = """
import json, sys, pip
from pathlib import Path
from hostsim.wheelhouse import TARGETS, dependency_wheels
cache = Path(sys.argv[1])
picked = {t.tag: sorted(w.name for w in dependency_wheels(t, cache).glob("*.whl")) for t in TARGETS}
print(json.dumps([pip.__version__, picked]))
"""
    proc = subprocess.run(
        [venv / "bin/python", "-c", script, tmp_path / "cache"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    pip_version, built = json.loads(proc.stdout)
    assert pip_version.split(".")[0] == "23"
    ours = {t.tag: sorted(w.name for w in dependency_wheels(t).glob("*.whl")) for t in TARGETS}
    assert built == ours
