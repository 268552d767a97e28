"""Provider-shaped faces of the sandbox gateway.

Each module here speaks one real provider's documented wire format (Stripe,
Adyen, ...) on top of the shared ``Gateway`` core, so an adapter can be tested
over real HTTP against what its provider would answer. A module defines
``PREFIX`` (its URL prefix, e.g. ``"/stripe"``) and
``add_routes(app: web.Application) -> None``; handlers reach the core through
``request.app[GATEWAY_KEY]``. Modules are discovered, not listed.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from aiohttp import web


def dialect_modules() -> list[ModuleType]:
    return [
        importlib.import_module(f"{__name__}.{info.name}")
        for info in pkgutil.iter_modules(__path__)
        if not info.name.startswith("_")
    ]


def add_dialect_routes(app: web.Application) -> None:
    for module in dialect_modules():
        module.add_routes(app)
