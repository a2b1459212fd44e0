"""install.sh refuses a python3 outside 3.10-3.14 by name, before apt or pip change anything.

python3 is a real interpreter (pyenv's builds: 3.9 as Debian 11's, 3.10 to 3.13 as the supported
releases'); every other program install.sh runs is a recording stub, so the log shows whether apt
(or anything else that installs) ran. No Python newer than 3.14 exists yet: that case is a stub
python3 answering as one would, the only stand-in here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.install.pythons import require_python

REPO = Path(__file__).resolve().parents[2]
STUBBED = ["apt-get", "curl", "dpkg-query", "jq", "openssl", "sha256sum", "tar", "uname"]
NEED = "vectorlay-node needs Python 3.10 to 3.14 (the system python3 of Ubuntu 22.04+ / Debian 12+)"


def _install_sh(
    tmp_path: Path,
    python3: Path | str | None,
    args: tuple[str, ...] = (),
    missing: tuple[str, ...] = ("python3-venv",),
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """install.sh on a Debian 12 tree with `python3` (a path, a stub script's body, or none) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "stub.log"
    log.write_text("")
    for prog in STUBBED:
        out = "x86_64" if prog == "uname" else ""
        (bin_dir / prog).write_text(f'#!/bin/bash\nprintf "%s\\n" "{prog} $*" >> "{log}"\nprintf "{out}"\n')
        (bin_dir / prog).chmod(0o755)
    # dpkg-query says python3-venv is missing, as on a box where python3 came without it.
    gone = " ".join(missing)
    (bin_dir / "dpkg-query").write_text(
        f'#!/bin/bash\nprintf "%s\\n" "dpkg-query $*" >> "{log}"\n'
        f'for a; do p="$a"; done\nfor m in {gone}; do [ "$p" = "$m" ] && exit 1; done\n'
        'printf "install ok installed"\n'
    )
    if isinstance(python3, Path):
        (bin_dir / "python3").symlink_to(python3)
    elif isinstance(python3, str):
        (bin_dir / "python3").write_text(python3)
        (bin_dir / "python3").chmod(0o755)
    for tool in ("bash", "cat", "grep", "mkdir", "mktemp", "rm", "mv", "ln", "id", "stat", "date", "base64"):
        real = next(Path(d, tool) for d in ("/usr/bin", "/bin") if Path(d, tool).exists())
        (bin_dir / tool).symlink_to(real)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text(
        'ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'
    )
    env = {
        "PATH": str(bin_dir),
        "VECTORLAY_ROOT": str(root),
        "VECTORLAY_TOKEN": "vtk_" + "a" * 40,
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(
        ["/bin/bash", str(REPO / "install.sh"), "api=https://127.0.0.1:9", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc, [line for line in log.read_text().splitlines() if line]


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("install.sh checks for root before it looks at python3")


def test_python_3_9_is_refused_as_too_old_before_anything_is_installed(tmp_path: Path) -> None:
    proc, commands = _install_sh(tmp_path, require_python("3.9"))
    assert proc.returncode == 1
    assert f"error: Python 3.9 is too old: {NEED}\n" in proc.stderr
    assert "fix: install on Ubuntu 22.04 or later, or Debian 12 or later" in proc.stderr
    assert commands == ["uname -m"]


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
@pytest.mark.slow
def test_a_supported_python_goes_on_to_the_packages(tmp_path: Path, version: str) -> None:
    proc, commands = _install_sh(tmp_path, require_python(version))
    assert "Python" not in proc.stderr and "python3" not in proc.stderr
    assert any(c.startswith("apt-get install") and "python3-venv" in c for c in commands)
    assert any(c.startswith("curl") for c in commands)  # past every local check, on to the manifest


def test_a_python_newer_than_the_artifact_is_refused_naming_it(tmp_path: Path) -> None:
    proc, commands = _install_sh(tmp_path, "#!/bin/sh\necho cpython 3 15\n")
    assert proc.returncode == 1
    assert f"error: Python 3.15 is newer than this installer: {NEED}\n" in proc.stderr
    assert "vectorlay-node release built for Python 3.15" in proc.stderr
    assert commands == ["uname -m"]


def test_without_python3_apt_installs_it_and_it_is_checked_then(tmp_path: Path) -> None:
    # The stub apt-get installs nothing, so python3 is still missing after it.
    proc, commands = _install_sh(tmp_path, None)
    assert proc.returncode == 1
    assert f"error: python3 (none) is not a CPython that runs: {NEED}\n" in proc.stderr
    assert any(c.startswith("apt-get install") and "python3-venv" in c for c in commands)
    assert not any(c.startswith("curl") for c in commands)


@pytest.mark.parametrize(("args", "wanted"), [((), True), (("gpu=1",), False)])
def test_qemu_is_installed_on_every_node_that_rents_vms(
    tmp_path: Path, args: tuple[str, ...], wanted: bool
) -> None:
    # Nomad's qemu driver and the VM-attach probe need qemu-system-x86; a container-GPU node
    # (gpu=1) runs gVisor containers instead and is not given it.
    proc, commands = _install_sh(
        tmp_path, require_python("3.11"), args, missing=("python3-venv", "qemu-system-x86")
    )
    installs = [c for c in commands if c.startswith("apt-get install")]
    assert len(installs) == 1, proc.stderr
    assert ("qemu-system-x86" in installs[0].split()) is wanted
    assert "python3-venv" in installs[0].split()
