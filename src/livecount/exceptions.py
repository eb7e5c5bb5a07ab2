"""The project's exceptions: one base, one subclass per HTTP-visible failure.

Each carries the status and machine-readable code the API puts in its error body, so the
server maps them without a table of its own.
"""

from __future__ import annotations

__all__ = [
    "Conflict",
    "Forbidden",
    "LimitExceeded",
    "LivecountError",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "StoreError",
    "Unauthorized",
    "Unavailable",
    "ValidationError",
]


class LivecountError(Exception):
    """Base of every error livecount raises on purpose."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(LivecountError):
    """Bad input: the message names the offending path, e.g. ``value[1].operator: ...``."""

    status = 400
    code = "invalid"

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class LimitExceeded(ValidationError):
    """A documented limit (nesting, conditions, views per workspace, ...) was passed."""

    code = "limit_exceeded"


class Unauthorized(LivecountError):
    status = 401
    code = "unauthorized"


class Forbidden(LivecountError):
    status = 403
    code = "forbidden"


class NotFound(LivecountError):
    status = 404
    code = "not_found"


class Conflict(LivecountError):
    status = 409
    code = "conflict"


class PreconditionFailed(LivecountError):
    """``If-Match`` named a version that is not the current one."""

    status = 412
    code = "version_mismatch"


class PayloadTooLarge(LivecountError):
    status = 413
    code = "payload_too_large"


class Unavailable(LivecountError):
    """Try again later: overload, draining, a busy (locked) or unreachable database.

    The API answers 503 with ``Retry-After: <retry_after>`` (whole seconds).
    """

    status = 503
    code = "unavailable"
    #: Seconds a client should wait before retrying (the ``Retry-After`` header).
    retry_after: int = 1

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = max(0, int(retry_after))


class StoreError(LivecountError):
    """The store failed in a way the caller cannot fix (a bug or an outage)."""
