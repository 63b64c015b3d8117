"""`make bench-kernels`: what one target pass of 1..9 rows costs on each matmul path (fp32, bf16, int8, int4 on
PyTorch's kernels and on specd's VNNI kernel).

Speculation needs a (K+1)-row verify pass to cost little more than a 1-row decode pass; whether it does depends on
the processor's matrix instructions and on the kernel. This bench times the matmuls of one whole target pass (every
layer's qkv, o, gate_up and down projections and the LM head at the real target's shapes, each layer its own random
weights, so each pass streams the whole model from memory as decoding does) for 1..9 rows on each path. Each
oneDNN instruction-set cap runs in its own child process (`ONEDNN_MAX_CPU_ISA`: the oneDNN bf16/fp32 kernels follow
it, PyTorch's own int8/int4 kernels and the VNNI kernel do not). It prints each path's curve relative to its own 1-row pass (the verify
overhead speculation pays) and its 1-row pass against bf16's (what the bytes buy).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROWS = tuple(range(1, 10))
PATHS = ("float32", "bfloat16", "int8/torch", "int4/torch", "int8/vnni", "int4/vnni")   # method/kernel
# Qwen2.5-Coder-1.5B: hidden 1536, intermediate 8960, 12 query and 2 KV heads of 128, 28 layers, tied 151936 head.
LAYER_SHAPES = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960)}
NUM_LAYERS, HEAD_SHAPE = 28, (151936, 1536)
ISA_CAPS = {"native": None, "avx512_vnni (no avx512_bf16, no AMX)": "AVX512_CORE_VNNI"}


def _matmuls(path: str, num_layers: int):
    """One pass's matmuls in order, as (callable, in_features, weight bytes)."""
    import torch
    from common.layers.cpu_gemm import packed_linear, prepack
    from common.layers.quantization import quantize
    from common.models.llama_family import HEAD_METHOD
    dtype = torch.float32 if path == "float32" else torch.bfloat16
    shapes = [s for _ in range(num_layers) for s in LAYER_SHAPES.values()] + [HEAD_SHAPE]
    out = []
    for i, (n, k) in enumerate(shapes):
        w = (torch.randn(n, k) / k ** 0.5).to(dtype)
        if "/" in path:
            method, kernel = path.split("/")
            head = i == len(shapes) - 1
            qw = quantize(w, HEAD_METHOD[method] if head else method, kernel=kernel)
            out.append((qw.matmul, k, qw.nbytes))
        else:
            packed = prepack(w)
            fn = (lambda x, p=packed: packed_linear(x, p)) if packed is not None else (lambda x, w=w: x @ w.T)
            out.append((fn, k, w.nbytes))
    return out, dtype


def measure(path: str, reps: int, num_layers: int) -> dict:
    """{"weight_bytes", "pass_ms": {rows: median ms}} for one path in this process."""
    import torch
    matmuls, dtype = _matmuls(path, num_layers)
    inputs = {rows: {k: torch.randn(rows, k).to(dtype) for k in {k for _, k, _ in matmuls}} for rows in ROWS}
    for fn, k, _ in matmuls:                                   # warm-up: first calls pick and cache kernels
        fn(inputs[1][k]), fn(inputs[5][k])
    pass_ms = {}
    for rows in ROWS:
        samples = []
        for _ in range(reps):
            x = inputs[rows]
            t = time.perf_counter()
            for fn, k, _ in matmuls:
                fn(x[k])
            samples.append((time.perf_counter() - t) * 1e3)
        pass_ms[rows] = statistics.median(samples)
    return {"weight_bytes": sum(b for _, _, b in matmuls), "pass_ms": pass_ms}


def _child(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    print(json.dumps({p: measure(p, args.reps, args.layers) for p in args.paths}))


def _run_cap(cap: str | None, args) -> dict:
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if cap:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    cmd = [sys.executable, "-m", "bench.kernels", "--child", "--reps", str(args.reps), "--threads", str(args.threads),
           "--layers", str(args.layers), "--paths", *args.paths]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench-kernels child (ONEDNN_MAX_CPU_ISA={cap}) failed:\n{proc.stderr[-3000:]}")
    return {p: {"weight_bytes": r["weight_bytes"], "pass_ms": {int(k): v for k, v in r["pass_ms"].items()}}
            for p, r in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=NUM_LAYERS)
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--caps", nargs="+", default=list(ISA_CAPS), choices=list(ISA_CAPS))
    ap.add_argument("--name", default="kernels")
    ap.add_argument("--plot-python", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    from bench.report import goal, plot_with, print_goals, print_table, write_result
    from bench.wan import cpu_features
    rows, goals = [], []
    for cap_name in args.caps:
        result = _run_cap(ISA_CAPS[cap_name], args)
        bf16_one = result.get("bfloat16", {}).get("pass_ms", {}).get(1)
        for path, r in result.items():
            t = r["pass_ms"]
            row = {"isa": cap_name, "path": path, "weight_gb": r["weight_bytes"] / 1e9, "ms_1": t[1],
                   **{f"x{n}": t[n] / t[1] for n in ROWS if n > 1},
                   "vs_bf16": bf16_one / t[1] if bf16_one else None, "pass_ms": t}
            rows.append(row)
            goals.append(goal(f"{cap_name} {path}: 5-row pass / 1-row pass", t[5] / t[1], 1.3, higher_is_better=False))
    print_table(rows, [("isa", "oneDNN ISA", "s"), ("path", "path", "s"), ("weight_gb", "GB/pass", ".2f"),
                       ("ms_1", "1 row ms", ".1f"), *[(f"x{n}", f"{n} rows", ".2f") for n in (2, 3, 4, 5, 6, 8, 9)],
                       ("vs_bf16", "1-row speed vs bf16", ".2f")])
    print_goals(goals)
    out = write_result("kernels", {"rows": list(ROWS), "threads": args.threads, "layers": args.layers,
                                   "reps": args.reps, "cpu_features": cpu_features(),
                                   "shapes": {**LAYER_SHAPES, "head": HEAD_SHAPE}}, rows, goals, "cpu", args.name)
    print(f"wrote {out}")
    from pathlib import Path
    plot_with(args.plot_python, Path(__file__).with_name("kernels_plot.py"), out)


if __name__ == "__main__":
    main()
