"""Plot bench/results/kernels.json: one target pass's matmul time against its row count, per path and oneDNN
instruction-set cap. Runs in the bench venv (matplotlib, no project imports):
`python bench/kernels_plot.py kernels.json kernels.png`."""
from __future__ import annotations

import json
import sys

COLORS = {"float32": "tab:gray", "bfloat16": "tab:blue", "int8/torch": "tab:orange", "int4/torch": "tab:green",
          "int8/vnni": "tab:red", "int4/vnni": "tab:purple"}


def main(src: str, dst: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = json.load(open(src))["rows"]
    caps = list(dict.fromkeys(r["isa"] for r in rows))
    fig, axes = plt.subplots(1, len(caps), figsize=(5.5 * len(caps), 4.4), squeeze=False, sharey=True)
    for ax, cap in zip(axes[0], caps):
        for r in (r for r in rows if r["isa"] == cap):
            t = {int(k): v for k, v in r["pass_ms"].items()}
            ax.plot(list(t), list(t.values()), marker="o", color=COLORS.get(r["path"]),
                    ls="-" if r["path"].endswith("vnni") or "/" not in r["path"] else "--",
                    label=f"{r['path']} ({r['weight_gb']:.2f} GB)")
        ax.axvline(5, color="k", lw=0.6, ls=":")
        ax.set_xlabel("rows in the pass (K drafts + 1)")
        ax.set_title(f"oneDNN ISA: {cap}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("ms per target pass (matmuls only)")
    fig.suptitle("What a verify pass costs against a decode pass (Qwen2.5-Coder-1.5B shapes, 2 threads)")
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:])
