"""Logs never contain a token (DESIGN.md §5).

Browsers cannot set headers on a WebSocket, so the stream endpoints take ``?token=`` in the
URL, and uvicorn logs URLs: its access log (logger ``uvicorn.access``) prints every request's
path with its query string, and its WebSocket protocols log the path of each handshake at
INFO on ``uvicorn.error``. :class:`RedactSecrets` rewrites a record before any handler sees
it, keeping the line useful:

- ``token=<value>`` (and ``access_token=``, ``?token%3D`` ...) → ``token=REDACTED``;
- ``Authorization: <anything>`` (also ``'authorization': ...``, ``authorization=``) →
  ``Authorization: REDACTED``;
- ``Bearer <token>`` anywhere → ``Bearer REDACTED``.

It rewrites each argument separately, keeping the arguments' shape (a tuple stays a tuple
of the same length, a dict a dict, numbers stay numbers) because formatters such as uvicorn's
``AccessFormatter`` unpack them; a dict value under a key naming a token or Authorization is
replaced whole. An argument that is neither a string nor a number is replaced by its redacted
``str()`` only when that contains a secret. When the message template itself mentions a
token, a bearer or Authorization (``"Authorization: Bearer %s"``), the secret is only whole
in the formatted line: the record is formatted, redacted and left without arguments.
(A secret split over two arguments with no marker in either is beyond it: do not log one.)

:func:`install_redaction` attaches one filter to the loggers that may carry a URL or a
header and to the handlers of those loggers and of the root logger. Logger filters apply
only to records logged on that very logger, so it also goes on their existing child loggers
(``livecount.server``, ``livecount.gateway`` ...) and on the handlers, which records of any
later child reach by propagation, and on ``logging.lastResort``. Call it after
``uvicorn.Config(...)`` (which replaces uvicorn's handlers) and before the server runs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["LOGGERS", "REDACTED", "RedactSecrets", "install_redaction", "redact",
           "uninstall_redaction"]

REDACTED: Final = "REDACTED"
#: The loggers the filter is attached to (and their handlers, and the root's handlers).
LOGGERS: Final = ("uvicorn.access", "uvicorn.error", "uvicorn", "uvicorn.asgi", "livecount",
                  "websockets")

_PATTERNS: Final = (
    # an Authorization header's value, as text, repr of a pair or a dict
    (re.compile(r"""(?i)(\bauthorization\b['"]?\s*[:=,]\s*[(\[]?\s*(?:b?['"])?)[^'"\r\n,;)\]}]+"""),
     rf"\g<1>{REDACTED}"),
    # a bearer token, wherever it appears
    (re.compile(r"(?i)(\bbearer\s+)[^\s'\",;&)\]}]+"), rf"\g<1>{REDACTED}"),
    # a token query parameter (or any *token=), also percent-encoded as token%3D
    (re.compile(r"(?i)(token(?:=|%3D))[^&\s'\"#;,)\]}]*"), rf"\g<1>{REDACTED}"),
)


_MARKERS: Final = re.compile(r"(?i)token|bearer|authorization")


def redact(text: str) -> str:
    """``text`` with every token value and Authorization value replaced by REDACTED."""
    if not _MARKERS.search(text):
        return text  # the common case: one scan, no substitution
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, int | float):
        return value  # numbers keep their type (%d, uvicorn's status code)
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("latin-1")
        clean = redact(text)
        return value if clean == text else clean.encode("latin-1")
    try:
        text = str(value)
    except Exception:  # an object that cannot even print itself: leave it to the formatter
        return value
    clean = redact(text)
    return value if clean == text else clean


def _secret_key(key: Any) -> bool:
    """A mapping key whose value is a secret as a whole (``{"Authorization": "Bearer x"}``)."""
    if isinstance(key, bytes):
        key = key.decode("latin-1")
    return isinstance(key, str) and ("token" in key.lower() or "authorization" in key.lower())


class RedactSecrets(logging.Filter):
    """Rewrite tokens and Authorization values out of a record's message and arguments.

    Never drops a record (always returns True).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _DONE, False):  # already through another filtered logger/handler
            return True
        try:
            args = record.args
            if isinstance(args, tuple):
                record.args = tuple(_redact_value(arg) for arg in args)
            elif isinstance(args, Mapping):
                record.args = {key: REDACTED if _secret_key(key) else _redact_value(value)
                               for key, value in args.items()}
            if not isinstance(record.msg, str):
                record.msg = _redact_value(record.msg)
            elif _MARKERS.search(record.msg):
                # The template itself names a secret ("Authorization: Bearer %s"): only the
                # formatted line shows it whole. Format, redact, and keep no arguments.
                try:
                    line = record.getMessage()
                except Exception:  # a template that does not fit its arguments: drop them
                    line = f"{record.msg} [arguments dropped: they do not fit the message]"
                record.msg, record.args = redact(line), ()
        except Exception:  # a filter must never break logging; fall back to the safe side
            record.msg, record.args = f"{REDACTED}: unloggable record", ()
        setattr(record, _DONE, True)
        return True


_FILTER: Final = RedactSecrets()
_DONE: Final = "_livecount_redacted"


def _targets() -> list[logging.Filterer]:
    """:data:`LOGGERS` and their existing descendants (``livecount.server``: a logger's
    filters do not see its children's records), their handlers, the root's handlers and
    ``logging.lastResort`` (what prints WARNING and above when nothing is configured)."""
    names = set(LOGGERS)
    names.update(name for name, logger in list(logging.root.manager.loggerDict.items())
                 if isinstance(logger, logging.Logger)
                 and any(name.startswith(f"{parent}.") for parent in LOGGERS))
    targets: list[logging.Filterer] = []
    for name in sorted(names):
        logger = logging.getLogger(name)
        targets += [logger, *logger.handlers]
    targets += logging.getLogger().handlers
    if logging.lastResort is not None:
        targets.append(logging.lastResort)
    return targets


def install_redaction() -> RedactSecrets:
    """Attach the redaction filter to :data:`LOGGERS`, their handlers and the root logger's
    handlers. Idempotent: each gets the filter once, however often this is called."""
    for target in _targets():
        if not any(isinstance(f, RedactSecrets) for f in target.filters):
            target.addFilter(_FILTER)
    return _FILTER


def uninstall_redaction() -> None:
    """Take the filter off everything :func:`install_redaction` put it on (for tests)."""
    for target in _targets():
        for existing in [f for f in target.filters if isinstance(f, RedactSecrets)]:
            target.removeFilter(existing)
