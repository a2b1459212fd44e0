"""The installer's stages as data (docs/contracts.md#stages-and-plans), and what a stage receives and returns.

A stage is a module with `run(ctx) -> StageResult`. `--only STAGE` runs that stage and the stages it
needs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from bootstrap.discovery import Inventory
from bootstrap.errors import UsageError
from bootstrap.host import Host
from bootstrap.manifest import Artifact
from bootstrap.settings import Settings
from bootstrap.state import RunState

if TYPE_CHECKING:
    from doctor.model import Report


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    module: str
    needs: tuple[str, ...] = ()


STAGES: tuple[Stage, ...] = (
    Stage("preflight", "root, OS, KVM, memory, disk, API and token checks", "bootstrap.stages.preflight"),
    Stage("detect", "PCI devices, GPUs, NVSwitches, IOMMU groups, GPU units", "bootstrap.stages.detect"),
    Stage(
        "gpu", "GPU passthrough: IOMMU, vfio, bind service, reboot gate", "bootstrap.stages.gpu", ("detect",)
    ),
    Stage("enroll", "key pair, CSR, token exchanged for an identity", "bootstrap.stages.enroll", ("detect",)),
    Stage(
        "artifacts",
        "nebula, nomad, node-agent from the signed manifest",
        "bootstrap.stages.artifacts",
        ("enroll",),
    ),
    Stage(
        "agents", "units and configs of the agents, update timer", "bootstrap.stages.agents", ("artifacts",)
    ),
    Stage("verify", "the doctor's checks: the run's verdict", "bootstrap.stages.verify", ("agents",)),
)
BY_NAME = {s.name: s for s in STAGES}


class Outcome(str, Enum):
    OK = "ok"
    PLANNED = "planned"
    REBOOT = "reboot"
    SKIPPED = "skipped"


@dataclass
class StageResult:
    outcome: Outcome
    message: str = ""


@dataclass(frozen=True)
class Doctor:
    """The doctor's checks and the node-agent's one heartbeat, as preflight and verify use them. They
    stand beside the stages on the same core, not under them, so the command that runs the stages
    hands them in (bootstrap.commands.doctor_port)."""

    run_checks: Callable[..., Report]
    render_text: Callable[[Report], str]
    # One heartbeat now; the line to show (delivered or not, it never raises).
    report_now: Callable[[Host], str]


@dataclass
class Context:
    host: Host
    settings: Settings
    state: RunState
    plan_only: bool = False
    gpu_mode: str | None = None
    api: str | None = None
    ca_file: Path | None = None
    token_expires_at: datetime | None = None
    out: Callable[[str], None] = print
    inventory: Inventory | None = None
    notes: list[str] = field(default_factory=list)
    # Stage artifacts -> agents: what the signed manifest offers for each agent.
    targets: dict[str, Artifact] = field(default_factory=dict)
    # The provisioning token: read once (VECTORLAY_TOKEN, --token-file, standard input), held in
    # memory only. `token_state` is what introspection said: valid, used, expired, unknown, or None.
    token_file: Path | None = None
    token: str | None = field(default=None, repr=False)
    token_read: bool = False
    token_state: str | None = None
    # What the final screen lists: steps still to take after this run.
    left: list[str] = field(default_factory=list)
    report: Report | None = None  # the doctor's, once verify ran
    # Checks the operator accepts failing (--ignore-preflight-errors, as kubeadm's): still run and
    # reported, but neither preflight nor verify stops the run on them.
    ignored_checks: frozenset[str] = frozenset()
    doctor: Doctor | None = None

    def need_doctor(self) -> Doctor:
        if self.doctor is None:
            raise RuntimeError("this stage runs the doctor's checks, and none was handed in")
        return self.doctor


class StageModule(Protocol):
    def run(self, ctx: Context) -> StageResult: ...


def _closure(name: str) -> list[Stage]:
    order = [s.name for s in STAGES]
    wanted: set[str] = set()

    def visit(n: str) -> None:
        if n in wanted:
            return
        wanted.add(n)
        for dep in BY_NAME[n].needs:
            visit(dep)

    visit(name)
    return [BY_NAME[n] for n in order if n in wanted]


def select(only: str | None) -> list[Stage]:
    """The stages to run, in order: all of them, or `only` and the stages it needs."""
    if only is None:
        return list(STAGES)
    if only not in BY_NAME:
        raise UsageError(f"unknown stage {only!r}", "choose one of: " + ", ".join(s.name for s in STAGES))
    return _closure(only)


def load(stage: Stage) -> StageModule:
    module: StageModule = importlib.import_module(stage.module)
    return module
