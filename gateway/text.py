"""Incremental detokenization for streaming: emit only text that can no longer change, at a cost per chunk that
does not grow with the output."""
from __future__ import annotations

REPLACEMENT = "\ufffd"          # what a decoder gives for the bytes of a character that has not fully arrived


def _stable_end(text: str) -> int:
    """len(text) without its trailing U+FFFD run: a multi-byte character split across tokens may still complete."""
    end = len(text)
    while end and text[end - 1] == REPLACEMENT:
        end -= 1
    return end


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in `text` (`common/tokenizer.py::cut_at_stop` cuts there), or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


class IncrementalText:
    """The output text of one request, decoded as its tokens arrive, handed out as new suffixes.

    The text handed out, chunk by chunk, is exactly `cut_at_stop(decode(all ids, skip_special_tokens=True), stop)`:
    the one full decode, for any chunking. Each call decodes a window of tokens only (vLLM's and TGI's incremental
    detokenizer): the window starts at a token where an earlier decode ended on a whole character, so its first
    tokens are context (a sentencepiece decoder drops the leading space of a text's first token, a byte-level one
    needs whole characters), and only text past what the window gave before is new. The window moves up after
    every decode that ends on a whole character. This is exact for decoders whose text for a token depends on
    the tokens before it only through such context (byte-level BPE, Metaspace, WordPiece, word-level: what
    `tokenizers` ships); one that rewrites text it already gave switches the request to a full decode per call,
    streaming what the old full-decode stream did.

    Held back until the last chunk: a trailing U+FFFD (a multi-byte character split across tokens) and, while stop
    strings are active, the last max(len(stop)) - 1 characters (they may turn out to be the start of a stop string).
    Call `delta(ids, final)` with the whole output so far (a list that only grows) and `full_text(ids)` at the end.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.hold = max(max((len(s) for s in self.stop), default=1) - 1, 0)
        self._start = 0                 # first token of the decode window
        self._read = 0                  # a later token where a decode from `_start` ended on a whole character
        self._window = ""               # what decoding ids[_start:] has given so far (a prefix of its text)
        self._seen = 0                  # tokens decoded so far
        self._full = False              # fallback: the decoder is not prefix-stable, decode everything each time
        self._committed = 0             # characters of text that can no longer change: handed out + _pending
        self._pending = ""              # committed text not handed out yet (held back, or past a stop string)
        self._stopped = False           # a stop string was found where no earlier one can still appear
        self._ended = False             # the final chunk was decoded
        self._parts: list[str] = []     # the text handed out, in order

    def delta(self, token_ids: list[int], final: bool) -> str:
        """The text that `token_ids` (the whole output so far) adds and that can no longer change."""
        self._advance(token_ids, final)
        return self._release(final)

    def full_text(self, token_ids: list[int]) -> str:
        """The whole text of the finished output `token_ids`, cut at the first stop string; ends the stream."""
        self.delta(token_ids, final=True)
        return "".join(self._parts)

    # ---- decoding -------------------------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _commit(self, text: str) -> None:
        self._pending += text
        self._committed += len(text)

    def _advance(self, ids: list[int], final: bool) -> None:
        if self._stopped or self._ended or (len(ids) == self._seen and not final):
            return
        self._seen, self._ended = len(ids), final
        if self._full:
            text = self._decode(ids)
            end = len(text) if final else _stable_end(text)
            if end > self._committed:
                self._commit(text[self._committed:end])
            return
        text = self._decode(ids[self._start:])
        if not text.startswith(self._window):
            self._full = True           # text once given has changed: only a full decode is exact now
            self._seen, self._ended = 0, False
            self._advance(ids, final)
            return
        end = len(text) if final else _stable_end(text)
        if end > len(self._window):
            self._commit(text[len(self._window):end])
            self._window = text[:end]
        if end == len(text) and self._read < len(ids):
            self._move_window(ids)

    def _move_window(self, ids: list[int]) -> None:
        """Start the window at `_read`: the tokens from there on are the next decodes' context."""
        if self._read > self._start:
            head = self._decode(ids[self._read:])
            if not head:                # only skipped special tokens: no context yet, keep the wider window
                return
            self._start, self._window = self._read, head
        self._read = len(ids)

    # ---- stop strings and holding back ----------------------------------------------------------------------
    def _release(self, final: bool) -> str:
        pending = self._pending
        end = len(pending)
        if self.stop and not self._stopped:
            cut = _first_stop(pending, self.stop)
            # Pending starts where a stop string could still start (what went out before could not), so its
            # earliest stop is the text's; it is final once a longer stop starting earlier would be in sight.
            if cut is not None and (final or len(pending) >= cut + self.hold):
                self._stopped, pending = True, pending[:cut]
                self._committed -= end - cut
                end = cut
            elif not final:
                end = max(0, (end if cut is None else cut) - self.hold)
        out, self._pending = pending[:end], pending[end:]
        if out:
            self._parts.append(out)
        return out
