"""What a Redis call raises when Redis is down, restarting or unreachable.

Every user of the fleet's Redis (the halt watcher, the fleet rate limit, the
operator commands) catches this set and falls back; a Redis outage never stops
payments by itself.
"""

from __future__ import annotations

from typing import Final

import redis.exceptions

REDIS_ERRORS: Final = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
