#!/usr/bin/env python3
"""Plots bench/lora_model_bench's JSON: base vs per-request-LoRA decode steps against their
rooflines (bytes at the measured read bandwidth, FLOPs at the measured GEMM rate).

    .venv-tools/bin/python bench/plot_lora_model.py docs/benchmarks/lora_model.json \
        docs/benchmarks/lora_model.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, encoding="utf-8") as f:
        d = json.load(f)
    steps = d["steps"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    x = list(range(len(steps)))
    w = 0.2
    ax.bar([i - 1.5 * w for i in x], [s["base_step_seconds"] * 1e3 for s in steps], w,
           label="base step", color="#999999")
    ax.bar([i - 0.5 * w for i in x], [s["base_roofline_seconds"] * 1e3 for s in steps], w,
           label="base roofline", color="#dddddd", hatch="//")
    ax.bar([i + 0.5 * w for i in x], [s["lora_step_seconds"] * 1e3 for s in steps], w,
           label="LoRA step (own adapter per request)", color="#3b75af")
    ax.bar([i + 1.5 * w for i in x], [s["lora_roofline_seconds"] * 1e3 for s in steps], w,
           label="LoRA roofline", color="#b9d3ee", hatch="//")
    for i, s in enumerate(steps):
        ax.text(i + 0.5 * w, s["lora_step_seconds"] * 1e3, f"{s['ratio']:.3f}x", ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(x, [f"batch {s['batch']}\n{s['distinct_adapters']} adapters" for s in steps])
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"Rank-{d['rank']} all-linear LoRA per request, TinyLlama shapes, "
                 f"{d['threads']} threads\nload of one adapter: "
                 f"{d['adapter_load_ms']['median']:.1f} ms median", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main()
