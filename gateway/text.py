"""Incremental detokenization for streaming: emit only text that can no longer change."""
from __future__ import annotations

from common.tokenizer import cut_at_stop


class IncrementalText:
    """Decodes the whole output each time and hands out the new suffix.

    Held back: a trailing U+FFFD (a multi-byte character split across tokens) and, while stop strings are
    active, the last max(len(stop)) - 1 characters (they may turn out to be the start of a stop string).
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = 0

    def full_text(self, token_ids: list[int]) -> str:
        return cut_at_stop(self.tokenizer.decode(token_ids, skip_special_tokens=True), self.stop)

    def delta(self, token_ids: list[int], final: bool) -> str:
        text = self.full_text(token_ids)
        end = len(text)
        if not final:
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
            end = max(self.sent, end - self.hold)
        out = text[self.sent:end]
        self.sent = end
        return out
