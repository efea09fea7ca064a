"""Exceptions that the command line turns into one clear line and exit code 2."""

from __future__ import annotations

__all__ = ["DermlabError", "DataError", "ConfigError", "CheckpointError"]


class DermlabError(Exception):
    """Base class: the message names the file, row, field or class that is wrong."""


class DataError(DermlabError, ValueError):
    """A dataset, image, CSV row or split cannot be used as it is."""


class ConfigError(DermlabError, ValueError):
    """A configuration key, value or type is wrong."""


class CheckpointError(DermlabError, ValueError):
    """A checkpoint or weights file cannot be loaded."""
