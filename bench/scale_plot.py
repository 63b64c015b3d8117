"""Plot bench/results/scale.json: aggregate tokens/s with one and two verifier replicas (per K), and the verify time
per round of TP=2 on one node against two "nodes". Runs in the bench venv (matplotlib, no project imports):
`python bench/scale_plot.py scale.json scale.png`."""
from __future__ import annotations

import json
import sys


def main(src: str, dst: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = json.load(open(src))["rows"]
    rep = [r for r in rows if r["part"] == "replicas"]
    hop = [r for r in rows if r["part"] == "tp-hop"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), squeeze=False)
    ax = axes[0][0]
    ks = sorted({r["k"] for r in rep})
    for j, n in enumerate((1, 2)):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(ks))]
        ys = [next((r["tokens_per_s"] for r in rep if r["k"] == k and r["replicas"] == n), 0) for k in ks]
        ax.bar(xs, ys, width=0.38, label=f"{n} verifier replica{'s' if n > 1 else ''}",
               color="tab:gray" if n == 1 else "tab:blue")
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
    ax.set_ylabel("aggregate generated tokens/s")
    ax.set_title(f"replicas, {rep[0]['concurrency'] if rep else '?'} concurrent requests")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[0][1]
    ks = sorted({r["k"] for r in hop})
    for j, layout in enumerate(("one node", "two nodes")):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(ks))]
        ys = [next((r["verify_ms_per_round"] for r in hop if r["k"] == k and r["layout"] == layout), 0) for k in ks]
        ax.bar(xs, ys, width=0.38, label=f"TP=2 on {layout}", color="tab:green" if j == 0 else "tab:orange")
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
    ax.set_ylabel("verify ms per round (gateway's view)")
    ax.set_title("the extra hop: gloo over TCP between two processes")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:])
