"""`TextStream`: one row's tokens as text pieces, never a broken UTF-8 character, ending at stop strings.

    token ─► its bytes ─► incremental UTF-8 decoder ─► held back while it may begin a stop string ─► text
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Turns one row's tokens into text pieces that never split a UTF-8 character or cross a stop string."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded text held back because it may be the start of a stop string
        self.stopped = False

    def feed(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(self.tokenizer.token_bytes(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.pending
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.pending = ""
            return text[:cut]
        keep = 0
        if not final:
            # Hold back the longest tail that is a proper prefix of some stop string.
            for stop in self.stop_strings:
                for n in range(min(len(stop) - 1, len(text)), keep, -1):
                    if text.endswith(stop[:n]):
                        keep = n
                        break
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]
