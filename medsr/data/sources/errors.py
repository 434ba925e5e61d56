"""Errors shared by every data source."""

from __future__ import annotations


class SourceError(RuntimeError):
    """A source could not deliver its data; the message is one line meant for the user.

    The message names what failed (dataset, file) and how to fix it. Line breaks are folded
    into spaces so that a CLI or a DVC stage log shows it whole on one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
