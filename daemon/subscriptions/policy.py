"""The subscription rules in force: dunning per plan or provider, card-network limits, jitter.

Built once from ``[subscriptions]`` when the daemon starts, and handed to what
records outcomes (the pipeline, the reconciler) as an argument: every path
down to ``apply_subscription_effects`` carries it, so no task can miss it, and
two daemons in one process (the tests) each keep their own.
"""

from __future__ import annotations

from typing import Any

import msgspec

from daemon.config import DunningOverride, SubscriptionSettings
from daemon.models import ChargeResult
from daemon.subscriptions.model import SubscriptionStatus
from daemon.subscriptions.networks import EVERY_RULE, NEVER_RETRY_CODES, RULES_OF_BRAND, NetworkRule


class Dunning(msgspec.Struct, frozen=True, kw_only=True):
    """The dunning rules for one subscription (its plan's, else its provider's, else the default)."""

    schedule_s: tuple[float, ...]
    on_exhausted: SubscriptionStatus
    on_hard_decline: SubscriptionStatus


class SubscriptionPolicy:
    def __init__(self, settings: SubscriptionSettings) -> None:
        self.settings = settings
        dunning = settings.dunning
        self._default = Dunning(
            schedule_s=tuple(dunning.schedule_s),
            on_exhausted=SubscriptionStatus(dunning.on_exhausted),
            on_hard_decline=SubscriptionStatus(dunning.on_hard_decline),
        )
        # Validated by the configuration loader, which names a bad key.
        self._plans = {k: msgspec.convert(v, DunningOverride) for k, v in dunning.plans.items()}
        self._providers = {k: msgspec.convert(v, DunningOverride) for k, v in dunning.providers.items()}
        self._resolved: dict[tuple[str | None, str], Dunning] = {}
        self.never_retry_codes = NEVER_RETRY_CODES | {c.lower() for c in dunning.do_not_retry_codes}
        self.rules = settings.retry_budget.rules()
        self._rules_of_brand = {
            brand: tuple(self.rules[name] for name in names) for brand, names in RULES_OF_BRAND.items()
        }
        self._every_rule = tuple(self.rules[name] for name in EVERY_RULE)

    @property
    def failed_retry_s(self) -> float:
        return self.settings.dunning.failed_retry_s

    @property
    def retry_jitter_s(self) -> float:
        return self.settings.dunning.retry_jitter_s

    @property
    def pending_recheck_s(self) -> float:
        return self.settings.retry_budget.pending_recheck_s

    @property
    def renewal_jitter_s(self) -> float:
        return self.settings.renewal_jitter_s

    @property
    def dispatch_timeout_s(self) -> float:
        return self.settings.dispatch_timeout_s

    def dunning_for(self, plan: str | None, provider: str) -> Dunning:
        """Each key from the plan's override, else the provider's, else the default."""
        resolved = self._resolved.get((plan, provider))
        if resolved is None:
            layers = [o for o in (self._plans.get(plan or ""), self._providers.get(provider)) if o]

            def pick(key: str) -> Any:
                return next((getattr(o, key) for o in layers if getattr(o, key) is not None), None)

            schedule = pick("schedule_s")
            resolved = Dunning(
                schedule_s=self._default.schedule_s if schedule is None else tuple(schedule),
                on_exhausted=SubscriptionStatus(pick("on_exhausted") or self._default.on_exhausted),
                on_hard_decline=SubscriptionStatus(pick("on_hard_decline") or self._default.on_hard_decline),
            )
            self._resolved[(plan, provider)] = resolved
        return resolved

    def rules_for(self, card_brand: str | None) -> tuple[NetworkRule, ...]:
        """The network limits a card of this brand is held to (every one for an unknown brand)."""
        return self._rules_of_brand.get(card_brand, self._every_rule)

    def forbids_retry(self, result: ChargeResult) -> bool:
        """A decline after which no further try is allowed: the network or the provider said so."""
        if not result.retryable:
            return True
        return result.decline_code is not None and result.decline_code.lower() in self.never_retry_codes
