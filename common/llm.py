"""The in-process API: `LLM(target, draft).generate(prompts, SamplingParams(...))`.

The same engine the services run, in one process: every service path has this twin to be compared against.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from common.config import EngineConfig, draft_lm_head_quantization
from common.engine.model_runner import ModelRunner, SequenceChunk
from common.engine.pass_probe import measure_pass_seconds
from common.engine.tp_executor import TPExecutor
from common.errors import ConfigError
from common.speculative.adaptive_k import AdaptiveK, CostModel
from common.speculative.outcome import TokenLogprob
from common.speculative.decoder import SpeculativeDecoder
from common.speculative.proposers.draft_model import DraftModelProposer
from common.speculative.proposers.ngram import NgramProposer
from common.speculative.params import SamplingParams
from common.speculative.request import Request, parse_num_speculative_tokens
from common.speculative.stats import RequestStats
from common.tokenizer import (cut_at_stop, encode_prompt, load_tokenizer, stop_string_checker, stop_token_ids,
                              vocab_fingerprint)
from common.validation import check_token_ids

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


@dataclass(slots=True)
class RequestOutput:
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats
    # The target's log-probability of each of token_ids and its top alternatives (common/speculative/logprobs.py);
    # None unless SamplingParams.logprobs was set.
    logprobs: list[TokenLogprob] | None = None

    def as_dict(self) -> dict:
        out = {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
               "prompt_tokens": len(self.prompt_token_ids), "stats": self.stats.as_dict()}
        if self.logprobs is not None:
            out["logprobs"] = [asdict(t) for t in self.logprobs]
        return out


class LLM:
    def __init__(self, target_path: str, draft_model_path: str | None = None,
                 num_speculative_tokens: int | str = 4, tp_size: int = 1, dtype: str = "bfloat16",
                 device: str = "cpu", k_max: int = 8, kv_cache_memory_gib: float = 1.0,
                 max_model_len: int | None = None, max_num_seqs: int = 256, batch_invariant: bool = False,
                 quantization: str = "none", draft_quantization: str = "none", gguf: str | None = None,
                 draft_gguf: str | None = None):
        if not 0 <= k_max <= 32:
            raise ConfigError(f"k_max={k_max}: must be in [0, 32]")
        self.k_max = k_max
        self.max_num_seqs = max_num_seqs
        self.k = parse_num_speculative_tokens(num_speculative_tokens, k_max)
        self.tokenizer = load_tokenizer(target_path)
        self.fingerprint = vocab_fingerprint(self.tokenizer)
        draft_runner = None
        if draft_model_path not in (None, "ngram"):
            draft_fp = vocab_fingerprint(load_tokenizer(draft_model_path))
            if draft_fp != self.fingerprint:
                raise ConfigError(f"draft tokenizer differs from the target's: draft vocab fingerprint {draft_fp}, "
                                  f"target {self.fingerprint} ({draft_model_path} vs {target_path})")
        self.target = TPExecutor(EngineConfig(model=target_path, dtype=dtype, device=device, tp_size=tp_size,
                                              kv_cache_memory_gib=kv_cache_memory_gib,
                                              max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                              batch_invariant=batch_invariant, quantization=quantization,
                                              gguf=gguf))
        # n-gram lookup costs nothing to keep around, so it is always offered; the draft model when given.
        self.proposers: dict[str, object] = {"ngram": NgramProposer()}
        if draft_model_path not in (None, "ngram"):
            draft_runner = ModelRunner(EngineConfig(model=draft_model_path, dtype=dtype, device=device,
                                                    kv_cache_memory_gib=kv_cache_memory_gib,
                                                    max_model_len=self.target.runner.max_model_len,
                                                    max_num_seqs=max_num_seqs,
                                                    quantization=draft_quantization, gguf=draft_gguf,
                                                    lm_head_quantization=draft_lm_head_quantization(
                                                        draft_quantization)))
            if draft_runner.model_config.vocab_size != self.target.model_config.vocab_size:
                raise ConfigError(f"draft vocab_size={draft_runner.model_config.vocab_size} differs from the "
                                  f"target's {self.target.model_config.vocab_size}")
            self.proposers["draft"] = DraftModelProposer(draft_runner)
        self.default_proposer = {None: None, "ngram": "ngram"}.get(draft_model_path, "draft")
        self.draft_runner = draft_runner
        self.costs = {name: CostModel() for name in self.proposers}
        self.eos_token_ids = stop_token_ids(self.tokenizer, self.target.model_config.eos_token_ids)
        self.decoder = SpeculativeDecoder(self.target, None, self.eos_token_ids,
                                          stop_check=stop_string_checker(self.tokenizer))
        self._calibrated = False
        if self.k == "auto" and self.default_proposer is not None:
            self._calibrate()

    @property
    def max_model_len(self) -> int:
        return self.target.runner.max_model_len

    # ---- generation ----------------------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_chat_template: bool = False, num_speculative_tokens: int | str | None = None,
                 proposer: str | None = ...) -> list[RequestOutput]:
        """Generate for every prompt (one batch). `num_speculative_tokens` and `proposer` ("draft", "ngram" or
        None for target-only) override the constructor's choice for this call."""
        k = self.k if num_speculative_tokens is None else parse_num_speculative_tokens(num_speculative_tokens,
                                                                                        self.k_max)
        name = self.default_proposer if proposer is ... else proposer
        if name is not None and name not in self.proposers:
            raise ConfigError(f"proposer={name!r}: available here: {', '.join(self.proposers)} or None")
        if k == "auto" and name is not None and not self._calibrated:
            self._calibrate()
        prompt_list = self._normalise_prompts(prompts)
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompt_list)
        if len(params_list) != len(prompt_list):
            raise ValueError(f"{len(params_list)} sampling params for {len(prompt_list)} prompts")
        costs = self.costs[name] if name is not None else None
        requests = [self._make_request(self._encode(p, use_chat_template), sp, k, costs)
                    for p, sp in zip(prompt_list, params_list)]
        proposer_obj = self.proposers[name] if name is not None else None
        for start in range(0, len(requests), self.max_num_seqs):      # more prompts than sequences: waves
            self.decoder.run(requests[start:start + self.max_num_seqs], proposer_obj, costs)
        return [self._output(r) for r in requests]

    def _make_request(self, ids: list[int], params: SamplingParams, k, costs) -> Request:
        check_token_ids("prompt", ids, self.target.model_config.vocab_size)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens, must be < max_model_len={self.max_model_len}")
        controller = AdaptiveK(self.k_max, costs) if k == "auto" and costs is not None else None
        return Request(list(ids), params, controller=controller, fixed_k=0 if k == "auto" else k)

    def _output(self, r: Request) -> RequestOutput:
        text = cut_at_stop(self.tokenizer.decode(r.output_ids, skip_special_tokens=True), r.params.stop)
        return RequestOutput(r.prompt_ids, text, list(r.output_ids), r.finish_reason or "length", r.stats,
                             list(r.output_logprobs) if r.params.logprobs is not None else None)

    def _encode(self, prompt, chat: bool) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt: empty or whitespace only")
            return encode_prompt(self.tokenizer, prompt, chat)
        return [int(t) for t in prompt]

    @staticmethod
    def _normalise_prompts(prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]
        if not prompts:
            raise ValueError("prompts: empty list")
        return prompts

    # ---- adaptive-K calibration ----------------------------------------------------------------------------
    def _calibrate(self, reps: int = 3) -> None:
        """Measure one draft step, a draft catch-up pass, and target passes of every length 1..k_max+1, so round one
        already picks K well: the cost model prices each length as measured (common/speculative/adaptive_k.py says
        why)."""
        probe = list(range(10, 42))
        seconds = measure_pass_seconds(self.target, max_tokens=self.k_max + 1, reps=reps)
        for costs in self.costs.values():
            for n, s in enumerate(seconds, start=1):
                costs.observe_verify(n, s)
        if self.draft_runner is not None:
            costs = self.costs["draft"]
            self.draft_runner.forward([SequenceChunk(-1, probe)])             # warm-up
            for _ in range(reps):
                t = time.perf_counter()
                self.draft_runner.forward([SequenceChunk(-1, [7])])
                costs.observe_draft(1, time.perf_counter() - t)
            self.draft_runner.free(-1)
            t = time.perf_counter()                                          # a catch-up: one pass of missed tokens
            self.draft_runner.forward([SequenceChunk(-1, probe)])
            costs.observe_catchup(len(probe) - 1, 1, time.perf_counter() - t)
            self.draft_runner.free(-1)
        self._calibrated = True

    def close(self) -> None:
        self.target.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
