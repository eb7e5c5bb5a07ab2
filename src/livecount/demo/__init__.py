"""``livecount demo``: a seeded workspace, the real server, and a simulated team at work.

The README's first command. It needs nothing but this package: an SQLite file in a temporary
directory, realistic data written through the Store API, and a simulator that changes
conversations at a steady rate through the same store path the HTTP API uses.
"""

from __future__ import annotations

from .seed import DemoWorkspace, Login, ViewSpec, conversation_body, custom_views, seed_workspace
from .simulator import ACTIONS, Simulator

__all__ = [
    "ACTIONS",
    "DemoWorkspace",
    "Login",
    "Simulator",
    "ViewSpec",
    "conversation_body",
    "custom_views",
    "seed_workspace",
]
