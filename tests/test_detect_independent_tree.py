"""`detect --json` on a tree laid out the kernel's way by code that is not hostsim: a shell script.

The script follows the kernel's sysfs layout (Documentation/ABI/testing/sysfs-bus-pci,
sysfs-kernel-iommu_groups): real device directories under /sys/devices/pciDDDD:BB/, bus links in
/sys/bus/pci/devices, `driver` and `iommu_group` as relative symlinks, binary `config` space.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TREE_SCRIPT = r"""
set -eu
R=$1
dev() {  # dev PATH_UNDER_DEVICES ADDR VENDOR DEVICE CLASS DRIVER GROUP CONFIG_OCTAL
  d="$R/sys/devices/$1"; mkdir -p "$d"
  echo "0x$3" > "$d/vendor"; echo "0x$4" > "$d/device"; echo "0x$5" > "$d/class"
  echo "0x00" > "$d/revision"; echo D0 > "$d/power_state"; echo "(null)" > "$d/driver_override"
  printf "$8" > "$d/config"
  mkdir -p "$R/sys/bus/pci/devices"
  ln -s "../../../devices/$1" "$R/sys/bus/pci/devices/$2"
  if [ -n "$6" ]; then
    mkdir -p "$R/sys/bus/pci/drivers/$6"
    ln -sfn "$(realpath --relative-to="$d" "$R/sys/bus/pci/drivers/$6")" "$d/driver"
    ln -s "$(realpath --relative-to="$R/sys/bus/pci/drivers/$6" "$d")" "$R/sys/bus/pci/drivers/$6/$2"
  fi
  if [ -n "$7" ]; then
    g="$R/sys/kernel/iommu_groups/$7/devices"; mkdir -p "$g"
    ln -s "$(realpath --relative-to="$g" "$d")" "$g/$2"
    ln -s "$(realpath --relative-to="$d" "$R/sys/kernel/iommu_groups/$7")" "$d/iommu_group"
  fi
}
mkdir -p "$R/proc" "$R/sys/class/iommu" "$R/sys/devices/virtual/iommu/dmar0" "$R/sys/firmware/acpi/tables"
ln -s ../../devices/virtual/iommu/dmar0 "$R/sys/class/iommu/dmar0"
printf 'DMAR' > "$R/sys/firmware/acpi/tables/DMAR"
printf 'processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vmx sse2\n\n' > "$R/proc/cpuinfo"
echo 'BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro intel_iommu=on iommu=pt' > "$R/proc/cmdline"
# An H100 behind a root port, on vfio-pci, alone in group 7.
dev pci0000:17/0000:17:01.0 0000:17:01.0 8086 352a 060400 pcieport 6 '\x86\x80\x2a\x35'
dev pci0000:17/0000:17:01.0/0000:18:00.0 0000:18:00.0 10de 2330 030200 vfio-pci 7 '\xde\x10\x30\x23'
# A second H100 on nvidia shares group 9 with an X710 NIC on its root bus (no ACS): not isolatable.
dev pci0000:30/0000:30:00.0 0000:30:00.0 10de 2330 030200 nvidia 9 '\xde\x10\x30\x23'
dev pci0000:30/0000:30:01.0 0000:30:01.0 8086 1572 020000 i40e 9 '\x86\x80\x72\x15'
# A third one that fell off the bus: sysfs caches its IDs, config space reads all ones.
dev pci0000:40/0000:40:00.0 0000:40:00.0 10de 2330 030200 vfio-pci 11 '\xff\xff\xff\xff'
# An NVSwitch with no driver.
dev pci0000:50/0000:50:00.0 0000:50:00.0 10de 22a3 068000 '' 12 '\xde\x10\xa3\x22'
"""


def test_detect_json_is_right_on_a_tree_built_by_a_shell_script(tmp_path: Path) -> None:
    root = tmp_path / "host"
    subprocess.run(["bash", "-c", TREE_SCRIPT, "tree", str(root)], check=True)
    out = subprocess.run(
        [sys.executable, "-m", "bootstrap.cli", "detect", "--root", str(root), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(out.stdout)

    def gpu(addr: str, driver: str | None, group: str, wedged: bool) -> dict[str, object]:
        return {
            "address": addr,
            "vendor_id": "10de",
            "device_id": "2330",
            "class_id": "030200",
            "name": "",
            "driver": driver,
            "iommu_group": group,
            "wedged": wedged,
            "power_state": "D0",
            "boot_vga": False,
        }

    assert data == {
        "iommu": {"active": True, "groups": 5, "vendor": "intel"},
        "gpus": [
            gpu("0000:18:00.0", "vfio-pci", "7", False),
            gpu("0000:30:00.0", "nvidia", "9", False),
            gpu("0000:40:00.0", "vfio-pci", "11", True),
        ],
        "nvswitches": [
            {
                "address": "0000:50:00.0",
                "vendor_id": "10de",
                "device_id": "22a3",
                "class_id": "068000",
                "name": "",
                "driver": None,
                "iommu_group": "12",
                "wedged": False,
                "power_state": "D0",
                "boot_vga": False,
            }
        ],
        "units": [
            {"iommu_group": "7", "status": "ready", "gpus": ["0000:18:00.0"], "devices": ["0000:18:00.0"]},
            {
                "iommu_group": "9",
                "status": "not_isolatable",
                "gpus": ["0000:30:00.0"],
                "devices": ["0000:30:00.0", "0000:30:01.0"],
                "blockers": ["0000:30:01.0"],
            },
            {"iommu_group": "11", "status": "wedged", "gpus": ["0000:40:00.0"], "devices": ["0000:40:00.0"]},
        ],
        "nvswitch_units": [
            {
                "iommu_group": "12",
                "status": "needs_binding",
                "gpus": ["0000:50:00.0"],
                "devices": ["0000:50:00.0"],
            }
        ],
    }
