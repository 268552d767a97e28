"""What the card networks allow: their retry rules, and the decline codes that forbid any retry.

Data, plus the one check the configuration needs (``schedule_problem``). The
counting against live attempts is ``daemon.subscriptions.netbudget``.

Sources. Visa's and Mastercard's rule books are not public; the numbers below
are as their acquirers and gateways publish them (secondary sources, named
per rule, retrieved 2026-11):

- Visa, Visa Rules "excessive reattempts" (Visa Integrity Risk Program, fees
  from July 2021 / April 2022): a declined transaction may be reattempted at
  most **15 times in 30 days**; decline categories 2 (cannot approve now),
  3 (data quality) and 4 (generic) may be reattempted, **category 1** (issuer
  will never approve: 04, 07, 12, 14, 15, 41, 43, 46, 57, R0, R1, R3) never.
  Payvision, "New Visa fees for declined transactions reattempts" (2021-03-29);
  Evolve, "Visa's Processing Integrity Fee Program" (code list); Global
  Payments/Payway, "Visa Excessive Reattempts Rule & Fees".
  Counted per card, **amount and currency**: Checkout.com support, "When can I
  retry a declined transaction" ("up to 15 times in a rolling 30-day time
  frame for the same card, amount, and currency").
- Visa, 2025 revision: **20 reattempts in 30 days**, customer-initiated and
  merchant-initiated reattempts **counted separately**. Checkout.com (same
  article: from 2025-05-19); Cielo changelog, "New limit for Visa retries
  starting May 25, 2025". payd calls it ``visa_rule = "2026"``.
- Mastercard, Transaction Processing Excellence, "Excessive Authorization
  Attempts": at most **10 declined attempts in 24 hours** on the same card
  (Checkout.com, same article; Dintero, "Tokenization error handling"), and
  since 2023-11-01 at most **35 in 30 days** (Braintree, "Mastercard Networks"
  2023 network updates; TabaPay, "Excessive Retry Rules").
- Mastercard, Transaction Processing Excellence, "Merchant Advice Code
  Transaction Excellence": a card-not-present retry after **MAC 03** (do not
  try again) or **MAC 21** (payment cancelled) is charged a fee; MAC 24-30 say
  when to retry (1 hour to 10 days). Maast, "Mastercard's decline code grouping
  and MAC"; Everonet, "Mastercard Merchant Advice Code".

Where the sources differ, payd takes the reading that allows fewer tries: an
approval resets no counter (Dintero and TabaPay describe consecutive declines),
and Mastercard's 30-day limit is per card whatever the amount (TabaPay keys it
by amount too). Customer- and merchant-initiated reattempts are counted
together under the 2025 rule, which only ever counts fewer. A payment method of
any other or unknown brand is held to every rule, since it may be either card.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final

import msgspec


class CardBrand(enum.StrEnum):
    """The network a payment method belongs to (``subscriptions.card_brand``)."""

    VISA = "visa"
    MASTERCARD = "mastercard"
    AMEX = "amex"
    DISCOVER = "discover"
    OTHER = "other"


class Counted(enum.StrEnum):
    """What a rule counts, in its own words."""

    DECLINES = "declines"
    """Every declined authorisation on the card (Mastercard): first tries included."""
    DECLINED_REATTEMPTS = "declined_reattempts"
    """Reattempts of a declined transaction (Visa): the first decline itself is not one."""


class NetworkRule(msgspec.Struct, frozen=True, kw_only=True):
    """One published limit, as payd enforces it."""

    name: str
    """Stable identifier: the ``deferred_by`` of a deferred try, a metric label."""
    network: str
    counts: Counted
    window_s: float
    limit: int
    by_amount: bool
    """Counted per card, amount and currency (else per card)."""
    key: str
    """The ``[subscriptions.retry_budget]`` key that sets it."""
    source: str


DAY_S: Final = 86400.0
WINDOW_30_DAYS_S: Final = 30 * DAY_S

VISA_LIMITS: Final[dict[str, int]] = {"2021": 15, "2026": 20}
"""Visa's reattempts per 30 days: the 2021 rule, and the 2025 revision payd calls ``"2026"``."""
MASTERCARD_DAILY_LIMIT: Final = 10
MASTERCARD_MONTHLY_LIMIT: Final = 35

VISA_REATTEMPTS: Final = "visa_reattempts_30d"
MASTERCARD_DAILY: Final = "mastercard_declines_24h"
MASTERCARD_MONTHLY: Final = "mastercard_declines_30d"


def network_rules(
    *, visa_rule: str, visa: int, mastercard_daily: int, mastercard: int
) -> dict[str, NetworkRule]:
    """The rules by name, with the limits the configuration chose (at most the published ones)."""
    return {
        VISA_REATTEMPTS: NetworkRule(
            name=VISA_REATTEMPTS,
            network="Visa",
            counts=Counted.DECLINED_REATTEMPTS,
            window_s=WINDOW_30_DAYS_S,
            limit=visa,
            by_amount=True,
            key="visa",
            source=f"Visa excessive-reattempt rule ({visa_rule}): {VISA_LIMITS[visa_rule]} in 30 days",
        ),
        MASTERCARD_DAILY: NetworkRule(
            name=MASTERCARD_DAILY,
            network="Mastercard",
            counts=Counted.DECLINES,
            window_s=DAY_S,
            limit=mastercard_daily,
            by_amount=False,
            key="mastercard_daily",
            source=f"Mastercard excessive authorization attempts: {MASTERCARD_DAILY_LIMIT} in 24 hours",
        ),
        MASTERCARD_MONTHLY: NetworkRule(
            name=MASTERCARD_MONTHLY,
            network="Mastercard",
            counts=Counted.DECLINES,
            window_s=WINDOW_30_DAYS_S,
            limit=mastercard,
            by_amount=False,
            key="mastercard",
            source=f"Mastercard excessive authorization attempts: {MASTERCARD_MONTHLY_LIMIT} in 30 days",
        ),
    }


RULES_OF_BRAND: Final[dict[str | None, tuple[str, ...]]] = {
    CardBrand.VISA.value: (VISA_REATTEMPTS,),
    CardBrand.MASTERCARD.value: (MASTERCARD_DAILY, MASTERCARD_MONTHLY),
}
EVERY_RULE: Final = (VISA_REATTEMPTS, MASTERCARD_DAILY, MASTERCARD_MONTHLY)
"""Any other or unknown brand: it may be a Visa or a Mastercard under another label."""


def densest(times: Sequence[float], window_s: float) -> int:
    """The most of ``times`` (sorted) that fall within any one window of ``window_s``."""
    best, start = 0, 0
    for end, moment in enumerate(times):
        while moment - times[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


def schedule_problem(schedule_s: Sequence[float], rules: Sequence[NetworkRule]) -> str | None:
    """Why a dunning schedule would break a rule on its own, or None.

    A cycle's first try may be declined at time 0, its retries follow at the
    schedule's running sums. Jitter and a provider's retry advice only delay
    a retry, so the bare schedule is the densest the cycle can be.
    """
    retries: list[float] = []
    elapsed = 0.0
    for wait in schedule_s:
        elapsed += wait
        retries.append(elapsed)
    for rule in rules:
        # Visa counts reattempts only; Mastercard every decline, the first try's too.
        counted = retries if rule.counts is Counted.DECLINED_REATTEMPTS else [0.0, *retries]
        most = densest(counted, rule.window_s)
        if most > rule.limit:
            what = "retries" if rule.counts is Counted.DECLINED_REATTEMPTS else "declined tries"
            window = "24 hours" if rule.window_s == DAY_S else "30 days"
            return (
                f"{most} {what} within {window} exceed {rule.limit}, the most retry_budget.{rule.key} "
                f"allows ({rule.source})"
            )
    return None


# Decline codes after which no network allows another try of the charge.
# Adapters report raw network codes as ``NETWORK:CODE`` (``visa:43``,
# ``mastercard:mac_03``); the plain names are the ones providers commonly use
# for the same conditions. Matching ignores case.
NEVER_RETRY_CODES: Final[frozenset[str]] = frozenset(
    code.lower()
    for code in (
        # Visa decline category 1, "issuer will never approve".
        "visa:04",  # pick up card
        "visa:07",  # pick up card, special conditions
        "visa:12",  # invalid transaction
        "visa:14",  # invalid account number
        "visa:15",  # no such issuer
        "visa:41",  # lost card, pick up
        "visa:43",  # stolen card, pick up
        "visa:46",  # closed account
        "visa:57",  # transaction not permitted to cardholder
        "visa:R0",  # stop payment order
        "visa:R1",  # revocation of authorisation order
        "visa:R3",  # revocation of all authorisations order
        # Mastercard merchant advice codes.
        "mastercard:mac_03",  # do not try again
        "mastercard:mac_21",  # payment cancelled by the cardholder
        # The same conditions under their usual provider names.
        "pickup_card",
        "lost_card",
        "stolen_card",
        "invalid_account",
        "invalid_number",
        "closed_account",
        "no_such_issuer",
        "transaction_not_allowed",
        "stop_payment_order",
        "revocation_of_authorization",
        "revocation_of_all_authorizations",
        "do_not_try_again",
    )
)
