"""Errors every layer may raise; this module imports nothing of the package."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A bad config value or input: the message names the key, the value and the valid choices or the fix.

    The command line prints the message alone (no traceback) and exits with status 2.
    """
