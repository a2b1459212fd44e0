"""What can go wrong in a control-plane operation, in the domain's words.

The service and the store raise these; they know nothing of HTTP. The HTTP layer (controlplane.app,
`HTTP_STATUS`) is the one place that turns each kind into a status, and every kind carries the
machine-readable code and the message the API answers with ({"error": {"code", "message"}}).
"""

from __future__ import annotations


class ControlPlaneError(Exception):
    """A refused operation: `code` for programs, `message` for people (what is wrong, what to do)."""

    default_code = "ERROR"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.default_code
        self.message = message


class BadRequest(ControlPlaneError):
    """The request itself is malformed or incomplete."""

    default_code = "BAD_REQUEST"


class Unauthorized(ControlPlaneError):
    """Credentials missing, unknown, expired or not current."""

    default_code = "UNAUTHORIZED"


class Forbidden(ControlPlaneError):
    """Known credentials that may not do this (an org not yet a provider, a removed node)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, code)


class NotFound(ControlPlaneError):
    default_code = "NOT_FOUND"


class Conflict(ControlPlaneError):
    """The request clashes with the state: a name taken, a quota used, an overlay full."""

    default_code = "CONFLICT"


class TooLarge(ControlPlaneError):
    """A request body past what the operation accepts."""

    default_code = "PAYLOAD_TOO_LARGE"


def bad_request(message: str) -> BadRequest:
    return BadRequest(message)


def unauthorized(message: str, code: str = "UNAUTHORIZED") -> Unauthorized:
    return Unauthorized(message, code)


def not_a_provider(org_name: str) -> Forbidden:
    return Forbidden(f"org {org_name} isn't an approved provider yet", "NOT_A_PROVIDER")
