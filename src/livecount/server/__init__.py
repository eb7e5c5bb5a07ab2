"""The HTTP side of livecount: the JSON API, operations endpoints and the stream gateway."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
