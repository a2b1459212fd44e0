"""The seam between the control plane's service and its HTTP face: the service raises domain errors
(controlplane.errors), and controlplane.app.http_status is the one place that gives each its status,
for the Flask routes and the heartbeat path alike. The statuses are the error table of
docs/contracts.md (control-plane API, errors)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from controlplane import errors
from controlplane.app import create_app, http_status
from controlplane.clock import Clock, wall_now
from controlplane.db import Database
from controlplane.errors import (
    BadRequest,
    Conflict,
    ControlPlaneError,
    Forbidden,
    NotFound,
    TooLarge,
    Unauthorized,
)
from controlplane.nebula_ca import NebulaCA
from controlplane.pki import CertificateAuthority
from controlplane.service import ControlPlane

# docs/contracts.md: each documented status with codes the control plane answers with it.
DOCUMENTED = [
    (BadRequest("m"), 400, "BAD_REQUEST"),
    (Unauthorized("m"), 401, "UNAUTHORIZED"),
    (Unauthorized("m", "TOKEN_EXPIRED"), 401, "TOKEN_EXPIRED"),
    (Unauthorized("m", "BAD_NODE_CREDENTIALS"), 401, "BAD_NODE_CREDENTIALS"),
    (Forbidden("m", "NOT_A_PROVIDER"), 403, "NOT_A_PROVIDER"),
    (Forbidden("m", "NODE_REMOVED"), 403, "NODE_REMOVED"),
    (NotFound("m"), 404, "NOT_FOUND"),
    (Conflict("m"), 409, "CONFLICT"),
    (Conflict("m", "NODE_QUOTA_EXCEEDED"), 409, "NODE_QUOTA_EXCEEDED"),
    (Conflict("m", "OVERLAY_FULL"), 409, "OVERLAY_FULL"),
    (TooLarge("m"), 413, "PAYLOAD_TOO_LARGE"),
]


@pytest.mark.parametrize(("error", "status", "code"), DOCUMENTED, ids=lambda v: str(v))
def test_each_domain_error_gets_its_documented_status_and_code(
    error: ControlPlaneError, status: int, code: str
) -> None:
    assert http_status(error) == status
    assert error.code == code and error.message == "m"


def test_every_kind_of_domain_error_has_a_status_below_500() -> None:
    kinds = [
        k
        for _, k in inspect.getmembers(errors, inspect.isclass)
        if issubclass(k, ControlPlaneError) and k is not ControlPlaneError
    ]
    assert {type(e) for e, _, _ in DOCUMENTED} == set(kinds)

    class Narrower(NotFound):
        pass

    # A kind derived from a mapped one answers as its parent; an unmapped kind is an internal error.
    assert http_status(Narrower("m")) == 404
    assert http_status(ControlPlaneError("m")) == 500


def _json(answer: TestResponse) -> Any:
    body = answer.get_json()
    assert body is not None, answer.data
    return body


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    cp = ControlPlane(
        Database(tmp_path / "cp.sqlite"),
        CertificateAuthority.load_or_create(tmp_path / "state", wall_now()),
        Clock(),
        nebula_ca=NebulaCA.load_or_create(tmp_path / "state", wall_now()),
    )
    return create_app(cp).test_client()


def test_the_heartbeat_path_and_the_flask_routes_answer_one_error_alike(client: FlaskClient) -> None:
    beat = client.post("/v1/node/heartbeat", json={"doctor": {}})
    assert beat.status_code == 400 and _json(beat)["error"]["code"] == "BAD_REQUEST"
    good = {
        "doctor": {"verdict": "PASS", "gpu_units": {"ready": 0, "total": 0}},
        "resources": {"cpu_percent": 1, "memory_percent": 1, "disk_percent": 1},
        "draining": False,
    }
    beat = client.post("/v1/node/heartbeat", json=good)
    me = client.get("/v1/node/self")
    assert beat.status_code == me.status_code == 401
    assert (
        beat.json
        == me.json
        == {"error": {"code": "CLIENT_CERT_REQUIRED", "message": "a client certificate is required"}}
    )
    # What Flask answered before the heartbeat had one path: 400 for another content type, 405 for
    # another method (with Allow), 413 past the heartbeat's size.
    not_json = client.post("/v1/node/heartbeat", data=b"{}", content_type="text/plain")
    assert (
        not_json.status_code == 400
        and "Content-Type: application/json" in _json(not_json)["error"]["message"]
    )
    vendor_json = client.post("/v1/node/heartbeat", data=b"{}", content_type="application/vnd.x+json")
    assert vendor_json.status_code == 400 and "doctor" in _json(vendor_json)["error"]["message"]
    get = client.get("/v1/node/heartbeat")
    assert get.status_code == 405 and get.headers["Allow"] == "POST"
    assert _json(get)["error"]["code"] == "METHOD_NOT_ALLOWED"
    big = client.post("/v1/node/heartbeat", data=b" " * (70 * 1024), content_type="application/json")
    assert big.status_code == 413 and _json(big)["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert "Connection" not in big.headers
    flood = client.post("/v1/node/heartbeat", data=b" " * (2 << 20), content_type="application/json")
    assert flood.status_code == 413 and "1 MiB" in _json(flood)["error"]["message"]
