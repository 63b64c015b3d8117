"""The Python client of the gateway, on the generated stubs: `SpecdClient("host:50051").generate("...")`.

`tls=TLSConfig(ca="ca.crt")` (optionally with `cert`/`key` for a gateway that requires client certificates)
connects over TLS; `tls=TLSConfig()` trusts the system's roots; no `tls` is plaintext (loopback development).
`api_key=` is sent as `authorization: Bearer <key>` with every call.

When the process has set up tracing (`common.telemetry.tracing.setup_tracing("specd-client")`) before the client
is made, each call opens a CLIENT span: the root of the request's trace, carried to the gateway in metadata."""
from __future__ import annotations

from collections.abc import Iterator

import grpc

from common.rpc.generated.specd.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from common.rpc.tls import TLSConfig, sync_channel
from common.telemetry.tracing import tracing_enabled

K_AUTO = -1


class SpecdClient:
    def __init__(self, target: str = "127.0.0.1:50051", timeout_s: float = 600.0, *, tls: TLSConfig | None = None,
                 api_key: str | None = None):
        self.channel = sync_channel(target, tls, options=[("grpc.max_receive_message_length", 64 << 20)])
        channel = self.channel
        if tracing_enabled():
            from common.telemetry.client_interceptors import TracingClientInterceptor
            channel = grpc.intercept_channel(channel, TracingClientInterceptor())
        self.stub = gateway_pb2_grpc.GatewayStub(channel)
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    @staticmethod
    def request(prompt: str | list[int], max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                num_speculative_tokens: int | str | None = None, use_chat_template: bool = False,
                ignore_eos: bool = False) -> gateway_pb2.GenerateRequest:
        sampling = common_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
        if seed is not None:
            sampling.seed = seed
        req = gateway_pb2.GenerateRequest(max_tokens=max_tokens, sampling=sampling, stop=stop or [],
                                          use_chat_template=use_chat_template, ignore_eos=ignore_eos)
        if isinstance(prompt, str):
            req.prompt = prompt
        else:
            req.prompt_token_ids.ids.extend(prompt)
        if num_speculative_tokens is not None:
            req.num_speculative_tokens = K_AUTO if num_speculative_tokens == "auto" else int(num_speculative_tokens)
        return req

    def generate(self, prompt, **kwargs) -> gateway_pb2.GenerateReply:
        return self.stub.Generate(self.request(prompt, **kwargs), timeout=self.timeout_s, metadata=self._metadata)

    def stream(self, prompt, **kwargs) -> Iterator[gateway_pb2.GenerateChunk]:
        yield from self.stub.GenerateStream(self.request(prompt, **kwargs), timeout=self.timeout_s,
                                            metadata=self._metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
