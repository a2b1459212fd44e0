"""The stage contract (docs/contracts.md#stages-and-plans): what a stage receives and returns.

A stage is a module with `plan(ctx, facts) -> StagePlan` and `apply(ctx, plan) -> (StageResult,
Facts)`. `plan` only reads the host; `apply` carries the plan out. Only the runner
(bootstrap/commands/runner.py) knows whether the run is a plan: it plans every stage and, in a real
run, applies each just after planning it (earlier stages change the host). What a stage finds out for
later ones (the inventory, the identity, the manifest's targets, the token) goes forward in `Facts`,
a value: in a plan run the later stages plan from what the earlier ones would produce.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Generic, TypeVar

from bootstrap.discovery import Inventory
from bootstrap.errors import VectorlayError
from bootstrap.host import Host
from bootstrap.identity import Identity
from bootstrap.manifest import Artifact
from bootstrap.plan import Plan
from bootstrap.provisioning import ProvisioningToken, TokenReader
from bootstrap.settings import Settings
from bootstrap.state import RunState, save_state

if TYPE_CHECKING:
    from doctor.model import Report


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
    # The checks preflight runs (doctor.checks.PREFLIGHT: each check's record says whether).
    preflight_checks: tuple[str, ...]


@dataclass(frozen=True)
class Facts:
    """What the stages run so far found out, or in a plan run would produce, for the later ones.
    Never changed in place: a stage returns a new value (`replace`)."""

    inventory: Inventory | None = None
    # The identity in force after the enroll stage; None while the node is not enrolled.
    identity: Identity | None = None
    # The enroll stage would enroll (a plan run) or re-enroll: the later stages plan for that.
    would_enroll: bool = False
    # Stage artifacts -> agents: what the signed manifest offers for each agent.
    targets: Mapping[str, Artifact] = field(default_factory=lambda: MappingProxyType({}))
    # None: no stage has read the token yet.
    token: ProvisioningToken | None = None


@dataclass
class Summary:
    """What the run's final screen shows beyond the stages' results, filled in as the stages run (also
    by one that then stops): the one part of what a run hands the stages that they change."""

    # Warnings and steps still to take after this run, in stage order.
    left: list[str] = field(default_factory=list)
    report: Report | None = None  # the doctor's, once verify ran


@dataclass(frozen=True)
class Context:
    """What a run hands every stage: the host, its settings and state, where output goes, the
    doctor's port, and the run's options; complete when made (frozen). The facts travel separately
    (`Facts`); what the final screen gathers goes into `summary`."""

    host: Host
    settings: Settings
    state: RunState
    api: str | None = None
    ca_file: Path | None = None
    # The expiry known when the run started (the state's, or the caller's): the reboot message's.
    token_expires_at: datetime | None = None
    out: Callable[[str], None] = print
    tokens: TokenReader = field(default_factory=lambda: TokenReader(prompt=False))
    summary: Summary = field(default_factory=Summary)
    # Checks the operator accepts failing (--ignore-preflight-errors, as kubeadm's): still run and
    # reported, but neither preflight nor verify stops the run on them.
    ignored_checks: frozenset[str] = frozenset()
    doctor: Doctor | None = None

    def persist(self) -> None:
        """Make the run state durable now (written only when it changed): the one way a run writes
        it. The runner does after every stage, also one that stopped; a stage itself only for what
        must outlive a kill in its middle (the command journal, an accepted manifest serial)."""
        save_state(self.host, self.state)

    def need_doctor(self) -> Doctor:
        if self.doctor is None:
            raise RuntimeError("this stage runs the doctor's checks, and none was handed in")
        return self.doctor


# What a stage's apply needs of its own plan: each stage names its type (None: nothing).
C = TypeVar("C")


@dataclass(frozen=True)
class StagePlan(Generic[C]):
    """A stage's plan: the changes (files, commands, actions) as compared with the host, lines to
    show after them, what a plan run reports, and what the later stages may plan from. (What the
    stage says while planning it says through ctx.out: a check that fails must not hide the ones
    before it.)"""

    facts: Facts
    planned: StageResult
    plan: Plan = field(default_factory=Plan)
    tail: tuple[str, ...] = ()
    # A gate that stops a real run: shown in a plan run as what would come first, raised by apply.
    blocked: VectorlayError | None = None
    # What apply needs of the planning that is no fact for later stages, of the stage's own type;
    # None when apply has nothing to carry out beyond the plan (the gate, a skip).
    carry: C | None = None
