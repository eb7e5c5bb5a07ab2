"""Views, their counts and their lists.

Counts and the views they belong to come from one counter-state snapshot (the same source
the stream uses), so ``GET /views``, ``GET /counts`` and the stream agree; nothing here talks
to the relay. A view write waits (briefly) until the state shows it, so the caller reads its
own write; it never drives the relay itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .. import conversations
from ..domain import NOBODY, check_text, now_us
from ..exceptions import LivecountError, NotFound, ValidationError
from ..service import Caller, Service, wait_for_position
from ..store.base import View, written_position
from ..views import Rendered, render_counts, view_to_wire, visible_views
from .auth import service_of, workspace_caller
from .body import fields, read_json
from .errors import JSONResponse

__all__ = ["AFTER_WAIT", "DEFAULT_LIMIT", "POSITION_HEADER", "counts_for", "position_headers",
           "routes", "settle"]

log = logging.getLogger("livecount.server")

DEFAULT_LIMIT: Final = 50
SETTLE_TIMEOUT: Final = 2.0
#: How long ``GET /counts?after=P`` waits for the counts to reflect P before a 503.
AFTER_WAIT: Final = 5.0
#: The response header naming the outbox position a write committed at (DESIGN §5).
POSITION_HEADER: Final = "Livecount-Position"


def position_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """``headers`` plus ``Livecount-Position`` when this request's task wrote to the outbox."""
    out = dict(headers or {})
    position = written_position.get()
    if position:
        out[POSITION_HEADER] = str(position)
    return out


async def settle(service: Service, workspace_id: int, done: Callable[[list[View]], bool]
                 ) -> None:
    """Wait until the counter state reflects this request's write and ``done(views)`` holds
    for its views, or give up quietly after ``SETTLE_TIMEOUT`` seconds: the write has
    committed either way, and the stream will show it."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    position = written_position.get()
    delay = 0.002
    try:
        if position:
            await wait_for_position(service.state, service.store, workspace_id, position,
                                    SETTLE_TIMEOUT)
        while not done((await service.state.snapshot(workspace_id)).views):
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
    except LivecountError:  # not reflected in time: the write stands
        log.info("a write was not reflected in the counts within %.1f s", SETTLE_TIMEOUT)


async def counts_for(service: Service, workspace_id: int, teammate: int | None
                     ) -> tuple[int, list[View], Rendered]:
    """(seq, visible views in position order, their counts as ``teammate`` sees them), from
    one state snapshot, so the views and the counters belong together."""
    snapshot = await service.state.snapshot(workspace_id)
    shown = sorted(visible_views(snapshot.views, teammate), key=lambda v: (v.position, v.id))
    return snapshot.seq, shown, render_counts(shown, snapshot.counts, teammate)


async def _visible_view(request: Request, caller: Caller) -> View:
    """The view of the path, if the caller may see it; another's personal view is a 404 with
    the same message as a view that does not exist."""
    view_id = request.path_params["view_id"]
    view = await service_of(request).store.get_view(request.path_params["workspace_id"],
                                                    view_id)
    if view.owner_id is not None and view.owner_id != caller.teammate_id:
        raise NotFound(f"view {view_id} not found")
    return view


def _installed(view: View) -> Callable[[list[View]], bool]:
    def done(views: list[View]) -> bool:
        return any(v.id == view.id and v.version >= view.version for v in views)
    return done


async def list_views(request: Request) -> Response:
    workspace_id = request.path_params["workspace_id"]
    caller = await workspace_caller(request, workspace_id)
    seq, views, counts = await counts_for(service_of(request), workspace_id,
                                          caller.teammate_id)
    wire = [{**view_to_wire(v), "count": counts[str(v.id)]} for v in views]
    return JSONResponse({"seq": seq, "views": wire})


async def create_view(request: Request) -> Response:
    workspace_id = request.path_params["workspace_id"]
    caller = await workspace_caller(request, workspace_id)
    body = fields(await read_json(request), ("name", "filter"), ("group_by", "personal"))
    personal = body.get("personal", False)
    if not isinstance(personal, bool):
        raise ValidationError("expected true or false", "personal")
    if personal and caller.is_admin:
        raise ValidationError("the admin token cannot own a personal view", "personal")
    service = service_of(request)
    view = await service.store.create_view(
        workspace_id, body["name"], body["filter"], body.get("group_by"),
        caller.teammate_id if personal else None)
    await settle(service, workspace_id, _installed(view))
    return JSONResponse(view_to_wire(view), status_code=201, headers=position_headers())


async def replace_view(request: Request) -> Response:
    caller = await workspace_caller(request, request.path_params["workspace_id"])
    view = await _visible_view(request, caller)
    body = fields(await read_json(request), ("name", "filter"), ("group_by", "position"))
    service = service_of(request)
    view = await service.store.update_view(view.workspace_id, view.id, body["name"],
                                           body["filter"], body.get("group_by"),
                                           body.get("position"))
    await settle(service, view.workspace_id, _installed(view))
    return JSONResponse(view_to_wire(view), headers=position_headers())


async def delete_view(request: Request) -> Response:
    caller = await workspace_caller(request, request.path_params["workspace_id"])
    view = await _visible_view(request, caller)
    service = service_of(request)
    await service.store.delete_view(view.workspace_id, view.id)
    await settle(service, view.workspace_id, lambda views: all(v.id != view.id for v in views))
    return Response(status_code=204, headers=position_headers())


def _limit(request: Request) -> int:
    text = request.query_params.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not text.isascii() or not text.strip().isdigit() or len(text) > 9:
        raise ValidationError(f"expected a positive integer, got {text[:40]!r}", "limit")
    return int(text)


async def list_conversations(request: Request) -> Response:
    caller = await workspace_caller(request, request.path_params["workspace_id"])
    view = await _visible_view(request, caller)
    group = request.query_params.get("group")
    if group is not None:
        check_text(group, "group")
    cursor = request.query_params.get("cursor")
    me = NOBODY if caller.teammate_id is None else caller.teammate_id
    page = await service_of(request).store.list_conversations(
        view, me, group, _limit(request), cursor, now_us())
    items: list[dict[str, Any]] = [conversations.to_wire(c) for c in page.conversations]
    return JSONResponse({"conversations": items, "next_cursor": page.next_cursor})


async def get_counts(request: Request) -> Response:
    workspace_id = request.path_params["workspace_id"]
    caller = await workspace_caller(request, workspace_id)
    service = service_of(request)
    after = request.query_params.get("after")
    if after is not None:
        text = after.strip()
        if not text.isascii() or not text.isdigit() or len(text) > 18:
            raise ValidationError(f"expected an outbox position (a non-negative integer), "
                                  f"got {after[:40]!r}", "after")
        await wait_for_position(service.state, service.store, workspace_id, int(text),
                                AFTER_WAIT)
    seq, _, counts = await counts_for(service, workspace_id, caller.teammate_id)
    return JSONResponse({"seq": seq, "counts": counts})


def routes(prefix: str, route: Callable[..., Route]) -> list[BaseRoute]:
    view = f"{prefix}/views/{{view_id:int}}"
    return [
        route(f"{prefix}/views", get=list_views, post=create_view),
        route(view, put=replace_view, delete=delete_view),
        route(f"{view}/conversations", get=list_conversations),
        route(f"{prefix}/counts", get=get_counts),
    ]
