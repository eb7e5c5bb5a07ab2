"""The OpenAPI 3.1 document served at ``/openapi.json``, written by hand.

Hand-written so it says what the server promises (every error status included), not what a
framework can infer; ``tests/server/test_openapi.py`` checks that its operations are exactly
the app's routes and fuzzes the live server with it.
"""

from __future__ import annotations

from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..domain import GROUPABLE, STATES
from ..filters.parse import OPERATORS
from ..store.queries import MAX_LIMIT
from .errors import CODES, JSONResponse
from .views_api import DEFAULT_LIMIT

__all__ = ["document", "routes"]

_ERROR_TEXT: Final[dict[int, str]] = {
    400: "Bad input: malformed JSON, a body that is not JSON, a wrong type, an unknown or "
         "read-only field, a bad filter (the message names the offending path), a bad query "
         "parameter.",
    401: "Missing or unknown bearer token.",
    403: "The token gives no access to this workspace, or the endpoint needs the admin "
         "token.",
    404: "No such workspace, conversation or view in this workspace (another workspace's ids "
         "and other teammates' personal views answer the same), or no such route.",
    405: "The path exists, the method does not (see the Allow header).",
    409: "Conflict: a teammate with this email exists, or a concurrent change; retry.",
    412: "If-Match named a version that is not the current one.",
    413: "The request body is larger than 1 MiB.",
    429: "Too many requests from this token (view previews are rate-limited per token); "
         "retry after the Retry-After header's seconds.",
    503: "Draining, or above the soft memory watermark.",
}
_WRITE_ERRORS: Final = (400, 401, 403, 404, 405, 413, 503)
_READ_ERRORS: Final = (400, 401, 403, 404, 405, 503)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


def _path_id(name: str, what: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": what,
            "schema": {"type": "integer", "minimum": 0}, "example": 1}


_WS: Final = _path_id("workspace_id", "The workspace (tenant).")
_CONVERSATION: Final = _path_id("conversation_id", "A conversation of the workspace.")
_VIEW: Final = _path_id("view_id", "A view of the workspace.")
_NULLABLE_INT: Final = {"type": ["integer", "null"], "minimum": 1}
_NULLABLE_TIME: Final = {"type": ["string", "null"], "format": "date-time"}
_IDS: Final = {"type": "array", "items": {"type": "integer", "minimum": 1}, "maxItems": 100}
_TAGS: Final = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 100},
                "maxItems": 100}
_CUSTOM_VALUE: Final = {"type": ["string", "number", "boolean"]}
_NAME: Final = {"type": "string", "minLength": 1, "maxLength": 200}


def _schemas() -> dict[str, Any]:
    conversation_fields: dict[str, Any] = {
        "state": {"type": "string", "enum": list(STATES)},
        "assignee_id": _NULLABLE_INT,
        "team_id": _NULLABLE_INT,
        "priority": {"type": "boolean"},
        "channel": {"type": "string", "minLength": 1, "maxLength": 100},
        "tags": _TAGS,
        "mentions": _IDS,
        "unread_by": _IDS,
        "waiting_since": _NULLABLE_TIME,
        "snoozed_until": _NULLABLE_TIME,
    }
    return {
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string", "examples": list(CODES.values())},
                               "message": {"type": "string"}}}},
        },
        "Workspace": {"type": "object", "required": ["id", "name"],
                      "properties": {"id": {"type": "integer"}, "name": {"type": "string"}}},
        "Teammate": {
            "type": "object", "required": ["id", "name", "email"],
            "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                           "email": {"type": "string"}}},
        "NewTeammate": {
            "allOf": [_ref("Teammate"), {
                "type": "object", "required": ["token"],
                "properties": {"token": {"type": "string",
                                         "description": "Shown once; only its hash is stored."}}}]},
        "Team": {
            "type": "object", "required": ["id", "name", "member_ids"],
            "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                           "member_ids": {"type": "array", "items": {"type": "integer"}}}},
        "Me": {
            "description": "The caller: ``{\"admin\": true}`` for the admin token, else the "
                           "teammate.",
            "type": "object", "required": ["admin"],
            "properties": {"admin": {"type": "boolean"}, "id": {"type": "integer"},
                           "name": {"type": "string"}, "email": {"type": "string"},
                           "workspace_id": {"type": "integer"}}},
        "Conversation": {
            "type": "object",
            "required": ["id", "workspace_id", "version", "state", "assignee_id", "team_id",
                         "author_id", "priority", "channel", "tags", "mentions", "unread_by",
                         "created_at", "updated_at", "waiting_since", "snoozed_until",
                         "custom"],
            "properties": {
                "id": {"type": "integer"}, "workspace_id": {"type": "integer"},
                "version": {"type": "integer", "minimum": 1},
                **conversation_fields,
                "author_id": _NULLABLE_INT,
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
                "custom": {"type": "object", "additionalProperties": _CUSTOM_VALUE},
            }},
        "ConversationCreate": {
            "description": "Every field is optional: state open, priority false, empty sets, "
                           "channel \"chat\"; author_id defaults to the caller.",
            "type": "object", "additionalProperties": False,
            "properties": {
                **conversation_fields,
                "author_id": _NULLABLE_INT,
                "custom": {"type": "object", "maxProperties": 50,
                           "additionalProperties": _CUSTOM_VALUE}}},
        "ConversationPatch": {
            "description": "A JSON Merge Patch (RFC 7396): named fields replace, custom merges "
                           "key by key, null clears; sets are replaced whole.",
            "type": "object", "additionalProperties": False,
            "properties": {
                **conversation_fields,
                "custom": {"type": ["object", "null"], "maxProperties": 50,
                           "additionalProperties": {"type": ["string", "number", "boolean",
                                                             "null"]}}}},
        "Filter": {
            "description": "A filter (DESIGN §3): a comparison {field, operator, value} or a "
                           "composite {operator: AND|OR|NOT, value}. At most 8 levels and 100 "
                           "conditions.",
            "type": "object", "required": ["operator"],
            "properties": {"operator": {"type": "string", "enum": list(OPERATORS)},
                           "field": {"type": "string"}, "value": {}},
            "examples": [{"field": "state", "operator": "=", "value": "open"}]},
        "GroupBy": {
            "description": "A field to count per value of, or custom.<key>.",
            "type": ["string", "null"],
            "examples": sorted(GROUPABLE)},
        "View": {
            "type": "object",
            "required": ["id", "name", "filter", "group_by", "owner_id", "personal",
                         "position", "version"],
            "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                           "filter": _ref("Filter"), "group_by": _ref("GroupBy"),
                           "owner_id": {"type": ["integer", "null"]},
                           "personal": {"type": "boolean"},
                           "position": {"type": "integer"}, "version": {"type": "integer"}}},
        "Count": {
            "description": "An integer, or {group value: integer} for a grouped view.",
            "oneOf": [{"type": "integer"},
                      {"type": "object", "additionalProperties": {"type": "integer"}}]},
        "Counts": {"type": "object", "description": "View id (as a string) → count.",
                   "additionalProperties": _ref("Count")},
        "ViewCreate": {
            "type": "object", "additionalProperties": False, "required": ["name", "filter"],
            "properties": {"name": _NAME, "filter": _ref("Filter"), "group_by": _ref("GroupBy"),
                           "personal": {"type": "boolean", "default": False,
                                        "description": "Visible only to the caller (not "
                                                       "for the admin token)."}}},
        "ViewPreview": {
            "type": "object", "additionalProperties": False, "required": ["filter"],
            "properties": {"filter": _ref("Filter"), "group_by": _ref("GroupBy")}},
        "Preview": {
            "description": "What a view with this filter would count for the caller now: "
                           "{count} for a plain filter, {counts} (group value → count, empty "
                           "groups left out) with group_by.",
            "oneOf": [
                {"type": "object", "required": ["count"], "additionalProperties": False,
                 "properties": {"count": {"type": "integer", "minimum": 0}}},
                {"type": "object", "required": ["counts"], "additionalProperties": False,
                 "properties": {"counts": {"type": "object", "additionalProperties": {
                     "type": "integer", "minimum": 1}}}}]},
        "ViewReplace": {
            "type": "object", "additionalProperties": False, "required": ["name", "filter"],
            "properties": {"name": _NAME, "filter": _ref("Filter"), "group_by": _ref("GroupBy"),
                           "position": {"type": "integer", "minimum": 0}}},
    }


def _responses() -> dict[str, Any]:
    responses = {f"E{status}": _json(_ref("Error"), text)
                 for status, text in _ERROR_TEXT.items()}
    responses["E429"]["headers"] = {"Retry-After": {
        "required": True, "description": "Whole seconds to wait before retrying.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
    return responses


def _op(summary: str, ok: str, ok_response: dict[str, Any], errors: tuple[int, ...], *,
        body: str | None = None, parameters: list[dict[str, Any]] | None = None,
        security: bool = True, description: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {ok: ok_response, **_errors(*errors)}}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": True, "content": {
            media: {"schema": _ref(body)}
            for media in ("application/json", *(("application/merge-patch+json",)
                                                 if body == "ConversationPatch" else ()))}}
    if not security:
        op["security"] = []
    return op


def _paths() -> dict[str, Any]:
    ws = "/api/workspaces/{workspace_id}"
    conversation = _json(_ref("Conversation"), "The conversation.")
    conversation["headers"] = {"ETag": {"schema": {"type": "string"},
                                        "description": "The version, quoted: \"3\"."}}
    view = _json(_ref("View"), "The view.")
    admin_errors = (*_WRITE_ERRORS, 409)
    stream_params = [
        _WS,
        {"name": "epoch", "in": "query", "schema": {"type": "string",
                                                    "pattern": "^[A-Za-z0-9_-]{1,64}$"},
         "description": "The epoch of the seq to resume from (as sent in a snapshot)."},
        {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0},
         "description": "Resume after this seq of that epoch: one merged delta when the "
                        "server still holds it, else a snapshot."},
        {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0},
         "description": "The first counts reflect at least this outbox position (a write's "
                        "Livecount-Position); 503 if they do not within a bounded wait."},
        {"name": "token", "in": "query", "schema": {"type": "string"},
         "description": "The bearer token (browsers cannot set headers on these)."},
    ]
    return {
        "/healthz": {"get": _op("Liveness", "200", _json(
            {"type": "object", "properties": {"status": {"const": "ok"}}}, "Alive."), (),
            security=False)},
        "/readyz": {"get": _op("Readiness", "200", _json(
            {"type": "object", "properties": {"status": {"const": "ready"}}}, "Ready."),
            (503,), security=False)},
        "/metrics": {"get": _op("Prometheus metrics", "200", {
            "description": "Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}}}, (), security=False)},
        "/openapi.json": {"get": _op("This document", "200", _json({"type": "object"},
                                                                   "OpenAPI 3.1."), (),
                                     security=False)},
        "/api/workspaces": {"post": _op(
            "Create a workspace (admin)", "201", _json(_ref("Workspace"), "Created; the "
                                                       "folders are seeded."),
            _WRITE_ERRORS, body="WorkspaceCreate")},
        f"{ws}/teammates": {
            "get": _op("The workspace's teammates", "200", _json(
                {"type": "object", "required": ["teammates"], "properties": {
                    "teammates": {"type": "array", "items": _ref("Teammate")}}},
                "Teammates by id."), _READ_ERRORS, parameters=[_WS]),
            "post": _op("Create a teammate (admin)", "201", _json(
                _ref("NewTeammate"), "Created, with its bearer token."), admin_errors,
                body="TeammateCreate", parameters=[_WS]),
        },
        f"{ws}/teams": {
            "get": _op("The workspace's teams", "200", _json(
                {"type": "object", "required": ["teams"], "properties": {
                    "teams": {"type": "array", "items": _ref("Team")}}}, "Teams by id."),
                _READ_ERRORS, parameters=[_WS]),
            "post": _op("Create a team (admin)", "201", _json(_ref("Team"), "Created."),
                        _WRITE_ERRORS, body="TeamCreate", parameters=[_WS]),
        },
        f"{ws}/me": {"get": _op("Who the token stands for", "200", _json(
            _ref("Me"), "The caller."), _READ_ERRORS, parameters=[_WS])},
        f"{ws}/conversations": {"post": _op(
            "Create a conversation", "201", conversation, _WRITE_ERRORS,
            body="ConversationCreate", parameters=[_WS])},
        f"{ws}/conversations/{{conversation_id}}": {
            "get": _op("A conversation", "200", conversation, _READ_ERRORS,
                       parameters=[_WS, _CONVERSATION]),
            "patch": _op(
                "Change a conversation (JSON Merge Patch)", "200", conversation,
                (*_WRITE_ERRORS, 409, 412), body="ConversationPatch",
                parameters=[_WS, _CONVERSATION, {
                    "name": "If-Match", "in": "header", "required": False,
                    "description": "The version the change is based on: 3, \"3\" or "
                                   "W/\"3\"; 412 when it is not the current one.",
                    "schema": {"type": "string", "pattern": r'^(W/)?"?[0-9]{1,18}"?$'}}]),
        },
        f"{ws}/views": {
            "get": _op("The views the caller sees, with their counts", "200", _json(
                {"type": "object", "required": ["seq", "views"], "properties": {
                    "seq": {"type": "integer"},
                    "views": {"type": "array", "items": {"allOf": [_ref("View"), {
                        "type": "object", "required": ["count"],
                        "properties": {"count": _ref("Count")}}]}}}},
                "In position order; counts as of seq, as the caller sees them."),
                _READ_ERRORS, parameters=[_WS]),
            "post": _op("Create a view", "201", view, (*_WRITE_ERRORS, 409), body="ViewCreate",
                        parameters=[_WS]),
        },
        f"{ws}/views/preview": {"post": _op(
            "Preview a view's count without saving it", "200", _json(
                _ref("Preview"), "The count as the caller would see it ($me is the caller), "
                "from one consistent snapshot."),
            (*_WRITE_ERRORS, 429), body="ViewPreview", parameters=[_WS],
            description="Validated exactly like a view (the same 400s, naming the same "
                        "path); nothing is written. Rate-limited per token (a burst of 10, "
                        "then 3 per second): 429 with Retry-After past it.")},
        f"{ws}/views/{{view_id}}": {
            "put": _op("Replace a view's name, filter, grouping (and position)", "200", view,
                       (*_WRITE_ERRORS, 409), body="ViewReplace", parameters=[_WS, _VIEW]),
            "delete": _op("Delete a view", "204", {"description": "Deleted."},
                          (*_READ_ERRORS, 409), parameters=[_WS, _VIEW]),
        },
        f"{ws}/views/{{view_id}}/conversations": {"get": _op(
            "The view's list for the caller (keyset pagination)", "200", _json(
                {"type": "object", "required": ["conversations", "next_cursor"],
                 "properties": {"conversations": {"type": "array",
                                                  "items": _ref("Conversation")},
                                "next_cursor": {"type": ["string", "null"]}}},
                "Newest first; the items over all pages number exactly the view's count."),
            _READ_ERRORS, parameters=[
                _WS, _VIEW,
                {"name": "group", "in": "query", "schema": {"type": "string"},
                 "description": "Only this group of a grouped view (its text form)."},
                {"name": "limit", "in": "query", "schema": {
                    "type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                    "default": DEFAULT_LIMIT}},
                {"name": "cursor", "in": "query", "schema": {"type": "string"},
                 "description": "The next_cursor of the previous page."}])},
        f"{ws}/counts": {"get": _op("Every visible view's count", "200", _json(
            {"type": "object", "required": ["seq", "counts"],
             "properties": {"seq": {"type": "integer"}, "counts": _ref("Counts")}},
            "As the caller sees them, as of seq."), _READ_ERRORS, parameters=[_WS, {
                "name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0},
                "description": "Answer once the counts reflect at least this outbox "
                               "position (a write's Livecount-Position header); 503 when "
                               "they do not within a bounded wait."}])},
        f"{ws}/reconcile": {"post": _op(
            "Recount every view and repair drift (admin)", "200", _json(
                {"type": "object", "required": ["position", "views_checked", "drift",
                                                "repaired"],
                 "properties": {
                     "position": {"type": "integer"},
                     "views_checked": {"type": "integer"},
                     "drift": {"type": "array", "items": {
                         "type": "object",
                         "required": ["view", "group", "teammate", "state", "sql"],
                         "properties": {
                             "view": {"type": "integer"},
                             "group": {"type": ["string", "null"]},
                             "teammate": {"type": ["integer", "null"]},
                             "state": {"type": "integer"},
                             "sql": {"type": "integer"}}}},
                     "repaired": {"type": "boolean"}}},
                "What the recount found at position, compared with the live counter "
                "state, and whether it was repaired."), _WRITE_ERRORS, parameters=[_WS])},
        f"{ws}/stream": {"get": _op(
            "Live counts (Server-Sent Events)", "200", {
                "description": "Events: snapshot, delta, views, reconnect (JSON data; id is "
                               "epoch:seq).",
                "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            (401, 403, 404), parameters=[*stream_params, {
                "name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
                "description": "Resume after this event id (epoch:seq)."}])},
        f"{ws}/ws": {"get": _op(
            "Live counts (WebSocket)", "101", {"description": "Switching to the WebSocket "
                                                              "protocol."},
            (401, 403, 404), parameters=stream_params,
            description="A WebSocket upgrade: the same JSON messages as the SSE stream. A "
                        "plain HTTP request (no upgrade) answers 404.")},
    }


def _web_paths() -> dict[str, Any]:
    page = {"description": "The inbox page.",
            "content": {"text/html": {"schema": {"type": "string"}}}}
    asset = {"description": "A script, style sheet or image of the page.",
             "content": {"*/*": {"schema": {"type": "string"}}}}
    return {
        "/": {"get": _op("The inbox page (open it with ?ws=<id>&token=<token>)", "200", page,
                         (), security=False)},
        "/static/{path}": {"get": _op(
            "The page's assets", "200", asset, (404,), security=False,
            parameters=[{"name": "path", "in": "path", "required": True,
                         "schema": {"type": "string"}}])},
    }


def document(*, streams: bool = True, web: bool = True) -> dict[str, Any]:
    """The document; ``streams`` False leaves out the stream routes (no gateway), ``web``
    False the inbox page."""
    paths = _paths()
    if not streams:
        paths = {p: ops for p, ops in paths.items() if not p.endswith(("/stream", "/ws"))}
    if web:
        paths = {**_web_paths(), **paths}
    schemas = _schemas()
    schemas["WorkspaceCreate"] = {
        "type": "object", "additionalProperties": False, "required": ["name"],
        "properties": {"name": _NAME}}
    schemas["TeammateCreate"] = {
        "type": "object", "additionalProperties": False, "required": ["name", "email"],
        "properties": {"name": _NAME, "email": {"type": "string", "format": "email",
                                                "maxLength": 200}}}
    schemas["TeamCreate"] = {
        "type": "object", "additionalProperties": False, "required": ["name"],
        "properties": {"name": _NAME, "member_ids": {"type": "array", "items": {
            "type": "integer", "minimum": 1}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "livecount", "version": "0.1.0",
                 "description": "Live, exact conversation counts for every folder and view "
                                "of a shared team inbox. Every error is "
                                "{\"error\": {\"code\", \"message\"}}."},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "The admin token, or a teammate's token."}},
            "schemas": schemas,
            "responses": _responses(),
        },
    }


def routes(*, streams: bool, web: bool) -> list[BaseRoute]:
    body = JSONResponse(document(streams=streams, web=web)).body

    async def openapi_json(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return [Route("/openapi.json", openapi_json, methods=["GET"])]
