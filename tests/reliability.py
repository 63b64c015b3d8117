"""What the reliability tests share: a service as a real process, Prometheus scraping, polling, latency figures,
the JSON report (SPECD_RELIABILITY_REPORT), and hypothesis strategies for random protobuf messages built from
their descriptors."""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

from common.distributed import free_port
from common.rpc.health_check import check
from scripts.dev.metrics_scrape import scrape

# Status codes a service may answer to any input; INTERNAL / UNKNOWN mean an unhandled error, UNAVAILABLE a crash.
EXPECTED_CODES = {"OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "RESOURCE_EXHAUSTED",
                  "OUT_OF_RANGE", "DEADLINE_EXCEEDED"}


# ---- processes and metrics ---------------------------------------------------------------------------------------
def insecure_flag(service: str) -> list[str]:
    """['--insecure'] once `specd <service>` wants it for plaintext (TLS by default), else []."""
    from scripts.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return ["--insecure"] if "--insecure" in sub.choices[service]._option_string_actions else []


class ServiceProcess:
    """`specd <service> --model ...` on free loopback ports (gRPC + Prometheus), logging to a file."""

    def __init__(self, service: str, model: str, log_dir: Path, *extra: str, env: dict | None = None,
                 port: int | None = None):
        self.service = service
        self.port, self.metrics_port = port or free_port(), free_port()
        self.log_path = log_dir / f"{service}-{self.port}.log"
        self.address = f"127.0.0.1:{self.port}"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scripts.cli", service, "--model", model, "--dtype", "float32",
                 "--kv-cache-gib", "0.05", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                 *insecure_flag(service), *extra], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})}, start_new_session=True)

    def wait_serving(self, timeout_s: float = 120) -> "ServiceProcess":
        deadline = time.monotonic() + timeout_s
        while not check(self.address, timeout_s=1)[0]:
            assert self.proc.poll() is None, f"{self.service} exited:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.service} not SERVING after {timeout_s}s"
            time.sleep(0.2)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self) -> dict[str, float]:
        return scrape(self.metrics_port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.01) -> float:
    """Poll `predicate` until true; the seconds it took. Fails with `what` after `timeout_s`."""
    t = time.monotonic()
    while not predicate():
        assert time.monotonic() - t < timeout_s, f"{what}: not within {timeout_s}s"
        time.sleep(interval_s)
    return time.monotonic() - t


def wait_for_state(read, expected: dict, timeout_s: float, what: str) -> float:
    """Poll `read()` until it equals `expected`; the seconds it took. Fails showing the last state read."""
    t, last = time.monotonic(), None
    while (last := read()) != expected:
        assert time.monotonic() - t < timeout_s, f"{what}: still {last} after {timeout_s}s, expected {expected}"
        time.sleep(0.01)
    return time.monotonic() - t


def idle_state(metrics: dict[str, float]) -> dict[str, float]:
    """What must return to its idle value after any request: KV blocks held, sessions, queued calls."""
    keys = ("specd_kv_blocks_used", "specd_verifier_sessions", "specd_verifier_queue_depth",
            "specd_requests_in_flight")
    return {k: metrics[k] for k in keys if k in metrics}


# ---- figures -----------------------------------------------------------------------------------------------------
def percentile(values, q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def latency_figures(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 1), "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(max(ms), 1) if ms else None,
            "mean_ms": round(statistics.fmean(ms), 1) if ms else None}


def record(section: str, figures: dict) -> None:
    """Print a test's figures (pytest -s / -rA shows them) and merge them into $SPECD_RELIABILITY_REPORT."""
    print(f"\n[reliability] {section}: {json.dumps(figures, sort_keys=True)}")
    path = os.environ.get("SPECD_RELIABILITY_REPORT")
    if not path:
        return
    report = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    report[section] = figures
    Path(path).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


# ---- random protobuf messages ------------------------------------------------------------------------------------
_I32, _U32, _I64, _U64 = (-2**31, 2**31 - 1), (0, 2**32 - 1), (-2**63, 2**63 - 1), (0, 2**64 - 1)
_INT_RANGES = {F.TYPE_INT32: _I32, F.TYPE_SINT32: _I32, F.TYPE_SFIXED32: _I32, F.TYPE_UINT32: _U32,
               F.TYPE_FIXED32: _U32, F.TYPE_INT64: _I64, F.TYPE_SINT64: _I64, F.TYPE_SFIXED64: _I64,
               F.TYPE_UINT64: _U64, F.TYPE_FIXED64: _U64}
_INT_EDGES = (0, 1, 2, 3, 8, 9, 127, 128, 129, 255, 1023, 1024, 1025, 32768, 32769, -1, -2)
_FLOAT_EDGES = (0.0, -0.0, 1.0, 0.5, 1.0000001, 1e-38, 1e-45, 1e-6, -1.0, 2.0, 100.0, 100.5, 1e30,
                math.nan, math.inf, -math.inf)
_STRING_EDGES = ("", " ", "\n\t ", "a", "<w5><w7>", "x" * 129, "\u00e9\u4e2d\U0001f600", "\x00")


def _scalar(field) -> st.SearchStrategy:
    t = field.type
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        return st.one_of(st.integers(0, 140), st.sampled_from([v for v in _INT_EDGES if lo <= v <= hi] + [lo, hi]),
                         st.integers(lo, hi))
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.one_of(st.floats(0, 1, width=32), st.sampled_from(_FLOAT_EDGES),
                         st.floats(width=32 if t == F.TYPE_FLOAT else 64))
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return st.one_of(st.sampled_from(_STRING_EDGES), st.text(max_size=40))
    if t == F.TYPE_BYTES:
        return st.binary(max_size=40)
    if t == F.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    raise TypeError(f"no strategy for field {field.full_name} of type {t}")


def _repeated(field) -> st.SearchStrategy:
    one = _scalar(field)
    # Long lists repeat one value (drawing thousands of values one by one would be slow, and says nothing more).
    return st.one_of(st.lists(one, max_size=12), st.builds(lambda v, n: [v] * n, one, st.integers(200, 5000)))


def _fill(draw, msg, depth: int, hints: dict, mutant: str | None) -> None:
    """Set `msg`'s fields. With `hints` (a plausible example) the hinted fields are always set from their hints,
    except `mutant`, drawn wild; other fields are set half of the time, with wild values."""
    done_oneofs = set()
    for field in msg.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None:                     # a real oneof, or proto3 `optional` (a synthetic one, "_name")
            if oneof.name in done_oneofs:
                continue
            done_oneofs.add(oneof.name)
            optional = not hints or oneof.name.startswith("_") and oneof.fields[0].name not in hints
            field = draw(st.sampled_from([None, *oneof.fields] if optional else list(oneof.fields)))
            if field is None:
                continue
        elif field.name not in hints and not draw(st.booleans()):
            continue                              # left at its default
        name = field.name
        if field.message_type is not None:
            if depth <= 0:
                continue
            if field.is_repeated:
                for _ in range(draw(st.integers(0, 4))):
                    _fill(draw, getattr(msg, name).add(), depth - 1, hints, mutant)
            else:
                getattr(msg, name).SetInParent()
                _fill(draw, getattr(msg, name), depth - 1, hints, mutant)
            continue
        plausible = name in hints and name != mutant
        if field.is_repeated:
            getattr(msg, name).extend(draw(hints[name] if plausible else _repeated(field)))
        else:
            setattr(msg, name, draw(hints[name] if plausible else _scalar(field)))


TOKENS = st.lists(st.integers(0, 127), min_size=1, max_size=24)     # ids of the tiny checkpoints' vocabulary
PLAUSIBLE_SAMPLING = {"temperature": st.sampled_from([0.0, 0.0, 0.7, 1.0, 1.5]),
                      "top_p": st.floats(0.0625, 1.0, width=32), "top_k": st.integers(0, 40),
                      "min_p": st.floats(0.0, 0.5, width=32), "seed": st.integers(0, 2**63 - 1)}


def messages(message_class, depth: int = 3, hints: dict | None = None) -> st.SearchStrategy:
    """Random `message_class` instances: each field set or left default, values from the whole range of its type
    (edges, NaN, infinities, huge and negative numbers, long repeated fields), nested messages `depth` deep.
    `hints` maps a field name (at any depth) to a strategy of plausible values."""
    hints = hints or {}

    @st.composite
    def build(draw):
        # A third wild, a third plausible with one field drawn wild, a third plausible: enough examples get past
        # validation to exercise what lies behind it, and each check is met alone.
        kind = draw(st.sampled_from(["wild", "mutant", "plausible"]))
        mutant = draw(st.sampled_from(sorted(hints))) if kind == "mutant" and hints else None
        msg = message_class()
        _fill(draw, msg, depth, {} if kind == "wild" else hints, mutant)
        return msg
    return build()
