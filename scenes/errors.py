"""Errors raised while reading driving logs."""

from __future__ import annotations

from pathlib import Path


class LogFormatError(ValueError):
    """A log file is missing or malformed.

    Carries the offending ``path`` and a plain-sentence ``reason``; ``str(err)`` reads
    ``"<path>: <reason>"`` so a CLI can print it as is.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
