#!/usr/bin/env python3
"""Drives the serving benchmark of issue 6 ("Must show" 11) and writes docs/benchmarks/serve.json.

1. Writes K_max PEFT adapter folders (rank 16 on q/k/v/o, bf16, the model's shapes) under
   WORK/adapters: --distinct_files distinct weight files with random small non-zero values, each
   hard-linked into K_max / distinct_files id folders (ad0000 .. ad0999). The server sees K_max
   separate ids and loads, validates, hashes and places each one on its own; only the disk (the
   OS page cache) holds fewer distinct bytes.
2. For the base model alone and for each K in --ks x each distribution in --dists: removes the
   server's cached adapter versions (every configuration starts cold), starts loraserve (
   --threads, a resident pool with room for --pool_adapters adapters, a host cache with room for
   --host_cache_adapters, --max_loras_per_step), waits for its ready line, runs serve_bench (the
   closed loop), scrapes the adapter metrics, and stops the server with SIGTERM.
3. The PEFT baseline at K = --peft_k: serve_bench writes the same trace (--trace_out) and
   peft_baseline.py serves its first requests one at a time with transformers + PEFT.
4. Writes one JSON with every run, the ratios the issue sets goals for, and the set-up.

Per-configuration results are kept in WORK/results, so an interrupted sweep continues where it
stopped (--resume) and --assemble_only rebuilds the JSON from them.

    .venv-tools/bin/python bench/serve/run.py --model /tmp/tl --out docs/benchmarks/serve.json
"""

import argparse
import datetime
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY_RE = re.compile(r"^loraserve ready grpc=(\S+) metrics=(\S+)$", re.M)
PACK_ALIGNMENT = 256  # LoraAdapter::kPackAlignment: every packed matrix starts 256-aligned
BF16_BYTES = 2
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def log(msg):
    print(f"[{datetime.datetime.utcnow():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# ---- Adapters --------------------------------------------------------------------------------

def model_shapes(config):
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    # (in_features, out_features) as PEFT sees the modules.
    return config["num_hidden_layers"], {"q_proj": (hidden, q), "k_proj": (hidden, kv),
                                         "v_proj": (hidden, kv), "o_proj": (q, hidden)}


def packed_bytes(config, rank):
    """Bytes of one adapter in the server's pool (bf16): per layer the fused q/k/v A (stacked)
    and each B, then o's A and B, each matrix rounded up to the pack alignment."""
    layers, shapes = model_shapes(config)

    def align(n):
        return (n + PACK_ALIGNMENT - 1) // PACK_ALIGNMENT * PACK_ALIGNMENT

    qkv_a = align(3 * rank * shapes["q_proj"][0] * BF16_BYTES)
    qkv_b = sum(align(shapes[m][1] * rank * BF16_BYTES) for m in ("q_proj", "k_proj", "v_proj"))
    o = align(rank * shapes["o_proj"][0] * BF16_BYTES) + align(
        shapes["o_proj"][1] * rank * BF16_BYTES)
    return layers * (qkv_a + qkv_b + o)


def to_bf16_bits(x):
    """float32 array -> uint16 bf16 bits, round to nearest even."""
    import numpy as np  # only the adapter writer needs numpy (the tests' .venv has none)

    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path, tensors):
    """tensors: list of (name, uint16 bf16 array). The safetensors layout, written directly."""
    header, offset = {}, 0
    for name, a in tensors:
        header[name] = {"dtype": "BF16", "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, a in tensors:
            f.write(a.tobytes())
    os.replace(tmp, path)


def adapter_id(i):
    return f"ad{i:04d}"


def make_adapters(work, config, rank, num_ids, distinct):
    """WORK/weights/wNN/adapter_model.safetensors (distinct files) hard-linked into
    WORK/adapters/adNNNN. Kept between runs when the stamp matches."""
    root = os.path.join(work, "adapters")
    stamp_path = os.path.join(work, "adapters.stamp.json")
    layers, shapes = model_shapes(config)
    # As read back from JSON (tuples become lists), so that it compares equal.
    stamp = json.loads(json.dumps({"rank": rank, "ids": num_ids, "distinct": distinct,
                                   "layers": layers, "shapes": shapes, "format": 1}))
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            old = json.load(f)
        if old.get("ids", 0) >= num_ids and dict(old, ids=num_ids) == stamp:
            log(f"adapters: {old['ids']} ids under {root} already written")
            return root
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
                      "lora_alpha": 2 * rank, "target_modules": list(MODULES),
                      "bias": "none", "lora_dropout": 0.0}
    import numpy as np

    weights = os.path.join(work, "weights")
    os.makedirs(weights, exist_ok=True)
    files = []
    for j in range(distinct):
        rng = np.random.default_rng(1000 + j)
        tensors = []
        for layer in range(layers):
            for m in MODULES:
                fin, fout = shapes[m]
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{m}"
                # Small, non-zero, different in every file: the update B A x is about 1 % of
                # the base projection, so outputs change without any risk of overflow.
                a = rng.uniform(-1.0, 1.0, size=(rank, fin)) / math.sqrt(fin)
                b = rng.uniform(-1.0, 1.0, size=(fout, rank)) * 0.02
                tensors.append((f"{prefix}.lora_A.weight", to_bf16_bits(a)))
                tensors.append((f"{prefix}.lora_B.weight", to_bf16_bits(b)))
        path = os.path.join(weights, f"w{j:02d}.safetensors")
        write_safetensors(path, tensors)
        files.append(path)
    os.makedirs(root, exist_ok=True)
    for i in range(num_ids):
        d = os.path.join(root, adapter_id(i))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(adapter_config, f)
        target = os.path.join(d, "adapter_model.safetensors")
        if os.path.exists(target):
            os.remove(target)
        os.link(files[i % distinct], target)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    log(f"adapters: {num_ids} ids over {distinct} distinct weight files under {root}")
    return root


def clear_version_caches(root):
    for p in glob.glob(os.path.join(root, "*", ".loraserve-version.json")):
        os.remove(p)


# ---- Server ----------------------------------------------------------------------------------

class Server:
    def __init__(self, binary, args, log_path, ready_timeout=600):
        self.log_path = log_path
        self.out_path = log_path + ".stdout"
        self.args = [binary, "--address=127.0.0.1:0", "--metrics_address=127.0.0.1:0", *args]
        self.started = time.monotonic()
        with open(log_path, "w") as err, open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=err)
        deadline = time.monotonic() + ready_timeout
        while True:
            with open(self.out_path) as f:
                m = READY_RE.search(f.read())
            if m:
                self.grpc, self.metrics = m.group(1), m.group(2)
                self.ready_seconds = time.monotonic() - self.started
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(log_path) as f:
                    tail = f.read()[-3000:]
                raise RuntimeError(f"loraserve did not become ready ({' '.join(self.args)}):\n"
                                   f"{tail}")
            time.sleep(0.2)

    def scrape(self):
        """The loraserve_* series whose name mentions adapters, as {series: value}."""
        try:
            text = urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10).read()
        except OSError as e:
            return {"error": str(e)}
        series = {}
        for line in text.decode().splitlines():
            if line.startswith("#") or "adapter" not in line or not line.startswith("loraserve"):
                continue
            name, _, value = line.rpartition(" ")
            if name.endswith("_bucket") or "_bucket{" in name:
                continue
            try:
                series[name] = float(value)
            except ValueError:
                pass
        return series

    def stop(self, timeout=120):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def machine():
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"cpu": cpu, "online_cpus": os.cpu_count(), "memory_bytes": mem_kib * 1024,
            "kernel": os.uname().release}


# ---- The sweep -------------------------------------------------------------------------------

def configurations(args):
    runs = []
    if not args.no_base:
        runs.append({"name": "base", "distribution": "base", "k": 0})
    for dist in args.dists.split(","):
        for k in (int(x) for x in args.ks.split(",")):
            runs.append({"name": f"{dist}_k{k}", "distribution": dist, "k": k})
    return runs


def schedule(args, runs):
    """The order runs are made in: with --order=goals, first the runs the goals compare (K = 8
    and the largest K per distribution, then the PEFT comparison), so that a sweep cut short
    still answers them; "peft" marks where the baseline runs."""
    names = [r["name"] for r in runs] + ([] if args.no_peft else ["peft"])
    if args.order == "goals":
        k_max = max(int(k) for k in args.ks.split(","))
        first = []
        for dist in args.dists.split(","):
            first += [f"{dist}_k8", f"{dist}_k{k_max}"]
        first += [f"{args.peft_dist}_k{args.peft_k}", "peft"]
        first = [n for n in first if n in names]
        # K = 1 is the same trace under every distribution: its repeats only measure noise.
        last = [f"{dist}_k1" for dist in args.dists.split(",")[1:]]
        names = first + [n for n in names if n not in first and n not in last] + [
            n for n in last if n in names]
    return names


def server_flags(args, root, pool_bytes, host_bytes):
    return [f"--model={args.model}", f"--threads={args.threads}", f"--adapter_root={root}",
            f"--adapter_pool_bytes={pool_bytes}", f"--adapter_page_bytes={args.page_bytes}",
            f"--adapter_host_cache_bytes={host_bytes}",
            f"--max_loras_per_step={args.max_loras_per_step}", f"--max_lora_rank={args.rank}",
            *args.server_arg]


def bench_flags(args, vocab):
    return [f"--clients={args.clients}", f"--prompt_tokens={args.prompt_tokens}",
            f"--max_tokens={args.max_tokens}", f"--seed={args.seed}", f"--vocab_size={vocab}",
            "--adapter_prefix=ad", f"--zipf_alpha={args.zipf_alpha}"]


def run_config(args, cfg, root, pool_bytes, host_bytes, vocab, results):
    path = os.path.join(results, cfg["name"] + ".json")
    if args.resume and os.path.exists(path):
        log(f"{cfg['name']}: kept from an earlier run ({path})")
        with open(path) as f:
            return json.load(f)
    clear_version_caches(root)
    flags = server_flags(args, root, pool_bytes, host_bytes)
    load_before = loadavg()
    server = Server(os.path.join(args.build, "server", "loraserve"), flags,
                    os.path.join(results, cfg["name"] + ".server.log"))
    log(f"{cfg['name']}: loraserve ready in {server.ready_seconds:.1f}s at {server.grpc}")
    bench_out = os.path.join(results, cfg["name"] + ".bench.json")
    cmd = [os.path.join(args.build, "bench", "serve", "serve_bench"), f"--address={server.grpc}",
           *bench_flags(args, vocab), f"--warmup_requests={args.warmup_requests}",
           f"--measure_requests={args.measure_requests}", f"--label={cfg['name']}",
           f"--out={bench_out}"]
    if cfg["distribution"] == "base":
        cmd.append("--distribution=base")
    else:
        cmd += [f"--distribution={cfg['distribution']}", f"--num_adapters={cfg['k']}"]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=args.run_timeout)
        metrics = server.scrape()
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{cfg['name']}: serve_bench ran over {args.run_timeout}s") from e
    finally:
        code = server.stop()
    if proc.returncode != 0 or not os.path.exists(bench_out):
        raise RuntimeError(f"{cfg['name']}: serve_bench failed ({proc.returncode}): "
                           f"{proc.stderr[-3000:]}")
    with open(bench_out) as f:
        bench = json.load(f)
    run = dict(cfg)
    run.update({"server_flags": flags, "server_ready_seconds": server.ready_seconds,
                "server_exit_code": code, "loadavg_before": load_before,
                "loadavg_after": loadavg(), "adapter_metrics": metrics, "result": bench})
    with open(path, "w") as f:
        json.dump(run, f, indent=1)
    log(f"{cfg['name']}: {bench['output_tokens_per_second']:.2f} output tokens/s over "
        f"{bench['window_seconds']:.1f}s; TTFT p50 {bench['ttft_seconds'].get('p50', 0):.2f}s, "
        f"TPOT p50 {bench['tpot_seconds'].get('p50', 0) * 1e3:.0f}ms; load {loadavg()[0]:.1f}")
    return run


def run_peft(args, root, vocab, results):
    path = os.path.join(results, "peft.json")
    if args.resume and os.path.exists(path):
        log(f"peft: kept from an earlier run ({path})")
        with open(path) as f:
            return json.load(f)
    trace = os.path.join(results, f"trace_{args.peft_dist}_k{args.peft_k}.json")
    subprocess.run([os.path.join(args.build, "bench", "serve", "serve_bench"),
                    *bench_flags(args, vocab), f"--distribution={args.peft_dist}",
                    f"--num_adapters={args.peft_k}", f"--trace_out={trace}",
                    f"--trace_requests={args.peft_warmup + args.peft_requests}"], check=True)
    ids = ",".join(adapter_id(i) for i in range(args.peft_k))
    load_before = loadavg()
    cmd = [args.python_tools, os.path.join(REPO, "bench", "serve", "peft_baseline.py"),
           f"--model={args.model}", f"--adapter_root={root}", f"--trace={trace}",
           f"--adapters={ids}", f"--requests={args.peft_requests}",
           f"--warmup={args.peft_warmup}", f"--max_new_tokens={args.max_tokens}",
           f"--dtype={args.peft_dtype}", f"--threads={args.threads}", f"--out={path}.tmp"]
    log("peft: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    with open(path + ".tmp") as f:
        peft = json.load(f)
    peft.update({"distribution": args.peft_dist, "k": args.peft_k, "loadavg_before": load_before,
                 "loadavg_after": loadavg()})
    with open(path, "w") as f:
        json.dump(peft, f, indent=1)
    os.remove(path + ".tmp")
    log(f"peft: {peft['output_tokens_per_second']:.2f} output tokens/s")
    return peft


def ratio(a, b):
    return a / b if a is not None and b else None


def assemble(args, runs, peft, pool_bytes, host_bytes, adapter_bytes, pages):
    thr = {(r["distribution"], r["k"]): r["result"]["output_tokens_per_second"] for r in runs}
    ratios = {}
    for dist in args.dists.split(","):
        r = ratio(thr.get((dist, 1000)), thr.get((dist, 8)))
        if r is not None:
            ratios[f"{dist}_k1000_over_k8"] = r
        if peft:
            r = ratio(thr.get((dist, args.peft_k)), peft["output_tokens_per_second"])
            if r is not None:
                ratios[f"{dist}_k{args.peft_k}_over_peft"] = r
    goals = {}
    for dist in args.dists.split(","):
        if f"{dist}_k1000_over_k8" in ratios:
            goals[f"{dist}_k1000_over_k8 >= 0.95"] = ratios[f"{dist}_k1000_over_k8"] >= 0.95
    if f"{args.peft_dist}_k{args.peft_k}_over_peft" in ratios:
        key = f"{args.peft_dist}_k{args.peft_k}_over_peft"
        goals[f"{key} >= 10"] = ratios[key] >= 10
    with open(os.path.join(args.model, "config.json")) as f:
        model_config = json.load(f)
    return {
        "bench": "serve (bench/serve/run.py)",
        "date": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "setup": {
            "model": args.model, "model_config": {k: model_config.get(k) for k in (
                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size")},
            "clients": args.clients, "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens, "greedy": True, "ignore_eos": True,
            "seed": args.seed, "zipf_alpha": args.zipf_alpha,
            "warmup_requests_per_client": args.warmup_requests,
            "measure_requests_per_client": args.measure_requests,
            "adapter": {"rank": args.rank, "lora_alpha": 2 * args.rank,
                        "target_modules": list(MODULES), "dtype": "bf16",
                        "packed_bytes": adapter_bytes, "pool_pages": pages,
                        "ids": max(int(k) for k in args.ks.split(",")),
                        "distinct_weight_files": args.distinct_files},
            "server": {"threads": args.threads, "adapter_pool_bytes": pool_bytes,
                       "pool_adapters": args.pool_adapters,
                       "adapter_host_cache_bytes": host_bytes,
                       "host_cache_adapters": args.host_cache_adapters,
                       "adapter_page_bytes": args.page_bytes,
                       "max_loras_per_step": args.max_loras_per_step,
                       "extra_flags": args.server_arg},
        },
        "runs": runs,
        "peft": peft,
        "ratios": ratios,
        "goals_met": goals,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="/tmp/tl", help="Hugging Face model folder")
    ap.add_argument("--work", default="/tmp/ls_serve_bench", help="adapters, logs, results")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks", "serve.json"))
    ap.add_argument("--build", default=os.path.join(REPO, "build"))
    ap.add_argument("--python_tools", default=os.path.join(REPO, ".venv-tools", "bin", "python"))
    ap.add_argument("--ks", default="1,8,32,128,1000")
    ap.add_argument("--dists", default="uniform,zipf")
    ap.add_argument("--no_base", action="store_true", help="skip the base-model run")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--prompt_tokens", type=int, default=128)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--warmup_requests", type=int, default=1)
    ap.add_argument("--measure_requests", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--zipf_alpha", type=float, default=1.0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--distinct_files", type=int, default=32)
    ap.add_argument("--pool_adapters", type=int, default=48,
                    help="the resident pool holds this many adapters")
    ap.add_argument("--host_cache_adapters", type=int, default=64,
                    help="the host cache holds this many adapters")
    ap.add_argument("--page_bytes", type=int, default=256 << 10)
    ap.add_argument("--max_loras_per_step", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server_arg", action="append", default=[],
                    help="extra loraserve flag (repeatable)")
    ap.add_argument("--peft_k", type=int, default=32)
    ap.add_argument("--peft_dist", default="uniform")
    ap.add_argument("--peft_requests", type=int, default=4)
    ap.add_argument("--peft_warmup", type=int, default=1)
    # float32: torch's CPU bf16 path measured slower on this machine (see serve.md).
    ap.add_argument("--peft_dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--no_peft", action="store_true")
    ap.add_argument("--run_timeout", type=int, default=900,
                    help="seconds one serve_bench run may take before it counts as failed")
    ap.add_argument("--order", default="goals", choices=["goals", "listed"],
                    help="goals: the runs the goals compare first; listed: base, then by K")
    ap.add_argument("--resume", action="store_true",
                    help="keep per-configuration results already in WORK/results")
    ap.add_argument("--assemble_only", action="store_true",
                    help="only rebuild --out from WORK/results")
    args = ap.parse_args()

    if not os.path.exists(os.path.join(args.model, "config.json")):
        sys.exit(f"run.py: no model at {args.model}; a TinyLlama-shaped random checkpoint is made "
                 f"by build/bench/decode_bench --model_dir={args.model} (it keeps it there)")
    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    vocab = config["vocab_size"]
    results = os.path.join(args.work, "results")
    os.makedirs(results, exist_ok=True)
    adapter_bytes = packed_bytes(config, args.rank)
    pages = -(-adapter_bytes // args.page_bytes)
    pool_bytes = args.pool_adapters * pages * args.page_bytes
    host_bytes = args.host_cache_adapters * adapter_bytes
    k_max = max(int(k) for k in args.ks.split(","))
    if k_max > 10000:
        sys.exit("run.py: --ks above 10000 (ids are 4 digits)")
    log(f"adapter: {adapter_bytes} bytes packed, {pages} pages; pool {pool_bytes} bytes "
        f"({args.pool_adapters} adapters), host cache {host_bytes} bytes")

    if args.assemble_only:
        args.resume = True
    root = make_adapters(args.work, config, args.rank, max(k_max, args.peft_k),
                         args.distinct_files)
    configs = {c["name"]: c for c in configurations(args)}
    done, failed = {}, {}
    sweep_start = time.monotonic()
    for name in schedule(args, list(configs.values())):
        p = os.path.join(results, name + ".json")
        if args.assemble_only:
            if os.path.exists(p):
                with open(p) as f:
                    done[name] = json.load(f)
            continue
        t = time.monotonic()
        try:
            if name == "peft":
                done[name] = run_peft(args, root, vocab, results)
            else:
                done[name] = run_config(args, configs[name], root, pool_bytes, host_bytes,
                                        vocab, results)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            # One broken configuration must not cost the rest of the sweep; it is reported.
            log(f"{name}: FAILED: {e}")
            failed[name] = str(e)
        log(f"{name}: {time.monotonic() - t:.0f}s; sweep so far "
            f"{time.monotonic() - sweep_start:.0f}s")
    runs = [done[n] for n in configs if n in done]
    out = assemble(args, runs, done.get("peft"), pool_bytes, host_bytes, adapter_bytes, pages)
    out["failed_runs"] = failed
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    log(f"wrote {args.out}: ratios {json.dumps(out['ratios'])}")


if __name__ == "__main__":
    main()
