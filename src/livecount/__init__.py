"""livecount: live, exact conversation counts for every folder and view of a team inbox."""

__version__ = "0.1.0"
