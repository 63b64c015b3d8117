"""Plot bench/results/wan.json: tokens/s against RTT, one line per system, one panel per (temperature, batch).
Runs in the bench venv (matplotlib, no project imports): `python bench/wan_plot.py wan.json wan.png`."""
from __future__ import annotations

import json
import sys

STYLE = {"target-only": ("tab:gray", ":"), "sequential, per-step K": ("tab:orange", "--"),
         "sequential, network K": ("tab:green", "-."), "pre-drafting": ("tab:blue", "-"),
         "sequential, K=3": ("tab:red", "--"), "pre-drafting, K=3": ("tab:purple", "-")}


def main(src: str, dst: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    doc = json.load(open(src))
    rows = doc["rows"]
    panels = sorted({(r["temperature"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.4, 5.2 * len(panels)), 4.6), squeeze=False)
    one_rtt = len({r["rtt_ms"] for r in rows}) == 1          # a single RTT: bars, one per system
    for ax, (t, b) in zip(axes[0], panels):
        cell = [r for r in rows if r["temperature"] == t and r["batch"] == b]
        for i, (system, (color, dash)) in enumerate(STYLE.items()):
            pts = sorted((r["rtt_ms"], r["tokens_per_s"]) for r in cell if r["system"] == system)
            if pts and one_rtt:
                ax.bar(i, pts[0][1], color=color, label=system)
                ax.text(i, pts[0][1], f"{pts[0][1]:.2f}", ha="center", va="bottom", fontsize=8)
            elif pts:
                ax.plot(*zip(*pts), color=color, linestyle=dash, marker="o", label=system)
        ax.set_title(f"{'greedy' if t == 0 else f'T={t:g}'}, batch {b}"
                     + (f", RTT {rows[0]['rtt_ms']:g} ms" if one_rtt else ""))
        if one_rtt:
            ax.set_xticks([])
        else:
            ax.set_xlabel("round trip time to each service (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("generated tokens/s")
    axes[0][-1].legend(fontsize=8)
    cfg, machine = doc["config"], doc["machine"]
    features = ", ".join(cfg.get("cpu_features", [])) or "?"
    fig.suptitle(f"specd bench-wan: draft and verifier on one core each, {cfg['prompts']} prompts x "
                 f"{cfg['max_tokens']} tokens, {cfg['dtype']}\n{machine['cpu']} ({features}), {doc['when']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
