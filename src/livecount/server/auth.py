"""Who is calling, and may they touch this workspace: bearer tokens and tenancy.

Order matters and is the same everywhere: no or unknown token → 401; a teammate token on
another workspace's path → 403 (whether that workspace exists or not, so nothing leaks);
the admin token on a workspace that does not exist → 404. Works on any
:class:`~starlette.requests.HTTPConnection`, so the stream gateway uses it too.
"""

from __future__ import annotations

from starlette.requests import HTTPConnection

from ..exceptions import Forbidden, Unauthorized
from ..service import Caller, Service

__all__ = ["admin_caller", "authenticate", "bearer_token", "service_of", "workspace_caller"]


def service_of(conn: HTTPConnection) -> Service:
    service: Service = conn.app.state.service
    return service


def bearer_token(conn: HTTPConnection, *, query: bool = False) -> str:
    """The token of ``Authorization: Bearer <token>``; with ``query``, else ``?token=``."""
    scheme, _, token = conn.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if query:
        return conn.query_params.get("token", "")
    return ""


async def authenticate(conn: HTTPConnection, *, query: bool = False) -> Caller:
    token = bearer_token(conn, query=query)
    if not token:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    caller = await service_of(conn).authenticate(token)
    if caller is None:
        raise Unauthorized("invalid token")
    return caller


async def workspace_caller(conn: HTTPConnection, workspace_id: int, *,
                           query: bool = False) -> Caller:
    """The caller, if it may act in ``workspace_id``: one of its teammates, or the admin."""
    caller = await authenticate(conn, query=query)
    if caller.teammate is None:
        await service_of(conn).store.get_workspace(workspace_id)  # NotFound when absent
    elif caller.teammate.workspace_id != workspace_id:
        raise Forbidden(f"this token gives no access to workspace {workspace_id}")
    return caller


async def admin_caller(conn: HTTPConnection) -> Caller:
    caller = await authenticate(conn)
    if not caller.is_admin:
        raise Forbidden("this endpoint needs the admin token")
    return caller
