"""Provider kinds, found through the ``payd.providers`` entry-point group.

A third-party package registers ``[project.entry-points."payd.providers"]
mykind = "mypkg.provider:MyProvider"``; payd picks it up without a fork. The
class must satisfy ``daemon.providers.api.ProviderFactory`` (see docs/providers.md).
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from typing import cast

from daemon.providers.base import Provider, ProviderConfig, ProviderFactory

ENTRY_POINT_GROUP = "payd.providers"


def installed_kind_names() -> list[str]:
    return sorted({entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)} | {"sandbox"})


@functools.cache
def factory(kind: str) -> ProviderFactory:
    """The class for ``kind``, imported on first use: a broken plugin only affects configs using it."""
    matches = list(entry_points(group=ENTRY_POINT_GROUP, name=kind))
    if matches:
        return cast(ProviderFactory, matches[0].load())
    if kind == "sandbox":  # running from a source tree that was never installed
        from daemon.providers.sandbox.adapter import SandboxProvider  # noqa: PLC0415

        return SandboxProvider
    raise LookupError(f"unknown provider kind {kind!r}; installed kinds: {', '.join(installed_kind_names())}")


def provider_kinds() -> dict[str, ProviderFactory]:
    """Every installed kind, imported (for listings and tests; the daemon imports only what it uses)."""
    return {name: factory(name) for name in installed_kind_names()}


def provider_config_type(kind: str) -> type[ProviderConfig]:
    return factory(kind).config_type


def create_provider(name: str, config: ProviderConfig) -> Provider:
    return factory(config.kind)(name, config)
