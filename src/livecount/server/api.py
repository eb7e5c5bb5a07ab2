"""The JSON API of DESIGN §5: tenants and people (admin), conversations, and the route table.

Handlers are thin: authenticate, decode, call the store, render. Every refusal is a
:class:`~livecount.exceptions.LivecountError` the error handlers turn into the error shape.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .. import conversations
from ..domain import Image
from ..exceptions import ValidationError
from ..store.base import Team, Teammate, written_position
from . import preview, views_api
from .auth import admin_caller, service_of, workspace_caller
from .body import fields, read_json
from .errors import JSONResponse
from .views_api import POSITION_HEADER, position_headers, settle

__all__ = ["ConversationResponse", "Endpoint", "parse_if_match", "route", "routes"]

Endpoint = Callable[[Request], Awaitable[Response]]

_WS: Final = "/api/workspaces/{workspace_id:int}"
_IF_MATCH: Final = re.compile(r'(?:W/)?(?:"(\d{1,18})"|(\d{1,18}))')
_ENCODE: Final = msgspec.json.Encoder().encode
_POSITION: Final = POSITION_HEADER.lower().encode()


def _ws(request: Request) -> int:
    workspace_id: int = request.path_params["workspace_id"]
    return workspace_id


def _teammate(teammate: Teammate) -> dict[str, Any]:
    return {"id": teammate.id, "name": teammate.name, "email": teammate.email}


def _team(team: Team) -> dict[str, Any]:
    return {"id": team.id, "name": team.name, "member_ids": team.member_ids}


class ConversationResponse(Response):
    """A conversation as JSON, with its ``ETag`` and (after a write) ``Livecount-Position``.

    The hottest response of the API, so its headers are built directly (what
    :class:`~livecount.server.errors.JSONResponse` would build, without the generic path)."""

    media_type = "application/json"

    def __init__(self, image: Image, status_code: int = 200) -> None:
        self.status_code = status_code
        self.background = None
        self.body = _ENCODE(conversations.to_wire(image))
        headers = [(b"content-length", str(len(self.body)).encode()),
                   (b"content-type", b"application/json"),
                   (b"etag", b'"%d"' % image.version)]
        position = written_position.get()
        if position:
            headers.append((_POSITION, str(position).encode()))
        self.raw_headers = headers


def _conversation(image: Image, status: int = 200) -> Response:
    return ConversationResponse(image, status)


def parse_if_match(value: str | None) -> int | None:
    """The version an ``If-Match`` header pins: ``3``, ``"3"`` or ``W/"3"``; ``*`` or no
    header pins none. Anything else is a 400."""
    if value is None or value.strip() == "*":
        return None
    match = _IF_MATCH.fullmatch(value.strip())
    if match is None:
        raise ValidationError(f"expected a version number, e.g. \"3\", got {value[:40]!r}",
                              "If-Match")
    return int(match.group(1) or match.group(2))


# -- admin: tenants and people ----------------------------------------------------------------


async def create_workspace(request: Request) -> Response:
    await admin_caller(request)
    body = fields(await read_json(request), ("name",))
    service = service_of(request)
    workspace = await service.store.create_workspace(body["name"])
    await settle(service, workspace.id, bool)
    return JSONResponse({"id": workspace.id, "name": workspace.name}, status_code=201,
                        headers=position_headers())


async def create_teammate(request: Request) -> Response:
    await admin_caller(request)
    body = fields(await read_json(request), ("name", "email"))
    teammate, token = await service_of(request).store.create_teammate(
        _ws(request), body["name"], body["email"])
    return JSONResponse({**_teammate(teammate), "token": token}, status_code=201)


async def create_team(request: Request) -> Response:
    await admin_caller(request)
    body = fields(await read_json(request), ("name",), ("member_ids",))
    team = await service_of(request).store.create_team(
        _ws(request), body["name"], body.get("member_ids", []))
    return JSONResponse(_team(team), status_code=201)


# -- anyone of the workspace: who is who ------------------------------------------------------


async def me(request: Request) -> Response:
    caller = await workspace_caller(request, _ws(request))
    if caller.teammate is None:
        return JSONResponse({"admin": True})
    return JSONResponse({"admin": False, **_teammate(caller.teammate),
                         "workspace_id": caller.teammate.workspace_id})


async def list_teammates(request: Request) -> Response:
    await workspace_caller(request, _ws(request))
    found = await service_of(request).store.list_teammates(_ws(request))
    return JSONResponse({"teammates": [_teammate(t) for t in found]})


async def list_teams(request: Request) -> Response:
    await workspace_caller(request, _ws(request))
    found = await service_of(request).store.list_teams(_ws(request))
    return JSONResponse({"teams": [_team(t) for t in found]})


# -- conversations ----------------------------------------------------------------------------


async def create_conversation(request: Request) -> Response:
    caller = await workspace_caller(request, _ws(request))
    body = await read_json(request)
    image = await service_of(request).store.create_conversation(
        _ws(request), body, caller.teammate_id)
    return _conversation(image, 201)


async def update_conversation(request: Request) -> Response:
    await workspace_caller(request, _ws(request))
    if_match = parse_if_match(request.headers.get("if-match"))
    body = await read_json(request)
    image = await service_of(request).store.update_conversation(
        _ws(request), request.path_params["conversation_id"], body, if_match)
    return _conversation(image)


async def get_conversation(request: Request) -> Response:
    await workspace_caller(request, _ws(request))
    image = await service_of(request).store.get_conversation(
        _ws(request), request.path_params["conversation_id"])
    return _conversation(image)


async def reconcile(request: Request) -> Response:
    """Admin: recount every view of the workspace in one snapshot, compare with the live
    counter state at the same position, repair and publish any drift (DESIGN §5)."""
    await admin_caller(request)
    service = service_of(request)
    workspace_id = _ws(request)
    await service.store.get_workspace(workspace_id)  # 404 for a workspace that is not there
    # run by the process that counts the workspace (this one, or its owner's worker)
    return JSONResponse(await service.reconcile(workspace_id))


def route(path: str, **handlers: Endpoint) -> Route:
    """One route per path, dispatching on the method, so a 405 lists every allowed one."""
    table = {method.upper(): handler for method, handler in handlers.items()}
    if "GET" in table:
        table["HEAD"] = table["GET"]

    async def endpoint(request: Request) -> Response:
        return await table[request.method](request)

    return Route(path, endpoint, methods=list(table))


def routes() -> list[BaseRoute]:
    """Every route of the JSON API (the stream routes belong to the gateway)."""
    conversation = f"{_WS}/conversations/{{conversation_id:int}}"
    return [
        route("/api/workspaces", post=create_workspace),
        route(f"{_WS}/teammates", get=list_teammates, post=create_teammate),
        route(f"{_WS}/teams", get=list_teams, post=create_team),
        route(f"{_WS}/me", get=me),
        route(f"{_WS}/conversations", post=create_conversation),
        route(conversation, get=get_conversation, patch=update_conversation),
        route(f"{_WS}/reconcile", post=reconcile),
        *views_api.routes(_WS, route),
        *preview.routes(_WS, route),
    ]
