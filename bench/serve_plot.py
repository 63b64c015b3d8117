"""Plot bench/results/serve.json: output tokens/s vs concurrency, one line per door and K, one panel per prompt kind.
Runs in the bench venv (matplotlib, no project imports): `python bench/serve_plot.py serve.json serve.png`."""
from __future__ import annotations

import json
import sys

STYLE = {("http", "auto"): ("tab:blue", "-"), ("grpc", "auto"): ("tab:orange", "--"),
         ("http", "0"): ("tab:blue", ":"), ("grpc", "0"): ("tab:orange", "-.")}


def main(src: str, dst: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    doc = json.load(open(src))
    rows = doc["rows"]
    kinds = sorted({r["kind"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        for (door, k), (color, dash) in STYLE.items():
            pts = sorted((r["concurrency"], r.get("output_tokens_per_s")) for r in rows
                         if r["kind"] == kind and r["door"] == door and r["k"] == k)
            pts = [(c, v) for c, v in pts if v]
            if pts:
                ax.plot(*zip(*pts), color=color, linestyle=dash, marker="o", label=f"{door.upper()} K={k}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["concurrency"] for r in rows}), [str(c) for c in sorted({r["concurrency"]
                                                                                           for r in rows})])
        ax.set_title(f"{kind} prompts")
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("output tokens/s")
    axes[0][-1].legend()
    cfg, machine = doc["config"], doc["machine"]
    fig.suptitle(f"specd bench-serve: {cfg['max_tokens']} tokens, greedy, {machine['cores']} cores "
                 f"({machine['cpu']}), {doc['when']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
