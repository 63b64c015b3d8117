"""OpenAI request bodies -> specd's request, and exceptions -> OpenAI errors, without any process (fast)."""
import logging
from types import SimpleNamespace

import grpc
import pytest

from common.errors import KVCacheExhaustedError, QueueFullError, SequenceTooLongError
from common.speculative.adaptive_k import CostModel
from common.speculative.outcome import TokenLogprob
from common.speculative.params import SamplingParams
from common.speculative.request import Request
from gateway.generation import Generator
from gateway.openai_api.errors import http_error_for
from gateway.openai_api.protocol import FieldError, chat_messages, parse_chat, parse_completion
from gateway.openai_api.responses import Renderer


class Tokenizer:
    chat_template = "(any)"

    def encode(self, text, add_special_tokens=False):
        return [len(w) for w in text.split()]

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        self.rendered = messages
        return [1] + [len(m["content"]) for m in messages] + [2]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture()
def g():
    return Generator(SimpleNamespace(max_model_len=64, costs=CostModel()), Tokenizer(), "auto", 8, 100)


def test_completion_defaults_are_openais(g):
    p = parse_completion(g, {"model": "m", "prompt": "a bb ccc"})
    assert p.spec.prompt_ids == [1, 2, 3] and p.model == "m" and not p.stream and not p.logprobs
    assert (p.spec.params.max_tokens, p.spec.params.temperature, p.spec.n, p.spec.k) == (16, 1.0, 1, "auto")


def test_fields_map_onto_specd(g):
    p = parse_completion(g, {"prompt": [5, 6], "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": -1,
                             "min_p": 0.1, "seed": 3, "stop": "x", "n": 2, "presence_penalty": 0.5,
                             "frequency_penalty": -0.5, "repetition_penalty": 1.3, "ignore_eos": True,
                             "num_speculative_tokens": 0, "logprobs": 4, "stream": True,
                             "stream_options": {"include_usage": True}})
    assert p.spec.params == SamplingParams(temperature=0, top_p=0.5, top_k=0, min_p=0.1, max_tokens=7, stop=["x"],
                                           seed=3, ignore_eos=True, presence_penalty=0.5, frequency_penalty=-0.5,
                                           repetition_penalty=1.3, logprobs=4)
    assert (p.spec.n, p.spec.k, p.stream, p.include_usage, p.logprobs) == (2, 0, True, True, True)
    assert parse_completion(g, {"prompt": ["one two"]}).spec.prompt_ids == [3, 3]        # a batch of one


def test_chat_fields(g):
    p = parse_chat(g, {"messages": [{"role": "developer", "content": "abc"},
                                    {"role": "user", "content": [{"type": "text", "text": "de"},
                                                                 {"type": "text", "text": "f"}]}],
                       "max_completion_tokens": 5, "max_tokens": 9, "logprobs": True, "top_logprobs": 3})
    assert g.tokenizer.rendered == [{"role": "system", "content": "abc"}, {"role": "user", "content": "def"}]
    assert p.spec.prompt_ids == [1, 3, 3, 2] and p.spec.params.max_tokens == 5 and p.spec.params.logprobs == 3
    default = parse_chat(g, {"messages": [{"role": "user", "content": "x"}]})
    assert default.spec.params.max_tokens == 64 - 3 and default.spec.params.logprobs is None   # rest of the context


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "a", "temperature": "hot"}, "temperature", "must be a number"),
    ({"prompt": "a", "temperature": True}, "temperature", "must be a number"),
    ({"prompt": "a", "top_p": 0}, "top_p", "(0, 1]"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "[1, 32768]"),
    ({"prompt": "a", "n": 17}, "n", "[1, 16]"),
    ({"prompt": "a", "num_speculative_tokens": 9}, "num_speculative_tokens", "[0, 8]"),
    ({"prompt": "a", "presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty", "(0, 2]"),
    ({"prompt": "a", "logprobs": 21}, "logprobs", "[0, 20]"),
    ({"prompt": "a", "stop": [1]}, "stop", "strings"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ({"prompt": "a", "echo": True}, "echo", "not supported"),
    ({"prompt": "a", "suffix": "z"}, "suffix", "not supported"),
    ({"prompt": "a", "logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ({"prompt": "a", "best_of": 3}, "best_of", "not supported"),
    ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"prompt": []}, "prompt", "required"),
    ({}, "prompt", "required"),
    ({"prompt": [1, 100]}, "prompt[1]", "outside the vocabulary"),
])
def test_bad_completion_fields_are_named(g, body, param, words):
    with pytest.raises(ValueError) as e:
        parse_completion(g, body)
    err = http_error_for(e.value)
    assert err.status == 400 and err.param == param and words in err.message, err.message


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_chat_fields_are_named(g, body, param):
    with pytest.raises(FieldError) as e:
        parse_chat(g, body)
    assert http_error_for(e.value).param == param


def test_too_long_prompts_are_413(g):
    for body in ({"prompt": list(range(1, 65))}, {"prompt": "x " * 2000}):
        with pytest.raises(SequenceTooLongError) as e:
            parse_completion(g, body)
        err = http_error_for(e.value)
        assert err.status == 413 and err.code == "context_length_exceeded" and err.param == "prompt"


def test_unknown_fields_are_ignored_with_a_warning(g, caplog):
    with caplog.at_level(logging.WARNING):
        parse_completion(g, {"prompt": "a", "temprature": 0.5, "user": "u"})
    assert "temprature" in caplog.text and "user" not in caplog.text.split("ignored")[-1]


def test_errors_get_fitting_codes():
    assert http_error_for(QueueFullError("full")).status == 429
    assert http_error_for(KVCacheExhaustedError("kv")).status == 429
    down = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
    assert http_error_for(down).status == 503 and "verifier unavailable" in http_error_for(down).message
    busy = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "q")
    assert http_error_for(busy).status == 429
    assert http_error_for(RuntimeError("boom")).status == 500
    assert chat_messages([{"role": "assistant", "content": None}]) == [{"role": "assistant", "content": ""}]


def test_completion_logprobs_are_openais_columns():
    r = Request([1, 2], SamplingParams(logprobs=1))
    r.output_ids = [7, 8]
    r.output_logprobs = [TokenLogprob(7, -0.1, [(7, -0.1)]), TokenLogprob(8, -2.0, [(9, -0.5)])]
    r.finish_reason = "length"
    out = Renderer(Tokenizer(), "m", chat=False, num_speculative_tokens=-1, report_cached_tokens=False)
    body = out.response([r], ["<7><8>"], logprobs=True)
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["<7>", "<8>"] and lp["token_logprobs"] == [-0.1, -2.0] and lp["text_offset"] == [0, 3]
    assert lp["top_logprobs"] == [{"<7>": -0.1}, {"<9>": -0.5, "<8>": -2.0}]      # the sampled token always listed
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    chat = Renderer(Tokenizer(), "m", chat=True, num_speculative_tokens=-1, report_cached_tokens=True)
    content = chat.response([r], ["<7><8>"], logprobs=True)["choices"][0]["logprobs"]["content"]
    assert content[1] == {"token": "<8>", "logprob": -2.0, "bytes": list(b"<8>"),
                          "top_logprobs": [{"token": "<9>", "logprob": -0.5, "bytes": list(b"<9>")}]}
