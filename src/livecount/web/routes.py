"""Routes serving the inbox page at ``/`` and its assets under ``/static/``.

The page is served with a strict Content-Security-Policy (only this origin, no inline code)
and no Referer: the first load carries a teammate's token in its query string, which the page
removes from the address bar at once, and which must not travel to anyone else meanwhile.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

__all__ = ["SECURITY_HEADERS", "STATIC_DIR", "web_routes"]

STATIC_DIR: Final = Path(__file__).parent / "static"

#: sent with the page; the API's JSON responses need none of them
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                        headers=SECURITY_HEADERS)


class _Assets(StaticFiles):
    """StaticFiles that asks browsers to revalidate, so a new release's script is picked up."""

    def file_response(self, full_path: PathLike, stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def web_routes() -> list[BaseRoute]:
    """``GET /`` (the page) and ``/static/...`` (its script and style sheet)."""
    return [
        Route("/", index, methods=["GET", "HEAD"], name="index",
              include_in_schema=False),
        Mount("/static", app=_Assets(directory=STATIC_DIR), name="static"),
    ]
