"""Messages for people: notices go to stderr so that stdout stays clean for data (e.g. --json)."""

from __future__ import annotations

import sys

from tqdm import tqdm

_quiet = False  # set in processes other than rank 0 of a multi-process run: rank 0 speaks for all


def notice(message: str) -> None:
    """A one-line notice that does not break an active progress bar."""
    if not _quiet:
        tqdm.write(f"gptkit: {message}", file=sys.stderr)


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet
