"""The HTTP door end to end, driven by the official `openai` package (sync and async, streaming and not) against
real processes on loopback (verifier, draft, two gateways; tiny checkpoints). Results are compared with the
in-process twin (common.llm.LLM) on the same checkpoints: the door must not change what the engine computes.

The verifier-down test stops the verifier: it runs last in this file (pytest keeps file order).
"""
import asyncio
import http.client
import json
import os
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest

from common.distributed import free_port
from common.llm import LLM
from common.speculative.params import SamplingParams
from scripts.dev.metrics_scrape import scrape
from scripts.dev.topology import LocalTopology
from tests.checkpoints import WORD_CHAT_TEMPLATE, build_model_folder, perturbed_copy
from tests.reliability import wait_until

KEY = "test-key-0123456789abcdef"
LIMITED_KEY = "limited-key-0123456789abc"
QUEUE_KEY = "queue-key-0123456789abcdef"
BODY_KEY = "body-key-0123456789abcdefg"
DRAIN_KEY = "drain-key-0123456789abcdef"
MODEL = "target"
PROMPT = [5, 9, 2, 77, 31]
CONVERSATION = [{"role": "system", "content": "<w9><w8>"}, {"role": "user", "content": "<w10><w11><w12>"},
                {"role": "assistant", "content": "<w20><w21>"}, {"role": "user", "content": "<w13><w14>"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    target = build_model_folder(root / MODEL, seed=21, chat_template=WORD_CHAT_TEMPLATE)
    return str(target), str(perturbed_copy(target, root / "draft", noise=0.05))


@pytest.fixture(scope="module")
def twin(models):
    with LLM(models[0], models[1], num_speculative_tokens=3, dtype="float32", kv_cache_memory_gib=0.05) as llm:
        yield llm


@pytest.fixture(scope="module")
def topo(models, tmp_path_factory):
    t = LocalTopology(models[0], models[1], tp=1, dtype="float32", ports=(free_port(), free_port(), free_port()),
                      k="3", log_dir=tmp_path_factory.mktemp("logs"), http_port=free_port(),
                      api_keys=[KEY, LIMITED_KEY, QUEUE_KEY, BODY_KEY, DRAIN_KEY], extra_env={"SPECD_RATE_LIMIT_RPS": "0"})
    t.service_env["verifier"] = {"SPECD_METRICS_PORT": str(free_port())}
    t.start(timeout_s=180)
    # A second gateway in front of the same services, with tight bounds: 2 requests per key, then ~none (each
    # test on it has its own key); one request at a time; 1 MiB bodies.
    t.limited_port, t.limited_http = free_port(), free_port()
    t.service_env["limited"] = {"SPECD_RATE_LIMIT_RPS": "0.001", "SPECD_RATE_LIMIT_BURST": "2"}
    t.start_gateway("limited", t.limited_port, t.limited_http,
                    ("--max-concurrent-rpcs", "1", "--max-message-mib", "1"))
    t.wait_serving(f"127.0.0.1:{t.limited_port}", "limited", 60)
    yield t
    t.stop()


def base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def client(topo):
    with openai.OpenAI(base_url=base_url(topo.http_port), api_key=KEY, timeout=120, max_retries=0) as c:
        yield c


def in_process_text(twin, ids, params, proposer=None):
    return twin.generate([ids], params, proposer=proposer)[0]


# ---- completions ------------------------------------------------------------------------------------------
def test_greedy_completion_equals_in_process_target_only(client, twin):
    expected = in_process_text(twin, PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 12, 17)
    spec = r.choices[0].model_extra["spec_decode"]
    assert spec["num_speculative_tokens"] == 3 and spec["num_draft_tokens"] > 0
    assert spec["mean_acceptance_length"] == pytest.approx(1 + spec["num_accepted_draft_tokens"] / spec["rounds"],
                                                           abs=1e-5)
    assert sum(spec["acceptance_histogram"]) == spec["rounds"]


def test_a_text_prompt_and_the_k_extension_field(client, twin):
    text = "<w5><w9><w2><w77>"
    expected = twin.generate(text, SamplingParams(max_tokens=8, ignore_eos=True), proposer=None)[0]
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True, "num_speculative_tokens": 0})
    assert r.choices[0].text == expected.text
    spec = r.choices[0].model_extra["spec_decode"]
    assert spec["num_speculative_tokens"] == 0 and spec["num_draft_tokens"] == 0 and spec["rounds"] == 8


def test_n_sampled_completions_are_each_the_in_process_speculative_sample_with_seed_plus_i(client, twin):
    seed = 1234
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=seed, n=3,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    for i, text in enumerate(texts):
        # seeded speculation is reproducible: through the services == in process with the same draft and K (its
        # random streams are keyed by seed, round and position)
        exp = twin.generate([PROMPT], SamplingParams(temperature=1.0, seed=seed + i, max_tokens=10, ignore_eos=True))[0]
        assert text == exp.text
    assert len(set(texts)) > 1                       # independent samples, not one sample three times
    assert r.usage.completion_tokens == 30


def test_stop_strings_cut_the_text_and_end_the_request(client, twin):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[full.index(">", 12) + 1:][:5]          # a piece of the greedy output after a few tokens
    assert stop and stop in full
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "<w999>"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 12


def test_streamed_completion_equals_the_whole_one_and_ends_with_usage(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len(chunks) > 3                             # streamed as rounds complete, not in one piece


# ---- chat -------------------------------------------------------------------------------------------------
def test_a_three_turn_conversation_equals_in_process_on_the_rendered_prompt(client, twin):
    ids = twin.tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids[-2:] == [1, 4] and 9 in ids and 20 in ids        # system, both user turns, the assistant turn
    expected = twin.generate([ids], SamplingParams(max_tokens=10, ignore_eos=True), proposer=None)[0]
    r = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(ids)


def test_chat_streams_role_first_then_content(client):
    whole = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == "length" and "spec_decode" in last.choices[0].model_extra
    assert chunks[-1].usage.completion_tokens == 10


def test_async_client_streams_concurrent_chats(topo):
    async def run():
        async with openai.AsyncOpenAI(base_url=base_url(topo.http_port), api_key=KEY, max_retries=0) as c:
            async def one(seed):
                text = ""
                stream = await c.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=8,
                                                         temperature=0.8, seed=seed, stream=True,
                                                         extra_body={"ignore_eos": True})
                async for chunk in stream:
                    text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
                return text
            texts = await asyncio.gather(*(one(s) for s in (1, 2, 1, 2)))
            whole = await c.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=8,
                                                    temperature=0.8, seed=1, extra_body={"ignore_eos": True})
            return texts, whole.choices[0].message.content
    texts, whole = asyncio.run(run())
    assert texts[0] == texts[2] == whole and texts[1] == texts[3]         # seeded: reproducible, under load too


# ---- logprobs: the target's, accepted drafts included --------------------------------------------------------
def teacher_forced_logprobs(twin, prompt, output):
    """log-softmax of the target's logits at each output position, the output fed as given (in process)."""
    import torch
    from common.engine.forward_io import SequenceChunk
    try:
        logits = twin.target.forward([SequenceChunk(-7, prompt + output, num_logits=len(output) + 1)]).logits[0]
    finally:
        twin.target.free(-7)
    return torch.log_softmax(logits[:-1].float(), dim=-1)              # [len(output), vocab]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_are_the_targets_at_every_emitted_token(client, twin, temperature):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=temperature, seed=7,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert r.choices[0].model_extra["spec_decode"]["num_accepted_draft_tokens"] > 0     # drafts were accepted
    output = twin.tokenizer.convert_tokens_to_ids(lp.tokens)
    assert len(output) == 10
    target = teacher_forced_logprobs(twin, PROMPT, output)
    for i, (got, tops) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
        assert got == pytest.approx(float(target[i, output[i]]), abs=1e-4)
        best = target[i].topk(3)
        want = {twin.tokenizer.convert_ids_to_tokens(int(t)): float(v) for v, t in zip(best.values, best.indices)}
        assert {k: v for k, v in tops.items() if k in want} == pytest.approx(want, abs=1e-4)
        assert set(want) <= set(tops) and len(tops) <= 4               # 3 alternatives + the sampled token
    if temperature == 0:                                               # and the in-process target-only run agrees
        [expected] = twin.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True, logprobs=3),
                                   proposer=None)
        assert [t.logprob for t in expected.logprobs] == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_chat_logprobs(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "<w5><w9>"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-6) for t in content)   # greedy: argmax
    assert "".join(t.token for t in content) == chat.choices[0].message.content


# ---- routes and framing -------------------------------------------------------------------------------------
def test_models_health_and_metrics(client, topo):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with urllib.request.urlopen(f"http://127.0.0.1:{topo.http_port}/health", timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}
    with urllib.request.urlopen(f"http://127.0.0.1:{topo.http_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert "specd_requests_total" in text and "specd_time_to_first_token_seconds_bucket" in text


def _raw_post(port: int, path: str, body, key: str = KEY, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body),
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp, resp.read(), conn


def test_sse_framing(topo):
    resp, data, _ = _raw_post(topo.http_port, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 6,
                                                                 "temperature": 0, "stream": True,
                                                                 "ignore_eos": True})
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    text = data.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)    # one data line per event
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert all(p["object"] == "text_completion" and p["id"] == payloads[0]["id"] for p in payloads)


# ---- errors: OpenAI's shape, fitting codes ------------------------------------------------------------------
def test_a_bad_field_is_400_naming_it_and_its_limit(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, top_p=1.5)
    assert e.value.status_code == 400 and e.value.body["param"] == "top_p" and "(0, 1]" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=4, logprobs=True,
                                       top_logprobs=21)
    assert e.value.body["param"] == "top_logprobs" and "[0, 20]" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True)
    assert e.value.body["param"] == "echo" and "not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}], max_tokens=4)
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=17)
    assert e.value.body["param"] == "n" and "[1, 16]" in e.value.body["message"]


def test_unknown_model_and_route_are_404(client, topo):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    assert e.value.body["param"] == "model" and MODEL in e.value.body["message"]
    resp, data, _ = _raw_post(topo.http_port, "/v1/embeddings", {"input": "x"})
    assert resp.status == 404 and json.loads(data)["error"]["type"] == "not_found_error"


def test_too_large_is_413(client, topo):
    with pytest.raises(openai.APIStatusError) as e:                  # 256-token context: 300 ids cannot fit
        client.completions.create(model=MODEL, prompt=[7] * 300, max_tokens=4)
    assert e.value.status_code == 413 and "context limit of 256" in e.value.body["message"]
    resp, data, _ = _raw_post(topo.limited_http, "/v1/completions", None, BODY_KEY,
                              raw=b'{"prompt": "' + b"x" * (1 << 20) + b'"}')
    assert resp.status == 413 and "request body over" in json.loads(data)["error"]["message"]


def test_a_bad_key_is_401_and_never_logged(topo):
    with openai.OpenAI(base_url=base_url(topo.http_port), api_key="wrong-key-0123456789abc", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as e:
            c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert e.value.status_code == 401
    logs = "".join(p.read_text() for p in topo.log_dir.glob("*.log"))
    assert "wrong-key-0123456789abc" not in logs and KEY not in logs


def test_rate_limit_is_429_per_key(topo):
    with openai.OpenAI(base_url=base_url(topo.limited_http), api_key=LIMITED_KEY, max_retries=0) as c:
        for _ in range(2):                                     # the burst
            c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 429 and "rate limit" in e.value.body["message"]


def test_the_concurrency_bound_is_429_at_once(topo):
    with openai.OpenAI(base_url=base_url(topo.limited_http), api_key=QUEUE_KEY, max_retries=0) as c:
        stream = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, stream=True,
                                      extra_body={"ignore_eos": True})
        next(iter(stream))                                     # the one allowed request is running
        t = time.monotonic()
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert time.monotonic() - t < 5 and "at most 1" in e.value.body["message"]
        stream.close()


def test_a_client_gone_mid_stream_frees_its_verifier_session(topo):
    port = int(topo.service_env["verifier"]["SPECD_METRICS_PORT"])
    sessions = lambda: scrape(port).get("specd_verifier_sessions", 0.0)    # noqa: E731
    wait_until(lambda: sessions() == 0, 30, "verifier sessions left over by earlier tests")
    resp, _, conn = None, None, http.client.HTTPConnection("127.0.0.1", topo.http_port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 200,
                                                             "stream": True, "ignore_eos": True}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")
    assert sessions() == 1
    conn.sock.close()                                          # the client goes away mid-stream
    wait_until(lambda: sessions() == 0, 10, "the verifier session of a disconnected HTTP client")


def test_draining_is_503(topo):
    with openai.OpenAI(base_url=base_url(topo.limited_http), api_key=DRAIN_KEY, max_retries=0) as c:
        stream = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, stream=True,
                                      extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        os.killpg(topo.procs["limited"].pid, signal.SIGTERM)   # drain: in-flight finishes, new ones refused
        resp, data, _ = _raw_post(topo.limited_http, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2},
                                  DRAIN_KEY)
        assert resp.status == 503 and json.loads(data)["error"]["code"] == "draining"
        rest = list(it)                                         # the request in flight still completes
        assert rest[-1].choices[0].finish_reason == "length"
    topo.procs["limited"].wait(timeout=60)


def test_verifier_down_is_503_and_health_says_so(client, topo):
    topo.kill("verifier")                                      # last test of the file: the topology stays broken
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert e.value.status_code == 503 and "verifier unavailable" in e.value.body["message"]
    with pytest.raises(urllib.error.HTTPError) as h:
        urllib.request.urlopen(f"http://127.0.0.1:{topo.http_port}/health", timeout=10)
    assert h.value.code == 503
