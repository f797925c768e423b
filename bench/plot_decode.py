"""Plots docs/benchmarks/cpu_decode.json (written by build/bench/decode_bench) as a PNG.

    .venv-tools/bin/python bench/plot_decode.py docs/benchmarks/cpu_decode.json \
        docs/benchmarks/cpu_decode.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position


def main(src, dst):
    with open(src, encoding="utf-8") as f:
        r = json.load(f)
    batches = [d["batch"] for d in r["decode"]]
    tps = [d["tokens_per_second"] for d in r["decode"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(batches, tps, marker="o")
    left.set_xscale("log", base=2)
    left.set_xticks(batches, [str(b) for b in batches])
    left.set_xlabel("decode batch (sequences, 512 tokens of context each)")
    left.set_ylabel("tokens / s")
    left.set_title("Decode throughput")
    left.grid(True, alpha=0.3)
    bw = r["read_bandwidth_bytes_per_second"] / 1e9
    got = r["batch1_weight_bytes_per_second"] / 1e9
    right.bar(["measured read\nbandwidth", "batch-1 weight\nstream"], [bw, got],
              color=["#999999", "#3b75af"])
    right.set_ylabel("GB/s")
    right.set_title(f"Batch 1: {r['batch1_bandwidth_ratio']:.2f} of measured bandwidth")
    for i, v in enumerate([bw, got]):
        right.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    fig.suptitle(f"{r['model']} on {r['cpu']}, {r['threads']} threads, {r['isa']} ({r['date']})")
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
