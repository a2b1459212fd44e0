"""The HTTP face of the control plane (docs/contracts.md#control-plane-api), as a Flask application.

The TLS layer (server.py) has already verified any client certificate against the control plane's
CA and hands it over in the WSGI environ as `SSL_CLIENT_CERT` (PEM), the same variable Apache and
nginx set; nothing here trusts a certificate the TLS layer did not verify.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES

from controlplane.artifacts import ArtifactStore, register_artifacts
from controlplane.heartbeat import MAX_BODY_BYTES, list_provider_nodes, record_heartbeat
from controlplane.service import ApiError, ControlPlane

log = logging.getLogger("controlplane")


def _bearer() -> str | None:
    return _bearer_of(request.environ)


def _bearer_of(environ: dict[str, Any]) -> str | None:
    header = str(environ.get("HTTP_AUTHORIZATION", ""))
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _client_cert() -> str | None:
    return _client_cert_of(request.environ)


def _client_cert_of(environ: dict[str, Any]) -> str | None:
    if environ.get("SSL_CLIENT_VERIFY") != "SUCCESS":
        return None
    pem = environ.get("SSL_CLIENT_CERT")
    return pem if isinstance(pem, str) and pem else None


MAX_BODY = 1 << 20
HEARTBEAT_PATH = "/v1/node/heartbeat"
# The deepest legitimate body (enroll's hardware.units[].gpus[]) is 4 levels; the parser's own
# limit is Python's recursion limit, which a hostile body reaches on purpose.
MAX_DEPTH = 32


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any) -> int:
    """Nesting depth (a scalar is 1, a container one more than its deepest item), without recursion.
    Only containers go on the stack: a heartbeat is mostly scalars, and this runs on every one."""
    deepest, stack = 1, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            items: Any = item.values()
        elif isinstance(item, list):
            items = item
        else:
            continue
        if items and depth >= deepest:
            deepest = depth + 1
        stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))
    return deepest


def _json_body() -> Any:
    """The request's JSON body: 400 unless it is standard JSON of bounded depth, 413 past MAX_BODY."""
    if not request.is_json:
        raise ApiError(400, "BAD_REQUEST", "the body must be JSON (Content-Type: application/json)")
    return _parse_json(_read_body())


def _parse_json(raw: bytes) -> Any:
    """`raw` as standard JSON of bounded depth, or a 400 saying why not."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        body = None
        too_deep = True
    except ValueError as e:  # includes bad UTF-8 and integers too long to convert
        raise ApiError(400, "BAD_REQUEST", f"the body is not valid JSON ({_short(str(e))})") from None
    else:
        too_deep = _depth(body) > MAX_DEPTH
    if too_deep:
        raise ApiError(400, "BAD_REQUEST", f"the JSON body is nested more than {MAX_DEPTH} levels deep")
    return body


def _read_body() -> bytes:
    """The whole body, read until the end of the stream: a chunked body comes in pieces, and one
    read may return only the first. Past MAX_BODY: 413."""
    stream = request.stream  # 413 here already when Content-Length announces too much
    parts: list[bytes] = []
    total = 0
    while True:
        chunk = stream.read(1 << 16)
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if total > MAX_BODY:
            raise RequestEntityTooLarge()
        parts.append(chunk)


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:200] + "..."


def _has_node_credentials() -> bool:
    return _client_cert() is not None or _bearer() is not None


def create_app(
    cp: ControlPlane,
    artifacts_dir: Path | None = None,
    state_dir: Path | None = None,
    public_url: str | None = None,
) -> Flask:
    app = Flask("controlplane")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError) -> tuple[Response, int]:
        return jsonify(_error(e.code, e.message)), e.status

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(e: RequestEntityTooLarge) -> tuple[Response, int]:
        message = f"the request body is larger than the {MAX_BODY >> 20} MiB this API accepts"
        return jsonify(_error("PAYLOAD_TOO_LARGE", message)), 413

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> tuple[Response, int]:
        return jsonify(_http_error_body(e)), e.code or 500

    @app.errorhandler(Exception)
    def _internal(e: Exception) -> tuple[Response, int]:
        log.exception("internal error on %s %s", request.method, request.path)
        return jsonify(_INTERNAL), 500

    @app.post("/v1/provisioning-tokens")
    def create_token() -> Response:
        return jsonify(cp.api_create_token(_bearer()))

    @app.post("/v1/provisioning-tokens/introspect")
    def introspect() -> Response:
        body = _json_body()
        return jsonify(cp.introspect(body.get("token") if isinstance(body, dict) else None))

    store: ArtifactStore | None = None
    if state_dir is not None:
        from controlplane.artifacts import ManifestSerial, load_or_create_signing_key

        store = ArtifactStore(
            artifacts_dir,
            load_or_create_signing_key(state_dir),
            serials=ManifestSerial(state_dir),
            clock=cp.clock,
        )

    @app.post("/v1/nodes/enroll")
    def enroll() -> Response:
        result = cp.enroll(_json_body(), _client_cert(), _bearer())
        if store is not None:
            # The node pins the manifest key from here: an answer it got over the pinned TLS channel.
            result["manifest_keys"] = [store.public_pem]
        log.info(
            "enrolled node %s (org %s, %s)",
            result["node_id"],
            result["org_id"],
            "re-enrollment" if result["reenrolled"] else "new",
        )
        return jsonify(result)

    @app.get("/v1/node/self")
    def node_self() -> Response:
        return jsonify(cp.node_self(_client_cert(), _bearer()))

    @app.post("/v1/node/renew")
    def node_renew() -> Response:
        result = cp.renew(_json_body(), _client_cert(), _bearer())
        log.info("renewed the credentials of node %s", result["node_id"])
        return jsonify(result)

    @app.patch("/v1/orgs/<org>/provider/nodes/<node_id>")
    def patch_node(org: str, node_id: str) -> Response:
        result = cp.set_node_status(_bearer(), org, node_id, _json_body())
        log.info("node %s removed by the provider API (%d unit(s) freed)", node_id, result["units_freed"])
        return jsonify(result)

    @app.post(HEARTBEAT_PATH)
    def node_heartbeat() -> Response:
        if (request.content_length or 0) > MAX_BODY_BYTES:
            # Read what the client is still sending before answering (RFC 9112 section 9.6: a server
            # that answers early should not close until it has read the request): a close with the
            # body unread resets the connection before the client reads the 413. cheroot drains it
            # only on a connection it keeps, and it keeps none once its keep-alive slots are full.
            # Past MAX_BODY, request.stream itself answers 413 unread (a flood is not worth reading).
            _discard(request.stream)
            raise ApiError(413, "PAYLOAD_TOO_LARGE", f"a heartbeat is at most {MAX_BODY_BYTES} bytes")
        return jsonify(record_heartbeat(cp, _json_body(), _client_cert(), _bearer()))

    @app.get("/v1/orgs/<org>/provider/nodes")
    def provider_nodes(org: str) -> Response:
        return jsonify(list_provider_nodes(cp, _bearer(), org))

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"ok": True})

    app.wsgi_app = _HeartbeatPath(app, cp)  # type: ignore[method-assign]

    if store is not None:
        ca_pem = cp.ca_bundle_pem
        register_artifacts(
            app,
            store,
            ca_pem,
            public_url,
            # node_self refuses (401/403) all but an active node's current certificate + token.
            require_node=lambda: cp.node_self(_client_cert(), _bearer()),
            has_credentials=_has_node_credentials,
        )
    return app


class _HeartbeatPath:
    """`POST /v1/node/heartbeat` from WSGI straight to record_heartbeat, past Flask's request
    context, URL map, header objects and Response: every node beats, so this is the one request the
    control plane takes at hundreds a second, and Flask's share of it was a third of the time the
    request held the GIL. The same checks, limits and answers as the Flask route (node_heartbeat);
    a request this path does not take as is (chunked, no Content-Length, another content type, too
    large) goes to Flask, which answers it as before.
    """

    def __init__(self, app: Flask, cp: ControlPlane) -> None:
        self._app = app
        self._next = app.wsgi_app
        self._cp = cp

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        length = environ.get("CONTENT_LENGTH") or ""
        if (
            environ.get("PATH_INFO") != HEARTBEAT_PATH
            or environ.get("REQUEST_METHOD") != "POST"
            or not (length.isascii() and length.isdigit())
            # Refused unread by the route, which keeps the connection: closing it with the body
            # still arriving would reset it before the client reads the 413.
            or int(length) > MAX_BODY_BYTES
            or "HTTP_TRANSFER_ENCODING" in environ
            or environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower() != "application/json"
        ):
            return self._next(environ, start_response)
        status = 200
        try:
            body = _parse_json(_read_exactly(environ["wsgi.input"], int(length)))
            answer = record_heartbeat(self._cp, body, _client_cert_of(environ), _bearer_of(environ))
        except ApiError as e:
            status, answer = e.status, _error(e.code, e.message)
        except HTTPException as e:  # a body cut short: werkzeug's own exception, as the route raises
            status, answer = e.code or 400, _http_error_body(e)
        except Exception:
            log.exception("internal error on POST %s", HEARTBEAT_PATH)
            status, answer = 500, _INTERNAL
        # As jsonify writes it (compact, sorted keys, a final newline).
        data = (self._app.json.dumps(answer, separators=(",", ":")) + "\n").encode()
        start_response(
            f"{status} {HTTP_STATUS_CODES[status]}",
            # Closed after the answer: the next heartbeat is an interval away (240 s), long after
            # the server would have dropped the idle connection (10 s), which in the meantime held
            # a slot and cost a round through the connection manager to notice the client's close.
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("Connection", "close"),
            ],
        )
        return [data]


def _error(code: str, message: str | None) -> dict[str, Any]:
    """The body of every error answer, the Flask routes' and the heartbeat path's alike."""
    return {"error": {"code": code, "message": message}}


def _http_error_body(e: HTTPException) -> dict[str, Any]:
    return _error((e.name or "error").upper().replace(" ", "_"), e.description)


_INTERNAL = _error("INTERNAL", "internal error")


def _discard(stream: Any) -> None:
    while stream.read(1 << 16):
        pass


def _read_exactly(stream: Any, length: int) -> bytes:
    parts: list[bytes] = []
    left = length
    while left > 0:
        chunk = stream.read(min(left, 1 << 16))
        if not chunk:
            raise ClientDisconnected()
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
