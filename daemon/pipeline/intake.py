"""Intake: decode and validate one delivery. Never raises: bad input becomes a reason."""

from __future__ import annotations

from collections.abc import Container
from typing import Final

import msgspec

from daemon.models import AttemptRequest

MAX_BODY_BYTES: Final = 64 * 1024
_decode = msgspec.json.Decoder(AttemptRequest).decode


class Invalid(msgspec.Struct, frozen=True):
    """Why a request cannot be processed; becomes the ``x-payd-error`` header."""

    reason: str


def decode_request(body: bytes, providers: Container[str]) -> AttemptRequest | Invalid:
    if len(body) > MAX_BODY_BYTES:
        return Invalid(f"request is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        request = _decode(body)
    except msgspec.ValidationError as error:
        return Invalid(f"invalid request: {error}")
    except msgspec.DecodeError as error:
        return Invalid(f"not a JSON object: {error}")
    if request.provider not in providers:
        return Invalid(f"invalid request: unknown provider {request.provider!r} - at `$.provider`")
    return request
