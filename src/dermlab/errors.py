"""Exceptions that the command line turns into one clear line and exit code 2.

Every message is one printable line by construction: user-supplied names, keys, paths and values may hold
newlines, carriage returns or terminal escape sequences (a folder called ``"a\\nb"``, a YAML key ``"\\x1b[2J"``),
and a message that quotes them must neither break into two lines nor drive the terminal. ``DermlabError``
escapes every non-printable character of its message (``\\n``, ``\\x1b``, ...); :func:`printable` does the same
for a single value, for messages that are not exceptions (HTTP details, console warnings).
"""

from __future__ import annotations

__all__ = ["DermlabError", "DataError", "ConfigError", "CheckpointError", "printable"]


def printable(value: object) -> str:
    """``str(value)`` with every non-printable character escaped (``"a\\nb"`` -> ``a\\nb``); spaces stay."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    return repr(char)[1:-1] if char not in "'\"" else char


def _original_message(message: str) -> str:
    """A DataLoader worker re-raises our error with its traceback folded in: keep the original message."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in message:
        head, _, rest = lines[-1].partition(": ")
        return rest if rest and head.endswith(("Error", "Exception")) else lines[-1]
    return message


class DermlabError(Exception):
    """Base class: the message names the file, row, field or class that is wrong, in one printable line."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(printable(_original_message(str(message))), *args)


class DataError(DermlabError, ValueError):
    """A dataset, image, CSV row or split cannot be used as it is."""


class ConfigError(DermlabError, ValueError):
    """A configuration key, value or type is wrong."""


class CheckpointError(DermlabError, ValueError):
    """A checkpoint or weights file cannot be loaded."""
