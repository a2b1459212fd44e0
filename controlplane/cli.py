"""`vectorlay-control-plane`: run the reference control plane and administer its database."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import sys
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn
from urllib.parse import urlsplit

import typer

from controlplane.clock import Clock, wall_now
from controlplane.db import Database
from controlplane.errors import ControlPlaneError
from controlplane.service import ControlPlane

app = typer.Typer(
    name="vectorlay-control-plane",
    help="The reference vectorlay control plane and its admin commands.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
org_app = typer.Typer(help="Organisations (providers).", no_args_is_help=True)
token_app = typer.Typer(help="Provisioning tokens (vtk_...).", no_args_is_help=True)
apikey_app = typer.Typer(help="API keys for the provider API (vlk_...).", no_args_is_help=True)
app.add_typer(org_app, name="org")
app.add_typer(token_app, name="token")
app.add_typer(apikey_app, name="apikey")

DbOption = typer.Option(..., "--db", help="SQLite database file (created and migrated on first use).")


def _plane(db: Path) -> ControlPlane:
    # Admin commands sign nothing: only `serve` loads the CA.
    return ControlPlane(Database(db), None, Clock.from_env())


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not host:
        raise typer.BadParameter("expected HOST:PORT, e.g. 127.0.0.1:8443", param_hint="--listen")
    return host.strip("[]"), int(port)


@app.command()
def serve(
    db: Path = DbOption,
    listen: str = typer.Option("127.0.0.1:8443", "--listen", help="HOST:PORT (port 0: any free port)."),
    state_dir: Path = typer.Option(..., "--state-dir", help="CA and server keys; nodes trust its ca.crt."),
    artifacts: Path | None = typer.Option(
        None, "--artifacts", help="Directory of DIR/<name>/<version>/<file> to serve, in a signed manifest."
    ),
    public_url: str | None = typer.Option(
        None, "--public-url", help="URL install.sh tells nodes to use (default: the URL it was fetched at)."
    ),
    public_host: str | None = typer.Option(
        None, "--public-host", help="Address nodes reach nebula/nomad at (default: the listen host)."
    ),
    threads: int = typer.Option(32, "--threads", min=1, help="Worker threads (per process)."),
    workers: int = typer.Option(
        1, "--workers", min=1, max=64, help="Server processes sharing the port (SO_REUSEPORT)."
    ),
    cert_days: int = typer.Option(
        30,
        "--cert-days",
        min=1,
        max=3650,
        help="Lifetime of the certificates issued to nodes (client, nebula, Nomad); nodes renew at 2/3.",
    ),
    nebula_cert_days: int | None = typer.Option(
        None,
        "--nebula-cert-days",
        min=1,
        max=3650,
        help="Lifetime of nodes' nebula certificates (default: --cert-days).",
    ),
    nomad_cert_days: int | None = typer.Option(
        None,
        "--nomad-cert-days",
        min=1,
        max=3650,
        help="Lifetime of nodes' Nomad certificates (default: --cert-days).",
    ),
    max_per_address: int = typer.Option(
        64,
        "--max-connections-per-address",
        min=1,
        help="Connections one client address may hold open at once; more are closed at accept.",
    ),
) -> None:
    """Serve the API over HTTPS (mTLS for node endpoints) until SIGINT/SIGTERM."""
    from controlplane.app import create_app
    from controlplane.server import build_server, prepare
    from controlplane.service import Lifetimes, Network

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host, port = _parse_listen(listen)
    clock = Clock.from_env()
    from controlplane.rotation import load as load_authorities

    try:
        auth = load_authorities(state_dir, wall_now())
    except ValueError as e:  # RotationError and NebulaCertError are ValueErrors
        _fail(str(e))
    ca = auth.ca
    lifetimes = Lifetimes(cert_days, nebula_cert_days or cert_days, nomad_cert_days or cert_days)
    network = Network(public_host=public_host or host)
    plane = ControlPlane(
        Database(db), ca, clock, network, auth.nebula_ca, lifetimes, auth.next_ca, auth.next_nebula_ca
    )
    # Nodes check the certificate against the host they were told to use.
    public_name = urlsplit(public_url).hostname if public_url else None
    server = build_server(
        create_app(plane, artifacts, state_dir, public_url),
        host,
        port,
        ca,
        state_dir,
        threads,
        extra_names=(public_name,) if public_name else (),
        trusted=(auth.next_ca.cert_pem,) if auth.next_ca else (),
        max_per_address=max_per_address,
    )

    def _stop(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    children: list[int] = []
    reserved = None
    ready = None
    if workers > 1:
        from controlplane.server import fork_workers, reserve_port, workers_listening

        try:
            reserved = reserve_port(host, port)
        except OSError as e:
            _fail(f"cannot listen on {listen}: {e.strerror or e}")
        server.bind_addr = (host, reserved.getsockname()[1])
        server.reuse_port = True
        plane.db.close_conn()
        children, ready = fork_workers(server, workers - 1)
    try:
        try:
            prepare(server, workers)
        except OSError as e:
            _fail(f"cannot listen on {listen}: {e.strerror or e}")
        if reserved is not None:
            reserved.close()
        if ready is not None and not workers_listening(ready, len(children)):
            _fail(f"a worker process could not listen on {listen}: see its error above")
        bound_host, bound_port = server.bind_addr[:2]
        print(f"serving https://{bound_host}:{bound_port} (CA: {state_dir / 'ca.crt'})", flush=True)
        try:
            server.serve()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
    finally:
        _stop_workers(children)


def _stop_workers(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@app.command("overlay-host")
def overlay_host(
    state_dir: Path = typer.Option(..., "--state-dir", help="The control plane's state dir (its nebula CA)."),
    name: str = typer.Option(..., "--name", help="The host's name in its certificate."),
    overlay_ip: str = typer.Option(..., "--overlay-ip", help="The host's overlay address, e.g. 100.64.0.1."),
    overlay_cidr: str = typer.Option("100.64.0.0/10", "--overlay-cidr", help="The overlay network."),
    out: Path = typer.Option(..., "--out", help="Directory for host.key, host.crt, ca.crt, config.yml."),
    group: list[str] = typer.Option(["vectorlay-control"], "--group", help="Certificate group (repeatable)."),
    lighthouse: bool = typer.Option(False, "--lighthouse", help="This host is a lighthouse."),
    listen_port: int = typer.Option(4242, "--listen-port", min=0, max=65535, help="nebula's UDP port."),
    lighthouse_at: list[str] = typer.Option(
        [], "--lighthouse-at", help="OVERLAY_IP=HOST:PORT of a lighthouse to use (repeatable)."
    ),
    db: Path | None = typer.Option(
        None,
        "--db",
        help="The control plane's database: the certificates of removed nodes go into pki.blocklist.",
    ),
) -> None:
    """Write a nebula identity and config for one of the control plane's own overlay hosts.

    With --db the config blocks the nebula certificates of every removed node. Re-run it after a
    node is removed (or from a timer) and, when "config.yml" is among the changed files, reload
    the host's nebula (SIGHUP, `systemctl reload nebula`): nebula re-reads pki.blocklist without
    dropping the other tunnels and closes the removed node's."""
    import ipaddress

    from controlplane.overlay_host import parse_lighthouse, write_overlay_host

    try:
        network = ipaddress.IPv4Network(overlay_cidr)
        address = ipaddress.IPv4Address(overlay_ip)
    except ValueError as e:
        _fail(f"bad overlay address: {e}")
    if address not in network or address in (network.network_address, network.broadcast_address):
        _fail(f"--overlay-ip {address} is not a host address of --overlay-cidr {network}")
    try:
        lighthouses = [parse_lighthouse(spec) for spec in lighthouse_at]
        if db is not None and not db.is_file():
            # Opening would create an empty database, whose blocklist would unblock every node.
            _fail(f"--db {db}: no such file; give the database the control plane serves with (its --db)")
        blocklist = _plane(db).nebula_blocklist() if db is not None else []
        changed = write_overlay_host(
            state_dir,
            out,
            name=name,
            ip=ipaddress.IPv4Interface((int(address), network.prefixlen)),
            groups=group,
            am_lighthouse=lighthouse,
            listen_port=listen_port,
            lighthouses=lighthouses,
            now=wall_now(),
            blocklist=blocklist,
        )
    except (ValueError, OSError, sqlite3.Error) as e:  # NebulaCertError is a ValueError
        _fail(str(e))
    print(json.dumps({"out": str(out.resolve()), "changed": changed}))


ca_app = typer.Typer(help="Rolling the control plane's CAs (API, Nomad and nebula).", no_args_is_help=True)
app.add_typer(ca_app, name="ca")
StateDirOption = typer.Option(..., "--state-dir", help="The control plane's state dir (its CAs).")


def _ca_summary(state_dir: Path, action: str) -> None:
    from controlplane.rotation import RotationError, introduce, load, retire

    try:
        if action == "introduce":
            auth = introduce(state_dir, wall_now())
        elif action == "retire":
            auth = retire(state_dir, wall_now())
        else:
            if not (state_dir / "ca.crt").is_file():
                _fail(f"{state_dir} has no ca.crt: point --state-dir at the control plane's state dir")
            auth = load(state_dir, wall_now())
    except (RotationError, ValueError) as e:  # NebulaCertError is a ValueError
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot use the CAs in {state_dir}: {e.strerror or e}")
    from controlplane.pki import fingerprint

    def x509_ca(ca: Any) -> dict[str, str]:
        return {"name": ca.cert.subject.rfc4514_string(), "sha256": fingerprint(ca.cert)}

    def nebula_ca(ca: Any) -> dict[str, str]:
        return {"name": ca.certificate.name, "sha256": ca.certificate.fingerprint}

    print(
        json.dumps(
            {
                "ca": x509_ca(auth.ca),
                "nebula_ca": nebula_ca(auth.nebula_ca),
                "next_ca": x509_ca(auth.next_ca) if auth.next_ca else None,
                "next_nebula_ca": nebula_ca(auth.next_nebula_ca) if auth.next_nebula_ca else None,
            },
            indent=2,
        )
    )


@ca_app.command("introduce")
def ca_introduce(state_dir: Path = StateDirOption) -> None:
    """Create new CAs beside the current ones: restart serve, and nodes move to them as they renew."""
    _ca_summary(state_dir, "introduce")


@ca_app.command("retire")
def ca_retire(state_dir: Path = StateDirOption) -> None:
    """Make the new CAs the only ones (the old are kept in retired/); restart serve."""
    _ca_summary(state_dir, "retire")


@ca_app.command("show")
def ca_show(state_dir: Path = StateDirOption) -> None:
    """The CAs in force, and the new ones during a rotation, as JSON."""
    _ca_summary(state_dir, "show")


@org_app.command("create")
def org_create(
    name: str = typer.Argument(..., help="Org name (unique)."),
    db: Path = DbOption,
    provider: bool = typer.Option(False, "--provider", help="An approved provider (may enroll nodes)."),
    node_quota: int | None = typer.Option(None, "--node-quota", min=0, help="Most nodes it may enroll."),
) -> None:
    """Create an org; prints it as JSON."""
    try:
        print(json.dumps(_plane(db).create_org(name, provider=provider, node_quota=node_quota)))
    except ControlPlaneError as e:
        _fail(e.message)


@org_app.command("update")
def org_update(
    name: str = typer.Argument(..., help="Org name or ID."),
    db: Path = DbOption,
    provider: bool | None = typer.Option(None, "--provider/--no-provider", help="Approve or revoke."),
    node_quota: int | None = typer.Option(None, "--node-quota", min=0),
) -> None:
    """Approve an org as a provider or change its node quota."""
    try:
        print(json.dumps(_plane(db).update_org(name, provider=provider, node_quota=node_quota)))
    except ControlPlaneError as e:
        _fail(e.message)


@org_app.command("show")
def org_show(name: str = typer.Argument(..., help="Org name or ID."), db: Path = DbOption) -> None:
    """An org and its nodes, as JSON."""
    try:
        print(json.dumps(_plane(db).org_summary(name), indent=2))
    except ControlPlaneError as e:
        _fail(e.message)


@token_app.command("create")
def token_create(
    org: str = typer.Option(..., "--org", help="Org name or ID."),
    db: Path = DbOption,
) -> None:
    """Mint a provisioning token (1 hour, single use); prints only the token."""
    try:
        result = _plane(db).create_provisioning_token(org)
    except ControlPlaneError as e:
        _fail(e.message)
    print(result["token"])
    print(f"expires at {result['expires_at']}", file=sys.stderr)


@apikey_app.command("create")
def apikey_create(
    org: str = typer.Option(..., "--org", help="Org name or ID."),
    db: Path = DbOption,
) -> None:
    """Mint an API key for the provider API; prints only the key (shown once, stored hashed)."""
    try:
        print(_plane(db).create_api_key(org))
    except ControlPlaneError as e:
        _fail(e.message)


@app.command("nomad-server-cert")
def nomad_server_cert(
    state_dir: Path = typer.Option(..., "--state-dir", help="The state dir of `serve` (its ca.key, ca.crt)."),
    region: str = typer.Option("global", "--region", help="Nomad region: the name is server.<region>.nomad."),
    overlay_ip: str = typer.Option(..., "--overlay-ip", help="The Nomad server's overlay IP."),
    out: Path = typer.Option(..., "--out", help="Directory for server.key (0600), server.crt, ca.crt."),
) -> None:
    """A TLS identity for one of the control plane's Nomad servers, from the CA nodes' Nomad trusts."""
    from bootstrap.fsutil import atomic_write
    from controlplane.pki import CertificateAuthority
    from controlplane.rotation import ca_trust_pem

    # A mistyped --state-dir must not quietly mint a second CA that no node trusts.
    missing = [name for name in ("ca.key", "ca.crt") if not (state_dir / name).is_file()]
    if missing:
        _fail(
            f"{state_dir} has no {' or '.join(missing)}: point --state-dir at the control plane's state dir"
        )
    try:
        ca = CertificateAuthority.load_or_create(state_dir, wall_now())
        key_pem, cert_pem = ca.issue_nomad_server_cert(region=region, overlay_ip=overlay_ip, now=wall_now())
    except ValueError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot read the CA in {state_dir}: {e.strerror or e}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Each file is replaced whole; a crash between two of them leaves a key that does not match
        # server.crt (Nomad says so at start) and re-running the command repairs it.
        atomic_write(out / "server.key", key_pem, mode=0o600)
        atomic_write(out / "server.crt", cert_pem, mode=0o644)
        atomic_write(out / "ca.crt", ca_trust_pem(state_dir, ca).encode(), mode=0o644)
    except OSError as e:
        _fail(f"cannot write to {out}: {e.strerror or e}")
    print(f"wrote {out / 'server.key'}, {out / 'server.crt'}, {out / 'ca.crt'} (server.{region}.nomad)")


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="vectorlay-control-plane")


if __name__ == "__main__":
    main()
