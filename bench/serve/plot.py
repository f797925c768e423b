#!/usr/bin/env python3
"""Plots bench/serve/run.py's JSON: output throughput, TTFT and TPOT against the number of adapters
K for each distribution, with the base model alone and the transformers + PEFT baseline.

    .venv-tools/bin/python bench/serve/plot.py docs/benchmarks/serve.json docs/benchmarks/serve.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"uniform": "#3b75af", "zipf": "#e1812c"}


def main():
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, encoding="utf-8") as f:
        d = json.load(f)
    runs = d["runs"]
    base = next((r for r in runs if r["distribution"] == "base"), None)
    peft = d.get("peft")
    dists = [x for x in ("uniform", "zipf") if any(r["distribution"] == x for r in runs)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    panels = [("output_tokens_per_second", None, "output tokens/s", axes[0]),
              ("ttft_seconds", "s", "TTFT (s)", axes[1]),
              ("tpot_seconds", "s", "TPOT (s)", axes[2])]
    for key, unit, label, ax in panels:
        for dist in dists:
            rs = sorted((r for r in runs if r["distribution"] == dist), key=lambda r: r["k"])
            ks = [r["k"] for r in rs]
            if unit is None:
                ax.plot(ks, [r["result"][key] for r in rs], "o-", color=COLORS[dist],
                        label=f"loraserve, {dist}")
            else:
                ax.plot(ks, [r["result"][key]["p50"] for r in rs], "o-", color=COLORS[dist],
                        label=f"loraserve, {dist}, p50")
                ax.plot(ks, [r["result"][key]["p99"] for r in rs], "o--", color=COLORS[dist],
                        alpha=0.6, label=f"loraserve, {dist}, p99")
        if base is not None:
            v = base["result"][key] if unit is None else base["result"][key]["p50"]
            ax.axhline(v, color="#777777", linestyle=":",
                       label="base model alone" + ("" if unit is None else ", p50"))
        if peft is not None:
            v = peft[key] if unit is None else peft[key]["p50"]
            ax.plot([peft["k"]], [v], "s", color="#c03030", markersize=8,
                    label="transformers + PEFT" + ("" if unit is None else ", p50"))
        ax.set_xscale("log")
        ax.set_xlabel("adapters K")
        ax.set_ylabel(label)
        if unit is not None or peft is not None:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    s = d["setup"]
    fig.suptitle(f"loraserve, TinyLlama shapes (random bf16), rank-{s['adapter']['rank']} q/k/v/o "
                 f"adapters; {s['clients']} closed-loop clients, {s['prompt_tokens']}-token "
                 f"prompts, {s['max_tokens']} new tokens, greedy; "
                 f"{s['server']['threads']} threads of {d['machine']['online_cpus']} vCPUs",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main()
