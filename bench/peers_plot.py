"""Plot bench/results/peers.json: generation tokens/s per system (median over prompts), llama.cpp beside specd.
Runs in the bench venv (matplotlib, no project imports): `python bench/peers_plot.py peers.json peers.png`."""
from __future__ import annotations

import json
import sys


def main(src: str, dst: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    doc = json.load(open(src))
    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.8))
    names = [r["system"] for r in rows]
    ys = [r["median_tokens_per_s"] for r in rows]
    colors = ["tab:gray" if n.startswith("llama.cpp") else ("tab:green" if " spec " in n else "tab:blue")
              for n in names]
    ax.bar(range(len(rows)), ys, color=colors)
    for i, (y, r) in enumerate(zip(ys, rows)):
        ax.text(i, y, f"{y:.1f}\n{r['vs_llama_cpp']:.2f}x", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), [n.replace("llama.cpp spec ", "llama.cpp\nspec ").replace("specd spec ",
                                                                                                  "specd spec\n")
                                     for n in names], fontsize=7)
    ax.set_ylabel("generation tokens/s (median over prompts)")
    cfg = doc["config"]
    ax.set_title(f"Qwen2.5-Coder 1.5B (+0.5B draft), greedy, {cfg['max_tokens']} tokens, {cfg['threads']} threads; "
                 f"ratio vs llama.cpp target-only", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:])
