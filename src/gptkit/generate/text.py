"""Generated tokens to text, piece by piece: whole characters only, cut at stop strings."""

from __future__ import annotations

import codecs

from gptkit.tokenizer import Tokenizer


class TextStream:
    """The text of one generated sequence, released as it becomes final.

    A byte-level tokenizer can split one UTF-8 character over several tokens; an incremental decoder
    keeps the incomplete bytes until the character is whole, so no piece ever holds half of one. Text
    that could be the start of a stop string is held back until it is known not to be one, so a
    stop string never appears in the output, streamed or not.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # decoded so far (emitted + held back)
        self._emitted = 0  # characters of _text already returned
        self.stopped = False  # a stop string was found; later tokens are ignored

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._text[: self._emitted]

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (often "", at most a few characters)."""
        if self.stopped:
            return ""
        self._text += self._decoder.decode(self.tokenizer.decode_bytes([token_id]))
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: release what was held back (a broken last character becomes U+FFFD)."""
        if not self.stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stopped:
            hits = [i for s in self.stop if (i := self._text.find(s, self._emitted)) >= 0]
            if hits:
                self._text = self._text[: min(hits)]
                self.stopped = final = True
        end = len(self._text) if final else len(self._text) - self._held_back()
        piece = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that a stop string starts with."""
        tail = self._text[self._emitted :]
        return max(
            (k for s in self.stop for k in range(min(len(s) - 1, len(tail)), 0, -1) if tail.endswith(s[:k])),
            default=0,
        )
