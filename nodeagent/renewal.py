"""Credentials that renew themselves: the node-agent's side of POST /v1/node/renew.

At two thirds of the earliest lifetime among the node's certificates (bootstrap.renewal) the agent
makes new keys, asks the control plane over its current mTLS identity for certificates and a node
token, and switches the identity directory to them in one rename (bootstrap.enroll.renew). nebula
and Nomad read their certificates through that directory's symlink, so they are told to reload
(`systemctl reload`, SIGHUP: the units' ExecReload) rather than restarted: nebula swaps its
certificate without dropping a tunnel (slackhq/nebula pki.go: the reload callback re-reads pki.cert,
pki.key and pki.ca, refusing only a certificate whose networks changed), Nomad its TLS configuration
without touching an allocation (the agent reloads its `tls` files on SIGHUP since 0.7.1,
hashicorp/nomad#3479; developer.hashicorp.com/nomad/docs/configuration/tls).

The reload is tied to the generation the identity symlink names, recorded once both agents were
told: a crash between the switch and the reload is repaired by the next run, which sees a generation
it never reloaded for. A renewal that fails leaves the working identity as it was and is retried with
a jittered exponential backoff.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from bootstrap.api import ApiClient, proxy_from_env
from bootstrap.errors import VectorlayError
from bootstrap.fsutil import atomic_write
from bootstrap.host import Host
from bootstrap.identity import Identity, load_identity
from bootstrap.paths import IDENTITY_DIR
from bootstrap.renewal import CredentialError, next_renewal, read_credentials
from bootstrap.settings import load_settings
from bootstrap.update import is_active

log = logging.getLogger("node-agent")

# The identity generation whose certificates nebula and Nomad were last told to load.
RELOADED_FILE = "/var/lib/vectorlay/node-agent/reloaded-generation"
RELOAD_UNITS = ("nebula.service", "nomad.service")
RETRY_FIRST_S = 60.0
RETRY_MAX_S = 3600.0


class RenewalError(VectorlayError):
    """A renewal that did not happen; the working identity is unchanged."""


def retry_delay(failures: int, rng: random.Random) -> float:
    """Exponential from a minute to an hour, jittered down to half: a control plane that is down
    for a while is not met by the whole fleet at once when it comes back."""
    ceiling = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** max(0, failures - 1))
    return float(ceiling * rng.uniform(0.5, 1.0))


def renewal_due(ident: Identity) -> datetime:
    try:
        return next_renewal(read_credentials(ident.path))
    except CredentialError as e:
        raise RenewalError(e.args[0], "re-run the install one-liner to re-enroll") from None


def reload_agents(host: Host) -> list[str]:
    """Tell the running agents to load the identity in force; the units told, in order."""
    told = []
    for unit in RELOAD_UNITS:
        # An agent that is not running reads the new files when it starts.
        if not is_active(host, unit):
            continue
        result = host.run(["systemctl", "reload", unit], timeout=60)
        if result.returncode != 0:
            raise RenewalError(
                f"systemctl reload {unit} failed: {result.stderr.strip() or result.returncode}",
                f"see journalctl -u {unit}",
            )
        told.append(unit)
    return told


def reload_if_switched(host: Host) -> list[str] | None:
    """Reload the agents if the identity changed since they were last told; the units told, or None
    when they already run the identity in force."""
    generation = host.readlink_name(IDENTITY_DIR)
    if generation is None:
        return None
    recorded = host.read_text(RELOADED_FILE, default="").strip()
    if recorded == generation:
        return None
    told = reload_agents(host)
    path = host.path(RELOADED_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, generation + "\n", mode=0o644)
    return told


@dataclass
class Renewer:
    """When to renew, and the backoff after a failed attempt."""

    host: Host
    api_url: Callable[[Identity], str]
    timeout: float = 20.0
    rng: random.Random = field(default_factory=random.Random)
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
    monotonic: Callable[[], float] = time.monotonic
    failures: int = 0
    _retry_at: float = 0.0

    def renew(self) -> Identity:
        """Renew now, whatever the schedule says; RenewalError (identity unchanged) when not."""
        from bootstrap.enroll import renew

        try:
            ident = load_identity(self.host)
        except VectorlayError as e:
            raise RenewalError(e.message, e.hint) from None
        if ident is None:
            raise RenewalError("this node is not enrolled yet", "run the install one-liner")
        api = ApiClient(
            self.api_url(ident),
            pinned_ca=ident.ca_file,
            timeout=self.timeout,
            attempts=1,
            # As the heartbeat goes: the unit's environment (proxy.env) or node.yaml's proxy.
            proxy=proxy_from_env(fallback=load_settings(self.host).proxy),
        )
        try:
            new = renew(self.host, api)
        except VectorlayError as e:
            raise RenewalError(e.message, e.hint) from None
        finally:
            api.close()
        try:
            reload_if_switched(self.host)
        except RenewalError as e:
            # The new identity is in force; the agents still run the old, valid one until the
            # next tick's reload_if_switched gets through.
            log.warning("renewed, but the agents were not told to reload yet: %s", e.message)
        return new

    def tick(self) -> Identity | None:
        """One look at the schedule: renews when due (and not backing off); the new identity, or None."""
        try:
            reload_if_switched(self.host)
            ident = load_identity(self.host)
        except VectorlayError as e:
            log.warning("credential renewal: %s", e.message)
            return None
        if ident is None or self.monotonic() < self._retry_at:
            return None
        try:
            if self.now() < renewal_due(ident):
                return None
            new = self.renew()
        except RenewalError as e:
            self.failures += 1
            delay = retry_delay(self.failures, self.rng)
            self._retry_at = self.monotonic() + delay
            log.warning("credential renewal failed (%s); next attempt in %.0f s", e.message, delay)
            return None
        self.failures = 0
        log.info("renewed this node's credentials; next renewal due %s", renewal_due(new).isoformat())
        return new
