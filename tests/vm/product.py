"""The product as install.sh will put it on a node: the installer artifact (this checkout's wheel plus
the dependency wheels of every supported CPython, hostsim.wheelhouse), installed into
/opt/vectorlay/venv in the guest without any network (`--no-index`). Every guest gets the same
artifact; pip in the guest picks the wheels its Python's tags match."""

from __future__ import annotations

from pathlib import Path

from harness import Vm

from hostsim import wheelhouse

VENV = "/opt/vectorlay/venv"
WHEELHOUSE = "/var/tmp/vectorlay-wheels"
COMMANDS = ("vectorlay-bootstrap", "vectorlay-node-doctor")
# Makes the stand-in display controllers (PCI vendor 1234) count as GPUs, as a deployment with Intel
# data-centre GPUs would add 8086.
NODE_YAML = 'extra_gpu_vendor_ids: ["1234"]\n'


def installer_wheels(out: Path) -> list[Path]:
    """This checkout's wheel (built with the dev venv's hatchling, no network) and the dependency wheels
    of every supported CPython (downloaded once, cached): the installer artifact's contents."""
    return [wheelhouse.project_wheel(out), *wheelhouse.all_dependency_wheels()]


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
    """The control plane's `installer` artifact made of `wheels`."""
    return wheelhouse.wheels_tarball(wheels)
