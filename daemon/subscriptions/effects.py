"""What a recorded attempt outcome does to its subscription, inside the record's own commit."""

from __future__ import annotations

from collections.abc import Sequence

from daemon.models import AttemptRequest, AttemptState, ChargeResult
from daemon.storage.db import Cursor, union_rows


async def apply_subscription_effects(
    cursor: Cursor,
    outcomes: Sequence[tuple[AttemptRequest, AttemptState, ChargeResult]],
    *,
    occurred_at: str,
) -> None:
    """Called by ``write_outcomes`` with every state change it is about to commit."""
    del occurred_at  # the lifecycle events will carry it
    paid = [
        (request.subscription_id, request.cycle or 0)
        for request, state, _ in outcomes
        if state is AttemptState.SUCCEEDED and request.subscription_id is not None
    ]
    if paid:
        derived, params = union_rows(paid, ("id", "cycle"))
        await cursor.execute(
            f"UPDATE subscriptions s JOIN ({derived}) v ON s.id = v.id "  # noqa: S608
            "SET s.paid_cycle = GREATEST(s.paid_cycle, v.cycle)",
            params,
        )
