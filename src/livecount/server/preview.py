"""``POST /api/workspaces/{ws}/views/preview``: what a view would count, without saving it.

The body is ``{filter, group_by?}``, validated exactly as a view's (the store's own checks, so
the same 400s naming the same paths). The answer is ``{"count": n}``, or ``{"counts": {group:
n}}`` for a grouped filter, as the caller would see it (``$me`` is the caller; the admin
token is nobody), counted by SQL over one consistent snapshot of the store. Nothing is
written, and neither the relay nor the counter state is involved: a preview costs one read
transaction on the store's readers.

A preview is a read that the visual builder sends while a filter is being edited, so each
token has a budget: a token bucket of :data:`PREVIEW_BURST` previews refilled at
:data:`PREVIEW_RATE` per second. Past it the answer is 429 with ``Retry-After`` (whole
seconds). The limiter lives on ``app.state.preview_limiter`` (created on first use), keys
tokens by a digest, and holds at most :data:`MAX_TOKENS` of them (least recently used go).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..domain import now_us
from ..store.base import View
from ..store.sqlstore import _check_filter, _check_group_by
from ..views import render_counts
from .auth import bearer_token, service_of, workspace_caller
from .body import fields, read_json
from .errors import CODES, JSONResponse, error_response

__all__ = ["MAX_TOKENS", "PREVIEW_BURST", "PREVIEW_RATE", "RateLimiter", "limiter_of",
           "preview_view", "routes"]

#: Previews a token may send at once (a builder session's first quick edits).
PREVIEW_BURST: Final = 10
#: Previews per second a token regains, up to the burst (the page sends at most ~2.5/s).
PREVIEW_RATE: Final = 3.0
#: Tokens whose bucket is remembered; the least recently used is forgotten past it.
MAX_TOKENS: Final = 10_000
#: The id of the synthetic view a preview counts (no stored view has id 0).
_PREVIEW_ID: Final = 0


class RateLimiter:
    """Token buckets by key: ``burst`` requests at once, ``rate`` more per second.

    Memory is bounded by ``max_keys`` (least recently used first out). Not thread-safe: it is
    used from the event loop only.
    """

    def __init__(self, rate: float = PREVIEW_RATE, burst: int = PREVIEW_BURST,
                 max_keys: int = MAX_TOKENS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be positive, burst and max_keys at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: bytes) -> float:
        """Take one request from ``key``'s bucket: 0.0 when allowed, else the seconds until
        one would be (nothing is taken then)."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


def limiter_of(request: Request) -> RateLimiter:
    """The app's preview limiter (a test may install its own on ``app.state``)."""
    state = request.app.state
    limiter = getattr(state, "preview_limiter", None)
    if not isinstance(limiter, RateLimiter):
        limiter = RateLimiter()
        state.preview_limiter = limiter
    return limiter


def _token_key(request: Request) -> bytes:
    token = bearer_token(request)
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()[:16]


async def preview_view(request: Request) -> Response:
    workspace_id: int = request.path_params["workspace_id"]
    caller = await workspace_caller(request, workspace_id)
    wait = limiter_of(request).acquire(_token_key(request))
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        return error_response(429, CODES[429], f"too many previews from this token; retry in "
                              f"{seconds} s", {"Retry-After": str(seconds)})
    body = fields(await read_json(request), ("filter",), ("group_by",))
    # the same checks, in the same order, as a view's creation (so the same 400s)
    _check_filter(body["filter"])
    group_by = _check_group_by(body.get("group_by"))
    # A synthetic view: a teammate's own, so $me is the caller; the admin's shared (and
    # rendered for nobody). Counted by SQL in one read transaction; nothing is written.
    view = View(id=_PREVIEW_ID, workspace_id=workspace_id, name="preview",
                filter=body["filter"], group_by=group_by, owner_id=caller.teammate_id,
                position=0, version=0)
    recount = await service_of(request).store.recount(workspace_id, [view], now_us())
    value = render_counts([view], recount.counts, caller.teammate_id)[str(_PREVIEW_ID)]
    answer: dict[str, Any] = {"counts": value} if group_by is not None else {"count": value}
    return JSONResponse(answer)


def routes(prefix: str, route: Callable[..., Route]) -> list[BaseRoute]:
    return [route(f"{prefix}/views/preview", post=preview_view)]
