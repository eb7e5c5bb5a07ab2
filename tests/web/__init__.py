"""Browser tests of the inbox page."""
