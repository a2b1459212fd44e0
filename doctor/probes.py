"""Kernel probes only a live host can answer: creating a KVM VM and asking VFIO about a group.

Both go one step past what the files say: /dev/kvm can exist while VM creation fails (a nested guest
without the feature, a module in a bad state), and a group whose members are all on vfio-pci can still
be unusable (not viable) or already held by a running VM.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

# <linux/kvm.h>: KVMIO = 0xAE; _IO(KVMIO, 0x00) and _IO(KVMIO, 0x01).
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12

# <linux/vfio.h>: VFIO_TYPE ';' (0x3b), VFIO_BASE 100; _IO(VFIO_TYPE, VFIO_BASE + 3).
VFIO_GROUP_GET_STATUS = 0x3B67
VFIO_GROUP_FLAGS_VIABLE = 1 << 0


class KvmProbe(NamedTuple):
    """Whether a test VM could be created, and what happened."""

    ok: bool
    detail: str  # what worked, or the step that failed and why


def probe_kvm(path: str = "/dev/kvm") -> KvmProbe:
    """Open /dev/kvm, check the API version and create (then drop) a VM, as QEMU does at start."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return KvmProbe(False, f"cannot open {path}: {e.strerror}")
    try:
        try:
            version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        except OSError as e:
            return KvmProbe(False, f"KVM_GET_API_VERSION failed: {e.strerror}")
        if version != KVM_API_VERSION:
            return KvmProbe(False, f"KVM API version {version}, expected {KVM_API_VERSION}")
        try:
            vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        except OSError as e:
            return KvmProbe(False, f"KVM_CREATE_VM failed: {e.strerror}")
        os.close(vm)
        return KvmProbe(True, f"created a test VM (KVM API {version})")
    finally:
        os.close(fd)


class GroupProbe(NamedTuple):
    """Whether a VFIO group can be opened by a VM, and its state."""

    usable: bool
    state: str  # "viable", "in use by a VM", or why not usable


def probe_vfio_group(path: str) -> GroupProbe:
    """VFIO_GROUP_GET_STATUS on /dev/vfio/<group>. A group is single-open: EBUSY means a VM holds it."""
    import fcntl
    import struct  # here: a node without GPUs never asks VFIO, and struct is an extension to load

    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return GroupProbe(True, "in use by a VM (rented)")
        if e.errno == errno.ENOENT:
            return GroupProbe(False, f"{path} does not exist (vfio-pci not bound or vfio not loaded)")
        return GroupProbe(False, f"cannot open {path}: {e.strerror}")
    try:
        buf = bytearray(struct.pack("=II", 8, 0))
        try:
            fcntl.ioctl(fd, VFIO_GROUP_GET_STATUS, buf, True)
        except OSError as e:
            return GroupProbe(False, f"VFIO_GROUP_GET_STATUS failed: {e.strerror}")
        _argsz, flags = struct.unpack("=II", buf)
        if flags & VFIO_GROUP_FLAGS_VIABLE:
            return GroupProbe(True, "viable")
        return GroupProbe(False, "not viable: a device in the group is bound to a host driver")
    finally:
        os.close(fd)
