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
from werkzeug.exceptions import ClientDisconnected, HTTPException, MethodNotAllowed, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES, parse_options_header
from werkzeug.wsgi import get_input_stream

from controlplane.artifacts import ArtifactStore, register_artifacts
from controlplane.errors import (
    BadRequest,
    Conflict,
    ControlPlaneError,
    Forbidden,
    NotFound,
    TooLarge,
    Unauthorized,
)
from controlplane.heartbeat import MAX_BODY_BYTES, list_provider_nodes, record_heartbeat
from controlplane.service import ControlPlane

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


# The one place a domain error (controlplane.errors) becomes an HTTP status: the Flask routes' error
# handler and the heartbeat path both answer through http_status.
HTTP_STATUS: dict[type[ControlPlaneError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
}


def http_status(error: ControlPlaneError) -> int:
    """The status of `error`'s kind (or of the nearest kind it derives from); 500 for a kind this
    table misses, which tests/controlplane/test_cp_errors.py keeps from happening."""
    for kind in type(error).__mro__:
        status = HTTP_STATUS.get(kind)
        if status is not None:
            return status
    return 500


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
        raise _not_json()
    return _parse_json(_read_body(request.stream))  # 413 here already when Content-Length is too large


def _not_json() -> BadRequest:
    return BadRequest("the body must be JSON (Content-Type: application/json)")


def _is_json(content_type: str) -> bool:
    """Flask's Request.is_json, for a request the heartbeat path answers without Flask."""
    mimetype = parse_options_header(content_type)[0].lower()
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


def _parse_json(raw: bytes) -> Any:
    """`raw` as standard JSON of bounded depth, or a 400 saying why not."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        body = None
        too_deep = True
    except ValueError as e:  # includes bad UTF-8 and integers too long to convert
        raise BadRequest(f"the body is not valid JSON ({_short(str(e))})") from None
    else:
        too_deep = _depth(body) > MAX_DEPTH
    if too_deep:
        raise BadRequest(f"the JSON body is nested more than {MAX_DEPTH} levels deep")
    return body


def _read_body(stream: Any) -> bytes:
    """The whole body, read until the end of the stream: a chunked body comes in pieces, and one
    read may return only the first. Past MAX_BODY: 413."""
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

    @app.errorhandler(ControlPlaneError)
    def _domain_error(e: ControlPlaneError) -> tuple[Response, int]:
        return jsonify(_error(e.code, e.message)), http_status(e)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(e: RequestEntityTooLarge) -> tuple[Response, int]:
        return _domain_error(_BODY_TOO_LARGE)

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
    """`POST /v1/node/heartbeat`, the one way in for a heartbeat: from WSGI straight to
    record_heartbeat, past Flask's request context, URL map, header objects and Response. Every node
    beats, so this is the one request the control plane takes at hundreds a second, and Flask's share
    of it was a third of the time the request held the GIL. It keeps Flask's rules for a body (size,
    content type, chunked or not, JSON) and answers as the Flask routes do (_error, http_status);
    every other path goes on to Flask.
    """

    def __init__(self, app: Flask, cp: ControlPlane) -> None:
        self._app = app
        self._next = app.wsgi_app
        self._cp = cp

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") != HEARTBEAT_PATH:
            return self._next(environ, start_response)
        headers: list[tuple[str, str]] = []
        status, read = 200, False
        try:
            if environ.get("REQUEST_METHOD") != "POST":
                raise MethodNotAllowed(valid_methods=["POST"])
            raw = _heartbeat_body(environ)
            read = True
            body = _parse_json(raw)
            answer = record_heartbeat(self._cp, body, _client_cert_of(environ), _bearer_of(environ))
        except ControlPlaneError as e:
            status, answer = http_status(e), _error(e.code, e.message)
        except RequestEntityTooLarge:
            status, answer = 413, _error(_BODY_TOO_LARGE.code, _BODY_TOO_LARGE.message)
        except HTTPException as e:  # a body cut short, a method other than POST: werkzeug's own
            status, answer = e.code or 400, _http_error_body(e)
            headers = [(k, v) for k, v in e.get_headers(environ) if k.lower() == "allow"]
        except Exception:
            log.exception("internal error on POST %s", HEARTBEAT_PATH)
            status, answer = 500, _INTERNAL
        # As jsonify writes it (compact, sorted keys, a final newline).
        data = (self._app.json.dumps(answer, separators=(",", ":")) + "\n").encode()
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        if read:
            # Closed after the answer once the whole body is read: the next heartbeat is an interval
            # away (240 s), long after the server would have dropped the idle connection (10 s),
            # which in the meantime held a slot and cost a round through the connection manager to
            # notice the client's close. An answer given before the body was read keeps the
            # connection, as Flask's would: closing it with the body still arriving would reset it
            # before the client reads the answer.
            headers.append(("Connection", "close"))
        start_response(f"{status} {HTTP_STATUS_CODES[status]}", headers)
        return [data]


def _heartbeat_body(environ: dict[str, Any]) -> bytes:
    """A heartbeat's body, by Flask's rules for a request (its MAX_BODY, is_json, a chunked body),
    held to MAX_BODY_BYTES."""
    # 413 unread past MAX_BODY, as request.stream answers: a flood is not worth reading.
    stream = get_input_stream(environ, max_content_length=MAX_BODY)
    length = int(environ.get("CONTENT_LENGTH") or 0) if _digits(environ.get("CONTENT_LENGTH")) else 0
    if length > MAX_BODY_BYTES:
        # Read what the client is still sending before answering (RFC 9112 section 9.6: a server
        # that answers early should not close until it has read the request): a close with the
        # body unread resets the connection before the client reads the 413. cheroot drains it
        # only on a connection it keeps, and it keeps none once its keep-alive slots are full.
        _discard(stream)
        raise TooLarge(f"a heartbeat is at most {MAX_BODY_BYTES} bytes")
    if not _is_json(str(environ.get("CONTENT_TYPE", ""))):
        raise _not_json()
    if length and "HTTP_TRANSFER_ENCODING" not in environ:
        return _read_exactly(stream, length)
    return _read_body(stream)


def _digits(value: Any) -> bool:
    return isinstance(value, str) and value.isascii() and value.isdigit()


def _error(code: str, message: str | None) -> dict[str, Any]:
    """The body of every error answer, the Flask routes' and the heartbeat path's alike."""
    return {"error": {"code": code, "message": message}}


def _http_error_body(e: HTTPException) -> dict[str, Any]:
    return _error((e.name or "error").upper().replace(" ", "_"), e.description)


_INTERNAL = _error("INTERNAL", "internal error")
_BODY_TOO_LARGE = TooLarge(f"the request body is larger than the {MAX_BODY >> 20} MiB this API accepts")


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
