"""Plain-Python references the engine's tensor code is checked against, and the logprob checks built on them."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from common.engine.forward_io import SequenceChunk
from common.speculative.params import SamplingParams

TOL = 1e-4          # logprobs: speculative vs target-only, fp32


def penalized_row(row: list[float], params: SamplingParams, before: list[int], prompt_len: int) -> list[float]:
    """vLLM's penalties for one row, token by token: `before` = every token ahead of the one this row scores."""
    seen, output = set(before), Counter(before[prompt_len:])
    out = []
    for token, z in enumerate(row):
        if token in seen:
            r = params.repetition_penalty
            z = z / r if z > 0 else z * r
        count = output[token]
        z -= params.frequency_penalty * count + params.presence_penalty * (count > 0)
        out.append(z)
    return out


def log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_total = top + math.log(sum(math.exp(z - top) for z in row))
    return [z - log_total for z in row]


def teacher_forced(llm, prompt: list[int], tokens: list[int], params: SamplingParams) -> list[list[float]]:
    """The target's logprob rows [len(tokens), vocab] for `tokens` after `prompt`: one pass of `llm`'s target,
    penalised and normalised by the references above."""
    runner = llm.target.runner
    rows = runner.forward([SequenceChunk(-7, prompt + tokens[:-1], num_logits=len(tokens))]).logits[0]
    runner.free(-7)
    return [log_softmax(penalized_row(rows[i].tolist(), params, prompt + tokens[:i], len(prompt)))
            for i in range(len(tokens))]


def assert_logprobs_match(out, ref_rows, top_n: int) -> None:
    """A RequestOutput's logprobs against reference rows: each token's, and each alternative's at its own id."""
    assert len(out.logprobs) == len(out.token_ids)
    for i, (t, ref) in enumerate(zip(out.logprobs, ref_rows)):
        assert t.token_id == out.token_ids[i]
        assert t.logprob == pytest.approx(ref[t.token_id], abs=TOL), f"token {i}"
        assert len(t.top) == top_n
        for j, lp in t.top:                             # the alternatives, most likely first, at their own values
            assert lp == pytest.approx(ref[j], abs=TOL), f"token {i}, alternative {j}"
        assert [lp for _, lp in t.top] == sorted((lp for _, lp in t.top), reverse=True)
        assert t.top[0][1] == pytest.approx(max(ref), abs=TOL)


def assert_same_logprobs(a, b) -> None:
    """Two runs' logprobs of the same tokens agree within TOL (alternatives that tie within TOL may swap places)."""
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x.token_id, len(x.top)) == (y.token_id, len(y.top))
        assert x.logprob == pytest.approx(y.logprob, abs=TOL), f"token {i}"
        assert [lp for _, lp in x.top] == pytest.approx([lp for _, lp in y.top], abs=TOL), f"token {i}"
        theirs = dict(y.top)
        for j, lp in x.top:
            assert j not in theirs or theirs[j] == pytest.approx(lp, abs=TOL), f"token {i}, alternative {j}"
