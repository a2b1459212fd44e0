"""The machine's own resources: free disk for VM images and RAM."""

from __future__ import annotations

from bootstrap.paths import SETTINGS_PATH
from doctor.checks.registry import REINSTALL, Context, check
from doctor.model import CheckResult, Status

GB = 1000**3  # disks and DIMMs are sold in decimal GB; a "32 GB" box must not fail a 32 GB floor
DISK_FAIL_GB, DISK_WARN_GB = 20, 50
MEMORY_FAIL_GB, MEMORY_WARN_GB = 32, 64


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


@check("disk", "Disk", preflight=True, waivable=True)
def check_disk(ctx: Context, name: str) -> CheckResult:
    path = ctx.settings.disk_path
    try:
        free = ctx.host.disk_free_bytes(path)
    except OSError as e:
        return CheckResult(name, Status.FAIL, f"cannot measure free space at {path}: {e.strerror}", REINSTALL)
    msg = f"{_gb(free)} free at {path}"
    if free < DISK_FAIL_GB * GB:
        return CheckResult(
            name,
            Status.FAIL,
            f"{msg} (needs {DISK_FAIL_GB} GB for VM base images)",
            f"free at least {_gb(DISK_WARN_GB * GB - free)} at {path}, or set disk_path in "
            f"{SETTINGS_PATH} to a larger disk",
        )
    if free < DISK_WARN_GB * GB:
        return CheckResult(
            name,
            Status.WARN,
            f"{msg} (below {DISK_WARN_GB} GB)",
            f"free {_gb(DISK_WARN_GB * GB - free)} more at {path} for VM base images",
        )
    return CheckResult(name, Status.PASS, msg)


@check("memory", "Memory", preflight=True, waivable=True)
def check_memory(ctx: Context, name: str) -> CheckResult:
    try:
        total = ctx.host.memory_total_bytes()
    except (OSError, ValueError) as e:
        return CheckResult(name, Status.FAIL, f"cannot read /proc/meminfo: {e}", "run on a Linux host")
    msg = f"{_gb(total)} RAM"
    if total < MEMORY_FAIL_GB * GB:
        return CheckResult(
            name,
            Status.FAIL,
            f"{msg}, below the {MEMORY_FAIL_GB} GB minimum",
            f"add RAM: provider nodes need at least {MEMORY_FAIL_GB} GB ({MEMORY_WARN_GB} GB+ recommended)",
        )
    if total < MEMORY_WARN_GB * GB:
        return CheckResult(
            name,
            Status.WARN,
            f"{msg}, below the recommended {MEMORY_WARN_GB} GB",
            f"add RAM: every VM needs system RAM; {MEMORY_WARN_GB} GB+ recommended",
        )
    return CheckResult(name, Status.PASS, msg)
