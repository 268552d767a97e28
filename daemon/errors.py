"""Errors every layer may raise, kept in a module that imports nothing of payd.

``ConfigError`` lives here rather than in ``daemon.config`` so that the secrets
module and provider adapters (which refuse to start without their credentials)
can raise it without importing the configuration loader, which imports them.
"""

from __future__ import annotations


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the problem."""
