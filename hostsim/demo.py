"""`make demo [GPU_MODE=container]`: the whole provider flow on one machine, nothing on it touched.

A reference control plane on loopback (its own CA, SQLite, the agent artifacts signed with its own key:
node-agent built from this repository, stand-ins for nebula and nomad), a provider org and a one-time
token minted with its admin CLI, and an example HGX H100 host tree whose GPUs are still on the nvidia
driver with the IOMMU off. The real installer CLI runs against the tree twice, as a provider would run
the one-liner: the first run configures passthrough and ends in "reboot required"; the tree is rebooted
(the kernel starts with the new command line, the udev rule hands the GPUs to vfio-pci); the second run
enrolls, installs and starts the agents (real processes) and ends with the doctor's verdict and the
control plane's own view of the node: what the node-agent's heartbeat got advertised. The control plane
and the agents are stopped at the end, also on failure; the tree, logs, the control plane's database and
state dir stay for you to look at (in VECTORLAY_DEMO_DIR when set).

With `--gpu-mode container` (`make demo GPU_MODE=container`) the node is a container-GPU one: the
same HGX with docker and the NVIDIA Container Toolkit installed, the GPUs left on the nvidia driver
and shared through gVisor's runsc (the control plane also serves the `runsc` artifact). One run of
the installer, no reboot, ends done, and the doctor runs the installed runsc with docker's arguments.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hostsim import build_host, load_topology

REBOOT_REQUIRED = 3


def example_host() -> dict[str, Any]:
    """HGX H100 (8 GPUs, 4 NVSwitches) with the GPUs on nvidia and the IOMMU off on the command line."""
    desc = load_topology("hgx-h100")
    desc["iommu"] = False
    desc["cmdline"] = "BOOT_IMAGE=/boot/vmlinuz-6.8.0-45-generic root=UUID=0b1e ro quiet splash"
    return desc


# Debian's docker.io layout (dockerd in /usr/sbin). The stand-in dockerd only runs until stopped: the
# installer restarts docker after registering runsc, and the doctor runs runsc itself.
DOCKERD = "#!/bin/sh\n# hostsim stand-in for dockerd: runs until stopped\nexec sleep infinity\n"
# What `nvidia-ctk runtime configure --runtime=docker` leaves (the NVIDIA Container Toolkit's install
# guide): the node's runsc entry has to go in beside it, not over it.
NVIDIA_CTK_DAEMON_JSON = (
    '{\n    "runtimes": {\n        "nvidia": {\n            "args": [],\n'
    '            "path": "nvidia-container-runtime"\n        }\n    }\n}\n'
)
DOCKER_UNIT = (
    "[Unit]\nDescription=Docker Application Container Engine\n"
    "[Service]\nExecStart=/usr/sbin/dockerd -H fd://\n[Install]\nWantedBy=multi-user.target\n"
)


def container_host(*, iommu: bool = False) -> dict[str, Any]:
    """The demo's HGX H100 ready for container-GPU mode: GPUs on the nvidia driver (550.90.07, which
    runsc 20240729's nvproxy supports), docker and the NVIDIA Container Toolkit installed; the IOMMU
    off by default, since container mode does not need it (on: the topology as shipped, with IOMMU
    groups whose GPUs are not on vfio-pci)."""
    desc = load_topology("hgx-h100") if iommu else example_host()
    desc.setdefault("files", {}).update(
        {
            "/sys/module/nvidia/version": "550.90.07\n",
            "/usr/sbin/dockerd": DOCKERD,
            "/usr/lib/systemd/system/docker.service": DOCKER_UNIT,
            "/usr/bin/nvidia-container-runtime-hook": "",
            "/usr/bin/nvidia-ctk": "",
            "/etc/docker/daemon.json": NVIDIA_CTK_DAEMON_JSON,
        }
    )
    return desc


def build_container_host(root: Path, *, iommu: bool = False) -> dict[str, Any]:
    desc = container_host(iommu=iommu)
    build_host(root, desc)
    (root / "usr/sbin/dockerd").chmod(0o755)
    return desc


def runsc_artifact() -> tuple[str, bytes, str]:
    """(version, tarball, where from): the real runsc 20240729 when the cache has it, else the
    stand-in that parses runsc's flags (demo only; the tests always serve the real one)."""
    from hostsim import runsc

    if runsc.cached(runsc.NVPROXY) is not None:
        where = f"the real gVisor runsc {runsc.NVPROXY} (Debian bookworm-backports, {runsc.cache_dir()})"
        return runsc.NVPROXY, runsc.artifact_tarball(runsc.NVPROXY), where
    where = "a stand-in runsc that parses runsc's flags (no cached real one: python -m hostsim.runsc fetch)"
    return runsc.NVPROXY, runsc.standin_tarball(runsc.NVPROXY), where


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(argv: list[str], env: Mapping[str, str] | None = None, shown: list[str] | None = None) -> int:
    """Run a command with its output on this terminal; `shown` is how it is printed (secrets out)."""
    print(f"$ {shlex.join(shown or argv)}", flush=True)
    return subprocess.run(
        argv, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, check=False
    ).returncode


def main(argv: list[str] | None = None) -> int:
    import argparse

    from controlplane import testing
    from hostsim import inject
    from hostsim.agents import publish, publish_agents
    from hostsim.kernel import simulated_reboot

    parser = argparse.ArgumentParser(prog="python -m hostsim.demo")
    parser.add_argument("--gpu-mode", choices=("passthrough", "container"), default="passthrough")
    container = parser.parse_args(argv).gpu_mode == "container"

    started = time.monotonic()
    bindir = Path(sys.executable).parent
    # Short: the agents' health sockets live under the tree and Unix socket paths stop at 108 bytes.
    workdir = Path(os.environ.get("VECTORLAY_DEMO_DIR") or tempfile.mkdtemp(prefix="vl-demo-", dir="/tmp"))
    root = workdir / "host"
    say(f"Working in {workdir}")

    art_dir = workdir / "artifacts"
    built = publish_agents(art_dir)
    say(
        "Reference control plane on loopback, serving the agents: "
        + ", ".join(
            f"{a.name} {a.version} ({'built from this repository' if a.name == 'node-agent' else 'stand-in'})"
            for a in built
        )
    )
    if container:
        version, tarball, where = runsc_artifact()
        publish(art_dir, "runsc", version, tarball)
        print(f"  and runsc {version}: {where}")
    cp = testing.start(workdir / "control-plane", args=("--artifacts", str(art_dir)))
    tree_env: dict[str, str] = {}
    try:
        print(f"  {cp.url} (CA {cp.ca_file}, database {cp.db_path})")
        res = cp.cli("org", "create", "acme-gpus", "--provider")
        print(f"$ vectorlay-control-plane org create acme-gpus --provider --db {cp.db_path}")
        print(res.stdout.strip())
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return 1
        res = cp.cli("token", "create", "--org", "acme-gpus")
        token = res.stdout.strip().split()[-1] if res.returncode == 0 else ""
        print(f"$ vectorlay-control-plane token create --org acme-gpus --db {cp.db_path}")
        print("vtk_... (one-time, valid for an hour; kept out of this output)")
        if not token.startswith("vtk_"):
            print(res.stderr, file=sys.stderr)
            return 1

        if container:
            desc = build_container_host(root)
            say(
                f"Example host in {root}: HGX H100, 8 GPUs on the nvidia driver (550.90.07), "
                "4 NVSwitches, IOMMU off, docker and the NVIDIA Container Toolkit installed"
            )
        else:
            desc = example_host()
            build_host(root, desc)
            say(f"Example host in {root}: HGX H100, 8 GPUs on the nvidia driver, 4 NVSwitches, IOMMU off")
        print("  /sys, /proc, /etc and /boot laid out as the kernel and Ubuntu do; systemctl, modprobe and")
        print("  update-grub answered by simulators (hostsim.inject hands them to the installer); the")
        print("  agents run as real processes.")

        # Stand-in agents are healthy at once; a real node waits 5 s per agent.
        tree_env = {**inject.env(settle=0.3), "VECTORLAY_TOKEN": token}
        install = [
            str(bindir / "vectorlay-bootstrap"),
            "install",
            "--root",
            str(root),
            "--api",
            cp.url,
            "--ca-file",
            str(cp.ca_file),
        ]
        if container:
            install += ["--gpu-mode", "container"]
        shown = ["VECTORLAY_TOKEN=vtk_...", *install]

        if container:
            say("The installer, once (what the one-liner with gpu=1 hands over to): no reboot needed")
            code = run(install, tree_env, shown)
            if code != 0:
                print(f"\ndemo: the install run failed (exit {code})", file=sys.stderr)
                return code
        else:
            say("First run of the installer (what the one-liner hands over to)")
            code = run(install, tree_env, shown)
            if code != REBOOT_REQUIRED:
                print(f"\ndemo: expected 'reboot required' (exit 3), got exit {code}", file=sys.stderr)
                return 1

            say("Simulated reboot: grub.cfg's command line, the udev rule binds the GPUs")
            simulated_reboot(root, desc)
            print(f"  /proc/cmdline: {(root / 'proc/cmdline').read_text().strip()}")

            say("Second run: the same command")
            code = run(install, tree_env, shown)
            if code != 0:
                print(f"\ndemo: the second run failed (exit {code})", file=sys.stderr)
                return code

        say("The doctor, as a provider runs it afterwards")
        doctor_env = {k: v for k, v in tree_env.items() if k != "VECTORLAY_TOKEN"}
        code = run([str(bindir / "vectorlay-node-doctor"), "--root", str(root)], doctor_env)

        say("The control plane's view: GET /v1/orgs/acme-gpus/provider/nodes (API key)")
        for line in control_plane_view(cp, "acme-gpus"):
            print(line)

        say(f"Done in {time.monotonic() - started:.1f}s. Where to look:")
        for what, path in (
            ("the host tree", root),
            ("installer log", root / "var/log/vectorlay/bootstrap.log"),
            ("run state", root / "var/lib/vectorlay/state.json"),
            ("node identity", root / "etc/vectorlay/identity/"),
            ("agent units", root / "etc/systemd/system/"),
            ("agent releases", root / "opt/vectorlay/releases/"),
            *(
                [("docker's runtimes", root / "etc/docker/daemon.json")]
                if container
                else [("kernel command line", root / "boot/grub/grub.cfg")]
            ),
            ("control plane log", cp.log_path),
            ("control plane db", cp.db_path),
            ("control plane state", cp.state_dir),
            ("agent status", root / "run/vectorlay/node-agent/status.json"),
            ("agent log", root / "run/hostsim/systemd/node-agent.service.log"),
        ):
            print(f"  {what:<20} {path}")
        return code
    finally:
        stop_agents(root)
        testing.stop(cp)
        print("  (control plane and agents stopped)")


def control_plane_view(cp: Any, org: str) -> list[str]:
    """One line per node of the org, as the control plane's provider listing has it."""
    import requests

    key = cp.api_key(org)
    r = requests.get(
        f"{cp.url}/v1/orgs/{org}/provider/nodes",
        headers={"Authorization": f"Bearer {key}"},
        verify=str(cp.ca_file),
        timeout=30,
    )
    if r.status_code != 200:
        return [f"control plane: the listing answered {r.status_code}"]
    lines = []
    for n in r.json()["nodes"]:
        units = n["gpu_units"]["advertised"]
        line = f"control plane: {n['node_id']} {n['status']}, {units} GPU unit(s) advertised"
        if n["reason"]:
            line += f" ({n['reason']})"
        lines.append(line)
    return lines or ["control plane: no nodes"]


def stop_agents(root: Path) -> None:
    """End the agent daemons the second run started (the systemctl simulator's state names them)."""
    if not root.exists():
        return
    from hostsim.host import SimHost
    from hostsim.systemd import Systemd

    Systemd().stop_all(SimHost(root))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
