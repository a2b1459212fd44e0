"""The agent's work: one heartbeat, the loop around it, the health socket and draining.

A heartbeat runs the doctor's own checks, reads the load and the installed agents' versions, posts
them over mTLS with the node token, and writes the answer to status.json. Nothing a control plane
answers (HTML, a 500, JSON of the wrong shape, silence) ends the loop: the failure is logged in one
line and the next attempt comes after a bounded, jittered backoff.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from bootstrap import answers, artifacts
from bootstrap.agent_status import iso, read_status, write_status
from bootstrap.api import ApiClient, ClientCert, proxy_from_env
from bootstrap.errors import VectorlayError, hold_secret, redact
from bootstrap.host import Host
from bootstrap.identity import Identity, load_identity
from bootstrap.paths import AGENT_CONFIG
from bootstrap.settings import Settings, load_settings
from bootstrap.update import SERVICES
from nodeagent import __version__
from nodeagent.renewal import Renewer
from nodeagent.resources import CpuSample, read_resources

log = logging.getLogger("node-agent")

NAME = "node-agent"
RUN_DIR = f"/run/vectorlay-{NAME}"
HEALTH_SOCKET = f"{RUN_DIR}/health.sock"
DRAINED_FILE = f"{RUN_DIR}/drained"
DEFAULT_CONFIG = AGENT_CONFIG
HEARTBEAT_PATH = "/v1/node/heartbeat"
# The control plane's opinion of the node is what the heartbeat asks for; feeding the last answer
# back in as a check would keep a node that was brought back reported as FAIL for one more round.
_OWN_CHECK = "control_plane"
BACKOFF_FIRST_S = 5.0
REQUEST_TIMEOUT_S = 20.0


class HeartbeatError(VectorlayError):
    """A heartbeat that was not delivered, or whose answer made no sense."""


class _Terminate(BaseException):
    """Raised by the SIGTERM handler to abandon a heartbeat in flight (a BaseException, so that no
    `except Exception` on the way swallows it)."""


def jittered(seconds: float, rng: random.Random) -> float:
    """`seconds` +-10%, so that nodes started together do not stay in step."""
    return float(seconds * rng.uniform(0.9, 1.1))


def backoff(failures: int, interval: float, rng: random.Random) -> float:
    """Exponential from 5 s, never longer than the interval, jittered down to half."""
    ceiling = min(float(interval), BACKOFF_FIRST_S * 2 ** max(0, failures - 1))
    return float(ceiling * rng.uniform(0.5, 1.0))


def _config_api(host: Host, config: str) -> str | None:
    text = host.read_text(config, default="")
    if not text.strip():
        return None
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise HeartbeatError(f"{config} is not valid YAML: {e}", "re-run the install one-liner") from None
    api = data.get("api") if isinstance(data, dict) else None
    return api if isinstance(api, str) and api else None


def _check_answer(answer: Any) -> dict[str, Any]:
    try:
        checked = answers.heartbeat(answer)
    except answers.AnswerError as e:
        raise HeartbeatError(
            f"the control plane's answer to the heartbeat is not one this agent understands: {e}",
            "is the api in node-agent.yaml the control plane's URL?",
        ) from None
    # Shown in the journal, status.json and the doctor: a secret echoed in it goes no further.
    reason = checked.get("reason")
    checked["reason"] = redact(reason) if isinstance(reason, str) else None
    for unit in checked.get("withheld", ()):
        unit["reasons"] = [redact(r) for r in unit["reasons"]]
    return checked


@dataclass
class Agent:
    host: Host
    config: str = DEFAULT_CONFIG
    rng: random.Random = field(default_factory=random.Random)
    draining: bool = False
    # The node's clock, as the renewal schedule reads it (tests move it to two thirds of a lifetime).
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
    _cpu: CpuSample | None = field(default=None, repr=False)
    _client: tuple[Path, ApiClient] | None = field(default=None, repr=False)

    # --- one heartbeat --------------------------------------------------------------------------

    def api_url(self, ident: Identity, settings: Settings | None = None) -> str:
        url = _config_api(self.host, self.config) or ident.api or (settings or load_settings(self.host)).api
        if not url:
            raise HeartbeatError(f"no control plane URL in {self.config}", "re-run the install one-liner")
        return url

    def renewer(self) -> Renewer:
        return Renewer(self.host, self.api_url, timeout=REQUEST_TIMEOUT_S, rng=self.rng, now=self.now)

    def _api(self, ident: Identity, settings: Settings) -> ApiClient:
        url = self.api_url(ident, settings)
        # The identity directory is a symlink switched at re-enrollment: a new target, a new client.
        where = ident.path.resolve()
        if self._client is not None and self._client[0] == where and self._client[1].base_url == url:
            return self._client[1]
        self.close()
        client = ApiClient(
            url,
            pinned_ca=ident.ca_file,
            client_cert=ClientCert(ident.cert_file, ident.key_file),
            timeout=REQUEST_TIMEOUT_S,
            attempts=1,
            user_agent=f"vectorlay-node-agent/{__version__}",
            # The unit's environment (proxy.env, written by the install run) or node.yaml's proxy.
            proxy=proxy_from_env(fallback=settings.proxy),
        )
        self._client = (where, client)
        return client

    def close(self) -> None:
        if self._client is not None:
            self._client[1].close()
            self._client = None

    def body(self, settings: Settings) -> dict[str, Any]:
        from doctor.checks import run_checks
        from doctor.render import to_json

        # This run's AER counts are the next heartbeat's baseline ("grew since the last run").
        report = run_checks(self.host, settings, record=True)
        report = report._replace(results=tuple(r for r in report.results if r.name != _OWN_CHECK))
        resources, self._cpu = read_resources(self.host, settings.disk_path, self._cpu)
        return {
            "doctor": to_json(report),
            "resources": {**resources, "thresholds": settings.thresholds},
            "agents": {name: artifacts.current_version(self.host, name) for name in SERVICES},
            "draining": self.draining,
            "interval_s": settings.advertise_interval,
        }

    def heartbeat(self) -> dict[str, Any]:
        """Deliver one heartbeat and record the answer in status.json; HeartbeatError when not."""
        started = time.time()
        settings = load_settings(self.host)
        try:
            ident = load_identity(self.host)
        except VectorlayError as e:
            raise HeartbeatError(e.message, e.hint) from None
        if ident is None:
            raise HeartbeatError("this node is not enrolled yet", "run the install one-liner")
        previous = read_status(self.host) or {}
        try:
            body = self.body(settings)
            client = self._api(ident, settings)
            token = ident.node_token()
            hold_secret(token)  # redacted by value from every line and file, should an answer echo it
            try:
                answer = _check_answer(client.request("POST", HEARTBEAT_PATH, json=body, bearer=token))
            except VectorlayError:
                # A connection in an unknown state is not reused.
                self.close()
                raise
        except VectorlayError as e:
            self._record(
                {
                    **previous,
                    "last_attempt_at": iso(started),
                    "last_error": e.message,
                    "node_id": ident.node_id,
                }
            )
            raise HeartbeatError(e.message, e.hint) from None
        status = {
            **answer,
            "node_id": ident.node_id,
            "heartbeat_at": iso(started),
            "interval_s": settings.advertise_interval,
            "draining": self.draining,
            "verdict": body["doctor"]["verdict"],
            "gpu_units_ready": body["doctor"]["gpu_units"]["ready"],
            "last_attempt_at": iso(started),
            "last_error": None,
        }
        self._record(status)
        return status

    def _record(self, status: dict[str, Any]) -> None:
        try:
            write_status(self.host, status)
        except OSError as e:
            log.warning("cannot write the status file: %s", e.strerror or e)


def describe(status: dict[str, Any]) -> str:
    """One log line for a delivered heartbeat."""
    if status["status"] == "removed":
        return (
            "the control plane says this node was removed: nothing is advertised "
            "(re-run the install one-liner with a new token to bring it back)"
        )
    line = f"{status['status']}, {status['advertised_units']} GPU unit(s) advertised"
    if status.get("reason"):
        line += f" ({status['reason']})"
    withheld = status.get("withheld") or []
    if withheld:
        # One line however many: the first reasons of the first units, then how many more.
        shown = [f"{u['id']} ({'; '.join(u['reasons'][:2]) or 'no reason given'})" for u in withheld[:4]]
        more = f" and {len(withheld) - 4} more" if len(withheld) > 4 else ""
        line += f"; withheld: {', '.join(shown)}{more}"
    return line


class HealthServer:
    """Answers `ok|draining|drained node-agent <version> <pid>` on the health socket."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.state = "ok"
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        path = self.host.path(HEALTH_SOCKET)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in (path, self.host.path(DRAINED_FILE)):
            stale.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="health", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, InterruptedError):
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(f"{self.state} {NAME} {__version__} {os.getpid()}\n".encode())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
        self.host.path(HEALTH_SOCKET).unlink(missing_ok=True)


@dataclass
class Daemon:
    """The service: heartbeats every interval until SIGTERM, draining on SIGUSR1."""

    agent: Agent
    wait: Callable[[threading.Event, float], bool] = lambda ev, t: ev.wait(t)
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: bool = False
    _drain_requested: bool = False
    _in_flight: bool = False

    def _on_term(self, signum: int, _frame: FrameType | None) -> None:
        self._stop = True
        self._wake.set()
        if self._in_flight:
            raise _Terminate

    def _on_usr1(self, signum: int, _frame: FrameType | None) -> None:
        self._drain_requested = True
        self._wake.set()

    def _beat(self) -> dict[str, Any] | None:
        self._in_flight = True
        try:
            status = self.agent.heartbeat()
        except HeartbeatError as e:
            log.warning("heartbeat not delivered: %s", e.message)
            return None
        except Exception as e:  # the agent outlives its own bugs; the journal gets one line
            log.error("heartbeat failed: %s: %s", type(e).__name__, redact(str(e)))
            return None
        finally:
            self._in_flight = False
        log.info("heartbeat: %s", describe(status))
        return status

    def run(self) -> int:
        host = self.agent.host
        renewer = self.agent.renewer()
        health = HealthServer(host)
        health.start()
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        log.info("vectorlay-node-agent %s started (pid %d)", __version__, os.getpid())
        failures = 0
        try:
            while not self._stop:
                if self._drain_requested and not self.agent.draining:
                    self.agent.draining = True
                    health.state = "draining"
                    log.info("draining: telling the control plane to stop advertising this node")
                    self._beat()
                    drained = host.path(DRAINED_FILE)
                    drained.parent.mkdir(parents=True, exist_ok=True)
                    drained.write_text(f"{__version__}\n")
                    health.state = "drained"
                    log.info("drained")
                    failures = 0
                    delay = self._interval()
                else:
                    if renewer.tick() is not None:
                        self.agent.close()  # the next heartbeat goes out with the new identity
                    status = self._beat()
                    failures = 0 if status is not None else failures + 1
                    interval = self._interval()
                    delay = (
                        jittered(interval, self.agent.rng)
                        if status
                        else backoff(failures, interval, self.agent.rng)
                    )
                    if failures:
                        log.info("next attempt in %.1f s", delay)
                self._wake.clear()
                if self._stop or (self._drain_requested and not self.agent.draining):
                    continue
                self.wait(self._wake, delay)
        except _Terminate:
            pass
        finally:
            health.stop()
            self.agent.close()
        log.info("stopped")
        return 0

    def _interval(self) -> float:
        try:
            return float(load_settings(self.agent.host).advertise_interval)
        except VectorlayError:
            return float(Settings().advertise_interval)
