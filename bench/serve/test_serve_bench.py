"""Smoke test of the serving benchmark at tiny scale: serve_bench against the real loraserve with
the tiny golden fixture model and its attn_r4 adapter copied under four benchmark ids.

    LS_BINARY_DIR=build .venv/bin/python -m pytest -q bench/serve/test_serve_bench.py
"""
import collections
import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.environ.get("LS_SOURCE_DIR", os.path.dirname(os.path.dirname(HERE)))
BINARY_DIR = os.environ.get("LS_BINARY_DIR", os.path.join(SOURCE_DIR, "build"))
SERVE_BENCH = os.path.join(BINARY_DIR, "bench", "serve", "serve_bench")
MODEL = os.path.join(SOURCE_DIR, "tests", "golden", "fixtures", "llama_gqa")
ADAPTER = os.path.join(MODEL, "adapters", "attn_r4")

sys.path.insert(0, HERE)
import run  # noqa: E402  (the driver's Server: start, ready line, scrape, SIGTERM)

SMALL = ["--clients=4", "--prompt_tokens=16", "--max_tokens=8", "--warmup_requests=1",
         "--measure_requests=2"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_bench")
    root = tmp / "adapters"
    for i in range(4):
        shutil.copytree(ADAPTER, root / run.adapter_id(i))
    s = run.Server(os.path.join(BINARY_DIR, "server", "loraserve"),
                   [f"--model={MODEL}", f"--adapter_root={root}", "--threads=1",
                    "--max_loras_per_step=2", "--adapter_pool_bytes=1048576",
                    "--adapter_page_bytes=65536"], str(tmp / "server.log"), ready_timeout=60)
    yield s
    assert s.stop() == 0


def bench(server, tmp_path, *flags):
    out = tmp_path / "out.json"
    p = subprocess.run([SERVE_BENCH, f"--address={server.grpc}", f"--out={out}", *flags],
                       capture_output=True, text=True, timeout=120)
    return p, json.loads(out.read_text())


@pytest.mark.parametrize("flags", [["--distribution=uniform", "--num_adapters=4"],
                                   ["--distribution=zipf", "--num_adapters=4"],
                                   ["--distribution=base"]])
def test_closed_loop_measures_every_request(server, tmp_path, flags):
    p, r = bench(server, tmp_path, *SMALL, *flags)
    assert p.returncode == 0, p.stderr
    assert r["ok"] and r["errors"] == []
    # Four clients, two measured requests each, every one complete (8 tokens, LENGTH).
    assert r["measured_requests"] == 8
    assert r["requests_ok"] >= 12  # one warm-up and two measured per client, at least
    assert r["output_tokens_in_window"] > 0 and r["output_tokens_per_second"] > 0
    assert r["window_seconds"] > 0
    for key in ("ttft_seconds", "tpot_seconds", "e2e_seconds"):
        s = r[key]
        assert s["n"] > 0 and 0 <= s["min"] <= s["p50"] <= s["p99"] <= s["max"], (key, s)
    assert r["ttft_seconds"]["max"] <= r["e2e_seconds"]["max"]
    if "--distribution=base" in flags:
        assert r["distinct_adapters_measured"] == 1  # the base model ("")
    else:
        assert 2 <= r["distinct_adapters_measured"] <= 4


def test_an_error_fails_the_run(server, tmp_path):
    # No adapter "zz0000".. exists: the server answers NOT_FOUND and the run must fail.
    p, r = bench(server, tmp_path, *SMALL, "--distribution=uniform", "--num_adapters=4",
                 "--adapter_prefix=zz")
    assert p.returncode == 1
    assert not r["ok"] and "not found" in r["errors"][0]


def test_prompts_over_the_model_length_fail_the_run(server, tmp_path):
    # 250 + 8 tokens > max_model_len 256: INVALID_ARGUMENT, reported, exit 1.
    p, r = bench(server, tmp_path, "--clients=2", "--prompt_tokens=250", "--max_tokens=8",
                 "--distribution=base")
    assert p.returncode == 1 and "status 3" in r["errors"][0]


def trace(tmp_path, *flags, n=2000):
    out = tmp_path / "trace.json"
    subprocess.run([SERVE_BENCH, "--vocab_size=32000", "--prompt_tokens=128",
                    f"--trace_out={out}", f"--trace_requests={n}", *flags], check=True)
    return json.loads(out.read_text())["requests"]


def test_trace_is_seeded_and_follows_the_distribution(tmp_path):
    uniform = trace(tmp_path, "--distribution=uniform", "--num_adapters=8")
    assert uniform == trace(tmp_path, "--distribution=uniform", "--num_adapters=8")
    assert uniform != trace(tmp_path, "--distribution=uniform", "--num_adapters=8", "--seed=2")
    prompts = {tuple(r["prompt"]) for r in uniform}
    assert len(prompts) == len(uniform)  # distinct per request
    assert all(len(r["prompt"]) == 128 and 3 <= min(r["prompt"]) and max(r["prompt"]) < 32000
               for r in uniform)
    count = collections.Counter(r["adapter_id"] for r in uniform)
    assert set(count) == {run.adapter_id(i) for i in range(8)}
    assert all(abs(c / 2000 - 1 / 8) < 0.03 for c in count.values()), count
    zipf = collections.Counter(
        r["adapter_id"] for r in trace(tmp_path, "--distribution=zipf", "--num_adapters=8"))
    harmonic = sum(1 / (i + 1) for i in range(8))
    for i in range(8):  # P(i) = 1 / ((i + 1) H_8) for alpha = 1
        assert abs(zipf[run.adapter_id(i)] / 2000 - 1 / ((i + 1) * harmonic)) < 0.03, zipf
    # The same prompts whatever the adapters: the base-model run sees the same trace.
    base = trace(tmp_path, "--distribution=base")
    assert [r["prompt"] for r in base] == [r["prompt"] for r in uniform]
    assert all(r["adapter_id"] == "" for r in base)
