"""The product as install.sh will put it on a node: this checkout's wheel plus a wheelhouse of its
dependencies, installed into /opt/vectorlay/venv in the guest without any network (`--no-index`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from harness import Vm
from image import cache_root

REPO = Path(__file__).resolve().parents[2]
# The guest is Debian 12: CPython 3.11 on x86_64 with glibc 2.36.
GUEST_PYTHON = "3.11"
GUEST_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
VENV = "/opt/vectorlay/venv"
WHEELHOUSE = "/var/tmp/vectorlay-wheels"
COMMANDS = ("vectorlay-bootstrap", "vectorlay-node-doctor")
# Makes the stand-in display controllers (PCI vendor 1234) count as GPUs, as a deployment with Intel
# data-centre GPUs would add 8086.
NODE_YAML = 'extra_gpu_vendor_ids: ["1234"]\n'


def build_project_wheel(out: Path) -> Path:
    """This checkout's wheel, built with the hatchling of the dev venv (no build isolation, no network)."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
    )
    (whl,) = out.glob("vectorlay_node-*.whl")
    return whl


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        text = z.read(meta).decode()
    # Extras (the dev tools) stay out of a node.
    return sorted(
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    )


def ensure_wheelhouse(wheel: Path) -> Path:
    """Binary wheels of the dependencies for the guest's Python, downloaded once per requirement set."""
    reqs = requirements(wheel)
    key = hashlib.sha256(("\n".join(reqs) + GUEST_PYTHON + ",".join(GUEST_PLATFORMS)).encode()).hexdigest()[
        :16
    ]
    final = cache_root() / f"wheelhouse-{key}"
    if final.is_dir():
        return final
    work = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    platforms = [a for p in GUEST_PLATFORMS for a in ("--platform", p)]
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "-q", "--dest", str(work),
            "--only-binary=:all:", "--python-version", GUEST_PYTHON, "--implementation", "cp",
            *platforms, *reqs,
        ],
        check=True,
    )  # fmt: skip
    os.replace(work, final)
    return final


def install_product(vm: Vm, wheels: list[Path], *, node_yaml: str | None = None) -> None:
    """What install.sh does after fetching the wheels: a venv from them, offline, and the commands on PATH."""
    vm.run(f"rm -rf {WHEELHOUSE} && mkdir -p {WHEELHOUSE}").check()
    for w in wheels:
        vm.put_file(f"{WHEELHOUSE}/{w.name}", w.read_bytes())
    vm.run(f"python3 -m venv {VENV}", timeout=600).check("python3 -m venv")
    vm.run(
        f"{VENV}/bin/pip install --quiet --no-index --find-links {WHEELHOUSE} vectorlay-node", timeout=900
    ).check("pip install")
    for cmd in COMMANDS:
        vm.run(["ln", "-sf", f"{VENV}/bin/{cmd}", f"/usr/local/sbin/{cmd}"]).check()
    if node_yaml is not None:
        vm.run("mkdir -p /etc/vectorlay").check()
        vm.put_file("/etc/vectorlay/node.yaml", node_yaml)


def installer_tarball(wheels: list[Path]) -> bytes:
    """The control plane's `installer` artifact, for the guest's Python rather than this machine's."""
    from hostsim.wheelhouse import wheels_tarball

    return wheels_tarball(wheels)
