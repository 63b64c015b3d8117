"""Plot bench/results/peers.json: generation tokens/s per system (median over prompts), llama.cpp beside specd; and,
where the run has them, each speculative worker's K=auto / K=0 per prompt against the 0.95 line.
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
    spec = [r for r in rows if "vs_k0_per_prompt" in r]
    fig, axes = plt.subplots(1, 2 if spec else 1, figsize=(max(8, 0.9 * len(rows)) + (7 if spec else 0), 4.8),
                             gridspec_kw={"width_ratios": [max(8, 0.9 * len(rows)), 7]} if spec else None,
                             squeeze=False)
    ax = axes[0][0]
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
                 f"ratio vs llama.cpp target-only\n{processor(doc)}", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    if spec:
        ax = axes[0][1]
        prompts = list(spec[0]["vs_k0_per_prompt"])
        width = 0.8 / len(spec)
        for j, r in enumerate(spec):
            ax.bar([i + (j - (len(spec) - 1) / 2) * width for i in range(len(prompts))],
                   [r["vs_k0_per_prompt"][p] for p in prompts], width, label=r["system"].replace("specd spec ", ""))
        values = [v for r in spec for v in r["vs_k0_per_prompt"].values()]
        ax.set_ylim(min(0.85, min(values) - 0.05), max(1.15, max(values) + 0.05))   # the 5% that matter, visible
        ax.axhline(0.95, color="tab:red", linestyle="--", linewidth=1, label="goal 0.95")
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(prompts)), [p.replace("_", "\n", 1) for p in prompts], fontsize=7)
        ax.set_ylabel("K=auto / K=0, same process (median of pairs)")
        ax.set_title(f"K=auto against its own target-only, {cfg['reps']} pairs per prompt", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


def processor(doc: dict) -> str:
    """The machine in a few words: its name and the widest matrix features the kernels use."""
    feats = set(doc["config"].get("cpu_features", []))
    isa = ("AVX-512 VNNI" if "avx512_vnni" in feats else "AVX-512" if "avx512f" in feats
           else "AVX2, no AVX-512" if "avx2" in feats else "no AVX2")
    extra = [f for f in ("avx512_bf16", "amx_bf16") if f in feats]
    return f"{doc['machine']['cpu']}, {doc['machine']['cores']} cores, {isa}" + (f" + {', '.join(extra)}" if extra
                                                                                 else "")


if __name__ == "__main__":
    main(*sys.argv[1:])
