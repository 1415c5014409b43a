"""The configuration error every ossnet module raises (kept apart so that any module can import it)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


__all__ = ["ConfigError"]
