"""How the sandbox gateway behaves: its settings, their command-line form, and the dice.

`SandboxBehaviour` is the one description of latency, faults and outcomes. The command
line (`add_arguments` / `settings_from_args`) and the live `/_sandbox/behaviour`
endpoint both produce it, and both get the same validation, so a bad value is refused
the same way wherever it comes from. `Dice` turns a behaviour into the per-request
random decisions, with everything that can be worked out once worked out once.
"""

from __future__ import annotations

import argparse
import bisect
import enum
import math
import random
from collections.abc import Callable, Mapping
from typing import Final

import msgspec


class LatencyDist(enum.StrEnum):
    """Shape of the added latency; every shape has the configured mean."""

    FIXED = "fixed"
    UNIFORM = "uniform"  # 0 .. 2 x mean
    EXPONENTIAL = "exponential"
    LOGNORMAL = "lognormal"  # sigma 0.5, scaled so the mean is the configured mean


class Outcome(enum.StrEnum):
    """What a charge request that reaches processing turns into. The values are mix names."""

    APPROVE = "approve"
    SOFT_DECLINE = "soft_decline"
    HARD_DECLINE = "hard_decline"
    ERROR = "error"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"  # approve, then answer only after hang_s


class Fault(enum.Enum):
    """A failure injected before any processing; none of them charges."""

    ERROR = "error"
    RATE_LIMITED = "rate_limited"
    HANG = "hang"


# The payment method token picks the outcome; any other token rolls the mix.
TOKEN_OUTCOMES: Final[Mapping[str, Outcome]] = {
    "pm_ok": Outcome.APPROVE,
    "pm_insufficient_funds": Outcome.SOFT_DECLINE,
    "pm_stolen": Outcome.HARD_DECLINE,
    "pm_rate_limited": Outcome.RATE_LIMITED,
    "pm_error": Outcome.ERROR,
    "pm_timeout": Outcome.TIMEOUT,
    "pm_refund_timeout": Outcome.APPROVE,  # its refunds hang (refunds.REFUND_HANGS)
    "pm_refund_pending": Outcome.APPROVE,  # its refunds are pending until hang_s (refunds.REFUND_PENDS)
}

_MIX_NAMES: Final = frozenset(outcome.value for outcome in Outcome)
_LOGNORMAL_SIGMA: Final = 0.5


def _default_mix() -> dict[str, float]:
    return {"approve": 0.9, "soft_decline": 0.05, "hard_decline": 0.03, "error": 0.02}


class SettingError(ValueError):
    """A setting holds a value the sandbox refuses; `setting` names it (a struct field)."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason


class SandboxBehaviour(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Latency, fault injection and outcome mix of the sandbox gateway.

    Treat an instance as a value: the gateway takes a validated copy, so mutating one
    afterwards changes nothing. Change a running gateway through `/_sandbox/behaviour`.
    """

    latency_ms: float = 0.0  # mean latency added to each charge and lookup
    latency_dist: LatencyDist = LatencyDist.FIXED
    hang_s: float = 30.0  # how long pm_timeout and injected hangs wait
    retry_after_s: int = 1  # Retry-After of every 429
    # Fractions of charge requests that fail before processing. If they add up to more
    # than 1, error wins over rate limit, which wins over hang.
    error_rate: float = 0.0  # 500, nothing charged
    rate_limit_rate: float = 0.0  # 429, nothing charged
    hang_rate: float = 0.0  # hang hang_s, then 503, nothing charged
    mix: dict[str, float] = msgspec.field(default_factory=_default_mix)  # weights, for other tokens
    seed: int | None = None  # None: outcomes differ from run to run

    def __post_init__(self) -> None:
        _require_non_negative("latency_ms", self.latency_ms)
        try:
            self.latency_dist = LatencyDist(self.latency_dist)
        except ValueError:
            raise SettingError(
                "latency_dist", f"expected one of {_names(LatencyDist)}, got {self.latency_dist!r}"
            ) from None
        _require_non_negative("hang_s", self.hang_s)
        if isinstance(self.retry_after_s, bool) or self.retry_after_s < 0:
            raise SettingError("retry_after_s", f"must be an integer >= 0, got {self.retry_after_s}")
        for name in ("error_rate", "rate_limit_rate", "hang_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise SettingError(name, f"must be between 0 and 1, got {rate}")
        _validate_mix(self.mix)


class SandboxSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where `payd sandbox` listens and how it behaves."""

    host: str = "127.0.0.1"
    port: int = 8090  # 0 picks a free port; serve() prints the one it got
    behaviour: SandboxBehaviour = msgspec.field(default_factory=SandboxBehaviour)

    def __post_init__(self) -> None:
        if not self.host:
            raise SettingError("host", "must not be empty")
        if not 0 <= self.port <= 65535:
            raise SettingError("port", f"must be between 0 and 65535, got {self.port}")


def _names(kind: type[enum.StrEnum]) -> str:
    return ", ".join(member.value for member in kind)


def _require_non_negative(setting: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise SettingError(setting, f"must be a finite number >= 0, got {value}")


def _validate_mix(mix: Mapping[str, float]) -> None:
    for name, weight in mix.items():
        if name not in _MIX_NAMES:
            raise SettingError("mix", f"unknown outcome {name!r}, expected one of {_names(Outcome)}")
        if not (math.isfinite(weight) and weight >= 0):
            raise SettingError("mix", f"weight of {name!r} must be a finite number >= 0, got {weight}")
    if sum(mix.values()) <= 0:
        raise SettingError("mix", "weights must add up to more than 0")


def updated(behaviour: SandboxBehaviour, changes: Mapping[str, object]) -> SandboxBehaviour:
    """`behaviour` with `changes` (JSON-shaped, any subset of fields) applied and validated.

    Raises `msgspec.ValidationError` (a ValueError) naming the field on any bad value.
    """
    merged = msgspec.to_builtins(behaviour) | dict(changes)
    return msgspec.convert(merged, SandboxBehaviour)


def snapshot(behaviour: SandboxBehaviour) -> SandboxBehaviour:
    """A validated copy that no caller holds a reference to."""
    return updated(behaviour, {})


class Dice:
    """The random decisions one behaviour implies, precomputed so each roll is cheap.

    The random generators are passed in so a live behaviour change keeps the sequence
    going, and latency has its own generator so turning latency on does not shift
    which outcomes a seeded run produces.
    """

    __slots__ = (
        "_fault_bounds",
        "_latency",
        "_mix_bounds",
        "_mix_outcomes",
        "_rng",
        "hang_s",
        "retry_after_s",
    )

    def __init__(
        self, behaviour: SandboxBehaviour, *, rng: random.Random, latency_rng: random.Random
    ) -> None:
        self._rng = rng
        self.hang_s = behaviour.hang_s
        self.retry_after_s = behaviour.retry_after_s
        self._latency = _latency_sampler(behaviour, latency_rng)
        bounds: list[tuple[float, Fault]] = []
        total = 0.0
        for rate, fault in (
            (behaviour.error_rate, Fault.ERROR),
            (behaviour.rate_limit_rate, Fault.RATE_LIMITED),
            (behaviour.hang_rate, Fault.HANG),
        ):
            if rate > 0:
                total += rate
                bounds.append((total, fault))
        self._fault_bounds = tuple(bounds)
        weighted = [(Outcome(name), w) for name, w in behaviour.mix.items() if w > 0]
        self._mix_outcomes = tuple(outcome for outcome, _ in weighted)
        mix_total = sum(w for _, w in weighted)
        cumulative = 0.0
        mix_bounds = []
        for _, weight in weighted:
            cumulative += weight / mix_total
            mix_bounds.append(cumulative)
        self._mix_bounds = tuple(mix_bounds)

    def fault(self) -> Fault | None:
        """The fault to inject into this charge request, if any."""
        if not self._fault_bounds:  # the usual case: no roll, no cost
            return None
        roll = self._rng.random()
        for bound, fault in self._fault_bounds:
            if roll < bound:
                return fault
        return None

    def latency_s(self) -> float:
        """Seconds to add to this request; 0 when latency is off."""
        return 0.0 if self._latency is None else self._latency()

    def mix_outcome(self) -> Outcome:
        """The outcome for a token the table does not know."""
        index = bisect.bisect_right(self._mix_bounds, self._rng.random())
        return self._mix_outcomes[min(index, len(self._mix_outcomes) - 1)]


def _latency_sampler(behaviour: SandboxBehaviour, rng: random.Random) -> Callable[[], float] | None:
    mean = behaviour.latency_ms / 1000.0
    if mean == 0:
        return None
    match behaviour.latency_dist:
        case LatencyDist.FIXED:
            return lambda: mean
        case LatencyDist.UNIFORM:
            return lambda: rng.uniform(0.0, 2.0 * mean)
        case LatencyDist.EXPONENTIAL:
            return lambda: rng.expovariate(1.0 / mean)
        case LatencyDist.LOGNORMAL:
            mu = math.log(mean) - _LOGNORMAL_SIGMA**2 / 2
            return lambda: rng.lognormvariate(mu, _LOGNORMAL_SIGMA)


def seeded_generators(seed: int | None) -> tuple[random.Random, random.Random]:
    """(outcome generator, latency generator); unseeded ones draw from the OS."""
    if seed is None:
        return random.Random(), random.Random()  # noqa: S311 -- simulated outcomes, not secrets
    return random.Random(seed), random.Random(f"latency:{seed}")  # noqa: S311 -- as above


# --- command line -------------------------------------------------------------------------


# Numeric behaviour flags: (flag, type, metavar, help). The dest is the struct field.
_NUMERIC_FLAGS: Final[tuple[tuple[str, type[float] | type[int], str, str], ...]] = (
    ("--latency-ms", float, "MS", "mean latency added to each charge and lookup"),
    ("--hang-s", float, "S", "how long pm_timeout and injected hangs wait"),
    ("--retry-after-s", int, "S", "Retry-After of each 429"),
    ("--error-rate", float, "P", "fraction of charges answered 500 before processing"),
    ("--rate-limit-rate", float, "P", "fraction of charges answered 429 before processing"),
    ("--hang-rate", float, "P", "fraction of charges that hang --hang-s, then get 503"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `payd sandbox`'s flags: --host, --port and one per behaviour setting."""
    settings = SandboxSettings()
    default = settings.behaviour
    parser.add_argument("--host", default=settings.host, help="address to listen on (%(default)s)")
    parser.add_argument("--port", type=int, default=settings.port, help="port (%(default)s)")
    group = parser.add_argument_group("behaviour (also changeable live: POST /_sandbox/behaviour)")
    for flag, kind, metavar, text in _NUMERIC_FLAGS:
        setting = flag.removeprefix("--").replace("-", "_")
        group.add_argument(
            flag,
            type=kind,
            default=getattr(default, setting),
            metavar=metavar,
            help=f"{text} (%(default)s)",
        )
    group.add_argument(
        "--latency-dist",
        choices=[d.value for d in LatencyDist],
        default=default.latency_dist.value,
        help="latency distribution (%(default)s)",
    )
    group.add_argument(
        "--mix",
        default=format_mix(default.mix),
        metavar="NAME=WEIGHT,...",
        help=f"outcome weights for tokens not in the table; names: {_names(Outcome)} (%(default)s)",
    )
    group.add_argument("--seed", type=int, default=default.seed, help="seed for reproducible outcomes")


def settings_from_args(args: argparse.Namespace) -> SandboxSettings:
    """The settings the parsed flags describe; `ValueError` naming the flag on a bad value."""
    try:
        behaviour = SandboxBehaviour(
            latency_ms=args.latency_ms,
            latency_dist=args.latency_dist,
            hang_s=args.hang_s,
            retry_after_s=args.retry_after_s,
            error_rate=args.error_rate,
            rate_limit_rate=args.rate_limit_rate,
            hang_rate=args.hang_rate,
            mix=parse_mix(args.mix),
            seed=args.seed,
        )
        return SandboxSettings(host=args.host, port=args.port, behaviour=behaviour)
    except SettingError as exc:
        flag = "--" + exc.setting.replace("_", "-")
        raise ValueError(f"{flag}: {exc.reason}") from None


def parse_mix(text: str) -> dict[str, float]:
    """`approve=0.9,soft_decline=0.1` as a mapping; names are checked by SandboxBehaviour."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        name = name.strip()
        if not (sep and name):
            raise SettingError("mix", f"expected NAME=WEIGHT pairs separated by commas, got {part!r}")
        try:
            mix[name] = float(weight)
        except ValueError:
            raise SettingError("mix", f"weight of {name!r} is not a number: {weight!r}") from None
    return mix


def format_mix(mix: Mapping[str, float]) -> str:
    return ",".join(f"{name}={weight:g}" for name, weight in mix.items())
