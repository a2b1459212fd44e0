"""The doctor's checks: pure functions of the host (root + runner) returning CheckResults.

`run_checks` is the entry point the installer's preflight and verify stages reuse
(e.g. `run_checks(host, settings, only=["kvm", "memory", "disk"])`).

One module per concern; each check is one function with its `@check` record (doctor.checks.registry)
on the line above it. The doctor runs and shows them in the order of the modules below, then of the
functions in each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bootstrap.errors import UsageError
from bootstrap.host import Host
from bootstrap.settings import Settings
from doctor.checks.registry import CHECKS, Context, check
from doctor.model import Report

# isort: off
# Importing a module registers its checks: this line's order is the order the checks run and show.
from doctor.checks import agents, virtualization, gpu, resources, enrollment
# isort: on

# Every module holding checks, in the order they run.
MODULES = (agents, virtualization, gpu, resources, enrollment)

__all__ = ["CHECKS", "MODULES", "PREFLIGHT", "WAIVABLE", "Context", "check", "run_checks"]

# What the installer's preflight runs, and which of those --ignore-preflight-errors may waive.
PREFLIGHT = tuple(n for n, spec in CHECKS.items() if spec.preflight)
WAIVABLE = tuple(n for n, spec in CHECKS.items() if spec.waivable)


def run_checks(
    host: Host,
    settings: Settings | None = None,
    only: Iterable[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    record: bool = False,
) -> Report:
    """Run the checks for this node's GPU mode (or just `only`, in their usual order).

    `record`: keep this run's AER counts in the node's state, as the baseline the next run measures
    growth against. The node-agent's runs do: with one writer, growth between two of its heartbeats
    is never hidden by a run in between (the textfile timer's, an operator's).
    """
    if settings is None:
        from bootstrap.settings import load_settings

        settings = load_settings(host, env)
    ctx = Context(host, settings)
    if only is not None:
        wanted = list(only)
        unknown = [n for n in wanted if n not in CHECKS]
        if unknown:
            raise UsageError(f"unknown check(s): {', '.join(unknown)}", f"known: {', '.join(CHECKS)}")
        names = [n for n in CHECKS if n in wanted]
    else:
        names = [n for n, spec in CHECKS.items() if ctx.mode in spec.modes]
    results = tuple(CHECKS[n].run(ctx) for n in names)

    ready, total = ctx.units()
    if record:
        ctx.record_unit_health()
    wedged = tuple(d.address for d in ctx.inventory.wedged)
    return Report(results, ctx.mode, ready, total, wedged, tuple(ctx.unit_health()))
