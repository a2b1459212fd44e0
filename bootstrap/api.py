"""The control plane's HTTP client, as the node sees it (docs/contracts.md#control-plane-api).

TLS is always verified: against `--ca-file` when given, else the system trust store plus the CA
pinned at the first enrollment. There is deliberately no way to turn verification off.
Network errors, failed handshakes, expired deadlines and 5xx answers are retried with exponential
backoff; then, and for every 4xx, the caller gets a VectorlayError worded as the provider
documentation's troubleshooting table.

The transport is this module's own, on the standard library's public socket, ssl and http.client
APIs, because the node treats every answer as bad input and requests cannot bound one:
- every request has one overall deadline (connect, proxy CONNECT, handshake, request, answer), not
  a timeout per read that a server dripping a byte at a time renews forever;
- every answer has a size limit, counted on the wire as it is read;
- no redirect is followed: a 3xx is an error naming its Location, so a credential is never re-sent
  to another origin or in clear text;
- one connection per request (`Connection: close`) and a full handshake each time: no TLS session
  is resumed, so nothing reaches into the ssl module past its public API;
- a proxy is taken from `https_proxy`/`HTTPS_PROXY` and `no_proxy`/`NO_PROXY` only (or node.yaml's
  `proxy:`), never the rest of the environment (no CA bundle, no .netrc), and is spoken to with
  CONNECT alone: the TLS session, its verification and the client certificate are end to end.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json as jsonlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from bootstrap.errors import VectorlayError

log = logging.getLogger(__name__)

TOKEN_HINT = "ask for a new one in the dashboard"
NETWORK_HINT = "check the node's outbound HTTPS (443) to the API and re-run; the node's state is unchanged"
# An answer the API sends is a few KB (the enrollment answer, with its certificates, ~20 KB).
MAX_ANSWER_BYTES = 4 << 20
# An artifact's deadline grows with its size at this rate, over the request deadline.
MIN_DOWNLOAD_RATE = 256 << 10
# The header block of a proxy's answer to CONNECT.
MAX_CONNECT_REPLY = 16 << 10
# All attempts of one request together take at most this many times one attempt's deadline.
MAX_ATTEMPTS_TIME = 3
REDIRECT_HINT = "pass the control plane's own https:// URL as api= (the node follows no redirect)"


class ApiError(VectorlayError):
    """A definitive answer from the control plane (4xx), or one that stayed bad after retries."""

    def __init__(
        self, message: str, hint: str | None, *, status: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, hint)
        self.status = status
        self.code = code


class _Expired(Exception):
    """The request's overall deadline passed."""


class _TooLarge(Exception):
    """The answer went past its size limit."""


class _HandshakeFailed(Exception):
    """The TLS handshake did not complete (for a reason other than the certificate)."""


class _ProxyRefused(Exception):
    """The proxy answered CONNECT with something other than 2xx."""


def _shown(text: str, limit: int = 200) -> str:
    """Untrusted text (a Location, a proxy's reason) as it may be printed: bounded, no control characters."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "")


# --- proxies ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy reached with CONNECT, and the hosts that bypass it (curl's `no_proxy` rules:
    `*` for every host; a name matches itself and its subdomains, a leading dot optional; an IP
    address or a CIDR network matches the addresses in it)."""

    host: str
    port: int
    url: str  # without credentials: what messages show
    authorization: str | None = None
    no_proxy: str = ""
    given: str = ""  # the URL as given (credentials included): what the agents' environment gets

    def bypassed(self, host: str) -> bool:
        name = host.lower().rstrip(".").strip("[]")
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
        except ValueError:
            address = None
        for raw in self.no_proxy.split(","):
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            if entry == "*":
                return True
            if address is not None:
                try:
                    if address in ipaddress.ip_network(entry.strip("[]"), strict=False):
                        return True
                except ValueError:
                    pass
                continue
            entry = entry.lstrip(".")
            if name == entry or name.endswith("." + entry):
                return True
        return False


def parse_proxy(url: str, no_proxy: str = "", *, source: str = "https_proxy") -> Proxy:
    """`http://[user:password@]host[:port]` (curl's default scheme and port 1080 when omitted)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port or 1080
    except ValueError:
        parts, port = None, 0
    if parts is None or not parts.hostname:
        raise VectorlayError(f"{source}={_shown(url)!r} is not a proxy URL", "use http://host:port")
    if parts.scheme != "http":
        raise VectorlayError(
            f"{source}={_shown(url)!r}: only http:// proxies (spoken to with CONNECT) are supported",
            "use http://host:port",
        )
    auth = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode()
    shown = f"http://{parts.hostname}:{port}"
    return Proxy(parts.hostname, port, shown, auth, no_proxy, url.strip())


def proxy_from_env(environ: Mapping[str, str] | None = None, fallback: str | None = None) -> Proxy | None:
    """The proxy for HTTPS as the environment gives it (lower case first, as curl reads it), else
    `fallback` (node.yaml's `proxy:`); `no_proxy` exactly as given."""
    env = os.environ if environ is None else environ
    for name in ("https_proxy", "HTTPS_PROXY"):
        if env.get(name, "").strip():
            source, url = name, env[name]
            break
    else:
        if not fallback:
            return None
        source, url = "proxy", fallback
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    return parse_proxy(url, no_proxy, source=source)


_FROM_ENV: Any = object()


# --- one exchange -------------------------------------------------------------------------------


class _Wire(io.RawIOBase):
    """The answer as it comes off a socket: each read waits at most until the deadline, and the
    bytes read are counted against the limit before anything is parsed from them."""

    def __init__(self, sock: socket.socket, deadline: float, limit: int) -> None:
        self.sock = sock
        self.deadline = deadline
        self.limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.sock.settimeout(_remaining(self.deadline))
        try:
            n = self.sock.recv_into(buffer)
        except TimeoutError:
            raise _Expired from None
        self.count += n
        if self.count > self.limit:
            raise _TooLarge
        return n

    def makefile(self, mode: str) -> io.BufferedReader:
        # http.client.HTTPResponse reads its socket through makefile("rb").
        return io.BufferedReader(self, 1 << 16)


def _open(where: tuple[str, int], deadline: float) -> socket.socket:
    """socket.create_connection with the name lookup inside the deadline too: getaddrinfo takes no
    timeout, so a name is looked up in a daemon thread, left behind if the resolver hangs."""
    host, port = where
    try:
        ipaddress.ip_address(host)
        found: list[Any] = [socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    except ValueError:
        found = []
        done = threading.Event()

        def lookup() -> None:
            try:
                found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
            except OSError as e:
                found.append(e)
            finally:
                done.set()

        threading.Thread(target=lookup, name="vectorlay-resolve", daemon=True).start()
        if not done.wait(_remaining(deadline)):
            raise _Expired from None
    if isinstance(found[0], OSError):
        raise found[0]
    error: OSError = OSError(f"{host} has no address")
    for family, kind, proto, _, address in found[0]:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(address)
            return sock
        except TimeoutError:
            sock.close()
            raise _Expired from None
        except OSError as e:
            sock.close()
            error = e
        except BaseException:
            sock.close()
            raise
    raise error


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Expired
    return left


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    prefix: str  # the path of the base URL, without its trailing slash

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 443 else f"{host}:{self.port}"


def _target(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError:
        parts, port = None, 0
    if parts is None or parts.scheme != "https" or not parts.hostname:
        raise VectorlayError(
            f"control plane URL {_shown(url)!r} is not https://host[:port][/path]",
            "the API is only spoken over HTTPS; pass --api https://...",
        )
    return _Target(parts.hostname, port, parts.path.rstrip("/"))


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
        proxy: Proxy | None = _FROM_ENV,
        max_answer: int = MAX_ANSWER_BYTES,
        user_agent: str = "vectorlay-bootstrap",
    ) -> None:
        """`timeout`: the overall deadline of one attempt (connection, handshake and whole answer).
        `node_token`: sent as the bearer of every request to this control plane that names no
        other (the node endpoints want it with the client certificate), never to another host.
        `proxy`: by default the environment's (`proxy_from_env`); None for a direct connection."""
        self._target = _target(base_url)
        self.base_url = base_url.rstrip("/")
        self.ca_file = ca_file
        self.pinned_ca = pinned_ca
        self.client_cert = client_cert
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.sleep = sleep
        self.node_token = node_token
        self.proxy: Proxy | None = proxy_from_env() if proxy is _FROM_ENV else proxy
        self.max_answer = max_answer
        self.user_agent = user_agent
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
            proxy=self.proxy,
            max_answer=self.max_answer,
            user_agent=self.user_agent,
        )

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is not None:
            return self._ssl_context
        try:
            if self.ca_file is not None:
                # --ca-file names the one CA to trust, as for a private deployment.
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies peer and hostname
                ctx.load_verify_locations(cafile=str(self.ca_file))
            else:
                # The system trust store, as ssl.create_default_context has it, without the flags
                # (VERIFY_X509_STRICT) that context gains on newer Pythons: one behaviour on all.
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
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
        self._ssl_context = ctx
        return ctx

    def close(self) -> None:
        """Nothing stays open between requests; kept for the callers that close a client."""

    # --- the wire -------------------------------------------------------------------------------

    def _connect(self, target: _Target, deadline: float) -> ssl.SSLSocket:
        ctx = self._context()
        proxy = self.proxy if self.proxy is not None and not self.proxy.bypassed(target.host) else None
        where = (proxy.host, proxy.port) if proxy is not None else (target.host, target.port)
        raw = _open(where, deadline)
        try:
            if proxy is not None:
                _tunnel(raw, proxy, target, deadline)
            tls = ctx.wrap_socket(raw, server_hostname=target.host, do_handshake_on_connect=False)
        except BaseException:
            raw.close()
            raise
        try:
            # One timeout for the whole handshake: the ssl module keeps it as a deadline.
            tls.settimeout(_remaining(deadline))
            tls.do_handshake()
        except TimeoutError:
            tls.close()
            raise _Expired from None
        except ssl.SSLCertVerificationError:
            tls.close()
            raise
        except OSError as e:
            # Closed, reset, an alert, not TLS at all: the peer, or something between, is not the
            # control plane at this moment. Said as what it is, and retried.
            tls.close()
            raise _HandshakeFailed(f"{type(e).__name__}: {_short(e)}") from None
        except BaseException:
            tls.close()
            raise
        return tls

    @contextmanager
    def _exchange(
        self,
        method: str,
        target: _Target,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
        *,
        deadline: float,
        limit: int,
    ) -> Iterator[http.client.HTTPResponse]:
        lines = [
            f"{method} {target.prefix}{path} HTTP/1.1",
            f"Host: {target.authority}",
            f"User-Agent: {self.user_agent}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
        tls = self._connect(target, deadline)
        try:
            tls.settimeout(_remaining(deadline))
            tls.sendall(request)
            wire = _Wire(tls, deadline, limit)
            resp = http.client.HTTPResponse(wire, method=method)  # type: ignore[arg-type]
            resp.begin()
            if resp.length is not None and resp.length > limit:
                raise _TooLarge
            yield resp
        finally:
            tls.close()

    def _attempts(
        self,
        method: str,
        url: str,
        run: Callable[[], Any],
        *,
        attempts: int,
        limit: int,
        per_attempt: float,
    ) -> Any:
        """`run` once per attempt, retrying what a later attempt can cure, for as long as all of them
        fit in three attempts' deadlines: a server that answers nothing costs at most that."""
        last = ""
        started = time.monotonic()
        made = 0
        for attempt in range(1, attempts + 1):
            made = attempt
            try:
                return run()
            except ssl.SSLCertVerificationError as e:
                # A certificate that does not verify will not verify on the next attempt either.
                raise _tls_error(url, e, self.ca_file, self.proxy) from None
            except _TooLarge:
                raise ApiError(
                    f"{method} {url}: the answer is larger than {limit} bytes",
                    "is --api the control plane's URL? (the node reads no answer that large)",
                ) from None
            except _Expired:
                last = f"{method} {url}: no complete answer within {self.timeout:g}s"
            except _ProxyRefused as e:
                last = f"{method} {url}: {e}"
            except _HandshakeFailed as e:
                last = f"TLS handshake with {url} failed: {e}"
            except (OSError, http.client.HTTPException) as e:
                last = f"could not reach {url}: {type(e).__name__}: {_short(e)}"
            except _Retry as e:
                last = e.message
            if attempt < attempts:
                delay = self.backoff * (2 ** (attempt - 1))
                if time.monotonic() - started + delay + per_attempt > MAX_ATTEMPTS_TIME * per_attempt:
                    break
                log.warning("%s; retrying in %.1fs (attempt %d of %d)", last, delay, attempt, attempts)
                self.sleep(delay)
        raise ApiError(f"{last} (gave up after {made} attempt(s))", NETWORK_HINT)

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
        body = None if json is None else jsonlib.dumps(json).encode()

        def once() -> Any:
            deadline = time.monotonic() + self.timeout
            with self._exchange(
                method, self._target, path, headers, body, deadline=deadline, limit=self.max_answer
            ) as resp:
                _refuse_redirect(method, url, resp)
                data = resp.read()
            if resp.status >= 500:
                raise _Retry(f"{method} {url} returned {resp.status}{_server_message(data)}")
            return _answer(method, url, resp.status, data)

        return self._attempts(
            method,
            url,
            once,
            attempts=self.attempts if retry else 1,
            limit=self.max_answer,
            per_attempt=self.timeout,
        )

    @contextmanager
    def stream(self, url: str, *, size: int | None = None) -> Iterator[Iterable[bytes]]:
        """GET an artifact (absolute https:// URL, or a path on the control plane) and yield its body
        in chunks: at most `size` bytes (the manifest's), within a deadline that grows with it.

        Connection errors and 5xx before the body starts are retried like `request`; the caller
        verifies what arrives against the signed manifest, so a broken body is caught there.
        """
        if "://" in url:
            target = _target(url)
            parts = urlsplit(url)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            full = url
            target = _Target(target.host, target.port, "")
        else:
            target, path, full = self._target, url, self.base_url + url
        headers = {}
        same_origin = (target.host, target.port) == (self._target.host, self._target.port)
        if self.node_token is not None and same_origin:
            headers["Authorization"] = f"Bearer {self.node_token}"
        limit = (size if size is not None else self.max_answer) + MAX_CONNECT_REPLY
        budget = self.timeout + (size or 0) / MIN_DOWNLOAD_RATE
        opened: list[Any] = []

        def once() -> Any:
            deadline = time.monotonic() + budget
            cm = self._exchange("GET", target, path, headers, None, deadline=deadline, limit=limit)
            resp = cm.__enter__()
            try:
                _refuse_redirect("GET", full, resp)
                if resp.status != 200:
                    data = resp.read(MAX_CONNECT_REPLY)
                    message = f"GET {full} returned {resp.status}{_server_message(data)}"
                    if resp.status >= 500:
                        raise _Retry(message)
                    raise ApiError(f"{message} (502 ARTIFACT)", STALE_HINT, status=resp.status)
            except BaseException:
                cm.__exit__(None, None, None)
                raise
            opened.append(cm)
            return resp

        try:
            resp = self._attempts("GET", full, once, attempts=self.attempts, limit=limit, per_attempt=budget)
        except ApiError as e:
            if e.status is not None:  # an answer (a redirect, a 4xx): already said as it is
                raise
            raise ApiError(f"{e.message} (502 ARTIFACT)", STALE_HINT) from None
        try:
            yield _chunks(resp, full, budget, size)
        finally:
            opened[0].__exit__(None, None, None)


STALE_HINT = "a stale artifact — re-run; artifacts are re-fetched and verified each run"


class _Retry(Exception):
    """An answer a later attempt may cure (5xx)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _chunks(resp: http.client.HTTPResponse, url: str, budget: float, size: int | None) -> Iterator[bytes]:
    try:
        while chunk := resp.read(1 << 16):
            yield chunk
    except _Expired:
        raise ApiError(f"the download of {url} did not complete within {budget:.0f}s", STALE_HINT) from None
    except _TooLarge:
        raise ApiError(
            f"the download of {url} is larger than the {size} bytes announced", STALE_HINT
        ) from None
    except (OSError, http.client.HTTPException) as e:
        raise ApiError(
            f"the download of {url} broke off: {type(e).__name__}: {_short(e)}", STALE_HINT
        ) from None


def _tunnel(sock: socket.socket, proxy: Proxy, target: _Target, deadline: float) -> None:
    """Ask the proxy for a tunnel (RFC 9110 section 9.3.6): any 2xx opens it; its header block is
    read byte by byte so that no byte of the TLS session behind it is consumed here."""
    authority = f"[{target.host}]:{target.port}" if ":" in target.host else f"{target.host}:{target.port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization is not None:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    sock.settimeout(_remaining(deadline))
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    reply = bytearray()
    while not reply.endswith(b"\r\n\r\n"):
        sock.settimeout(_remaining(deadline))
        try:
            byte = sock.recv(1)
        except TimeoutError:
            raise _Expired from None
        if not byte:
            raise _ProxyRefused(f"the proxy {proxy.url} closed the connection instead of answering CONNECT")
        reply += byte
        if len(reply) > MAX_CONNECT_REPLY:
            raise _ProxyRefused(
                f"the proxy {proxy.url} answered CONNECT with more than {MAX_CONNECT_REPLY} bytes"
            )
    status_line = bytes(reply).split(b"\r\n", 1)[0].decode("latin-1")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
        raise _ProxyRefused(f"the proxy {proxy.url} answered CONNECT with {_shown(status_line, 80)!r}")
    if not 200 <= int(fields[1]) < 300:
        raise _ProxyRefused(
            f"the proxy {proxy.url} refused CONNECT {authority}: {_shown(status_line, 120)}"
            + (" (it wants credentials: http://user:password@host:port)" if fields[1] == "407" else "")
        )


def _refuse_redirect(method: str, url: str, resp: http.client.HTTPResponse) -> None:
    if 300 <= resp.status < 400:
        location = resp.getheader("Location") or ""
        raise ApiError(
            f"{method} {url} answered {resp.status} redirecting to {_shown(location)!r}: "
            "the node follows no redirect",
            REDIRECT_HINT,
            status=resp.status,
        )


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return _shown(text, 300)


def _server_message(data: bytes) -> str:
    try:
        err = jsonlib.loads(data)["error"]
        return f": {_shown(str(err['code']), 80)}: {_shown(str(err['message']))}"
    except (ValueError, KeyError, TypeError, RecursionError):
        return ""


def _tls_error(url: str, e: Exception, ca_file: Path | None, proxy: Proxy | None) -> VectorlayError:
    text = _short(e)
    if ca_file:
        hint = "the server's certificate did not verify against --ca-file (wrong CA file, or a wrong clock)"
    else:
        hint = "pass --ca-file with the control plane's CA (the reference one writes <state-dir>/ca.crt)"
    if proxy is not None and not proxy.bypassed(_target(url).host):
        hint = (
            f"the proxy {proxy.url} may be intercepting TLS: the node trusts only the control plane's "
            "certificate, so allow CONNECT to it without inspection (or add its host to no_proxy); "
            "else " + hint
        )
    return VectorlayError(f"TLS verification of {url} failed: {text}", hint)


def not_a_provider(url: str | None) -> ApiError:
    """The documentation's 403 NOT_A_PROVIDER, from an answer or from token introspection."""
    return ApiError(
        f"{url}: 403 NOT_A_PROVIDER: this org isn't an approved provider yet",
        "ask vectorlay to approve your org as a provider, then re-run with a new token",
        status=403,
        code="NOT_A_PROVIDER",
    )


def _answer(method: str, url: str, status: int, data: bytes) -> Any:
    try:
        body = jsonlib.loads(data) if data else None
    except ValueError:
        body = None
    except RecursionError:
        # No answer of this API nests more than a few levels; json raises this past ~1000.
        raise ApiError(
            f"{method} {url} returned {status} with JSON nested too deep for an answer of this API",
            "is --api the control plane's URL?",
            status=status,
        ) from None
    if 200 <= status < 300:
        if body is None:
            raise ApiError(
                f"{method} {url} returned {status} without a JSON body",
                "is --api the control plane's URL?",
                status=status,
            )
        return body
    code = message = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code, message = body["error"].get("code"), body["error"].get("message")
        # Shown in messages and compared with known codes: strings, bounded, or nothing.
        code = code if isinstance(code, str) else None
        message = message if isinstance(message, str) else None
    detail = f" ({_shown(code, 80)}: {_shown(str(message))})" if code else ""
    if status == 401:
        raise ApiError(f"{url}: 401 bad, missing or expired token{detail}", TOKEN_HINT, status=401, code=code)
    if status == 403 and code == "NOT_A_PROVIDER":
        raise not_a_provider(url)
    if status == 403 and code == "NODE_REMOVED":
        raise ApiError(
            f"{url}: 403 NODE_REMOVED: this node was decommissioned by its provider",
            "to bring it back, re-run the install one-liner with a new provisioning token",
            status=403,
            code=code,
        )
    raise ApiError(
        f"{method} {url} returned {status}{detail}",
        None,
        status=status,
        code=code,
    )
