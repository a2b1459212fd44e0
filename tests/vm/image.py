"""The test guests' disk images: Debian 12 and Debian 13 from debootstrap, each built once and cached
by a hash of its recipe.

A recipe is this file, everything under tests/vm/guest/ and the release: change any and the next run
builds a fresh image under a new hash; otherwise every run on this machine reuses the cached one. The
build needs root (debootstrap, and mke2fs must read root-only files) but mounts nothing: the disk is
made with `mke2fs -d`, the EFI system partition with mtools.

Each image also carries its release's own `nebula` binary, unpacked from the package that release's
apt would install (`apt-get download` in the new root, against the same mirror): the scenario serves it
as the node's nebula artifact, so a guest runs the nebula of its own Debian.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST_DIR = HERE / "guest"

DEFAULT_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Release:
    key: str  # test id and cache name: debian12, debian13
    suite: str
    version_id: str  # /etc/os-release's VERSION_ID
    python: str  # the release's python3, which the guest's wheelhouse targets
    # Debian 13 installs write the deb822 /etc/apt/sources.list.d/debian.sources; debootstrap writes
    # the one-line sources.list, which Debian 12 installs still have.
    deb822_sources: bool


RELEASES = {
    r.key: r
    for r in (
        Release("debian12", "bookworm", "12", "3.11", deb822_sources=False),
        Release("debian13", "trixie", "13", "3.13", deb822_sources=True),
    )
}
DEFAULT_RELEASE = "debian12"

PACKAGES = (
    "systemd-sysv",
    "linux-image-amd64",
    "udev",
    "kmod",
    "pciutils",
    "python3",
    "python3-venv",
    "curl",
    "ca-certificates",
    "openssl",
    "grub-efi-amd64-bin",
    "grub-common",
    "grub2-common",
    "jq",
    "tar",
    "unzip",
    "iproute2",
    "procps",
    # The VM-attach probe's QEMU (bootstrap.vmprobe), as a node gets it from its OS.
    "qemu-system-x86",
)
# Sparse: the file takes what is written. Large enough that a disk check sees a plausible node.
DISK_SIZE = "64G"
ESP_SIZE = "64M"
# The EFI image only finds the guest's root filesystem and hands over to the guest's own grub.cfg,
# so the kernel arguments of a GRUB boot are whatever the guest's last update-grub wrote.
GRUB_EMBEDDED_CFG = """\
serial --speed=115200
terminal_input serial console
terminal_output serial console
if search --no-floppy --label root --set=root; then
  configfile ($root)/boot/grub/grub.cfg
fi
echo "vectorlay test image: no filesystem labelled root with a /boot/grub/grub.cfg; powering off"
halt
"""
GRUB_MODULES = (
    "part_gpt part_msdos fat ext2 search search_label configfile linux normal serial terminal echo test "
    "gzio all_video efi_gop halt"
)
UNNEEDED_UNITS = (
    # Timers that would wake up in the middle of a test; the serial getty would clear the console log.
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "fstrim.timer",
    "serial-getty@ttyS0.service",
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    dir: Path
    disk: Path  # raw ext4, whole disk, label "root"
    kernel: Path
    initrd: Path
    esp: Path  # FAT ESP holding EFI/BOOT/BOOTX64.EFI
    kernel_version: str
    build_seconds: float | None  # None when it came from the cache
    release: Release
    nebula: Path  # the release's own /usr/bin/nebula, from its nebula package
    nebula_version: str  # that package's version, e.g. 1.6.1+dfsg-1+b10

    @classmethod
    def load(cls, d: Path, build_seconds: float | None = None) -> GuestImage:
        meta = json.loads((d / "image.json").read_text())
        return cls(
            dir=d,
            disk=d / "disk.img",
            kernel=d / "vmlinuz",
            initrd=d / "initrd.img",
            esp=d / "esp.img",
            kernel_version=meta["kernel_version"],
            build_seconds=build_seconds,
            release=RELEASES[meta["release"]],
            nebula=d / "nebula",
            nebula_version=meta["nebula_version"],
        )


def recipe_files() -> list[Path]:
    files = [Path(__file__).resolve()]
    files += sorted(p for p in GUEST_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return files


def recipe_hash(release: Release) -> str:
    h = hashlib.sha256(repr(release).encode() + b"\0")
    for p in recipe_files():
        h.update(str(p.relative_to(HERE)).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("VECTORLAY_VM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vectorlay-vm"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_image(release: Release, log: Log = print) -> GuestImage:
    """The release's cached image for the current recipe, building it first when this machine has none."""
    root = cache_root()
    final = root / f"image-{release.key}-{recipe_hash(release)}"
    # One build at a time per machine; a second session waits and then finds the finished image.
    with _locked(root / ".build.lock"):
        if (final / "image.json").is_file():
            return GuestImage.load(final)
        if os.geteuid() != 0:
            raise RuntimeError(
                f"no cached guest image at {final} and building one needs root (debootstrap, mke2fs -d); "
                "run `sudo make test-vm` once"
            )
        work = root / f"{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        # A crashed earlier build leaves its temp dir; it is never reused.
        for stale in root.glob(f"{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.monotonic()
        _build(release, work, log)
        os.replace(work, final)  # the image appears complete or not at all
        return GuestImage.load(final, build_seconds=time.monotonic() - t0)


def _run(argv: list[str], log: Log, **kw: object) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(
            f"image build step failed ({proc.returncode}): {' '.join(argv)}\n{proc.stdout[-3000:]}"
            f"\n{proc.stderr[-3000:]}"
        )
    log(f"  {time.monotonic() - t0:6.1f}s  {' '.join(argv)[:110]}")


def _build(release: Release, work: Path, log: Log) -> None:
    rootfs = work / "rootfs"
    work.mkdir(parents=True)
    mirror = os.environ.get("VECTORLAY_VM_MIRROR", DEFAULT_MIRROR)
    log(f"building the {release.key} guest image in {work} (Debian {release.suite} from {mirror})")
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            release.suite,
            str(rootfs),
            mirror,
        ],
        log,
    )
    chroot = ["chroot", str(rootfs)]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    if release.deb822_sources:
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(
            f"Types: deb\nURIs: {mirror}\nSuites: {release.suite}\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
    nebula_version = _fetch_nebula(chroot, env, rootfs, work, log)

    # Files of the recipe, then the agent the harness talks to.
    overlay = GUEST_DIR / "overlay"
    for src in sorted(overlay.rglob("*")):
        if src.is_file():
            dst = rootfs / src.relative_to(overlay)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o644)
    agent = rootfs / "usr/local/lib/vm-agent/vm_agent.py"
    agent.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GUEST_DIR / "vm_agent.py", agent)
    (rootfs / "boot/grub").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/default/grub.d").mkdir(parents=True, exist_ok=True)

    _run([*chroot, "systemctl", "enable", "vm-agent.service", "systemd-networkd.service"], log, env=env)
    _run([*chroot, "systemctl", "mask", *UNNEEDED_UNITS], log, env=env)
    _run([*chroot, "systemd-machine-id-setup"], log, env=env)
    (rootfs / "tmp/grub-embed.cfg").write_text(GRUB_EMBEDDED_CFG)
    _run(
        [
            *chroot,
            "grub-mkstandalone",
            "-O",
            "x86_64-efi",
            "-o",
            "/tmp/BOOTX64.EFI",
            f"--modules={GRUB_MODULES}",
            "boot/grub/grub.cfg=/tmp/grub-embed.cfg",
        ],
        log,
        env=env,
    )
    shutil.move(rootfs / "tmp/BOOTX64.EFI", work / "BOOTX64.EFI")
    (rootfs / "tmp/grub-embed.cfg").unlink()
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)

    (kernel,) = sorted((rootfs / "boot").glob("vmlinuz-*"))
    version = kernel.name.removeprefix("vmlinuz-")
    shutil.copyfile(kernel, work / "vmlinuz")
    shutil.copyfile(rootfs / f"boot/initrd.img-{version}", work / "initrd.img")

    _run(
        [
            "mke2fs",
            "-q",
            "-t",
            "ext4",
            "-L",
            "root",
            # A regular file gets its inode tables zeroed by hole punching: cheap, and the guest
            # kernel then has no lazy-init work to do in the background during tests.
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            # Inode tables and journal sized for a test root, not for 64 GB of files: the cached
            # image stays near the size of what is in it.
            "-N",
            "262144",
            "-J",
            "size=64",
            "-d",
            str(rootfs),
            str(work / "disk.img"),
            DISK_SIZE,
        ],
        log,
    )
    esp = work / "esp.img"
    _run(["truncate", "-s", ESP_SIZE, str(esp)], log)
    _run(["mformat", "-i", str(esp), "-F", "::"], log)
    _run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT"], log)
    _run(["mcopy", "-i", str(esp), str(work / "BOOTX64.EFI"), "::/EFI/BOOT/BOOTX64.EFI"], log)
    # Read back from the finished disk without mounting it: the agent and its enabled unit made it in.
    disk = str(work / "disk.img")
    unit = _debugfs(disk, "cat /etc/systemd/system/vm-agent.service")
    wants = _debugfs(disk, "ls /etc/systemd/system/multi-user.target.wants")
    if "vm_agent.py" not in unit or "vm-agent.service" not in wants:
        raise RuntimeError(f"the built disk lacks the enabled vm-agent unit:\n{unit}\n{wants}")
    shutil.rmtree(rootfs)
    (work / "image.json").write_text(
        json.dumps(
            {
                "release": release.key,
                "suite": release.suite,
                "mirror": mirror,
                "packages": list(PACKAGES),
                "kernel_version": version,
                "nebula_version": nebula_version,
                "recipe_hash": recipe_hash(release),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
    )


def _fetch_nebula(chroot: list[str], env: dict[str, str], rootfs: Path, work: Path, log: Log) -> str:
    """The release's nebula package, downloaded by the new root's own apt (its suite, its mirror) and
    unpacked outside it: the binary goes next to the image, the guest has no nebula installed."""
    _run([*chroot, "apt-get", "-qq", "update"], log, env=env)
    _run([*chroot, "sh", "-c", "cd /tmp && apt-get -qq download nebula"], log, env=env)
    (deb,) = (rootfs / "tmp").glob("nebula_*.deb")
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    _run(["dpkg-deb", "-x", str(deb), str(work / "nebula-deb")], log)
    shutil.move(work / "nebula-deb/usr/bin/nebula", work / "nebula")
    shutil.rmtree(work / "nebula-deb")
    deb.unlink()
    # Package lists are tens of MB the guest never reads (everything the installer wants is already
    # installed); an installed Debian before its first apt-get update has none either.
    lists = rootfs / "var/lib/apt/lists"
    shutil.rmtree(lists)
    (lists / "partial").mkdir(parents=True)
    return version


def _debugfs(disk: str, request: str) -> str:
    proc = subprocess.run(["debugfs", "-R", request, disk], capture_output=True, text=True, check=False)
    return proc.stdout
