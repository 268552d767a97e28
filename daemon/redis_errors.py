"""What a Redis call raises when Redis is down, restarting or unreachable.

Every user of the fleet's Redis (the halt watcher, the fleet rate limit, the
operator commands) catches this set and falls back; a Redis outage never stops
payments by itself.
"""

from __future__ import annotations

from typing import Final

import redis.exceptions

# Refusals (an ACL NOPERM, a read-only replica) as well as lost connections: the caller could not do it.
REDIS_ERRORS: Final = (redis.exceptions.RedisError, OSError, TimeoutError)
