"""Plots the JSON of build/bench/lora_bench (segmented LoRA vs the base GEMMs of one TinyLlama
layer) as a PNG: the LoRA / base time ratio per batch size, one line per number of distinct
adapters (bars: min..max over repetitions), and the per-layer times themselves.

    .venv-tools/bin/python bench/plot_lora.py docs/benchmarks/lora_kernels.json \
        docs/benchmarks/lora_kernels.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position


def main(src, dst):
    with open(src, encoding="utf-8") as f:
        r = json.load(f)
    results = r["results"]
    adapter_counts = sorted({d["adapters"] for d in results})
    batches = sorted({d["batch"] for d in results})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for a in adapter_counts:
        rows = sorted((d for d in results if d["adapters"] == a), key=lambda d: d["batch"])
        xs = [d["batch"] for d in rows]
        ys = [d["ratio"] for d in rows]
        err = [[d["ratio"] - d["ratio_min"] for d in rows],
               [d["ratio_max"] - d["ratio"] for d in rows]]
        left.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{a} adapter(s)")
        right.plot(xs, [d["lora_ms_per_layer"] for d in rows], marker="o",
                   label=f"LoRA, {a} adapter(s)")
    base = {}
    for d in results:
        base.setdefault(d["batch"], []).append(d["base_ms_per_layer"])
    right.plot(batches, [sorted(base[b])[len(base[b]) // 2] for b in batches], marker="s",
               color="black", linestyle="--", label="base GEMMs")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch (rows)")
        ax.grid(True, alpha=0.3)
    left.set_ylabel("LoRA time / base GEMM time")
    left.set_title(f"All-linear rank {r['rank']} LoRA over the base layer")
    left.legend(fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("ms per layer (median)")
    right.set_title("Per-layer time")
    right.legend(fontsize=7)
    fig.suptitle(f"TinyLlama layer, bf16, {r['cpu']}, {r['threads']} threads, {r['isa']} "
                 f"({r['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
