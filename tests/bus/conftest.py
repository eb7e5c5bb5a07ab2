"""The ``redis_broker`` fixture: a Redis URL with a key prefix of the test's own."""

from tests.state.redis_support import redis_broker

__all__ = ["redis_broker"]
