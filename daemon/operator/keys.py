"""What an idempotency key can be, checked before a key from an operator reaches a query."""

from __future__ import annotations

import re
from typing import Final

_KEY: Final = re.compile(r"[A-Za-z0-9:_-]{1,128}")
"""``daemon.models.IdempotencyKey``'s alphabet and length: the ``ascii_bin`` key columns hold
nothing else, and comparing them with other characters is a MySQL error (1267), not a miss."""


def is_idempotency_key(text: str) -> bool:
    """True when ``text`` could name an attempt or a refund; anything else names nothing."""
    return _KEY.fullmatch(text) is not None
