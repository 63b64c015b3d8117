"""The OpenAI-compatible HTTP door of the gateway (aiohttp), served in the gRPC server's own event loop.

Why aiohttp: it runs inside an event loop someone else owns (`AppRunner` + `TCPSite`), so the gateway keeps one
loop, one round runner and one drain for both doors, with no second server framework taking over signals or the
loop (uvicorn's `Server.serve` can be embedded too, but brings its own lifecycle and signal handling, and FastAPI's
validation layer would be a second definition of limits specd already checks in one place). It streams with
`StreamResponse` (SSE needs nothing more) and can cancel a handler whose client went away, which frees its
verifier sessions at once.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (200 only while the gateway
and its verifier serve), GET /metrics (Prometheus). The same API keys (`Authorization: Bearer <key>`), per-key rate
limits and drain as the gRPC door; errors in OpenAI's JSON shape (gateway/openai_api/errors.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.auth import ApiKeyAuth, bind_key_id, presented_key
from gateway.generation import Generator
from gateway.openai_api.errors import (HttpError, draining, http_error_for, not_found, rate_limited,
                                       unauthorized)
from gateway.openai_api.protocol import ParsedRequest, parse_chat, parse_completion
from gateway.openai_api.responses import Renderer

log = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_OPEN_ROUTES = ("/health", "/metrics")          # answered without an API key, like gRPC health and reflection


class HttpDoor:
    def __init__(self, generator: Generator, *, model: str, admission, auth: ApiKeyAuth | None = None,
                 verifier_ready: Callable[[], Awaitable[bool]] | None = None, report_cached_tokens: bool = True,
                 max_concurrent: int = 256, max_body_bytes: int = 16 << 20):
        """`admission`: the gRPC server's AdmissionInterceptor: its drain flag refuses new requests here too, and
        requests in flight here count toward the drain's wait. `verifier_ready`: whether the verifier serves (for
        /health)."""
        self.generator = generator
        self.model = model
        self.admission = admission
        self.auth = auth
        self.verifier_ready = verifier_ready
        self.report_cached_tokens = report_cached_tokens
        self.max_concurrent = max_concurrent
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0
        self.started = int(time.time())
        self._runner: web.AppRunner | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._authenticate], client_max_size=self.max_body_bytes)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model_card)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self, host: str, port: int, ssl_context=None) -> int:
        """Serve on host:port (0: a free port); returns the bound port."""
        # handler_cancellation: a client that disconnects cancels its handler, so its rounds stop and release
        # their verifier sessions at once, not at the next chunk written.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context, reuse_address=True)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if ssl_context else "http", host, bound)
        return bound

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- middlewares ----------------------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except HttpError as e:
            return _error_response(e)
        except web.HTTPException as e:          # aiohttp's own: unknown route, wrong method, body too large
            if e.status == 404:
                return _error_response(not_found(f"no route {request.method} {request.path}"))
            kind = "invalid_request_error" if e.status < 500 else "internal_error"
            return _error_response(HttpError(e.status, e.reason if e.status != 413 else
                                             f"request body over {self.max_body_bytes} bytes", kind))

    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        if self.auth is None or request.path in _OPEN_ROUTES:
            return await handler(request)
        kid = self.auth.identify(presented_key([(k.lower(), v) for k, v in request.headers.items()]))
        if kid is None:
            self.auth.refused("unauthenticated", "HTTP requests refused: missing or invalid API key")
            raise unauthorized()
        if not self.auth.admit(kid):
            self.auth.refused("rate_limited", f"HTTP requests refused: rate limit hit by key {kid}", kid)
            raise rate_limited(self.auth.limit.describe())
        bind_key_id(kid)                        # this request's task: the generator names the cache namespace by it
        return await handler(request)

    # ---- generation routes ----------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if self.admission.draining:
            from common.rpc.admission import DRAINING_MESSAGE
            raise draining(DRAINING_MESSAGE)
        if self.in_flight >= self.max_concurrent:
            raise HttpError(429, f"too many concurrent requests: at most {self.max_concurrent} "
                                 "(--max-concurrent-rpcs); retry later", "rate_limit_error", code="queue_full")
        self.in_flight += 1
        self.admission.enter()
        try:
            body = await _json_body(request)
            try:
                parsed = (parse_chat if chat else parse_completion)(self.generator, body)
            except Exception as e:  # noqa: BLE001 - refused before it ran
                from common.telemetry import metrics
                from gateway.generation import outcome_label
                metrics.REQUESTS.labels(outcome_label(e)).inc()
                raise http_error_for(e) from None
            if parsed.model and parsed.model != self.model:
                raise not_found(f"the model {parsed.model!r} does not exist here; this gateway serves "
                                f"{self.model!r} (GET /v1/models)", "model")
            renderer = Renderer(self.generator.tokenizer, self.model, chat,
                                self.generator.num_speculative_tokens(parsed.spec), self.report_cached_tokens)
            if parsed.stream:
                return await self._stream(request, parsed, renderer)
            return await self._whole(parsed, renderer)
        finally:
            self.in_flight -= 1
            self.admission.leave()

    async def _whole(self, parsed: ParsedRequest, renderer: Renderer) -> web.Response:
        n = parsed.spec.n
        texts: list[list[str]] = [[] for _ in range(n)]
        finals = [None] * n
        try:
            async with contextlib.aclosing(self.generator.stream(parsed.spec)) as events:
                async for ev in events:
                    texts[ev.index].append(ev.text)
                    finals[ev.index] = ev.request
        except Exception as e:  # noqa: BLE001
            raise http_error_for(e) from None
        return web.json_response(renderer.response(finals, ["".join(t) for t in texts], parsed.logprobs),
                                 dumps=_dumps)

    async def _stream(self, request: web.Request, parsed: ParsedRequest, renderer: Renderer) -> web.StreamResponse:
        """SSE: `data: {chunk}` lines, a usage chunk when asked, `data: [DONE]`. A failure before the first round
        answers with its HTTP status; a later one (the status line is sent) is an error event before [DONE]."""
        async with contextlib.aclosing(self.generator.stream(parsed.spec)) as events:
            try:
                first = await anext(events)
            except StopAsyncIteration:
                first = None
            except Exception as e:  # noqa: BLE001
                raise http_error_for(e) from None
            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(request)
            finals: dict[int, object] = {}
            try:
                if renderer.chat:
                    for i in range(parsed.spec.n):
                        await _send(response, renderer.first_chunk(i, parsed.include_usage))
                ev = first
                while ev is not None:
                    finals[ev.index] = ev.request
                    if ev.text or ev.finished or (parsed.logprobs and ev.token_ids):
                        await _send(response, renderer.chunk(ev.index, ev.request, ev.text,
                                                             ev.logprobs if parsed.logprobs else None,
                                                             parsed.include_usage))
                    ev = await anext(events, None)
                if parsed.include_usage:
                    await _send(response, renderer.usage_chunk([finals[i] for i in range(parsed.spec.n)]))
            except (ConnectionError, RuntimeError) as e:
                if request.transport is None or request.transport.is_closing():
                    raise                                   # the client went away: nothing more to write
                await _send(response, http_error_for(e).body())
            except Exception as e:  # noqa: BLE001
                await _send(response, http_error_for(e).body())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response

    # ---- the other routes -----------------------------------------------------------------------------------
    def _card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.started, "owned_by": "specd",
                "max_model_len": self.generator.max_model_len}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._card()]})

    async def model_card(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.model:
            raise not_found(f"the model {request.match_info['model']!r} does not exist here", "model")
        return web.json_response(self._card())

    async def health(self, request: web.Request) -> web.Response:
        if self.admission.draining:
            return web.json_response({"status": "draining"}, status=503)
        if self.verifier_ready is not None and not await self.verifier_ready():
            return web.json_response({"status": "verifier not serving"}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()                          # over client_max_size: aiohttp raises 413
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise HttpError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "request body must be a JSON object")
    return body


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def _send(response: web.StreamResponse, obj: dict) -> None:
    await response.write(f"data: {_dumps(obj)}\n\n".encode())


def _error_response(e: HttpError) -> web.Response:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return web.json_response(e.body(), status=e.status, headers=headers)
