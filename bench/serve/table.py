#!/usr/bin/env python3
"""Prints the tables of docs/benchmarks/serve.md from bench/serve/run.py's JSON (Markdown).

    python3 bench/serve/table.py docs/benchmarks/serve.json
"""
import json
import sys


def fmt_s(x):
    return f"{x:.2f}" if x >= 1 else f"{x * 1e3:.0f} ms"


def from_start(r):
    """Output tokens/s from the start of the run to the end of the window: the warm-up requests'
    tokens (all delivered before the window opens) plus the window's, over the window's end.
    Both waves from one synchronised start, so less sensitive to where the window edges fall."""
    c = r["config"]
    warm = c["clients"] * c["warmup_requests_per_client"] * c["max_tokens"]
    return (warm + r["output_tokens_in_window"]) / (r["window_start_seconds"] +
                                                    r["window_seconds"])


def row(name, r, load=None):
    ttft, tpot, e2e = r["ttft_seconds"], r["tpot_seconds"], r["e2e_seconds"]
    start = f"{from_start(r):.2f}" if "config" in r else ""
    return (f"| {name} | **{r['output_tokens_per_second']:.2f}** | {start} | "
            f"{r['window_seconds']:.1f} | "
            f"{r['output_tokens_in_window']} | {fmt_s(ttft['p50'])} / {fmt_s(ttft['p99'])} | "
            f"{fmt_s(tpot['p50'])} / {fmt_s(tpot['p99'])} | {fmt_s(e2e['p50'])} / "
            f"{fmt_s(e2e['p99'])} | {r['measured_requests']} | "
            f"{'' if load is None else f'{load:.1f}'} |")


def traffic_row(name, run):
    r, m = run["result"], run.get("adapter_metrics", {})

    def n(series):
        x = m.get(series)
        return "" if x is None else f"{x:.0f}"

    pool, host = '{tier="pool"}', '{tier="host"}'
    loads = n('loraserve_adapter_loads_total{result="success"}')
    load_n = m.get("loraserve_adapter_load_seconds_count")
    load_s = m.get("loraserve_adapter_load_seconds_sum")
    steps = m.get("loraserve_step_adapters_count")
    per_step = m.get("loraserve_step_adapters_sum")
    mean_load = f"{load_s / load_n * 1e3:.0f} ms" if load_n else ""
    mean_step = f"{per_step / steps:.1f}" if steps else ""
    cells = [name, str(r.get("distinct_adapters_requested", "")), loads, mean_load,
             n("loraserve_adapter_evictions_total" + pool),
             n("loraserve_adapter_evictions_total" + host),
             n("loraserve_adapter_cache_hits_total" + pool) + " / " +
             n("loraserve_adapter_cache_misses_total" + pool),
             n("loraserve_adapter_cache_hits_total" + host) + " / " +
             n("loraserve_adapter_cache_misses_total" + host), mean_step]
    return "| " + " | ".join(cells) + " |"


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        d = json.load(f)
    print("| configuration | output tokens/s | from start | window (s) | tokens in window | TTFT p50 / p99 (s) "
          "| TPOT p50 / p99 | e2e p50 / p99 (s) | measured requests | load avg before |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    order = sorted(d["runs"], key=lambda r: ({"base": 0, "uniform": 1, "zipf": 2}.get(
        r["distribution"], 3), r["k"]))
    for r in order:
        name = "base model alone" if r["distribution"] == "base" else (
            f"{r['distribution']}, K = {r['k']}")
        print(row(name, r["result"], r["loadavg_before"][0]))
    if d.get("peft"):
        p = d["peft"]
        print(row(f"transformers + PEFT ({p['dtype']}), {p['distribution']}, K = {p['k']}", p,
                  p["loadavg_before"][0]))
    print()
    print("Adapter traffic over the whole run (server metrics, scraped before stopping it):")
    print()
    print("| configuration | distinct adapters requested | loads | mean load time | pool evictions "
          "| host-cache evictions | pool hits / misses | host hits / misses | adapters per step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in order:
        if r["distribution"] != "base":
            print(traffic_row(f"{r['distribution']}, K = {r['k']}", r))
    print()
    print("| ratio | value | goal |")
    print("|---|---|---|")
    for k, v in d["ratios"].items():
        goal = "≥ 0.95" if "k1000_over_k8" in k else ("≥ 10" if "over_peft" in k else "")
        print(f"| {k} | **{v:.3f}** | {goal} |")
    thr = {(r["distribution"], r["k"]): from_start(r["result"]) for r in d["runs"]}
    for dist in ("uniform", "zipf"):
        if (dist, 1000) in thr and (dist, 8) in thr:
            print(f"| {dist}_k1000_over_k8, from start (secondary) | "
                  f"{thr[(dist, 1000)] / thr[(dist, 8)]:.3f} | |")
    if d.get("failed_runs"):
        print()
        for k, v in d["failed_runs"].items():
            print(f"- FAILED {k}: {v[:300]}")


if __name__ == "__main__":
    main()
