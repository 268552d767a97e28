"""Recognising card numbers (PANs), so that payd never stores, logs or forwards one.

A card number is 13 to 19 digits whose last is a Luhn check digit (ISO/IEC
7812-1), written plain (``4111111111111111``) or in groups of 3 to 6 digits
joined by single spaces or dashes (``4111 1111 1111 1111``, ``3782-822463-10005``).
A digit run glued to letters, digits or a dot is part of something else (a hex
id, a decimal) and is left alone; so are groups outside 3 to 6 digits, which keeps
UUIDs (8-4-4-4-12) and dates out. One random 13-19 digit number in ten passes
Luhn, so a bare number of that length is refused as a card number: that is the
price of never storing one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

# Cheap first look (runs in C): most text has no 13 digits in a row or in groups.
_MAY_HOLD: Final = re.compile(r"\d[\d -]{11,}\d")
# A whole run of digit groups, taken atomically so a run glued to a letter is not
# shortened until it fits.
_RUN: Final = re.compile(r"(?<![A-Za-z0-9.])(?>\d+(?:[ -]\d+)*)(?![A-Za-z0-9.])")
_SEPARATOR: Final = re.compile(r"[ -]")
MASK: Final = "[card number]"


def luhn_ok(digits: str) -> bool:
    """Whether the last digit of ``digits`` is its Luhn check digit."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = int(char)
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _card_sequences(groups: list[str]) -> Iterator[str]:
    """The digit sequences of one run that could be written card numbers."""
    for start, group in enumerate(groups):
        if 13 <= len(group) <= 19:
            yield group
        digits = ""
        for part in groups[start:]:
            if not 3 <= len(part) <= 6:
                break
            digits += part
            if len(digits) > 19:
                break
            if len(digits) >= 13:
                yield digits


def _is_card_run(run: str) -> bool:
    return any(luhn_ok(digits) for digits in _card_sequences(_SEPARATOR.split(run)))


def holds_card_number(text: str) -> bool:
    """Whether ``text`` holds a Luhn-valid 13-19 digit sequence, plain or grouped."""
    if _MAY_HOLD.search(text) is None:
        return False
    return any(_is_card_run(match.group()) for match in _RUN.finditer(text))


def mask_card_numbers(text: str) -> str:
    """``text`` with every digit run that holds a card number replaced by ``[card number]``."""
    if _MAY_HOLD.search(text) is None:
        return text
    return _RUN.sub(lambda match: MASK if _is_card_run(match.group()) else match.group(), text)
