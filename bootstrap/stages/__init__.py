"""The installer's stages as data (docs/contracts.md#stages-and-plans), and what a stage receives and returns.

A stage is a module with `plan(ctx, facts) -> StagePlan` and `apply(ctx, plan) -> (StageResult,
Facts)`. `plan` only reads the host; `apply` carries the plan out. Only the runner
(bootstrap/commands/install.py) knows whether the run is a plan: it plans every stage and, in a real
run, applies each just after planning it (earlier stages change the host). What a stage finds out for
later ones (the inventory, the identity, the manifest's targets, the token) goes forward in `Facts`,
a value: in a plan run the later stages plan from what the earlier ones would produce. `--only STAGE`
runs that stage and the stages it needs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from bootstrap import resolve
from bootstrap.api import ApiClient, Proxy, proxy_from_env
from bootstrap.discovery import Inventory
from bootstrap.errors import UsageError, VectorlayError
from bootstrap.host import Host
from bootstrap.identity import Identity, IdentityError, identity_path, load_identity
from bootstrap.manifest import Artifact
from bootstrap.plan import Plan
from bootstrap.provisioning import ProvisioningToken, TokenReader
from bootstrap.settings import Settings
from bootstrap.state import RunState, save_state

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
    # Stage detect: this run's GPU mode (bootstrap.resolve.gpu_mode), resolved once; see gpu_mode_of.
    gpu_mode: str | None = None


@dataclass
class Context:
    """What a run hands every stage: the host, its settings and state, where output goes, the
    doctor's port, and the run's options. The facts travel separately (`Facts`)."""

    host: Host
    settings: Settings
    state: RunState
    api: str | None = None
    ca_file: Path | None = None
    # The expiry known when the run started (the state's, or the caller's): the reboot message's.
    token_expires_at: datetime | None = None
    out: Callable[[str], None] = print
    tokens: TokenReader = field(default_factory=lambda: TokenReader(prompt=False))
    # What the final screen lists: warnings and steps still to take after this run, in stage order.
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


@dataclass(frozen=True)
class StagePlan:
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
    # What apply needs of the planning that is no fact for later stages (the stage's own type).
    carry: object = None


class StageModule(Protocol):
    def plan(self, ctx: Context, facts: Facts) -> StagePlan: ...

    def apply(self, ctx: Context, plan: StagePlan) -> tuple[StageResult, Facts]: ...


# --- what preflight and enroll share: the control plane and the token --------------------------------


def api_url(ctx: Context) -> str:
    """The control plane of this run, in bootstrap.resolve.api_url's order (--api, node.yaml's api,
    the identity's); resolved once and kept in ctx.api."""
    ctx.api = resolve.api_url(ctx.api or ctx.settings.api, resolve.identity_or_none(ctx.host))
    return ctx.api


def gpu_mode_of(ctx: Context, facts: Facts) -> str:
    """The GPU mode of this run: the detect stage's (bootstrap.resolve.gpu_mode, resolved once),
    else resolved now for a stage planned without it."""
    if facts.gpu_mode:
        return facts.gpu_mode
    inv, ident = facts.inventory, facts.identity
    return resolve.gpu_mode(
        ctx.settings.gpu_mode,
        recorded=lambda: resolve.recorded_gpu_mode(ident or resolve.identity_or_none(ctx.host)),
        has_gpus=lambda: inv is not None and bool(inv.gpus),
    )


def proxy(ctx: Context) -> Proxy | None:
    """The proxy of this run: the environment's https_proxy, else node.yaml's proxy (install.sh's proxy=)."""
    return proxy_from_env(fallback=ctx.settings.proxy)


def client(ctx: Context, *, attempts: int = 5) -> ApiClient:
    return ApiClient(
        api_url(ctx),
        ca_file=ctx.ca_file,
        pinned_ca=identity_path(ctx.host) / "ca.crt",
        attempts=attempts,
        proxy=proxy(ctx),
    )


def enrolled(ctx: Context) -> bool:
    """A complete identity is in place (a damaged one counts as not enrolled: enrollment repairs it)."""
    try:
        return load_identity(ctx.host) is not None
    except IdentityError:
        return False


def token_of(ctx: Context, facts: Facts) -> ProvisioningToken:
    """The token as the earlier stages left it, else read now (once per run)."""
    if facts.token is not None:
        return facts.token
    return ctx.tokens.read(enrolled=enrolled(ctx))


def introspect(ctx: Context, token: ProvisioningToken) -> ProvisioningToken:
    """The token with its state (valid / used / expired / unknown) and expiry, asked without
    consuming it; asked once per run."""
    if token.state is not None or token.secret is None:
        return token
    from bootstrap.enroll import introspect_token

    api = client(ctx, attempts=3)
    try:
        info = introspect_token(api, token.secret)
    finally:
        api.close()
    state = "valid" if info.valid else (info.reason or "unknown")
    return token.introspected(state, info.expires_at if info.valid else None)


def keep_expiry(ctx: Context, token: ProvisioningToken) -> None:
    """Record a valid token's expiry in the run state at once, also when the stage then stops: the
    reboot message of the run after a reboot names it."""
    if token.state == "valid" and token.expires_at is not None:
        stamp = token.expires_at.isoformat(timespec="seconds")
        if ctx.state.token_expires_at != stamp:
            ctx.state.token_expires_at = stamp
            save_state(ctx.host, ctx.state)


def expiry(ctx: Context, facts: Facts) -> datetime | None:
    tok = facts.token
    if tok is not None and tok.expires_at is not None:
        return tok.expires_at
    return ctx.token_expires_at


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
