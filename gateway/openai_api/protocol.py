"""The OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) read into specd's own request, checked once.

Every field either maps onto specd (sampling parameters, K, n, logprobs, streaming), is refused with a message that
names it (`echo`, `suffix`, `logit_bias`, tools, ...), or is unknown and ignored with a warning, as vLLM does (a
harness that sends one more vendor field keeps working; a typo shows in the log). Limits are specd's own
(common/speculative/params.py, gateway/generation.py; docs/limits.md), checked where they are defined.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from common.speculative.params import MAX_LOGPROBS, MAX_TOKENS_LIMIT, SamplingParams
from gateway.generation import GenerationSpec, Generator

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16         # OpenAI's default for /v1/completions
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "stream",
           "stream_options", "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos",
           "num_speculative_tokens", "user", "logprobs", "best_of", "logit_bias"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                         "tool_choice", "parallel_tool_calls", "functions", "function_call"}
# Roles as the chat template knows them: OpenAI's newer "developer" is the system turn.
_ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class FieldError(ValueError):
    """A request field that is malformed or refused; `param` names it (OpenAI's error `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message if message.startswith(param) else f"{param}: {message}")
        self.param = param


@dataclass(slots=True)
class ParsedRequest:
    """What a door needs beyond the GenerationSpec: how to answer."""
    spec: GenerationSpec
    model: str
    stream: bool
    include_usage: bool
    logprobs: bool                   # return logprobs (chat: `logprobs`; completions: `logprobs` is not None)


# ---- reading typed fields -----------------------------------------------------------------------------------
def _number(body: dict, name: str, default: float | None) -> float | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FieldError(name, f"must be a number, got {type(v).__name__}")
    return float(v)


def _integer(body: dict, name: str, default: int | None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise FieldError(name, f"must be an integer, got {v!r}")
    return v


def _boolean(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise FieldError(name, f"must be true or false, got {v!r}")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return list(v)
    raise FieldError("stop", "must be a string or a list of strings")


def _refuse_unsupported(body: dict) -> None:
    if body.get("echo"):
        raise FieldError("echo", "echoing the prompt is not supported; set echo to false")
    if body.get("suffix"):
        raise FieldError("suffix", "insertion (a suffix after the completion) is not supported")
    if body.get("logit_bias"):
        raise FieldError("logit_bias", "not supported (speculation needs the target distribution as the model "
                                       "defines it); use presence/frequency/repetition penalties")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise FieldError("best_of", "not supported (only best_of = n, i.e. every completion is returned)")
    if body.get("tools") or body.get("functions"):
        raise FieldError("tools", "tool calling is not supported")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
        raise FieldError("response_format", "only {\"type\": \"text\"} is supported (no JSON mode or schemas)")


def _warn_unknown(body: dict, known: set[str], route: str) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        log.warning("%s: fields ignored (not part of specd's API): %s", route, ", ".join(unknown))


# ---- the shared sampling fields -------------------------------------------------------------------------------
def _sampling(body: dict, max_tokens: int, logprobs: int | None) -> SamplingParams:
    top_k = _integer(body, "top_k", 0)
    try:
        return SamplingParams(
            temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
            top_k=0 if top_k == -1 else top_k,                      # vLLM spells "off" -1
            min_p=_number(body, "min_p", 0.0), max_tokens=max_tokens, stop=_stop(body),
            seed=_integer(body, "seed", None), ignore_eos=_boolean(body, "ignore_eos", False),
            presence_penalty=_number(body, "presence_penalty", 0.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0), logprobs=logprobs)
    except FieldError:
        raise
    except ValueError as e:                 # SamplingParams names the field first: "top_p=1.5: must be in (0, 1]"
        message = str(e)
        name = message.split("=", 1)[0].split(":", 1)[0]
        raise FieldError(name, message) from None


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise FieldError("stream_options", "must be an object")
    if not stream:
        raise FieldError("stream_options", "only allowed when stream is true")
    return stream, _boolean(options, "include_usage", False)


def _spec(g: Generator, body: dict, prompt_ids: list[int], params: SamplingParams) -> GenerationSpec:
    k = _integer(body, "num_speculative_tokens", None)
    n = _integer(body, "n", 1)
    try:
        return g.spec(prompt_ids, params, k, n)
    except ValueError as e:
        raise FieldError(str(e).split("=", 1)[0], str(e)) from None


def _max_tokens(body: dict, names: tuple[str, ...], default: int) -> int:
    for name in names:
        v = _integer(body, name, None)
        if v is not None:
            if not 1 <= v <= MAX_TOKENS_LIMIT:
                raise FieldError(name, f"{name}={v}: must be in [1, {MAX_TOKENS_LIMIT}]")
            return v
    return default


def _model(body: dict) -> str:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise FieldError("model", "must be a string")
    return model or ""


# ---- the two routes -------------------------------------------------------------------------------------------
def parse_completion(g: Generator, body: dict) -> ParsedRequest:
    _warn_unknown(body, COMPLETION_FIELDS, "/v1/completions")
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                   # a batch of one
    if isinstance(prompt, str):
        ids = g.encode_text("prompt", prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = g.check_ids("prompt", prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise FieldError("prompt", f"{len(prompt)} prompts in one request are not supported: send one prompt per "
                                   "request (or use n for several completions of one prompt)")
    else:
        raise FieldError("prompt", "required: a string or a list of token ids")
    logprobs = _integer(body, "logprobs", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise FieldError("logprobs", f"logprobs={logprobs}: must be in [0, {MAX_LOGPROBS}]")
    params = _sampling(body, _max_tokens(body, ("max_tokens",), COMPLETIONS_DEFAULT_MAX_TOKENS), logprobs)
    stream, usage = _stream(body)
    return ParsedRequest(_spec(g, body, ids, params), _model(body), stream, usage, logprobs is not None)


def parse_chat(g: Generator, body: dict) -> ParsedRequest:
    _warn_unknown(body, CHAT_FIELDS, "/v1/chat/completions")
    _refuse_unsupported(body)
    ids = g.encode_messages("messages", chat_messages(body.get("messages")))
    want = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", None)
    if top is not None and not want:
        raise FieldError("top_logprobs", "needs logprobs: true")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise FieldError("top_logprobs", f"top_logprobs={top}: must be in [0, {MAX_LOGPROBS}]")
    default = max(1, min(MAX_TOKENS_LIMIT, g.max_model_len - len(ids)))      # the rest of the context
    params = _sampling(body, _max_tokens(body, ("max_completion_tokens", "max_tokens"), default),
                       (top or 0) if want else None)
    stream, usage = _stream(body)
    return ParsedRequest(_spec(g, body, ids, params), _model(body), stream, usage, want)


def chat_messages(raw: Any) -> list[dict]:
    """OpenAI messages as {"role", "content": str}: text content parts joined, other parts refused."""
    if not isinstance(raw, list) or not raw:
        raise FieldError("messages", "required: a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise FieldError(f"messages[{i}]", "must be an object with role and content")
        role = _ROLE_ALIASES.get(m.get("role"))
        if role is None:
            raise FieldError(f"messages[{i}].role", f"{m.get('role')!r} is not supported (system, developer, user, "
                                                    "assistant)")
        out.append({"role": role, "content": _content(i, m.get("content"))})
    return out


def _content(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise FieldError(f"messages[{i}].content[{j}]", f"{kind!r} parts are not supported (text only)")
            parts.append(part["text"])
        return "".join(parts)
    raise FieldError(f"messages[{i}].content", "must be a string or a list of text parts")
