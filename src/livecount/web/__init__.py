"""The inbox page: a static single-page client of the HTTP API and the live stream.

Plain HTML, CSS and JavaScript with no build step and nothing loaded from elsewhere, so the
embedded server is a complete product on its own. :func:`web_routes` serves it.
"""

from __future__ import annotations

from .routes import STATIC_DIR, web_routes

__all__ = ["STATIC_DIR", "web_routes"]
