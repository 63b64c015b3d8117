"""Limits of docs/limits.md that no other test covers: prompt length in characters (refused before tokenizing) and
the message size flag."""
from types import SimpleNamespace

import pytest

from scripts.cli import build_parser
from common.rpc.flags import server_config
from common.rpc.generated.specd.v1 import gateway_pb2
from common.speculative.adaptive_k import CostModel
from gateway.generation import PROMPT_CHARS_PER_TOKEN, Generator
from gateway.servicer import GatewayServicer


class CountingTokenizer:
    def __init__(self):
        self.calls = 0

    def encode(self, text, add_special_tokens=False):
        self.calls += 1
        return [1] * min(len(text), 3)


def test_a_prompt_too_long_in_characters_is_refused_before_tokenizing():
    tokenizer = CountingTokenizer()
    servicer = GatewayServicer(Generator(SimpleNamespace(max_model_len=8, costs=CostModel()), tokenizer, 0, 8, 100))
    limit = PROMPT_CHARS_PER_TOKEN * 8
    with pytest.raises(ValueError, match=rf"prompt: {limit + 1} characters, must be <= {limit} "):
        servicer._spec(gateway_pb2.GenerateRequest(prompt="x" * (limit + 1)))
    assert tokenizer.calls == 0
    assert servicer._spec(gateway_pb2.GenerateRequest(prompt="x" * limit)).prompt_ids == [1, 1, 1]


def test_message_size_flag(monkeypatch):
    monkeypatch.delenv("SPECD_MAX_MESSAGE_MIB", raising=False)
    args = build_parser().parse_args(["draft", "--insecure"])
    assert server_config(args).max_message_bytes == 16 << 20
    args = build_parser().parse_args(["draft", "--insecure", "--max-message-mib", "64"])
    assert dict(server_config(args).channel_options())["grpc.max_receive_message_length"] == 64 << 20
