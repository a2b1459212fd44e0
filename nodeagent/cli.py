"""`vectorlay-node-agent [--config FILE] [--root DIR] [--once [--renew]]`: the service, one heartbeat,
or a credential renewal now.

Logs go to stderr, which is the journal under systemd. Errors are one line each, never a traceback,
and never carry the node token: it only ever travels in the Authorization header.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from bootstrap.paths import AGENT_CONFIG
from nodeagent import __version__

DESCRIPTION = (
    "vectorlay's node agent: every advertise_interval (node.yaml) it runs the doctor's checks and "
    "sends the verdict, the node's load and its agents' versions to the control plane, which "
    "advertises the node's GPU units only while that heartbeat is fresh and healthy. Between "
    "heartbeats it watches the GPU units (config space, driver binding, the kernel log's Xid 79) "
    "and sends one at once when a unit changes. SIGUSR1 drains "
    "it (the control plane stops advertising the node), SIGTERM stops it."
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vectorlay-node-agent", description=DESCRIPTION)
    p.add_argument(
        "--config",
        default=AGENT_CONFIG,
        metavar="FILE",
        help="the agent's config, written by the installer (a path on the node, under --root)",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        metavar="DIR",
        help="host root; anything but / reads only inside it and runs no command on this machine",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="send one heartbeat now, print the answer and exit (non-zero when it was not delivered)",
    )
    p.add_argument(
        "--renew",
        action="store_true",
        help="with --once: renew the node's credentials now (new keys, same node ID and overlay IP), "
        "tell nebula and Nomad to reload them, and exit",
    )
    p.add_argument("--version", action="version", version=f"node-agent {__version__}")
    return p


def _renew_now(agent: Any) -> None:
    from bootstrap.renewal import read_credentials
    from nodeagent.renewal import RenewalError

    try:
        ident = agent.renewer().renew()
    except RenewalError as e:
        print(f"error: credentials not renewed: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  fix: {e.hint}", file=sys.stderr)
        print("  the node keeps its working identity", file=sys.stderr)
        sys.exit(1)
    print(f"renewed the credentials of node {ident.node_id} (overlay IP {ident.overlay_ip})")
    for cred in read_credentials(ident.path):
        print(
            f"  {cred.kind}: valid until {cred.not_after:%Y-%m-%d %H:%M} UTC, renews {cred.renew_at:%Y-%m-%d}"
        )
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
    from bootstrap.errors import VectorlayError, exit_with

    try:
        if not args.root.is_dir():
            raise VectorlayError(f"--root {args.root} is not a directory")
        if not args.config.startswith("/"):
            raise VectorlayError(f"--config {args.config} must be an absolute path on the node")
        from bootstrap.host import open_host
        from nodeagent.agent import Agent, Daemon, HeartbeatError, describe

        if args.renew and not args.once:
            raise VectorlayError("--renew needs --once", "run vectorlay-node-agent --once --renew")
        agent = Agent(open_host(args.root), args.config)
        if args.renew:
            _renew_now(agent)
        if args.once:
            try:
                status = agent.heartbeat()
            except HeartbeatError as e:
                print(f"error: heartbeat not delivered: {e.message}", file=sys.stderr)
                if e.hint:
                    print(f"  fix: {e.hint}", file=sys.stderr)
                sys.exit(1)
            finally:
                agent.close()
            print(f"heartbeat: {describe(status)}")
            sys.exit(0)
        sys.exit(Daemon(agent).run())
    except KeyboardInterrupt:
        sys.exit(130)
    except VectorlayError as e:
        exit_with(e)
    except Exception as e:  # an agent reports its own bug in one line; systemd restarts it
        from bootstrap.errors import redact

        print(f"error: node-agent crashed: {type(e).__name__}: {redact(str(e))}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
