"""Issue 6, Must show 1, 4 and 8, against the real loraserve binary on loopback:

1. 64 concurrent streams over 8 adapters and the base model produce, token for token, what each
   request produces alone, and the metrics show steps that mixed at least 4 distinct adapters.
4. After cancelled and timed-out streams, KV blocks in use and adapter references return to zero
   (GetModelInfo and /metrics); with a KV pool too small for the load, requests are preempted and
   their outputs still equal the runs alone.
8. A real Prometheus scrapes the server; its HTTP API has every family; `promtool check metrics`
   passes on the loraserve_* families.
"""
import json
import os
import random
import shutil
import struct
import subprocess
import threading
import time

import grpc
import pytest

from conftest import SOURCE_DIR, metric_value, parse_metrics, scrape_metrics
from loraserve.v1 import inference_pb2, inference_pb2_grpc

FIXTURE_MODEL = os.path.join(SOURCE_DIR, "tests", "golden", "fixtures", "llama_gqa")
TEMPLATE_ADAPTER = os.path.join(FIXTURE_MODEL, "adapters", "attn_r4")
PROMTOOL = shutil.which("promtool")


def write_random_adapter(dst, seed):
    """A PEFT adapter shaped like the fixture's attn_r4 (rank 4 on q/k/v/o of llama_gqa) with
    random non-zero A and B, so each seed steers the model differently."""
    os.makedirs(dst)
    shutil.copy(os.path.join(TEMPLATE_ADAPTER, "adapter_config.json"), dst)
    with open(os.path.join(TEMPLATE_ADAPTER, "adapter_model.safetensors"), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        template = json.loads(f.read(n))
    rng = random.Random(seed)
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, entry in sorted(template.items()):
        if name == "__metadata__":
            continue
        count = entry["shape"][0] * entry["shape"][1]
        data = struct.pack(f"<{count}f", *(rng.uniform(-0.5, 0.5) for _ in range(count)))
        header[name] = {"dtype": "F32", "shape": entry["shape"],
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(dst, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def make_adapter_root(tmp_path, count):
    root = tmp_path / "adapters"
    ids = [f"lora-{i:02d}" for i in range(count)]
    for i, adapter_id in enumerate(ids):
        write_random_adapter(str(root / adapter_id), seed=1000 + i)
    return root, ids


def long_context_model(tmp_path, positions=8192):
    """The fixture model with room for `positions` tokens (RoPE needs no table from the
    checkpoint), so one request can run long enough to be cancelled or time out mid-way."""
    d = tmp_path / "long_model"
    shutil.copytree(FIXTURE_MODEL, d, ignore=shutil.ignore_patterns("adapters", "expected*"))
    config = json.loads((d / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (d / "config.json").write_text(json.dumps(config))
    return d


def start_server(server_factory, root, *extra, model=FIXTURE_MODEL):
    return server_factory(f"--model={model}", f"--adapter_root={root}",
                          "--adapter_pool_bytes=8388608", "--adapter_page_bytes=65536",
                          "--max_lora_rank=64", "--threads=1", "--kv_block_tokens=8",
                          "--max_loras_per_step=16", *extra)


def greedy(prompt, adapter_id="", max_new_tokens=16):
    return inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=prompt), adapter_id=adapter_id,
        sampling=inference_pb2.SamplingParams(temperature=0.0),
        stopping=inference_pb2.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True),
        output=inference_pb2.OutputOptions(return_token_ids=True))


def stream_tokens(stub, request, timeout=120):
    return [t for chunk in stub.GenerateStream(request, timeout=timeout) for t in chunk.token_ids]


def run_together(fn, items):
    """fn(item) for every item on its own thread, all released at once; results in order (an
    exception is returned in place of its result)."""
    barrier = threading.Barrier(len(items))
    results = [None] * len(items)

    def work(i, item):
        barrier.wait()
        try:
            results[i] = fn(item)
        except Exception as e:  # pylint: disable=broad-except
            results[i] = e

    threads = [threading.Thread(target=work, args=(i, item)) for i, item in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def histogram_count_above(samples, name, bound):
    """Observations of histogram `name` above `bound` (count minus the bucket le=bound)."""
    count = metric_value(samples, f"{name}_count")
    at_most = [v for (n, labels), v in samples.items()
               if n == f"{name}_bucket" and float(dict(labels)["le"]) == bound]
    assert count is not None and len(at_most) == 1, (name, bound)
    return count - at_most[0]


def model_info(stub):
    return stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)


# ---- Must show 1 -------------------------------------------------------------------------------

def test_64_streams_over_8_adapters_match_runs_alone_and_mix_adapters(tmp_path, server_factory):
    root, ids = make_adapter_root(tmp_path, 8)
    srv = start_server(server_factory, root, "--kv_cache_bytes=4194304")
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(srv.grpc))
    choices = ids + [""]  # eight adapters and the base model
    rng = random.Random(6)
    requests = [greedy([rng.randrange(3, 256) for _ in range(rng.randint(4, 12))],
                       choices[i % len(choices)], max_new_tokens=24) for i in range(64)]

    # The adapters really steer the model: one prompt, nine different continuations.
    probe = [stream_tokens(stub, greedy([1, 17, 42, 99], a)) for a in choices]
    assert len({tuple(p) for p in probe}) == len(choices), probe

    alone = [stream_tokens(stub, r) for r in requests]
    before = parse_metrics(scrape_metrics(srv.metrics))
    together = run_together(lambda r: stream_tokens(stub, r), requests)
    for i, (a, t) in enumerate(zip(alone, together)):
        assert not isinstance(t, Exception), (i, t)
        assert len(t) == 24 and t == a, (i, requests[i].adapter_id, a, t)

    after = parse_metrics(scrape_metrics(srv.metrics))
    mixed = (histogram_count_above(after, "loraserve_step_adapters", 3) -
             histogram_count_above(before, "loraserve_step_adapters", 3))
    assert mixed >= 1, "no step mixed 4 or more distinct adapters"
    ok = metric_value(after, "loraserve_requests_total", code="OK", finished_reason="length")
    assert ok == len(probe) + 2 * len(requests)
    assert metric_value(after, "loraserve_generation_tokens_total") == (
        16 * len(probe) + 2 * 24 * len(requests))
    assert metric_value(after, "loraserve_time_to_first_token_seconds_count") == ok
    # 23 gaps between 24 tokens, 15 between 16.
    assert metric_value(after, "loraserve_inter_token_latency_seconds_count") == (
        15 * len(probe) + 2 * 23 * len(requests))
    assert metric_value(after, "loraserve_request_queue_time_seconds_count") == ok
    hits = metric_value(after, "loraserve_adapter_cache_hits_total", tier="pool")
    misses = metric_value(after, "loraserve_adapter_cache_misses_total", tier="pool")
    adapter_requests = sum(1 for r in requests if r.adapter_id) * 2 + len(ids)
    assert hits + misses == adapter_requests
    assert metric_value(after, "loraserve_adapter_cache_misses_total", tier="host") == len(ids)
    assert metric_value(after, "loraserve_adapter_loads_total", result="success") == len(ids)


# ---- Must show 4 -------------------------------------------------------------------------------

def wait_idle(stub, srv, timeout=20):
    """Waits until GetModelInfo and /metrics both show no KV block and no adapter reference in
    use; returns (info, samples) as last seen."""
    deadline = time.monotonic() + timeout
    while True:
        info = model_info(stub)
        samples = parse_metrics(scrape_metrics(srv.metrics))
        idle = (info.kv_cache.used_blocks == 0 and
                info.adapter_pool.num_adapter_references == 0 and
                info.scheduler.num_running_requests == 0 and
                metric_value(samples, "loraserve_kv_cache_used_blocks") == 0 and
                metric_value(samples, "loraserve_adapter_references") == 0 and
                metric_value(samples, "loraserve_requests_running") == 0 and
                metric_value(samples, "loraserve_requests_waiting") == 0)
        if idle or time.monotonic() > deadline:
            return info, samples
        time.sleep(0.1)


def lora_info(samples):
    series = [dict(labels) for (name, labels) in samples if name == "vllm:lora_requests_info"]
    assert len(series) == 1, series
    return series[0]


def test_cancelled_and_timed_out_streams_release_kv_blocks_and_adapter_refs(tmp_path,
                                                                             server_factory):
    root, ids = make_adapter_root(tmp_path, 4)
    # 16 requests of up to 8192 tokens: 16 x 1024 blocks of 4 KiB.
    srv = start_server(server_factory, root, f"--kv_cache_bytes={16 * 1024 * 4096}",
                       model=long_context_model(tmp_path))
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(srv.grpc))
    long_prompt = [5, 6, 7, 8, 9, 10]
    new_tokens = 8000  # seconds of work, so cancels and deadlines land mid-generation

    # Streams that will be cancelled: opened, and each has produced a token before we look.
    cancelled = []
    for i in range(8):
        s = stub.GenerateStream(greedy(long_prompt, ids[i % 4] if i < 6 else "", new_tokens),
                                timeout=120)
        next(s)  # header
        next(s)  # a first token: the request runs and holds KV blocks and its adapter
        cancelled.append(s)
    # While they run, the server shows them.
    info = model_info(stub)
    samples = parse_metrics(scrape_metrics(srv.metrics))
    assert info.kv_cache.used_blocks > 0 and info.adapter_pool.num_adapter_references == 6
    assert metric_value(samples, "loraserve_kv_cache_used_blocks") > 0
    assert metric_value(samples, "loraserve_adapter_references") == 6
    running = lora_info(samples)
    assert running["running_lora_adapters"] == ",".join(sorted(ids)), running
    assert running["max_lora"] == "16"

    # Streams with deadlines, from already expired on arrival to mid-generation.
    def timed(timeout):
        try:
            return len(stream_tokens(stub, greedy(long_prompt, ids[0], new_tokens), timeout=timeout))
        except grpc.RpcError as e:
            return e.code()
    timeouts = [0.05, 0.1, 0.2, 0.3, 0.5, 0.8]
    outcomes = run_together(timed, timeouts)
    for s in cancelled:
        s.cancel()
    for s in cancelled:
        with pytest.raises(grpc.RpcError) as err:
            list(s)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    assert grpc.StatusCode.DEADLINE_EXCEEDED in outcomes, outcomes
    assert all(o == grpc.StatusCode.DEADLINE_EXCEEDED for o in outcomes), outcomes

    info, samples = wait_idle(stub, srv)
    assert info.kv_cache.used_blocks == 0 and info.adapter_pool.num_adapter_references == 0
    assert metric_value(samples, "loraserve_kv_cache_used_blocks") == 0
    assert metric_value(samples, "loraserve_kv_cache_usage_ratio") == 0
    assert metric_value(samples, "loraserve_adapter_references") == 0
    assert metric_value(samples, "loraserve_requests_running") == 0
    assert metric_value(samples, "loraserve_requests_waiting") == 0
    assert metric_value(samples, "vllm:kv_cache_usage_perc") == 0
    idle = lora_info(samples)
    assert idle.get("running_lora_adapters", "") == "" and idle.get("waiting_lora_adapters",
                                                                      "") == ""
    # The engine itself ended them: cancelled at a step boundary, and at least one deadline
    # passed while it ran (not only in the client).
    assert metric_value(samples, "loraserve_requests_total", code="CANCELLED",
                        finished_reason="cancelled") == len(cancelled)
    assert (metric_value(samples, "loraserve_requests_total", code="DEADLINE_EXCEEDED",
                         finished_reason="deadline") or 0) >= 1
    # And the server still serves every adapter.
    for adapter_id in ids:
        assert len(stream_tokens(stub, greedy([1, 2, 3], adapter_id, 4))) == 4


def test_kv_pool_too_small_preempts_and_outputs_still_match(tmp_path, server_factory):
    root, ids = make_adapter_root(tmp_path, 4)
    # 24 blocks of 8 tokens (a block of llama_gqa is 2 layers x K,V x 2 heads x 16 x 8 x 4 bytes).
    srv = start_server(server_factory, root, "--kv_cache_bytes=98304")
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(srv.grpc))
    kv = model_info(stub).kv_cache
    assert kv.block_tokens == 8 and kv.total_blocks == 24, kv
    rng = random.Random(4)
    # Each request needs 8 blocks at its end (8 + 56 tokens); 12 of them need 96.
    requests = [greedy([rng.randrange(3, 256) for _ in range(8)], (ids + [""])[i % 5], 56)
                for i in range(12)]
    alone = [stream_tokens(stub, r) for r in requests]
    before = metric_value(parse_metrics(scrape_metrics(srv.metrics)), "loraserve_preemptions_total")
    assert before == 0
    together = run_together(lambda r: stream_tokens(stub, r), requests)
    for i, (a, t) in enumerate(zip(alone, together)):
        assert not isinstance(t, Exception), (i, t)
        assert t == a, (i, a, t)
    info, samples = wait_idle(stub, srv)
    assert metric_value(samples, "loraserve_preemptions_total") > 0
    assert info.kv_cache.used_blocks == 0 and info.adapter_pool.num_adapter_references == 0


# ---- Must show 8 -------------------------------------------------------------------------------

# Every family the issue names (histograms by their _count series), queried through Prometheus.
FAMILIES = [
    'loraserve_requests_total{code="OK",finished_reason="length"}',
    'loraserve_requests_total{code="NOT_FOUND",finished_reason="rejected"}',
    "loraserve_time_to_first_token_seconds_count",
    "loraserve_inter_token_latency_seconds_count",
    "loraserve_e2e_request_latency_seconds_count",
    "loraserve_request_queue_time_seconds_count",
    "loraserve_prompt_tokens_total",
    "loraserve_generation_tokens_total",
    "loraserve_requests_running",
    "loraserve_requests_waiting",
    "loraserve_kv_cache_usage_ratio",
    "loraserve_kv_cache_used_blocks",
    "loraserve_kv_cache_capacity_blocks",
    "loraserve_step_tokens_count",
    'loraserve_step_tokens_bucket{le="+Inf"}',
    "loraserve_step_adapters_count",
    "loraserve_step_rows_total",
    "loraserve_engine_steps_total",
    "loraserve_preemptions_total",
    'loraserve_adapter_loads_total{result="success"}',
    'loraserve_adapter_loads_total{result="failure"}',
    "loraserve_adapter_load_seconds_count",
    'loraserve_adapter_evictions_total{tier="pool"}',
    'loraserve_adapter_evictions_total{tier="host"}',
    'loraserve_adapter_cache_hits_total{tier="pool"}',
    'loraserve_adapter_cache_misses_total{tier="host"}',
    'loraserve_adapters_resident{tier="pool"}',
    'loraserve_adapters_resident{tier="host"}',
    'loraserve_adapter_resident_bytes{tier="pool"}',
    'loraserve_adapter_resident_bytes{tier="host"}',
    "loraserve_adapter_references",
    "loraserve_grpc_requests_total",
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:lora_requests_info",
]


def loraserve_lines(text):
    """The lines of the loraserve_* families (samples and their HELP/TYPE comments)."""
    keep = []
    for line in text.splitlines():
        name = line.split(" ")[2] if line.startswith("# ") else line
        if name.startswith("loraserve_"):
            keep.append(line)
    return "\n".join(keep) + "\n"


def test_prometheus_scrapes_every_family_and_promtool_passes(tmp_path, server_factory,
                                                               prometheus_factory):
    assert PROMTOOL, "promtool not found (Debian package prometheus; scripts/setup.sh installs it)"
    root, ids = make_adapter_root(tmp_path, 3)
    srv = start_server(server_factory, root, "--kv_cache_bytes=4194304")
    prom = prometheus_factory([srv.metrics])
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(srv.grpc))
    # Traffic: every adapter and the base model, twice, and a refused request.
    for adapter_id in ids + [""] + ids + [""]:
        assert len(stream_tokens(stub, greedy([3, 1, 4, 1, 5], adapter_id, 8))) == 8
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(greedy([3, 1, 4], "no-such-adapter", 4), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # Prometheus has scraped after the traffic when it sees all of it.
    result = prom.wait_for('loraserve_requests_total{code="OK",finished_reason="length"} >= 8',
                           timeout=30)
    assert result, "Prometheus never saw the traffic:\n" + prom.log()
    assert prom.targets_up(), prom.query("up")
    missing = [expr for expr in FAMILIES if not prom.query(expr)]
    assert not missing, missing
    # Values that Prometheus stored are the server's.
    tokens = prom.query("loraserve_generation_tokens_total")
    assert float(tokens[0]["value"][1]) == 8 * 8
    lora = prom.query("vllm:lora_requests_info")
    assert len(lora) == 1 and lora[0]["metric"]["max_lora"] == "16", lora
    assert abs(float(lora[0]["value"][1]) - time.time()) < 60, lora

    text = scrape_metrics(srv.metrics)
    lint = loraserve_lines(text)
    assert "loraserve_step_adapters_bucket" in lint and "vllm:" not in lint
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=lint, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_vllm_compat_gauges_can_be_turned_off(tmp_path, server_factory):
    root, _ = make_adapter_root(tmp_path, 1)
    srv = start_server(server_factory, root, "--kv_cache_bytes=4194304",
                       "--metrics_vllm_compat=false")
    text = scrape_metrics(srv.metrics)
    assert "vllm:" not in text
    assert "loraserve_requests_waiting 0" in text and "loraserve_kv_cache_usage_ratio 0" in text
