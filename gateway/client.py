"""The Python client of the gateway, on the generated stubs: `SpecdClient("host:50051").generate("...")`.

`tls=TLSConfig(ca="ca.crt")` (optionally with `cert`/`key` for a gateway that requires client certificates)
connects over TLS; `tls=TLSConfig()` trusts the system's roots; no `tls` is plaintext (loopback development).
`api_key=` is sent as `authorization: Bearer <key>` with every call, so it is refused on a plaintext channel to
anything but loopback (127.0.0.0/8, ::1, localhost) or a Unix socket: the key would cross the network readable.

When the process has set up tracing (`common.telemetry.tracing.setup_tracing("specd-client")`) before the client
is made, each call opens a CLIENT span: the root of the request's trace, carried to the gateway in metadata."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import grpc

from common.errors import ConfigError
from common.rpc.generated.specd.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from common.rpc.tls import TLSConfig, sync_channel
from common.telemetry.tracing import tracing_enabled

K_AUTO = -1
LOCAL_SCHEMES = ("unix:", "unix-abstract:")          # gRPC target schemes that never leave the host


def target_host(target: str) -> str:
    """The host part of a gRPC target: "h:port", "[v6]:port", "dns:///h:port", "ipv4:a:port", "ipv6:[v6]:port"."""
    rest = target.strip()
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if rest.lower().startswith(scheme):
            rest = rest[len(scheme):]
            if rest.startswith("//"):                   # dns://authority/host:port names the DNS server first
                rest = rest[2:].partition("/")[2]
            rest = rest.split(",")[0]                   # ipv4:a:p,b:p lists several addresses: the first decides
            break
    if rest.startswith("["):
        return rest[1:].partition("]")[0]
    if rest.count(":") > 1:                             # an IPv6 address without brackets (and without a port)
        return rest
    return rest.partition(":")[0]


def is_loopback(target: str) -> bool:
    """Whether `target` stays on this host: a Unix socket, localhost, 127.0.0.0/8 or ::1."""
    if target.strip().lower().startswith(LOCAL_SCHEMES):
        return True
    host = target_host(target).lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])      # fe80::1%eth0: the zone is not part of the address
    except ValueError:
        return False                                            # a name: it may resolve to any host
    mapped = getattr(ip, "ipv4_mapped", None)                   # ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def check_api_key_channel(target: str, tls: TLSConfig | None, api_key: str | None) -> None:
    """Raise ConfigError when `api_key` would be sent in plaintext to a host other than this one."""
    if not api_key or (tls is not None and not tls.insecure) or is_loopback(target):
        return
    raise ConfigError(f"api_key over a plaintext channel to {target!r}: the key would cross the network "
                      "unencrypted. Turn TLS on: SpecdClient(target, tls=TLSConfig(ca='ca.crt'), api_key=...) "
                      "(TLSConfig() trusts the system's roots; `specd generate --gateway`: --tls-ca, without "
                      "--insecure). Plaintext with a key is only for loopback (127.0.0.0/8, ::1, localhost)")


class SpecdClient:
    def __init__(self, target: str = "127.0.0.1:50051", timeout_s: float = 600.0, *, tls: TLSConfig | None = None,
                 api_key: str | None = None):
        check_api_key_channel(target, tls, api_key)
        self.channel = sync_channel(target, tls, options=[("grpc.max_receive_message_length", 64 << 20)])
        channel = self.channel
        if tracing_enabled():
            from common.telemetry.client_interceptors import TracingClientInterceptor
            channel = grpc.intercept_channel(channel, TracingClientInterceptor())
        self.stub = gateway_pb2_grpc.GatewayStub(channel)
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    @staticmethod
    def request(prompt: str | list[int] | list[dict], max_tokens: int = 128, temperature: float = 0.0,
                top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None,
                stop: list[str] | None = None, num_speculative_tokens: int | str | None = None,
                use_chat_template: bool = False, ignore_eos: bool = False, n: int = 1,
                logprobs: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                repetition_penalty: float = 1.0) -> gateway_pb2.GenerateRequest:
        """`prompt`: text, token ids, or a conversation ([{"role", "content"}, ...], rendered through the chat
        template). `logprobs`: alternatives per token (0..20) to get the target's logprobs; None = none."""
        sampling = common_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                             presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                             repetition_penalty=repetition_penalty)
        if seed is not None:
            sampling.seed = seed
        if logprobs is not None:
            sampling.logprobs = logprobs
        req = gateway_pb2.GenerateRequest(max_tokens=max_tokens, sampling=sampling, stop=stop or [],
                                          use_chat_template=use_chat_template, ignore_eos=ignore_eos, n=n)
        if isinstance(prompt, str):
            req.prompt = prompt
        elif prompt and all(isinstance(m, dict) for m in prompt):
            req.messages.messages.extend(gateway_pb2.ChatMessage(role=m["role"], content=m["content"])
                                         for m in prompt)
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
