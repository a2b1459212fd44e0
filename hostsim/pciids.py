"""An excerpt of pci.ids (https://pci-ids.ucw.cz) in its own format, for the IDs the topologies use."""

from __future__ import annotations

MINI_PCI_IDS = """\
#
#\tList of PCI ID's (excerpt for vectorlay-node test trees)
#
# Vendors, devices and subsystems. Please keep sorted.

1000  Broadcom / LSI
\tc030  PEX890xx PCIe Gen 5 Switch
1002  Advanced Micro Devices, Inc. [AMD/ATI]
\t14a4  Genoa/Bergamo Root Complex
\t74a1  Aqua Vanjaram [Instinct MI300X]
\t\t1002 74a1  Instinct MI300X
10de  NVIDIA Corporation
\t10f7  TU102 High Definition Audio Controller
\t1ac2  NVSwitch
\t1ad6  TU102 USB 3.1 Host Controller
\t1ad7  TU102 USB Type-C UCSI Controller
\t1af1  GA100 [A100 NVSwitch]
\t1e07  TU102 [GeForce RTX 2080 Ti Rev. A]
\t20b2  GA100 [A100 SXM4 80GB]
\t22a3  GH100 [H100 NVSwitch]
\t2330  GH100 [H100 SXM5 80GB]
\t\t10de 16c1  H100 SXM5 80GB
1234  Technical Corp.
\t1111  QEMU Virtual Video Controller
\t11e8  QEMU PCI Test Device
15b3  Mellanox Technologies
\t1021  MT2910 Family [ConnectX-7]
8086  Intel Corporation
\t1533  I210 Gigabit Network Connection
\t1901  6th-10th Gen Core Processor PCIe Controller (x16)
\t2922  82801IR/IO/IH (ICH9R/DO/DH) 6 port SATA Controller [AHCI mode]
\t352a  Sapphire Rapids PCIe Root Port
\t3e30  8th Gen Core 8-core Desktop Processor Host Bridge/DRAM Registers [Coffee Lake S]

# List of known device classes, subclasses and programming interfaces

C 03  Display controller
\t00  VGA compatible controller
\t02  3D controller
\t80  Display controller
"""
