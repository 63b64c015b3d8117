"""What every benchmark shares: its common flags, machine facts, repetition statistics, the table and the JSON result
file."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info(device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.get_device_name()}"
    return {"cpu": cpu, "cores": os.cpu_count(), "device": device, "torch": torch.__version__,
            "python": sys.version.split()[0], "threads": torch.get_num_threads()}


@dataclass(slots=True)
class Stat:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        return cls(statistics.median(values), min(values), max(values))

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max}


def goal(name: str, value: float, target: float, unit: str = "x", higher_is_better: bool = True) -> dict:
    met = value >= target if higher_is_better else value <= target
    return {"name": name, "value": round(value, 4), "target": target, "unit": unit, "met": bool(met)}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, line in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for c, w in zip(line, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_result(bench: str, config: dict, rows: list[dict], goals: list[dict], device: str = "cpu",
                 name: str | None = None) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{name or bench}.json"
    doc = {"bench": bench, "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(device), "config": config, "rows": rows, "goals": goals}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def print_goals(goals: list[dict]) -> None:
    for g in goals:
        print(f"goal {g['name']}: {g['value']:.3f}{g['unit']} (target {g['target']}{g['unit']}) "
              f"{'MET' if g['met'] else 'NOT MET'}")


def fetched_pair(bench: str) -> tuple[str, str] | None:
    """Folders of the real target and draft, or None (with a message) when `make models` has not run."""
    from common.models.fetch import DRAFT_MODEL, TARGET_MODEL, is_fetched, model_path
    if not (is_fetched(TARGET_MODEL) and is_fetched(DRAFT_MODEL)):
        print(f"{bench}: the model pair is not fetched; run `make models`", file=sys.stderr)
        return None
    return str(model_path(TARGET_MODEL)), str(model_path(DRAFT_MODEL))


def bench_arguments(description: str | None, name: str, *, max_tokens: int = 128, reps: int = 3,
                    prompts: int | None = None) -> argparse.ArgumentParser:
    """The flags every model-pair bench takes (dtype, tokens, repetitions, result name; prompts if it has a set)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--max-tokens", type=int, default=max_tokens)
    ap.add_argument("--reps", type=int, default=reps)
    if prompts is not None:
        ap.add_argument("--prompts", type=int, default=prompts)
    ap.add_argument("--name", default=name, help="result file: bench/results/NAME.json")
    return ap


def plot_with(plot_python: str | None, script: Path, out_json: Path) -> None:
    """Run a plot script (matplotlib lives in the bench venv, not the project's) on a result: NAME.json -> NAME.png."""
    if not plot_python:
        print("no --plot-python: plot skipped")
        return
    png = out_json.with_suffix(".png")
    proc = subprocess.run([plot_python, str(script), str(out_json), str(png)], capture_output=True, text=True)
    print(f"wrote {png}" if proc.returncode == 0 else f"plot failed: {proc.stderr.strip()[-500:]}")
