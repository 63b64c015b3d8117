"""OpenAI response bodies and stream chunks built from specd's completions (the two routes differ only in shape).

Extension fields, beside OpenAI's: each choice carries `spec_decode` (per-request speculative statistics, vLLM's
names: num_draft_tokens, num_accepted_draft_tokens, draft_acceptance_rate, mean_acceptance_length,
acceptance_histogram; plus num_speculative_tokens, the request's K setting: -1 auto, 0 off) when it finishes.
"""
from __future__ import annotations

import time
import uuid

from common.speculative.outcome import TokenLogprob
from common.speculative.request import Request


class Renderer:
    """One response's envelope (id, created, model) and the conversions of its pieces; `chat` picks the route."""

    def __init__(self, tokenizer, model: str, chat: bool, num_speculative_tokens: int, report_cached_tokens: bool):
        self.tokenizer = tokenizer
        self.model = model
        self.chat = chat
        self.k_setting = num_speculative_tokens
        self.report_cached_tokens = report_cached_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offset: dict[int, int] = {}               # completions logprobs: text offset per choice so far

    # ---- whole responses ----------------------------------------------------------------------------------
    def response(self, requests: list[Request], texts: list[str], logprobs: bool) -> dict:
        choices = []
        for i, (r, text) in enumerate(zip(requests, texts)):
            lp = self.logprobs(i, r.output_logprobs) if logprobs else None
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                          "finish_reason": r.finish_reason or "length"}
            else:
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": r.finish_reason or "length"}
            choice["spec_decode"] = self.spec_decode(r)
            choices.append(choice)
        return {**self._envelope(""), "choices": choices, "usage": self.usage(requests)}

    # ---- stream chunks ------------------------------------------------------------------------------------
    def first_chunk(self, index: int, include_usage: bool) -> dict:
        """Chat streams open each choice with the assistant role (OpenAI's first delta)."""
        return self._chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}, include_usage)

    def chunk(self, index: int, r: Request, text: str, logprobs: list[TokenLogprob] | None,
              include_usage: bool) -> dict:
        finished = r.finished
        lp = self.logprobs(index, logprobs) if logprobs is not None else None
        if self.chat:
            choice = {"index": index, "delta": {"content": text} if text or not finished else {}, "logprobs": lp,
                      "finish_reason": r.finish_reason if finished else None}
        else:
            choice = {"index": index, "text": text, "logprobs": lp,
                      "finish_reason": r.finish_reason if finished else None}
        if finished:
            choice["spec_decode"] = self.spec_decode(r)
        return self._chunk(choice, include_usage)

    def usage_chunk(self, requests: list[Request]) -> dict:
        return {**self._envelope(".chunk" if self.chat else ""), "choices": [], "usage": self.usage(requests)}

    def _chunk(self, choice: dict, include_usage: bool) -> dict:
        out = {**self._envelope(".chunk" if self.chat else ""), "choices": [choice]}
        if include_usage:
            out["usage"] = None                         # OpenAI: null on every chunk but the last
        return out

    def _envelope(self, suffix: str) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + suffix, "created": self.created, "model": self.model}

    # ---- pieces -------------------------------------------------------------------------------------------
    def usage(self, requests: list[Request]) -> dict:
        prompt = len(requests[0].prompt_ids)
        completion = sum(len(r.output_ids) for r in requests)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self.report_cached_tokens:
            usage["prompt_tokens_details"] = {
                "cached_tokens": min(prompt, requests[0].stats.prefix_cached_tokens)}
        return usage

    def spec_decode(self, r: Request) -> dict:
        s = r.stats
        return {"num_speculative_tokens": self.k_setting, "num_drafts": sum(1 for k in s.k_chosen if k),
                "num_draft_tokens": s.drafted, "num_accepted_draft_tokens": s.accepted,
                "draft_acceptance_rate": round(s.acceptance_rate, 6),
                "mean_acceptance_length": round(s.mean_acceptance_length, 6),
                "acceptance_histogram": s.acceptance_histogram, "rounds": s.rounds,
                "accepted_per_position": list(s.accepted_per_position)}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def logprobs(self, index: int, items: list[TokenLogprob]) -> dict:
        """Chat: {"content": [{token, logprob, bytes, top_logprobs}]}; completions: OpenAI's legacy columns."""
        if self.chat:
            def entry(token_id: int, logprob: float) -> dict:
                text = self._token(token_id)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
            return {"content": [{**entry(t.token_id, t.logprob),
                                 "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in items],
                    "refusal": None}
        tokens, offsets, top = [], [], []
        offset = self._offset.get(index, 0)
        for t in items:
            text = self._token(t.token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            # the sampled token is always listed, as vLLM does (so up to logprobs + 1 entries)
            top.append({**{self._token(i): lp for i, lp in t.top}, text: t.logprob})
        self._offset[index] = offset
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in items], "top_logprobs": top,
                "text_offset": offsets}
