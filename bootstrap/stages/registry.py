"""The installer's stages, in the order they run (docs/contracts.md#stages-and-plans).

Each record names the stage's own plan and apply functions, so a reader (and mypy) follows the
record straight to the code. `--only STAGE` runs that stage and the stages it `needs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic

from bootstrap.errors import UsageError
from bootstrap.stages import agents, artifacts, detect, enroll, gpu, preflight, verify
from bootstrap.stages.contract import C, Context, Facts, StagePlan, StageResult


@dataclass(frozen=True)
class Stage(Generic[C]):
    """A stage's record: its apply takes what its plan gives (mypy holds each record to it)."""

    name: str
    summary: str
    plan: Callable[[Context, Facts], StagePlan[C]]
    apply: Callable[[Context, StagePlan[C]], tuple[StageResult, Facts]]
    needs: tuple[str, ...] = ()


# The records differ in their carry type, so the runner sees them as Stage[Any]; each record is
# checked as written (STAGES takes its type from them, not from an annotation that would erase it).
AnyStage = Stage[Any]

STAGES = (
    Stage("preflight", "root, OS, KVM, memory, disk, API and token checks", preflight.plan, preflight.apply),
    Stage("detect", "PCI devices, GPUs, NVSwitches, IOMMU groups, GPU units", detect.plan, detect.apply),
    Stage("gpu", "GPU passthrough: IOMMU, vfio, bind service, reboot gate", gpu.plan, gpu.apply, ("detect",)),
    Stage("enroll", "key pair, CSR, token exchanged for an identity", enroll.plan, enroll.apply, ("detect",)),
    Stage(
        "artifacts",
        "nebula, nomad, node-agent from the signed manifest",
        artifacts.plan,
        artifacts.apply,
        ("enroll",),
    ),
    Stage(
        "agents", "units and configs of the agents, update timer", agents.plan, agents.apply, ("artifacts",)
    ),
    Stage("verify", "the doctor's checks: the run's verdict", verify.plan, verify.apply, ("agents",)),
)
BY_NAME: dict[str, AnyStage] = {s.name: s for s in STAGES}


def _closure(name: str) -> list[AnyStage]:
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


def select(only: str | None) -> list[AnyStage]:
    """The stages to run, in order: all of them, or `only` and the stages it needs."""
    if only is None:
        return list(STAGES)
    if only not in BY_NAME:
        raise UsageError(f"unknown stage {only!r}", "choose one of: " + ", ".join(s.name for s in STAGES))
    return _closure(only)
