"""The control plane's HTTP client, as the node sees it (docs/contracts.md#control-plane-api).

TLS is always verified: against `--ca-file` when given, else the system trust store plus the CA
pinned at the first enrollment. There is deliberately no way to turn verification off.
Network errors and 5xx answers are retried with exponential backoff; then, and for every 4xx, the
caller gets a VectorlayError worded as the provider documentation's troubleshooting table.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from bootstrap.errors import VectorlayError

log = logging.getLogger(__name__)

TOKEN_HINT = "ask for a new one in the dashboard"


class ApiError(VectorlayError):
    """A definitive answer from the control plane (4xx), or one that stayed bad after retries."""

    def __init__(
        self, message: str, hint: str | None, *, status: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, hint)
        self.status = status
        self.code = code


class _ResumingSocket(ssl.SSLSocket):
    resume_key: tuple[str | None, Any] | None = None

    def close(self) -> None:
        context = self.context
        if isinstance(context, _ResumingContext):
            context.keep_session(self)
        super().close()


class _ResumingContext(ssl.SSLContext):
    """A client context that offers each new connection the TLS session of the last one to the same
    server, so a node's heartbeat, which finds its keep-alive connection long closed by the server,
    resumes (TLS 1.3 ticket: no certificate chain to verify, no signatures) instead of making a full
    mTLS handshake.

    The server still knows the node by its certificate, which it keeps with the session the ticket
    names, and still checks the node token on every request. A session is offered only to
    the host name and address it came from, and dies with this context, so a new client certificate
    (re-enrollment builds a new ApiClient) never rides on an old session.
    """

    sslsocket_class = _ResumingSocket
    _sessions: dict[tuple[str | None, Any], ssl.SSLSession]
    resumed: int  # connections that resumed a session (tests, debugging)

    def __new__(cls, protocol: int = ssl.PROTOCOL_TLS_CLIENT, *args: Any, **kwargs: Any) -> _ResumingContext:
        self = super().__new__(cls, protocol, *args, **kwargs)
        self._sessions = {}
        self.resumed = 0
        return self

    def keep_session(self, sock: _ResumingSocket) -> None:
        # At the close, not after the handshake: TLS 1.3 tickets arrive after it, with the answer.
        session = sock.session
        if sock.resume_key is not None and session is not None:
            self._sessions[sock.resume_key] = session

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        key = None
        if kwargs.get("session") is None and not kwargs.get("server_side"):
            try:
                key = (kwargs.get("server_hostname"), sock.getpeername())
            except (OSError, AttributeError):
                key = None
            if key is not None:
                kwargs["session"] = self._sessions.get(key)
        wrapped = super().wrap_socket(sock, *args, **kwargs)
        if isinstance(wrapped, _ResumingSocket):
            wrapped.resume_key = key
        if wrapped.session_reused:
            self.resumed += 1
        return wrapped


class _ContextAdapter(HTTPAdapter):
    """Hands urllib3 our own SSLContext (trust set and client certificate) for every connection."""

    def __init__(self, context: ssl.SSLContext, **kwargs: Any) -> None:
        self._context = context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # requests would add certifi's bundle to our context here; the trust set is ours alone.
        conn.cert_reqs = "CERT_REQUIRED"


@dataclass(frozen=True)
class ClientCert:
    cert_file: Path
    key_file: Path


class ApiClient:
    def __init__(
        self,
        base_url: str,
        *,
        ca_file: Path | None = None,
        pinned_ca: Path | None = None,
        client_cert: ClientCert | None = None,
        timeout: float = 30.0,
        attempts: int = 5,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        node_token: str | None = None,
    ) -> None:
        """`node_token`: sent as the bearer of every request to this control plane that names no
        other (the node endpoints want it with the client certificate), never to another host."""
        if not base_url.startswith("https://"):
            raise VectorlayError(
                f"control plane URL {base_url!r} is not https://",
                "the API is only spoken over HTTPS; pass --api https://...",
            )
        self.base_url = base_url.rstrip("/")
        self.ca_file = ca_file
        self.pinned_ca = pinned_ca
        self.client_cert = client_cert
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.sleep = sleep
        self.node_token = node_token
        self._session: requests.Session | None = None
        self._ssl_context: ssl.SSLContext | None = None

    def with_client_cert(self, client_cert: ClientCert | None) -> ApiClient:
        return ApiClient(
            self.base_url,
            ca_file=self.ca_file,
            pinned_ca=self.pinned_ca,
            client_cert=client_cert,
            timeout=self.timeout,
            attempts=self.attempts,
            backoff=self.backoff,
            sleep=self.sleep,
        )

    def _context(self) -> ssl.SSLContext:
        try:
            if self.ca_file is not None:
                # --ca-file names the one CA to trust, as for a private deployment.
                ctx = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies peer and hostname
                ctx.load_verify_locations(cafile=str(self.ca_file))
            else:
                # ssl.create_default_context(Purpose.SERVER_AUTH), on a context that resumes.
                ctx = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
                if self.pinned_ca is not None and self.pinned_ca.exists():
                    ctx.load_verify_locations(cafile=str(self.pinned_ca))
        except (OSError, ssl.SSLError) as e:
            raise VectorlayError(
                f"cannot load the CA certificate {self.ca_file or self.pinned_ca}: {e}",
                "pass --ca-file with the control plane's CA certificate (PEM)",
            ) from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.client_cert is not None:
            try:
                ctx.load_cert_chain(str(self.client_cert.cert_file), str(self.client_cert.key_file))
            except (OSError, ssl.SSLError) as e:
                raise VectorlayError(
                    f"cannot load the node's certificate {self.client_cert.cert_file}: {e}",
                    "re-run enrollment with a new token",
                ) from None
        return ctx

    def session(self) -> requests.Session:
        if self._session is None:
            s = requests.Session()
            s.trust_env = False  # no proxy or CA-bundle environment overrides the verification set here
            self._ssl_context = self._context()
            s.mount("https://", _ContextAdapter(self._ssl_context))
            s.headers["User-Agent"] = "vectorlay-bootstrap"
            self._session = s
        return self._session

    @property
    def resumed_connections(self) -> int:
        """How many of this client's connections resumed a TLS session instead of a full handshake."""
        ctx = self._ssl_context
        return ctx.resumed if isinstance(ctx, _ResumingContext) else 0

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        bearer: str | None = None,
        retry: bool = True,
    ) -> Any:
        """JSON in, JSON out. `bearer` goes in the Authorization header, never in the URL."""
        url = self.base_url + path
        headers = {"Accept": "application/json"}
        bearer = bearer if bearer is not None else self.node_token
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        attempts = self.attempts if retry else 1
        last: str = ""
        for attempt in range(1, attempts + 1):
            try:
                resp = self.session().request(
                    method, url, json=json, headers=headers, timeout=self.timeout, verify=True
                )
            except requests.exceptions.SSLError as e:
                # A certificate that does not verify will not verify on the next attempt either.
                raise _tls_error(url, e, self.ca_file) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
                last = f"could not reach {url}: {_short(e)}"
            else:
                if resp.status_code < 500:
                    return _answer(method, url, resp)
                last = f"{method} {url} returned {resp.status_code}{_server_message(resp)}"
            if attempt < attempts:
                delay = self.backoff * (2 ** (attempt - 1))
                log.warning("%s; retrying in %.1fs (attempt %d of %d)", last, delay, attempt, attempts)
                self.sleep(delay)
        raise ApiError(
            f"{last} (gave up after {attempts} attempt(s))",
            "check the node's outbound HTTPS (443) to the API and re-run; the node's state is unchanged",
        )

    @contextmanager
    def stream(self, url: str) -> Iterator[Iterable[bytes]]:
        """GET an artifact (absolute URL, or a path on the control plane) and yield its body in chunks.

        Connection errors and 5xx before the body starts are retried like `request`; the caller
        verifies what arrives against the signed manifest, so a broken body is caught there.
        """
        full = url if url.startswith("https://") else self.base_url + url
        headers = {}
        if self.node_token is not None and full.startswith(self.base_url + "/"):
            headers["Authorization"] = f"Bearer {self.node_token}"
        last = ""
        for attempt in range(1, self.attempts + 1):
            try:
                resp = self.session().get(
                    full, stream=True, timeout=self.timeout, verify=True, headers=headers
                )
            except requests.exceptions.SSLError as e:
                raise _tls_error(full, e, self.ca_file) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
                last = f"could not reach {full}: {_short(e)}"
            else:
                if resp.status_code == 200:
                    try:
                        yield resp.iter_content(1 << 16)
                    except (
                        requests.exceptions.ConnectionError,
                        requests.exceptions.ChunkedEncodingError,
                    ) as e:
                        raise ApiError(
                            f"the download of {full} broke off: {_short(e)}",
                            "a stale artifact — re-run; artifacts are re-fetched and verified each run",
                        ) from None
                    finally:
                        resp.close()
                    return
                last = f"GET {full} returned {resp.status_code}{_server_message(resp)}"
                resp.close()
                if resp.status_code < 500:
                    break
            if attempt < self.attempts:
                self.sleep(self.backoff * (2 ** (attempt - 1)))
        raise ApiError(
            f"{last} (502 ARTIFACT)",
            "a stale artifact — re-run; artifacts are re-fetched and verified each run",
        )


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) < 300 else text[:300] + "..."


def _server_message(resp: requests.Response) -> str:
    try:
        err = resp.json()["error"]
        return f": {str(err['code'])[:64]}: {str(err['message'])[:300]}"
    except (ValueError, KeyError, TypeError, RecursionError):
        return ""


def _tls_error(url: str, e: Exception, ca_file: Path | None) -> VectorlayError:
    text = _short(e)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        hint = (
            "the server's certificate did not verify against --ca-file (wrong CA file, or a wrong clock)"
            if ca_file
            else "pass --ca-file with the control plane's CA (the reference one writes <state-dir>/ca.crt)"
        )
        return VectorlayError(f"TLS verification of {url} failed: {text}", hint)
    return VectorlayError(
        f"TLS connection to {url} failed: {text}",
        "the control plane refused this node's client certificate or the connection; re-run enrollment",
    )


def not_a_provider(url: str | None) -> ApiError:
    """The documentation's 403 NOT_A_PROVIDER, from an answer or from token introspection."""
    return ApiError(
        f"{url}: 403 NOT_A_PROVIDER: this org isn't an approved provider yet",
        "ask vectorlay to approve your org as a provider, then re-run with a new token",
        status=403,
        code="NOT_A_PROVIDER",
    )


def _answer(method: str, url: str, resp: requests.Response) -> Any:
    try:
        body = resp.json()
    except ValueError:
        body = None
    except RecursionError:
        # No answer of this API nests more than a few levels; json raises this past ~1000.
        raise ApiError(
            f"{method} {url} returned {resp.status_code} with JSON nested too deep for an answer of this API",
            "is --api the control plane's URL?",
            status=resp.status_code,
        ) from None
    if resp.ok:
        if body is None:
            raise ApiError(
                f"{method} {url} returned {resp.status_code} without a JSON body",
                "is --api the control plane's URL?",
                status=resp.status_code,
            )
        return body
    code = message = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code, message = body["error"].get("code"), body["error"].get("message")
        # Shown in messages and compared with known codes: strings, bounded, or nothing.
        code = code[:64] if isinstance(code, str) else None
        message = message[:300] if isinstance(message, str) else None
    detail = f" ({code}: {message})" if code else ""
    if resp.status_code == 401:
        raise ApiError(f"{url}: 401 bad, missing or expired token{detail}", TOKEN_HINT, status=401, code=code)
    if resp.status_code == 403 and code == "NOT_A_PROVIDER":
        raise not_a_provider(url)
    if resp.status_code == 403 and code == "NODE_REMOVED":
        raise ApiError(
            f"{url}: 403 NODE_REMOVED: this node was decommissioned by its provider",
            "to bring it back, re-run the install one-liner with a new provisioning token",
            status=403,
            code=code,
        )
    raise ApiError(
        f"{method} {url} returned {resp.status_code}{detail}",
        None,
        status=resp.status_code,
        code=code,
    )
