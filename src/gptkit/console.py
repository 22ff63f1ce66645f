"""Messages for people: notices go to stderr so that stdout stays clean for data (e.g. --json)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def notice(message: str) -> None:
    """A one-line notice that does not break an active progress bar."""
    tqdm.write(f"gptkit: {message}", file=sys.stderr)
