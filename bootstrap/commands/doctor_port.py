"""The doctor and the node-agent, handed to the stages that use them (preflight, verify)."""

from __future__ import annotations

from bootstrap.host import Host
from bootstrap.stages.contract import Doctor


def doctor_port() -> Doctor:
    from doctor.checks import PREFLIGHT, run_checks
    from doctor.render import render_text

    return Doctor(run_checks, render_text, report_now, PREFLIGHT)


def report_now(host: Host) -> str:
    """What `vectorlay-node-agent --once` does: the running agent's next heartbeat may be minutes
    away, and a node this run re-enrolled must not be shown what the control plane said of its
    previous identity (removed, say)."""
    from nodeagent.agent import Agent, HeartbeatError, describe

    agent = Agent(host)
    try:
        return f"heartbeat: {describe(agent.heartbeat())}"
    except HeartbeatError as e:
        return f"heartbeat not delivered: {e.message}"
    finally:
        agent.close()
