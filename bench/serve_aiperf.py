"""`make bench-serve`, HTTP side: one aiperf (NVIDIA's serving benchmark client, in its own venv) run per
configuration against the gateway's OpenAI-compatible door, fully offline, and its export read into a row.

Offline: aiperf 0.13 under HF_HUB_OFFLINE=1 looks a tokenizer up only in the Hugging Face cache (a folder path is
taken for a hub id), so `tokenizer_cache` lays the model's tokenizer files out as a cache entry of their own."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from pathlib import Path

from bench.serve_grpc import ServeRequest

REQUEST_RATE = 100              # requests/s: aiperf's schedule tick (see aiperf_argv), far above what is served
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json",
                   "vocab.json", "merges.txt", "special_tokens_map.json", "chat_template.jinja")


def tokenizer_cache(model_dir: str | Path, hf_home: Path) -> str:
    """Link `model_dir`'s tokenizer files into `hf_home` as the cached snapshot of hub id "specd/<folder name>"
    (HF cache layout: hub/models--specd--NAME/{refs/main, snapshots/local/...}); returns that id."""
    model_dir = Path(model_dir).resolve()
    repo = f"specd/{model_dir.name}"
    entry = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / "local"
    snapshot.mkdir(parents=True, exist_ok=True)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text("local")
    for name in TOKENIZER_FILES:
        src, dst = model_dir / name, snapshot / name
        if src.exists() and not dst.exists():
            dst.symlink_to(src)
    return repo


def write_dataset(path: Path, requests: list[ServeRequest]) -> Path:
    """aiperf's single_turn JSONL: one {"text": ...} per request, sent in file order (sequential sampling)."""
    path.write_text("".join(json.dumps({"text": r.text}) + "\n" for r in requests))
    return path


def aiperf_argv(aiperf: str, *, url: str, model: str, chat: bool, tokenizer: str, dataset: Path, max_tokens: int,
                k: int, concurrency: int, request_count: int, seed: int, out_dir: Path) -> list[str]:
    """Streaming, greedy (temperature 0: OpenAI's default is 1), EOS ignored, `k` in the body's extension field;
    token counts from the server's usage (as the gRPC side counts token ids).

    `--concurrency` alone makes aiperf's timing manager poll for a free slot without sleeping (~75% of a core for
    the whole run, measured: a third of this machine's services' CPU); a constant 100 requests/s schedule capped at
    `concurrency` keeps the same load, lets it sleep between 10 ms ticks, and delays a request by < 10 ms."""
    return [aiperf, "profile", "--model", model, "--url", url, "--endpoint-type", "chat" if chat else "completions",
            "--streaming", "--tokenizer", tokenizer, "--input-file", str(dataset),
            "--custom-dataset-type", "single_turn", "--dataset-sampling-strategy", "sequential",
            "--osl", str(max_tokens), "--use-legacy-max-tokens", "--use-server-token-count",
            "--extra-inputs", "temperature:0", "--extra-inputs", "ignore_eos:true",
            "--extra-inputs", f"num_speculative_tokens:{k}",
            "--concurrency", str(concurrency), "--request-rate", str(REQUEST_RATE), "--arrival-pattern", "constant",
            "--request-count", str(request_count), "--random-seed", str(seed),
            "--ui", "none", "--output-artifact-dir", str(out_dir), "--export-level", "raw",
            "--no-server-metrics", "--no-gpu-telemetry"]


def offline_env(hf_home: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def run_aiperf(argv: list[str], hf_home: Path, out_dir: Path, timeout_s: float = 900.0) -> dict:
    """Run one aiperf profile; its console and log stay in `out_dir`. Returns the row fields (see parse_export)
    plus the client's own CPU seconds (it shares the machine's cores with the services)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with open(out_dir / "aiperf.console.txt", "w") as log:
        proc = subprocess.run(argv, env=offline_env(hf_home), stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=timeout_s)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    export = out_dir / "profile_export_aiperf.json"
    if proc.returncode != 0 or not export.exists():
        raise RuntimeError(f"aiperf exited with code {proc.returncode}; see {out_dir / 'aiperf.console.txt'}")
    row = parse_export(json.loads(export.read_text()))
    raw = out_dir / "profile_export_raw.jsonl"
    if raw.exists():
        row.update(spec_decode_totals(raw.read_text().splitlines()))
    row["client_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row["client_wall_s"] = time.perf_counter() - t
    return row


def _metric(doc: dict, tag: str, stat: str = "avg") -> float | None:
    m = doc.get(tag)
    return m.get(stat) if isinstance(m, dict) else None


def parse_export(doc: dict) -> dict:
    """aiperf's profile_export_aiperf.json -> the fields `bench.serve_grpc.summarize` reports (ms, per second)."""
    ok = int(_metric(doc, "request_count") or 0)
    errors = int(_metric(doc, "error_request_count") or 0)
    row = {"requests": ok + errors, "errors": errors}
    if not ok:
        return row
    row.update({"duration_s": _metric(doc, "benchmark_duration"),
                "output_tokens": int(_metric(doc, "total_output_tokens") or 0),
                "output_tokens_per_s": _metric(doc, "output_token_throughput"),
                "requests_per_s": _metric(doc, "request_throughput")})
    for tag, name in (("time_to_first_token", "ttft_ms"), ("inter_token_latency", "itl_ms")):
        for stat in ("avg", "p50", "min", "max"):
            value = _metric(doc, tag, stat)
            if value is not None:
                row[f"{name}_{stat}"] = value
    return row


def spec_decode_totals(raw_lines: list[str]) -> dict:
    """Draft statistics summed over the requests of aiperf's raw export, from the `spec_decode` extension that each
    choice's last chunk carries (the same fields the gRPC side reads from SpecStats)."""
    drafted = accepted = rounds = 0
    for line in raw_lines:
        for response in json.loads(line).get("responses") or ():
            for packet in response.get("packets") or ():
                if packet.get("name") != "data" or not packet.get("value", "").startswith("{"):
                    continue
                for choice in json.loads(packet["value"]).get("choices") or ():
                    s = choice.get("spec_decode")
                    if s:
                        drafted += s["num_draft_tokens"]
                        accepted += s["num_accepted_draft_tokens"]
                        rounds += s.get("rounds", 0)
    return {"drafted": drafted, "acceptance_rate": accepted / drafted if drafted else None,
            "mean_acceptance_length": 1 + accepted / rounds if rounds else None}
