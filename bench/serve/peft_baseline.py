#!/usr/bin/env python3
"""The Hugging Face transformers + PEFT baseline of the serving benchmark (bench/serve/run.py).

One Python process, as a PEFT user serves many adapters: the base model is loaded once, every
adapter of the trace is loaded into one PeftModel (load_adapter), and requests are served one at a
time in arrival order: set_adapter(id), then model.generate greedy with exactly max_new_tokens
new tokens (min_new_tokens = max_new_tokens, so EOS cannot end it early, like ignore_eos). The
trace is the one serve_bench sends (serve_bench --trace_out): the same prompts and adapter ids.

Timing: a streamer records when each new token comes out of generate, so TTFT (set_adapter and
prefill included), TPOT and e2e latency are measured as in serve_bench. The first --warmup
requests are not measured; throughput is the measured requests' output tokens over the wall time
from the first measured request's start to the last one's end (requests run back to back).

Runs with the tools environment (.venv-tools: torch, transformers, peft):
    .venv-tools/bin/python bench/serve/peft_baseline.py --model DIR --adapter_root DIR \\
        --trace trace.json --requests 6 --out peft.json
"""

import argparse
import json
import os
import platform
import sys
import time


def percentile(values, p):
    """Linear interpolation between order statistics (numpy's default), as serve_bench."""
    if not values:
        return 0.0
    v = sorted(values)
    pos = p / 100.0 * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def summary(values):
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": sum(values) / len(values), "p50": percentile(values, 50),
            "p99": percentile(values, 99), "min": min(values), "max": max(values)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model folder")
    ap.add_argument("--adapter_root", required=True, help="folder with one PEFT folder per id")
    ap.add_argument("--trace", required=True, help="serve_bench --trace_out JSON")
    ap.add_argument("--adapters", default="",
                    help="comma-separated ids to load (default: every id in the used trace)")
    ap.add_argument("--requests", type=int, default=6, help="measured requests")
    ap.add_argument("--warmup", type=int, default=1, help="requests before the measured ones")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    import transformers
    import peft
    from peft import PeftModel
    from transformers.generation.streamers import BaseStreamer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    with open(args.trace) as f:
        trace = json.load(f)["requests"]
    used = trace[: args.warmup + args.requests]
    if len(used) < args.warmup + args.requests:
        sys.exit(f"peft_baseline: the trace has {len(trace)} requests, "
                 f"expected at least {args.warmup + args.requests}")
    ids = args.adapters.split(",") if args.adapters else sorted({r["adapter_id"] for r in used})
    missing = sorted({r["adapter_id"] for r in used} - set(ids))
    if missing:
        sys.exit(f"peft_baseline: trace requests use adapters not in --adapters: {missing}")

    t = time.monotonic()
    base = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    base.eval()
    load_base_s = time.monotonic() - t

    t = time.monotonic()
    model = PeftModel.from_pretrained(base, os.path.join(args.adapter_root, ids[0]),
                                      adapter_name=ids[0])
    for a in ids[1:]:
        model.load_adapter(os.path.join(args.adapter_root, a), adapter_name=a)
    model.eval()
    load_adapters_s = time.monotonic() - t
    print(f"peft_baseline: base model {load_base_s:.1f}s, {len(ids)} adapters "
          f"{load_adapters_s:.1f}s", file=sys.stderr, flush=True)

    class TokenTimes(BaseStreamer):
        """generate() calls put() with the prompt first, then with every new token."""

        def __init__(self):
            self.times = []
            self.seen_prompt = False

        def put(self, value):
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            self.times.append(time.monotonic())

        def end(self):
            pass

    records = []
    measured_start = None
    for i, r in enumerate(used):
        if i == args.warmup:
            measured_start = time.monotonic()
        sent = time.monotonic()
        model.set_adapter(r["adapter_id"])
        input_ids = torch.tensor([r["prompt"]], dtype=torch.long)
        streamer = TokenTimes()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=args.max_new_tokens,
                                 min_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=base.config.eos_token_id, streamer=streamer)
        done = time.monotonic()
        new_tokens = out.shape[1] - input_ids.shape[1]
        if new_tokens != args.max_new_tokens or len(streamer.times) != args.max_new_tokens:
            sys.exit(f"peft_baseline: request {r['index']} generated {new_tokens} tokens "
                     f"({len(streamer.times)} streamed), expected {args.max_new_tokens}")
        rec = {"index": r["index"], "adapter_id": r["adapter_id"], "warmup": i < args.warmup,
               "ttft_s": streamer.times[0] - sent, "e2e_s": done - sent,
               "tpot_s": (streamer.times[-1] - streamer.times[0]) / (new_tokens - 1),
               "tokens": new_tokens}
        records.append(rec)
        print(f"peft_baseline: request {i} ({r['adapter_id']}): e2e {rec['e2e_s']:.2f}s, "
              f"ttft {rec['ttft_s']:.2f}s, tpot {rec['tpot_s'] * 1e3:.0f}ms",
              file=sys.stderr, flush=True)
    measured_end = time.monotonic()

    measured = [x for x in records if not x["warmup"]]
    window = measured_end - measured_start
    tokens = sum(x["tokens"] for x in measured)
    result = {
        "ok": True,
        "what": "transformers + PEFT, one process, requests one at a time, set_adapter per request",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "adapters_loaded": len(ids),
        "load_base_seconds": load_base_s,
        "load_adapters_seconds": load_adapters_s,
        "warmup_requests": args.warmup,
        "measured_requests": len(measured),
        "window_seconds": window,
        "output_tokens_in_window": tokens,
        "output_tokens_per_second": tokens / window,
        "requests_per_second": len(measured) / window,
        "distinct_adapters_measured": len({x["adapter_id"] for x in measured}),
        "ttft_seconds": summary([x["ttft_s"] for x in measured]),
        "tpot_seconds": summary([x["tpot_s"] for x in measured]),
        "e2e_seconds": summary([x["e2e_s"] for x in measured]),
        "requests": records,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps({k: result[k] for k in ("output_tokens_per_second", "window_seconds",
                                              "measured_requests")}))


if __name__ == "__main__":
    main()
