"""What an Ubuntu host has that a Debian one does not, and that the node must live with. Ubuntu images
cannot be fetched on these machines (the VM test boots Debian guests), so the differences are
covered here, on trees holding Ubuntu's own files:

- Ubuntu cloud images' GRUB drop-ins (/etc/default/grub.d/40-force-partuuid.cfg and
  50-cloudimg-settings.cfg, written by livecd-rootfs's cloud image build): grub-mkconfig sources
  /etc/default/grub, then /etc/default/grub.d/*.cfg in glob order, so 50-cloudimg-settings.cfg's
  GRUB_CMDLINE_LINUX_DEFAULT replaces the one in /etc/default/grub. The IOMMU arguments must still
  reach the kernel line, exactly once: the evaluation is a real bash sourcing the files in that order
  (tests/test_grub.py's bash_effective).
- netplan-managed networking (/etc/netplan/50-cloud-init.yaml, and the systemd-networkd files
  `netplan generate` writes to /run/systemd/network). The node must not touch them, and nebula's tun
  device must be a link networkd leaves alone: systemd.network(5), [Match]: a .network file applies
  to a link only if every Match= condition holds (Name= takes shell-style globs, PermanentMACAddress=
  needs the link's permanent hardware address, which a tun device does not have), and a file with no
  [Match] condition applies to every link.
"""

from __future__ import annotations

import configparser
import fnmatch
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from bootstrap import grub
from bootstrap.host import TreeHost
from bootstrap.overlay import NEBULA_CONFIG, TUN_DEVICE
from hostsim import build_host, load_topology
from tests.install.helpers import FAST, gpus_on_vfio, install, stop_daemons
from tests.test_grub import CLOUDIMG, MakeTree, install_gpu, kernel_args

FORCE_PARTUUID = """# Force the root device to be identified by PARTUUID, booting without an initrd first
GRUB_FORCE_PARTUUID=4a8e0f2c-3b5d-4e61-9c7a-1f2e3d4c5b6a
"""

# What cloud-init writes on an Ubuntu 24.04 cloud image (one NIC, matched by its MAC address).
NETPLAN = """# This file is generated from information provided by the datasource.  Changes
# to it will not persist across an instance reboot.  To disable cloud-init's
# network configuration capabilities, write a file
# /etc/cloud/cloud.cfg.d/99-disable-network-config.cfg with the following:
# network: {config: disabled}
network:
    ethernets:
        ens3:
            dhcp4: true
            match:
                macaddress: 52:54:00:12:34:56
            set-name: ens3
    version: 2
"""
# And what `netplan generate` makes of it for systemd-networkd.
NETWORKD_LINK = """[Match]
PermanentMACAddress=52:54:00:12:34:56

[Link]
Name=ens3
WakeOnLan=off
"""
NETWORKD_NETWORK = """[Match]
PermanentMACAddress=52:54:00:12:34:56
Name=ens3

[Network]
DHCP=ipv4
LinkLocalAddressing=ipv6

[DHCP]
RouteMetric=100
UseMTU=true
"""
UBUNTU_FILES = {
    "/etc/default/grub.d/40-force-partuuid.cfg": FORCE_PARTUUID,
    "/etc/default/grub.d/50-cloudimg-settings.cfg": CLOUDIMG,
    "/etc/netplan/50-cloud-init.yaml": NETPLAN,
    "/run/systemd/network/10-netplan-ens3.link": NETWORKD_LINK,
    "/run/systemd/network/10-netplan-ens3.network": NETWORKD_NETWORK,
}
NETWORK_DIRS = ("etc/netplan", "run/systemd/network", "etc/systemd/network", "etc/network")


def ubuntu(desc: dict[str, Any]) -> None:
    desc["os_release"] = "ubuntu-24.04"
    desc["files"] = {**(desc.get("files") or {}), **UBUNTU_FILES}


def test_the_iommu_args_reach_the_kernel_past_every_ubuntu_cloud_image_drop_in(make_tree: MakeTree) -> None:
    root = make_tree("iommu-off", ubuntu)
    assert install_gpu(root) == 3
    assert kernel_args(root) == ["console=tty1", "console=ttyS0", "intel_iommu=on", "iommu=pt"]
    sourced = grub.sourced_files(TreeHost(root))
    assert sourced[-1] == "/etc/default/grub.d/99-vectorlay-iommu.cfg"  # after 40- and 50-: the last word
    assert "/etc/default/grub.d/50-cloudimg-settings.cfg" in sourced
    assert install_gpu(root) == 3  # a re-run adds nothing
    assert kernel_args(root).count("intel_iommu=on") == 1


def _network_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for d in NETWORK_DIRS
        for p in sorted((root / d).rglob("*"))
        if p.is_file()
    }


def _networkd_applies(network: Path, link: str) -> bool:
    """systemd.network(5) [Match] for a link named `link` with no permanent hardware address."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(network.read_text())
    match = dict(parser["Match"]) if parser.has_section("Match") else {}
    if not match:
        return True
    for key, value in match.items():
        if key == "Name":
            if not any(fnmatch.fnmatchcase(link, glob) for glob in value.split()):
                return False
        elif key in ("PermanentMACAddress", "MACAddress", "Driver", "Path", "Type"):
            return False  # a tun device has none of these to match (Type= would be "none")
    return True


@pytest.mark.slow
def test_a_netplan_managed_ubuntu_node_installs_without_touching_its_network() -> None:
    from controlplane import testing
    from hostsim.agents import publish_agents

    base = Path(tempfile.mkdtemp(prefix="vlu", dir="/tmp"))  # short: the agents' socket paths
    root = base / "host"
    try:
        publish_agents(base / "artifacts")
        cp = testing.start(base / "cp", args=("--artifacts", str(base / "artifacts")))
        try:
            cp.org("acme", provider=True)
            desc = load_topology("hgx-h100")
            gpus_on_vfio(desc)
            ubuntu(desc)
            build_host(root, desc)
            before = _network_files(root)
            assert len(before) == 3
            res = install(root, cp=cp, token=cp.token("acme"), env=FAST)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr
            assert "preflight: ubuntu 24.04\n" in res.stdout and "WARN:" not in res.stdout
            assert _network_files(root) == before  # netplan's and networkd's files, byte for byte
            nebula = yaml.safe_load((root / NEBULA_CONFIG.lstrip("/")).read_text())
            assert nebula["tun"]["dev"] == TUN_DEVICE
            networks = sorted((root / "run/systemd/network").glob("*.network"))
            assert networks and not any(_networkd_applies(n, TUN_DEVICE) for n in networks)
        finally:
            stop_daemons(root)
            testing.stop(cp)
    finally:
        shutil.rmtree(base, ignore_errors=True)
