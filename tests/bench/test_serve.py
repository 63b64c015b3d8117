"""`make bench-serve` without models or aiperf: the gRPC load generator against a fake gateway, the aiperf command
line and export reading, the offline tokenizer cache, the ratios and goals."""
import asyncio
import json
import subprocess
import sys

import grpc
import pytest

from bench.serve import core_plan, parse_requests, ratios, requests_for, serve_goals
from bench.serve_aiperf import (aiperf_argv, offline_env, parse_export, spec_decode_totals, tokenizer_cache,
                                write_dataset)
from bench.serve_grpc import RequestTiming, ServeRequest, generate_request, run_load, summarize
from common.rpc.generated.specd.v1 import gateway_pb2, gateway_pb2_grpc
from tests.checkpoints import build_model_folder


class CountingGateway(gateway_pb2_grpc.GatewayServicer):
    """Streams `max_tokens` tokens in chunks of 2, 10 ms apart; prompts "fail" are refused. Records the most
    streams it served at once and every request."""

    def __init__(self):
        self.active = self.peak = 0
        self.requests = []

    async def GenerateStream(self, request, context):
        self.requests.append(request)
        if request.prompt == "fail":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            for i in range(0, request.max_tokens, 2):
                await asyncio.sleep(0.01)
                last = i + 2 >= request.max_tokens
                chunk = gateway_pb2.GenerateChunk(token_ids=[i, i + 1], finish_reason="length" if last else "")
                if last:
                    chunk.stats.drafted, chunk.stats.accepted, chunk.stats.rounds = 6, 3, 4
                yield chunk
        finally:
            self.active -= 1


def _run(requests, concurrency, max_tokens=8):
    servicer = CountingGateway()

    async def go():
        server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await run_load(f"127.0.0.1:{port}", requests, concurrency, max_tokens, k=-1)
        finally:
            await server.stop(None)
    return asyncio.run(go()), servicer


def test_load_keeps_concurrency_streams_in_flight_and_counts_every_token():
    reqs = [ServeRequest(f"p{i}", chat=False) for i in range(6)]
    timings, gw = _run(reqs, concurrency=3)
    assert gw.peak == 3 and len(gw.requests) == 6
    assert [t.output_tokens for t in timings] == [8] * 6
    assert all(t.error is None and t.start < t.first_token < t.end for t in timings)
    row = summarize(timings)
    assert row["requests"] == 6 and row["errors"] == 0 and row["output_tokens"] == 48
    assert row["output_tokens_per_s"] == pytest.approx(48 / row["duration_s"])
    assert row["mean_acceptance_length"] == pytest.approx(1 + 3 / 4)
    # 4 chunks 10 ms apart: TTFT ~10 ms, the other 6 tokens over ~30 ms
    assert 5 < row["ttft_ms_p50"] < 200 and 2 < row["itl_ms_p50"] < 50


def test_refused_requests_are_errors_not_tokens():
    timings, _ = _run([ServeRequest("fail", False), ServeRequest("ok", False)], concurrency=1)
    row = summarize(timings)
    assert row["errors"] == 1 and row["requests"] == 2 and row["output_tokens"] == 8
    assert "RESOURCE_EXHAUSTED" in next(t.error for t in timings if t.error)


def test_nothing_served_reports_no_rate():
    row = summarize([RequestTiming(start=0.0, end=1.0, error="UNAVAILABLE: down")])
    assert row == {"requests": 1, "errors": 1}


def test_chat_request_is_one_user_turn_and_k_is_sent():
    msg = generate_request(ServeRequest("hello", chat=True), 64, 0, ignore_eos=True)
    assert msg.WhichOneof("input") == "messages"
    assert [(m.role, m.content) for m in msg.messages.messages] == [("user", "hello")]
    assert msg.HasField("num_speculative_tokens") and msg.num_speculative_tokens == 0 and msg.ignore_eos
    assert msg.sampling.temperature == 0.0
    assert generate_request(ServeRequest("def f", chat=False), 64, -1, True).prompt == "def f"


def test_aiperf_command_line_sends_k_greedy_and_ignores_eos(tmp_path):
    argv = aiperf_argv("aiperf", url="http://127.0.0.1:8000", model="m", chat=True, tokenizer="specd/m",
                       dataset=tmp_path / "d.jsonl", max_tokens=64, k=0, concurrency=4, request_count=8, seed=7,
                       out_dir=tmp_path)
    pairs = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    extras = [argv[i + 1] for i, a in enumerate(argv) if a == "--extra-inputs"]
    assert extras == ["temperature:0", "ignore_eos:true", "num_speculative_tokens:0"]
    assert pairs["--endpoint-type"] == "chat" and pairs["--concurrency"] == "4" and pairs["--request-count"] == "8"
    assert "--streaming" in argv and "--use-server-token-count" in argv


def test_export_is_read_into_the_grpc_side_fields():
    doc = {"request_count": {"unit": "requests", "avg": 4.0}, "error_request_count": {"avg": 1.0},
           "benchmark_duration": {"unit": "sec", "avg": 2.0}, "total_output_tokens": {"avg": 256.0},
           "output_token_throughput": {"avg": 128.0}, "request_throughput": {"avg": 2.0},
           "time_to_first_token": {"avg": 30.0, "p50": 25.0, "min": 20.0, "max": 50.0},
           "inter_token_latency": {"avg": 7.0, "p50": 6.5, "min": 6.0, "max": 9.0}}
    row = parse_export(doc)
    assert row["requests"] == 5 and row["errors"] == 1 and row["output_tokens_per_s"] == 128.0
    assert row["ttft_ms_p50"] == 25.0 and row["itl_ms_max"] == 9.0
    assert parse_export({"error_request_count": {"avg": 3.0}}) == {"requests": 3, "errors": 3}


def test_draft_totals_come_from_each_choice_s_last_chunk_in_the_raw_export():
    def record(*chunks):
        return json.dumps({"responses": [{"packets": [{"name": "data", "value": json.dumps(c)}]} for c in chunks]
                           + [{"packets": [{"name": "data", "value": "[DONE]"}]}]})
    last = {"choices": [{"text": "b", "spec_decode": {"num_draft_tokens": 8, "num_accepted_draft_tokens": 6,
                                                      "rounds": 3}}]}
    lines = [record({"choices": [{"text": "a"}]}, last, {"choices": [], "usage": {"completion_tokens": 9}}),
             record({"choices": [{"text": "c", "spec_decode": {"num_draft_tokens": 4, "num_accepted_draft_tokens": 0,
                                                                "rounds": 3}}]})]
    totals = spec_decode_totals(lines)
    assert totals["drafted"] == 12 and totals["acceptance_rate"] == pytest.approx(0.5)
    assert totals["mean_acceptance_length"] == pytest.approx(2.0)
    assert spec_decode_totals([record({"choices": [{"text": "x", "spec_decode": {
        "num_draft_tokens": 0, "num_accepted_draft_tokens": 0, "rounds": 5}}]})])["acceptance_rate"] is None


def test_dataset_is_one_text_per_line(tmp_path):
    path = write_dataset(tmp_path / "d.jsonl", [ServeRequest("a\nb", True), ServeRequest("c", True)])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"text": "a\nb"}, {"text": "c"}]


def test_tokenizer_cache_resolves_offline_as_a_hub_snapshot(tmp_path):
    # What aiperf does with HF_HUB_OFFLINE=1: snapshot_download(local_files_only=True), then loads the tokenizer
    # from that folder (the fast class here: AutoTokenizer follows the tiny folder's Qwen2 config.json).
    model = build_model_folder(tmp_path / "tiny-model", seed=1)
    repo = tokenizer_cache(model, tmp_path / "hf")
    assert repo == "specd/tiny-model" and tokenizer_cache(model, tmp_path / "hf") == repo      # idempotent
    code = ("import sys; from huggingface_hub import snapshot_download; from transformers import PreTrainedTokenizerFast as T;"
            f"p = snapshot_download({repo!r}, local_files_only=True); print(T.from_pretrained(p)"
            ".encode('<w5><w9>'))")
    out = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp_path / "hf"), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[5, 9]"


def test_requests_cycle_over_the_prompts_of_their_kind():
    chat = requests_for("chat", 7)
    assert len(chat) == 7 and all(r.chat for r in chat) and chat[0].text == chat[5].text
    completion = requests_for("completion", 4)
    assert not any(r.chat for r in completion) and completion[0].text.startswith("def quicksort")


def test_core_plan_pins_the_two_model_services_apart():
    assert core_plan([0, 1]) == {"verifier": "0", "draft": "1"}
    assert core_plan([3, 5, 7]) == {"verifier": "3", "draft": "5"}
    assert core_plan([0]) == {}


def test_parse_requests():
    assert parse_requests("1:3,4:8,16:16") == {1: 3, 4: 8, 16: 16}


def _row(door, k, kind, c, tps, errors=0):
    return {"door": door, "k": k, "kind": kind, "concurrency": c, "output_tokens_per_s": tps, "errors": errors}


def test_goals_from_ratios_and_a_failed_side_fails_its_goal():
    rows = [_row("http", "auto", "chat", 1, 10.0), _row("grpc", "auto", "chat", 1, 10.0),
            _row("http", "0", "chat", 1, 5.0), _row("grpc", "0", "chat", 1, 5.5),
            _row("http", "auto", "chat", 4, 19.0), _row("grpc", "auto", "chat", 4, 20.0),
            _row("http", "0", "chat", 4, 18.0), _row("grpc", "0", "chat", 4, 18.0)]
    r = ratios(rows)
    assert [(x["concurrency"], round(x["http_vs_grpc"], 3), x["auto_vs_k0_http"]) for x in r] == [
        (1, 1.0, 2.0), (4, 0.95, pytest.approx(19 / 18))]
    goals = {g["name"]: g for g in serve_goals(rows, r)}
    assert goals["http_vs_grpc_tokens_per_s"]["value"] == pytest.approx((1.0 * 0.95) ** 0.5, abs=1e-4)
    assert goals["k_auto_vs_k0_c1_http"]["met"] and goals["failed_requests"]["met"]

    rows[0] = _row("http", "auto", "chat", 1, None, errors=3)       # the HTTP side failed at c=1
    goals = {g["name"]: g for g in serve_goals(rows, ratios(rows))}
    assert not goals["http_vs_grpc_tokens_per_s"]["met"] and not goals["k_auto_vs_k0_c1_http"]["met"]
    assert goals["failed_requests"]["value"] == 3 and not goals["failed_requests"]["met"]
