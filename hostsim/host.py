"""The simulating host: a tree host whose kernel and disk are played by the test machinery.

The product's `TreeHost` has no kernel behind its sysfs and no filesystem of its own to measure.
`SimHost` adds the two seams the simulators need, outside the product: `sysfs_hooks` (hostsim.kernel
reacts to sysfs writes the way the PCI core does) and `disk_free_override` (a figure for the disk
checks, which cannot be made to see a full disk on the machine running the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bootstrap.host import Runner, TreeHost


class SimHost(TreeHost):
    def __init__(self, root: Path | str, runner: Runner | None = None) -> None:
        super().__init__(root, runner)
        self.disk_free_override: int | None = None
        self.sysfs_hooks: list[Callable[[str, str], None]] = []

    def __repr__(self) -> str:
        return f"SimHost(root={str(self.root)!r})"

    def sysfs_write(self, p: str, data: str) -> None:
        """With hooks, they play the kernel: they receive the host path and the data and change the
        tree as the kernel would (or raise the OSError it would return); without, the data lands."""
        if not self.sysfs_hooks:
            super().sysfs_write(p, data)
            return
        for hook in self.sysfs_hooks:
            hook(p, data)

    def disk_free_bytes(self, p: str) -> int:
        if self.disk_free_override is not None:
            return self.disk_free_override
        return super().disk_free_bytes(p)
