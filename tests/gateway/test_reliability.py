"""Faults, drain, cancellation, load, bad and random input through the whole topology: verifier (TP=2), draft and
gateway as real processes on loopback, tiny checkpoints. Each test asserts one promise of docs/reliability.md and
prints its figures (merged into $SPECD_RELIABILITY_REPORT when set).

One file of ~400 lines on purpose: every drill shares the module's one topology and reference outputs (started and
computed once), which a split would start again per file."""
import collections
import concurrent.futures as cf
import math
import os
import random
import signal
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.distributed import free_port
from common.llm import LLM
from common.rpc.generated.specd.v1 import gateway_pb2
from common.rpc.health_check import check
from common.speculative.params import SamplingParams
from gateway.client import SpecdClient
from scripts.dev.topology import LocalTopology
from tests.checkpoints import build_model_folder, perturbed_copy
from tests.reliability import (EXPECTED_CODES, PLAUSIBLE_SAMPLING, TOKENS, idle_state, latency_figures, messages,
                               record, scrape, wait_for_state, wait_until)

MAX_LEN = 1024                  # the tiny target's context: room for streams long enough to interrupt
PROMPT = [5, 9, 2, 77, 31]
LONG = 300                      # tokens of the streams that get interrupted
LONG_RUNS = {"greedy": {}, "seeded": dict(temperature=1.0, top_p=0.9, seed=7)}
GATEWAY_BOUND = 8               # --max-concurrent-rpcs of the gateway: admission control under load
LOAD_CLIENTS, LOAD_S, LOAD_TOKENS = 64, 6.0, 12
LOAD_PROMPTS = [[i + 1, 40 + i, 7, (13 * i) % 120 + 1] for i in range(8)]
UNAVAILABLE, INVALID = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    target = build_model_folder(root / "target", seed=21, max_position_embeddings=MAX_LEN)
    return str(target), str(perturbed_copy(target, root / "draft", noise=0.05))


@pytest.fixture(scope="module")
def reference(models):
    """Target-only greedy in process: what every admitted request must return."""
    prompts = [PROMPT, *LOAD_PROMPTS]
    with LLM(models[0], dtype="float32", kv_cache_memory_gib=0.05) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=LOAD_TOKENS, ignore_eos=True))
    return {tuple(p): o.token_ids for p, o in zip(prompts, outs)}


@pytest.fixture(scope="module")
def topo(models, tmp_path_factory):
    t = LocalTopology(models[0], models[1], tp=2, dtype="float32", ports=(free_port(), free_port(), free_port()),
                      k="3", log_dir=tmp_path_factory.mktemp("reliability-logs"))
    t.metrics = {"gateway": free_port(), "verifier": free_port()}
    small_kv = {"SPECD_KV_CACHE_GIB": "0.05"}
    t.service_env = {
        "verifier": {**small_kv, "SPECD_METRICS_PORT": str(t.metrics["verifier"]), "SPECD_MAX_QUEUE": "32"},
        "draft": small_kv,
        "gateway": {"SPECD_METRICS_PORT": str(t.metrics["gateway"]), "SPECD_GRACE_S": "30",
                    "SPECD_MAX_CONCURRENT_RPCS": str(GATEWAY_BOUND)}}
    t.start(timeout_s=180)
    yield t
    t.stop()


@pytest.fixture(scope="module")
def client(topo):
    with SpecdClient(f"127.0.0.1:{topo.gateway_port}", timeout_s=120) as c:
        yield c


@pytest.fixture(scope="module")
def idle(topo):
    """The topology's idle state (verifier KV blocks, sessions, queue; gateway requests in flight)."""
    return state(topo)


def state(topo) -> dict:
    return {**idle_state(scrape(topo.metrics["verifier"])),
            "gateway_in_flight": scrape(topo.metrics["gateway"])["specd_requests_in_flight"]}


def back_to_idle(topo, idle, timeout_s: float = 5.0) -> float:
    return wait_for_state(lambda: state(topo), idle, timeout_s, "back to idle")


@pytest.fixture(scope="module")
def uninterrupted(client, idle):
    """The long streams every interrupted one is compared with: tokens, seconds, rounds."""
    runs = {}
    for name, kw in LONG_RUNS.items():
        t = time.perf_counter()
        chunks = list(client.stream(PROMPT, max_tokens=LONG, ignore_eos=True, **kw))
        runs[name] = ([tok for c in chunks for tok in c.token_ids], time.perf_counter() - t, chunks[-1].stats.rounds)
        assert len(runs[name][0]) == LONG and len(chunks) > 20
    return runs


def stream_request(**kw) -> gateway_pb2.GenerateRequest:
    return SpecdClient.request(PROMPT, max_tokens=LONG, ignore_eos=True, **kw)


# ---- cancellation and deadlines ----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["stream cancelled", "stream past its deadline", "unary cancelled",
                                 "unary past its deadline"])
def test_a_client_that_goes_away_frees_its_session_and_kv_within_a_round(topo, client, idle, uninterrupted, how):
    seconds, rounds = uninterrupted["greedy"][1:]
    deadline = max(0.3, seconds / 4)                            # well before the request could finish
    if how.startswith("stream"):
        call = client.stub.GenerateStream(stream_request(), timeout=deadline if "deadline" in how else 60)
        next(call), next(call)
    else:
        call = client.stub.Generate.future(stream_request(), timeout=deadline if "deadline" in how else 60)
        time.sleep(deadline / 2)
    busy = state(topo)
    assert busy["specd_verifier_sessions"] == idle["specd_verifier_sessions"] + 1
    assert busy["specd_kv_blocks_used"] > idle["specd_kv_blocks_used"] and busy["gateway_in_flight"] == 1
    if "deadline" in how:
        with pytest.raises(grpc.RpcError) as e:
            list(call) if how.startswith("stream") else call.result()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        call.cancel()
    freed_s = back_to_idle(topo, idle)
    round_ms = seconds / rounds * 1000
    assert freed_s < max(1.0, 10 * round_ms / 1000), f"freed after {freed_s:.3f}s, rounds take {round_ms:.1f} ms"
    record(f"gateway_{how.replace(' ', '_')}", {"freed_after_ms": round(freed_s * 1000, 1),
                                                "round_ms": round(round_ms, 1), "leaked_kv_blocks": 0})


# ---- bad input through the public API ----------------------------------------------------------------------------
def bad(prompt=PROMPT, **kw) -> gateway_pb2.GenerateRequest:
    return SpecdClient.request(prompt, **{"max_tokens": 4, **kw})


def bad_min_p() -> gateway_pb2.GenerateRequest:
    req = bad(temperature=1.0)
    req.sampling.min_p = 1.0
    return req


def with_fields(req, **fields):
    for name, value in fields.items():
        if name == "prompt_token_ids":
            req.prompt_token_ids.SetInParent()
            del req.prompt_token_ids.ids[:]
            req.prompt_token_ids.ids.extend(value)
        else:
            setattr(req, name, value)
    return req


# (name, request, code, words the message must hold)
GATEWAY_BAD = [
    ("no prompt", gateway_pb2.GenerateRequest(max_tokens=4), INVALID, ["prompt: missing"]),
    ("empty prompt", bad(""), INVALID, ["prompt: empty"]),
    ("whitespace prompt", bad(" \n\t "), INVALID, ["prompt: empty or whitespace only"]),
    ("empty token ids", with_fields(gateway_pb2.GenerateRequest(max_tokens=4), prompt_token_ids=[]), INVALID,
     ["prompt_token_ids: empty"]),
    ("text prompt past the context limit", bad("<w5>" * 1100), INVALID, ["1100 tokens", "context limit of 1024"]),
    ("token prompt past the context limit", bad([1] * 1024), INVALID, ["1024 tokens", "context limit of 1024"]),
    ("token id = vocab size", bad([1, 128]), INVALID, ["prompt_token_ids", "[0, 128)"]),
    ("negative token id", bad([-1, 5]), INVALID, ["prompt_token_ids", "[0, 128)"]),
    ("negative max_tokens", bad(max_tokens=-5), INVALID, ["max_tokens=-5", "[1, 32768]"]),
    ("huge max_tokens", bad(max_tokens=2**31 - 1), INVALID, ["max_tokens=2147483647", "[1, 32768]"]),
    ("NaN temperature", bad(temperature=math.nan), INVALID, ["temperature=nan"]),
    ("negative temperature", bad(temperature=-0.5), INVALID, ["temperature=-0.5", "[1e-05, 100]"]),
    ("temperature that overflows logits", bad(temperature=1e-38), INVALID, ["temperature=", "1e-05"]),
    ("top_p just above 1", bad(temperature=1.0, top_p=1.0000001), INVALID, ["top_p=1.00000011", "(0, 1]"]),
    ("negative top_p", bad(temperature=1.0, top_p=-0.1), INVALID, ["top_p=-0.1", "(0, 1]"]),
    ("NaN top_p", bad(temperature=1.0, top_p=math.nan), INVALID, ["top_p=nan", "(0, 1]"]),
    ("min_p = 1", bad_min_p(), INVALID, ["min_p=1.0", "[0, 1)"]),
    ("seed past 2^63", bad(temperature=1.0, seed=2**63), INVALID, ["seed=9223372036854775808", "2^63"]),
    ("K above k_max", bad(num_speculative_tokens=9), INVALID, ["num_speculative_tokens=9", "[0, 8]"]),
    ("K below auto", bad(num_speculative_tokens=-2), INVALID, ["num_speculative_tokens=-2", "-1 (auto)"]),
    ("17 stop strings", bad(stop=["x"] * 17), INVALID, ["stop", "16"]),
    ("empty stop string", bad(stop=[""]), INVALID, ["stop"]),
    ("oversized message", bad("a" * (17 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, ["larger than max"]),
]


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
@pytest.mark.parametrize("request_,code,words", [c[1:] for c in GATEWAY_BAD], ids=[c[0] for c in GATEWAY_BAD])
def test_bad_request_gets_a_status_naming_the_field_and_limit(topo, client, reference, rpc, request_, code, words):
    with pytest.raises(grpc.RpcError) as e:
        reply = getattr(client.stub, rpc)(request_, timeout=30)
        list(reply) if rpc == "GenerateStream" else reply
    assert e.value.code() == code, e.value.details()
    assert all(w in e.value.details() for w in words), e.value.details()
    assert list(client.generate(PROMPT, max_tokens=4, ignore_eos=True).token_ids) == reference[tuple(PROMPT)][:4]


def test_undecodable_requests_are_invalid_argument_and_nothing_is_left(topo, client, reference, idle):
    raw = client.channel.unary_unary("/specd.v1.Gateway/Generate", request_serializer=None,
                                     response_deserializer=None)
    # prompt (field 1) in bad UTF-8 (proto3 strings must be UTF-8), and a field cut short
    for body in (b"\x0a\x04<w\xff>\x20\x04", b"\x12\x09\x0a\x07\x01\x02"):
        with pytest.raises(grpc.RpcError) as e:
            raw(body, timeout=30)
        assert e.value.code() == INVALID and "not a valid message" in e.value.details(), e.value.details()
    assert list(client.generate(PROMPT, max_tokens=4, ignore_eos=True).token_ids) == reference[tuple(PROMPT)][:4]
    back_to_idle(topo, idle)
    record("gateway_bad_input", {"cases": 2 * len(GATEWAY_BAD) + 2, "gateway_alive": True, "leaked_kv_blocks": 0})


def test_random_requests_never_crash_the_gateway_nor_leak(topo, client, reference, idle):
    codes = collections.Counter()
    t = time.perf_counter()

    def bounded(req):                       # a valid request generates at most 24 tokens: the run stays short
        if not 1 <= req.max_tokens <= 24:
            req.max_tokens = req.max_tokens if req.max_tokens < 0 or req.max_tokens > 32768 else 8
        return req

    hints = {**PLAUSIBLE_SAMPLING, "ids": TOKENS, "max_tokens": st.integers(1, 24),
             "num_speculative_tokens": st.integers(-1, 8), "stop": st.lists(st.text(min_size=1, max_size=6),
                                                                            max_size=3)}

    @settings(max_examples=120, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(messages(gateway_pb2.GenerateRequest, hints=hints).map(bounded), st.booleans())
    def generate(req, streamed):
        try:
            reply = (client.stub.GenerateStream if streamed else client.stub.Generate)(req, timeout=20)
            list(reply) if streamed else reply
            codes["OK"] += 1
        except grpc.RpcError as e:
            codes[e.code().name] += 1
            assert e.code().name in EXPECTED_CODES, f"{e.code().name}: {e.details()} for {req}"

    generate()
    assert topo.procs["gateway"].poll() is None and topo.procs["verifier"].poll() is None
    assert list(client.generate(PROMPT, max_tokens=4, ignore_eos=True).token_ids) == reference[tuple(PROMPT)][:4]
    back_to_idle(topo, idle)
    record("gateway_fuzz", {"examples": sum(codes.values()), "codes": dict(codes),
                            "seconds": round(time.perf_counter() - t, 1), "leaked_kv_blocks": 0})


# ---- load: bounded admission ---------------------------------------------------------------------------------------
def test_64_clients_are_admitted_up_to_the_bound_or_refused_at_once(topo, reference, idle):
    address = f"127.0.0.1:{topo.gateway_port}"
    clients = [SpecdClient(address, timeout_s=60) for _ in range(LOAD_CLIENTS)]
    admitted, refused, wrong, errors, tokens = [], [], [], [], [0]
    stop_at = time.monotonic() + LOAD_S

    def run(i):
        rng, n = random.Random(i), 0
        while time.monotonic() < stop_at:
            prompt, n = LOAD_PROMPTS[(i + n) % len(LOAD_PROMPTS)], n + 1
            t = time.perf_counter()
            try:
                if i % 2:
                    out = list(clients[i].generate(prompt, max_tokens=LOAD_TOKENS, ignore_eos=True).token_ids)
                else:
                    out = [tok for c in clients[i].stream(prompt, max_tokens=LOAD_TOKENS, ignore_eos=True)
                           for tok in c.token_ids]
            except grpc.RpcError as e:
                if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused.append(time.perf_counter() - t)
                    time.sleep(rng.uniform(0.1, 0.3))               # a polite client backs off
                else:
                    errors.append(f"{e.code().name}: {e.details()}")
                continue
            admitted.append(time.perf_counter() - t)
            tokens[0] += len(out)
            if out != reference[tuple(prompt)]:
                wrong.append((prompt, out))

    t0 = time.perf_counter()
    try:
        with cf.ThreadPoolExecutor(LOAD_CLIENTS) as pool:
            list(pool.map(run, range(LOAD_CLIENTS)))
    finally:
        for c in clients:
            c.close()
    wall = time.perf_counter() - t0
    assert not errors and not wrong, (errors[:5], wrong[:3])
    assert admitted and refused, (len(admitted), len(refused))
    assert max(refused) < 1.0                                           # refused at once: never queued, never hung
    settle_s = back_to_idle(topo, idle)
    record("gateway_load", {"clients": LOAD_CLIENTS, "seconds": round(wall, 1), "bound": GATEWAY_BOUND,
                            "admitted": len(admitted), "rejected": len(refused),
                            "admitted_latency": latency_figures(admitted),
                            "rejection_latency": latency_figures(refused),
                            "tokens_per_s": round(tokens[0] / wall, 1), "idle_after_s": round(settle_s, 3),
                            "leaked_sessions": 0, "leaked_kv_blocks": 0, "open_streams_after": 0})


# ---- verifier lost -------------------------------------------------------------------------------------------------
def test_verifier_killed_mid_stream_fails_fast_then_new_requests_succeed(topo, client, reference, uninterrupted):
    call = client.stub.GenerateStream(stream_request(), timeout=60)
    got = list(next(call).token_ids)
    topo.kill("verifier")                                               # SIGKILL, its TP rank with it
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        for chunk in call:
            got += chunk.token_ids
    failed_s = time.monotonic() - t
    assert e.value.code() == UNAVAILABLE and "verifier unavailable" in e.value.details(), e.value.details()
    assert failed_s < 10, f"failed after {failed_s:.1f}s: not fast"     # the client's deadline was 60 s
    message = e.value.details()
    assert got == uninterrupted["greedy"][0][:len(got)] and len(got) < LONG
    with pytest.raises(grpc.RpcError) as e:                             # while it is down: refused, not queued
        client.generate(PROMPT, max_tokens=4)
    assert e.value.code() == UNAVAILABLE

    t = time.monotonic()
    topo.start_verifier()
    topo.wait_serving(f"127.0.0.1:{topo.verifier_port}", "verifier", 120)
    restart_s = time.monotonic() - t

    def answers():
        try:
            return list(client.generate(PROMPT, max_tokens=4, ignore_eos=True).token_ids) == \
                reference[tuple(PROMPT)][:4]
        except grpc.RpcError as e:
            assert e.code() == UNAVAILABLE, e.details()                 # the gateway reconnecting, nothing else
            return False
    recovered_s = wait_until(answers, 10, "gateway serving again", interval_s=0.1)
    for prompt in LOAD_PROMPTS[:3]:
        assert list(client.generate(prompt, max_tokens=LOAD_TOKENS, ignore_eos=True).token_ids) == \
            reference[tuple(prompt)]
    record("verifier_killed", {"failed_after_ms": round(failed_s * 1000), "client_deadline_s": 60,
                               "error": message[:200], "tokens_before_loss": len(got),
                               "restart_s": round(restart_s, 1), "recovered_after_serving_s": round(recovered_s, 2)})


def test_verifier_replaced_mid_stream_resumes_with_identical_output(topo, client, uninterrupted):
    """A replacement listens on the same address (SO_REUSEPORT, as in a rolling restart) before the verifier is
    killed: the in-flight Verify is retried there, NOT_FOUND, and the gateway re-prefills from its token history
    under the same round counter, so greedy and seeded streams both equal their uninterrupted runs."""
    metrics_port = free_port()
    topo.service_env["verifier-next"] = {**topo.service_env["verifier"], "SPECD_METRICS_PORT": str(metrics_port)}
    topo.start_verifier("verifier-next")
    log = topo.log_dir / "verifier-next.log"
    wait_until(lambda: "SERVING" in log.read_text(errors="replace"), 120, "replacement verifier serving", 0.2)

    started = {name: threading.Event() for name in LONG_RUNS}
    results = {}

    def run(name):
        out = []
        for chunk in client.stream(PROMPT, max_tokens=LONG, ignore_eos=True, **LONG_RUNS[name]):
            out += chunk.token_ids
            started[name].set()
        results[name] = out

    with cf.ThreadPoolExecutor(len(LONG_RUNS)) as pool:
        futures = [pool.submit(run, name) for name in LONG_RUNS]
        assert all(e.wait(30) for e in started.values())
        topo.kill("verifier")
        killed_with = {name: len(results.get(name, ())) == 0 for name in LONG_RUNS}   # still streaming
        t = time.monotonic()
        for f in futures:
            f.result(timeout=120)
    assert all(killed_with.values()), "a stream finished before the verifier was killed: nothing was resumed"
    for name, (tokens, _, _) in uninterrupted.items():
        assert results[name] == tokens, f"{name}: resumed output differs from the uninterrupted run"
    gateway_log = (topo.log_dir / "gateway.log").read_text(errors="replace")
    resyncs = gateway_log.count("verifier lost session")
    assert resyncs >= len(LONG_RUNS)                                    # each stream was re-prefilled
    replacement = idle_state(scrape(metrics_port))
    assert replacement["specd_verifier_sessions"] == 0 and replacement["specd_kv_blocks_used"] == 0
    record("verifier_replaced", {"streams_resumed": len(LONG_RUNS), "identical_output": True,
                                 "re_prefills": resyncs, "finished_after_kill_s": round(time.monotonic() - t, 2)})


# ---- gateway drain -------------------------------------------------------------------------------------------------
def test_gateway_drains_on_sigterm(topo, client, uninterrupted):
    gateway, address = topo.procs["gateway"], f"127.0.0.1:{topo.gateway_port}"
    first, out, outcome = threading.Event(), [], {}

    def run():
        try:
            for chunk in client.stream(PROMPT, max_tokens=LONG, ignore_eos=True, num_speculative_tokens=0):
                out.extend(chunk.token_ids)
                first.set()
                if chunk.finish_reason:
                    outcome["finish_reason"] = chunk.finish_reason
        except grpc.RpcError as e:
            outcome["error"] = f"{e.code().name}: {e.details()}"

    streaming = threading.Thread(target=run)
    streaming.start()
    assert first.wait(30)
    t = time.monotonic()
    os.killpg(gateway.pid, signal.SIGTERM)
    not_serving_s = wait_until(lambda: check(address, timeout_s=1)[1].endswith("NOT_SERVING"), 5,
                               "health NOT_SERVING while draining")
    with SpecdClient(address, timeout_s=10) as newcomer, pytest.raises(grpc.RpcError) as e:
        newcomer.generate(PROMPT, max_tokens=4)
    assert e.value.code() == UNAVAILABLE and "draining" in e.value.details(), e.value.details()
    assert streaming.is_alive() and not outcome, "the stream ended before the drain was observed"
    streaming.join(60)
    assert outcome == {"finish_reason": "length"} and out == uninterrupted["greedy"][0]
    assert gateway.wait(timeout=35) == 0
    record("gateway_drain", {"exit_code": 0, "not_serving_after_ms": round(not_serving_s * 1000, 1),
                             "in_flight_stream_tokens": len(out), "grace_s": 30, "new_request": e.value.code().name,
                             "drained_and_exited_s": round(time.monotonic() - t, 2)})
