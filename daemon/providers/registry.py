"""Provider kinds, found through the ``payd.providers`` entry-point group.

A third-party package registers ``[project.entry-points."payd.providers"]
mykind = "mypkg.provider:MyProvider"``; payd picks it up without a fork. The
class must satisfy ``daemon.providers.base.ProviderFactory``.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from typing import cast

from daemon.config import ProviderConfig
from daemon.providers.base import Provider, ProviderFactory

ENTRY_POINT_GROUP = "payd.providers"


@functools.cache
def provider_kinds() -> dict[str, ProviderFactory]:
    kinds: dict[str, ProviderFactory] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        kinds[entry.name] = cast(ProviderFactory, entry.load())
    if "sandbox" not in kinds:  # running from a source tree that was never installed
        from daemon.providers.sandbox.adapter import SandboxProvider  # noqa: PLC0415

        kinds["sandbox"] = SandboxProvider
    return kinds


def factory(kind: str) -> ProviderFactory:
    kinds = provider_kinds()
    if kind not in kinds:
        known = ", ".join(sorted(kinds))
        raise LookupError(f"unknown provider kind {kind!r}; installed kinds: {known}")
    return kinds[kind]


def provider_config_type(kind: str) -> type[ProviderConfig]:
    return factory(kind).config_type


def create_provider(name: str, config: ProviderConfig) -> Provider:
    return factory(config.kind)(name, config)
