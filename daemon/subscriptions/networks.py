"""What the card networks allow: retry ceilings and the decline codes that forbid any retry.

Data, not logic. ``daemon.config`` checks the configured retry budgets against
these ceilings, and the lifecycle consults the never-retry codes on every
decline. Only sources that publish a number appear here; a payment method of
any other or unknown brand gets the strictest published ceiling, because it
may be a Visa card under another label.
"""

from __future__ import annotations

import enum
from typing import Final


class CardBrand(enum.StrEnum):
    """The network a payment method belongs to (``subscriptions.card_brand``)."""

    VISA = "visa"
    MASTERCARD = "mastercard"
    AMEX = "amex"
    DISCOVER = "discover"
    OTHER = "other"


BUDGET_WINDOW_DAYS: Final = 30
"""Every published limit is per payment method and trailing 30 days."""

# Visa's excessive-reattempt rule: at most 15 reattempts in 30 days (rule of
# 2021, fees since April 2022); 20 under the 2026 rule. payd counts every
# attempt in the window, first tries included, so a budget equal to the
# number is never looser than the rule.
VISA_CEILINGS: Final[dict[str, int]] = {"2021": 15, "2026": 20}
# Mastercard's excessive-attempts rule: at most 35 attempts in 30 days.
MASTERCARD_CEILING: Final = 35


def strictest_ceiling(visa_rule: str) -> int:
    """The ceiling for a brand without its own published number (or no known brand)."""
    return min(VISA_CEILINGS[visa_rule], MASTERCARD_CEILING)


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
