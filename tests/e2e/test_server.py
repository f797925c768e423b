"""The real loraserve binary on ephemeral ports: health, reflection, UNIMPLEMENTED RPCs,
Generate and GenerateStream,
GetModelInfo on a checkpoint, /metrics (checked by promtool), loractl, flags and shutdown."""
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import LORACTL, LORASERVE, ServerProcess
from loraserve.v1 import adapter_pb2, admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

PROMTOOL = shutil.which("promtool")


def write_safetensors(path, tensors):
    """Writes {name: (dtype, shape, bytes)} in the safetensors format (stdlib only)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, data) in sorted(tensors.items()):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


FIXTURE_MODEL = os.path.join(os.environ.get("LS_SOURCE_DIR", "."), "tests", "golden", "fixtures",
                             "llama_gqa")


def safetensors_parameters(path):
    """Sum of tensor element counts, read from the file's header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for d in entry["shape"]:
            count *= d
        total += count
    return total


@pytest.fixture
def model_dir():
    """A tiny Llama (GQA, 2 layers) from the golden fixtures."""
    return FIXTURE_MODEL


@pytest.fixture
def server(server_factory, model_dir):
    return server_factory(f"--model={model_dir}", "--kv_cache_bytes=4194304",
                          "--kv_block_tokens=8", "--threads=1")


def channel(srv):
    return grpc.insecure_channel(srv.grpc)


def test_health_serving(server):
    stub = health_pb2_grpc.HealthStub(channel(server))
    for service in ("", "loraserve.v1.Inference", "loraserve.v1.Admin"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_both_services(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel(server))
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"loraserve.v1.Inference", "loraserve.v1.Admin", "grpc.health.v1.Health"} <= names


def test_admin_without_an_adapter_root_fails_precondition(server):
    admin = admin_pb2_grpc.AdminStub(channel(server))
    calls = {
        "LoadAdapter": lambda: admin.LoadAdapter(
            admin_pb2.LoadAdapterRequest(adapter_id="a"), timeout=10),
        "ListAdapters": lambda: admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
        assert "adapter" in err.value.details(), err.value.details()


def test_model_info_reports_the_model(server, model_dir):
    stub = inference_pb2_grpc.InferenceStub(channel(server))
    info = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)
    assert info.server.version
    assert info.model_loaded
    m = info.model
    assert m.name == "llama_gqa"
    assert m.path == os.path.abspath(model_dir)
    assert m.model_type == "llama"
    assert (m.vocab_size, m.hidden_size, m.num_hidden_layers) == (256, 64, 2)
    assert (m.num_attention_heads, m.num_key_value_heads, m.head_dim) == (4, 2, 16)
    assert m.max_model_len == m.max_position_embeddings == 256
    assert m.num_parameters == safetensors_parameters(os.path.join(model_dir, "model.safetensors"))
    assert m.weights_dtype == adapter_pb2.DTYPE_BF16
    assert m.compute_dtype == adapter_pb2.DTYPE_F32
    assert list(info.tokenizer.eos_token_ids) == [2]
    kv = info.kv_cache
    assert kv.block_tokens == 8
    # 2 layers x (K and V) x 8 tokens x 2 kv heads x 16 dims x 4 bytes per block.
    assert kv.block_bytes == 2 * 2 * 8 * 2 * 16 * 4
    assert kv.total_blocks == 4194304 // kv.block_bytes
    assert kv.used_blocks == 0
    assert info.backend.kind == inference_pb2.BACKEND_KIND_CPU
    assert info.backend.num_threads == 1
    assert info.scheduler.max_step_tokens == 2048


@pytest.mark.parametrize("field,value,needle", [
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "yarn"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
])
def test_bad_config_refuses_to_start(tmp_path, model_dir, field, value, needle):
    d = tmp_path / "bad"
    shutil.copytree(model_dir, d)
    config = json.loads((d / "config.json").read_text())
    config[field] = value
    (d / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([LORASERVE, f"--model={d}", "--address=127.0.0.1:0",
                           "--metrics_address=127.0.0.1:0"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert f"--model={d}" in proc.stderr and needle in proc.stderr, proc.stderr


def test_model_info_without_model(server_factory):
    srv = server_factory()
    info = inference_pb2_grpc.InferenceStub(channel(srv)).GetModelInfo(
        inference_pb2.GetModelInfoRequest(), timeout=10)
    assert not info.model_loaded
    assert not info.HasField("model")


def scrape(srv):
    with urllib.request.urlopen(f"http://{srv.metrics}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_metrics_served_and_lint_clean(server):
    # One RPC first so the request counter has a series.
    health_pb2_grpc.HealthStub(channel(server)).Check(health_pb2.HealthCheckRequest(), timeout=10)
    text = scrape(server)
    assert "# TYPE loraserve_build_info gauge" in text
    assert 'loraserve_build_info{' in text
    assert "process_resident_memory_bytes" in text
    assert 'loraserve_grpc_requests_total{code="OK",method="grpc.health.v1.Health/Check"}' in text
    assert PROMTOOL, "promtool not found (Debian package prometheus; scripts/setup.sh installs it)"
    # The vLLM-compatible gauges keep vLLM's names, which promtool's lint rejects by design;
    # every other family must pass.
    assert "vllm:num_requests_running" in text
    ours = "\n".join(line for line in text.splitlines()
                     if not (line.startswith("vllm:") or line.startswith("# HELP vllm:")
                             or line.startswith("# TYPE vllm:"))) + "\n"
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=ours, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_unknown_methods_do_not_grow_labels(server):
    ch = channel(server)
    bogus = ch.unary_unary("/loraserve.v1.Inference/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as err:
        bogus(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "NoSuchMethod" not in scrape(server)


def test_loractl(server, model_dir):
    ok = subprocess.run([LORACTL, f"--address={server.grpc}", "health"], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "SERVING"
    info = subprocess.run([LORACTL, f"--address={server.grpc}", "model-info"],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    parsed = json.loads(info.stdout)
    assert parsed["model"]["path"] == os.path.abspath(model_dir)
    assert parsed["model_loaded"] is True
    missing = subprocess.run([LORACTL, f"--address={server.grpc}", "health", "no.such.Service"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr
    usage = subprocess.run([LORACTL, "frobnicate"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2


def test_sigterm_exits_zero(server):
    assert server.terminate(signal.SIGTERM) == 0
    assert "stopped" in server.log()


def test_sigint_exits_zero(server_factory):
    srv = server_factory()
    assert srv.terminate(signal.SIGINT) == 0


@pytest.mark.parametrize("flags,needle", [
    (["--address=nonsense"], "--address=nonsense"),
    (["--metrics_address=1.2.3.4:99999"], "--metrics_address"),
    (["--backend=tpu"], "--backend=tpu"),
    (["--model=/does/not/exist"], "--model=/does/not/exist"),
    (["--drain_timeout=-1s"], "--drain_timeout"),
    (["--adapter_root=/does/not/exist"], "--adapter_root=/does/not/exist: not a directory"),
    (["--adapter_root=/"], "adapters need a base model (--model)"),
    (["--max_lora_rank=0"], "--max_lora_rank=0"),
    (["--default_max_queue_seconds=-1"], "--default_max_queue_seconds=-1"),
])
def test_invalid_flags_exit_nonzero_with_message(flags, needle):
    proc = subprocess.run([LORASERVE, *flags], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr


def test_unknown_flag_exits_nonzero():
    proc = subprocess.run([LORASERVE, "--no_such_flag=1"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "no_such_flag" in proc.stderr


def test_bad_checkpoint_refuses_to_start(tmp_path, model_dir):
    d = tmp_path / "broken"
    d.mkdir()
    shutil.copy(os.path.join(model_dir, "config.json"), d / "config.json")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    proc = subprocess.run([LORASERVE, f"--model={d}", "--address=127.0.0.1:0",
                           "--metrics_address=127.0.0.1:0"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert f"--model={d}" in proc.stderr


def test_cuda_backend_without_gpu_fails_clearly():
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi"], capture_output=True).returncode == 0:
        pytest.skip("a GPU is present: this case needs a machine without one")
    proc = subprocess.run([LORASERVE, "--backend=cuda", "--address=127.0.0.1:0",
                           "--metrics_address=127.0.0.1:0"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "--backend=cuda" in proc.stderr


def test_port_in_use_fails_clearly(server):
    port = server.grpc.rsplit(":", 1)[1]
    proc = subprocess.run([LORASERVE, f"--address=127.0.0.1:{port}",
                           "--metrics_address=127.0.0.1:0"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert f"--address=127.0.0.1:{port}" in proc.stderr


def test_help_lists_the_server_flags():
    proc = subprocess.run([LORASERVE, "--help"], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    for flag in ("--address", "--metrics_address", "--model", "--kv_cache_bytes", "--threads",
                 "--weights_dtype", "--drain_timeout"):
        assert flag in out, flag


def test_adapter_root_opens_a_registry(tmp_path, server_factory, model_dir):
    """--adapter_root: the server starts with the adapter registry over the model and says what
    it found (the admin and inference RPCs over it come with the serving issue)."""
    root = tmp_path / "adapters"
    for name in ("attn_r4", "embed_head_r8"):
        shutil.copytree(os.path.join(model_dir, "adapters", name), root / name)
    srv = server_factory(f"--model={model_dir}", f"--adapter_root={root}",
                         "--adapter_pool_bytes=8388608", "--adapter_page_bytes=65536",
                         "--max_lora_rank=64", "--kv_cache_bytes=4194304", "--threads=1")
    log = srv.log()
    assert f"adapters under {root}: 2 on disk" in log, log
    assert "max_lora_rank=64" in log and "adapter_pool_bytes=8388608" in log, log


# ---- Tokenize / Detokenize ---------------------------------------------------------------------

TOKENIZERS = os.path.join(os.environ.get("LS_SOURCE_DIR", "."), "tests", "golden", "tokenizers")


def write_tiny_llama(path, vocab_size):
    """A one-layer random Llama (fp32, tied embeddings) with `vocab_size` rows, written with the
    standard library only, so a golden tokenizer can sit beside a model that covers its ids."""
    import array
    import random
    rng = random.Random(5)
    h, f, heads, kv_heads, head_dim = 32, 64, 2, 1, 16
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": h, "intermediate_size": f, "num_hidden_layers": 1,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "vocab_size": vocab_size, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1,
        "eos_token_id": 2,
    }
    shapes = {
        "model.embed_tokens.weight": [vocab_size, h],
        "model.norm.weight": [h],
        "model.layers.0.input_layernorm.weight": [h],
        "model.layers.0.post_attention_layernorm.weight": [h],
        "model.layers.0.self_attn.q_proj.weight": [heads * head_dim, h],
        "model.layers.0.self_attn.k_proj.weight": [kv_heads * head_dim, h],
        "model.layers.0.self_attn.v_proj.weight": [kv_heads * head_dim, h],
        "model.layers.0.self_attn.o_proj.weight": [h, heads * head_dim],
        "model.layers.0.mlp.gate_proj.weight": [f, h],
        "model.layers.0.mlp.up_proj.weight": [f, h],
        "model.layers.0.mlp.down_proj.weight": [h, f],
    }
    header, blobs, offset = {}, [], 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        values = array.array("f", (1.0 if len(shape) == 1 else rng.uniform(-0.1, 0.1)
                                   for _ in range(n)))
        data = values.tobytes()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    with open(path / "model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.fixture
def sp_model_dir(tmp_path):
    """The tiny model with the SentencePiece-style golden tokenizer (1256 tokens, BOS <s>)."""
    d = tmp_path / "sp_model"
    write_tiny_llama(d, 1280)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(TOKENIZERS, "sentencepiece_bpe", name), d / name)
    return d


@pytest.fixture
def sp_server(server_factory, sp_model_dir):
    return server_factory(f"--model={sp_model_dir}", "--kv_cache_bytes=1048576", "--threads=1")


def golden_cases(name):
    with open(os.path.join(TOKENIZERS, name, "expected.json"), encoding="utf-8") as f:
        return json.load(f)["cases"]


def test_tokenize_matches_hugging_face(sp_server):
    stub = inference_pb2_grpc.InferenceStub(channel(sp_server))
    cases = golden_cases("sentencepiece_bpe")
    checked = 0
    for case in cases:
        text = case["text"]
        if len(text.encode("utf-8")) > 300:
            continue
        # Defaults: BOS added, special-token strings in the text encoded as plain text.
        r = stub.Tokenize(inference_pb2.TokenizeRequest(text=text), timeout=10)
        assert list(r.token_ids) == case["ids_split_special"], text
        assert r.token_count == len(case["ids_split_special"])
        opts = inference_pb2.TokenizeOptions(parse_special=True)
        r = stub.Tokenize(inference_pb2.TokenizeRequest(text=text, options=opts, return_pieces=True,
                                                        return_offsets=True), timeout=10)
        assert list(r.token_ids) == case["ids"], text
        assert list(r.pieces) == case["tokens"], text
        assert [[o.start, o.end] for o in r.offsets] == case["offsets"], text
        opts = inference_pb2.TokenizeOptions(add_special_tokens=False)
        r = stub.Tokenize(inference_pb2.TokenizeRequest(text=text, options=opts), timeout=10)
        assert list(r.token_ids) == case["ids_split_special_no_special"], text
        checked += 1
    assert checked >= 40


def test_detokenize_matches_hugging_face(sp_server):
    stub = inference_pb2_grpc.InferenceStub(channel(sp_server))
    for case in golden_cases("sentencepiece_bpe")[:40]:
        r = stub.Detokenize(inference_pb2.DetokenizeRequest(token_ids=case["ids"]), timeout=10)
        assert r.text == case["decode_skip_special"], case["text"]
        r = stub.Detokenize(inference_pb2.DetokenizeRequest(token_ids=case["ids"],
                                                            skip_special_tokens=False), timeout=10)
        assert r.text == case["decode"], case["text"]


def test_tokenize_errors(sp_server):
    stub = inference_pb2_grpc.InferenceStub(channel(sp_server))
    with pytest.raises(grpc.RpcError) as err:
        stub.Detokenize(inference_pb2.DetokenizeRequest(token_ids=[5, 1280]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "token_ids[1] = 1280 is outside the vocabulary [0, 1280)" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Tokenize(inference_pb2.TokenizeRequest(text="a" * (1 << 20 | 1)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1048576" in err.value.details()
    # Ids past the tokenizer's vocabulary but inside the model's (padding rows) decode to nothing.
    r = stub.Detokenize(inference_pb2.DetokenizeRequest(token_ids=[1270]), timeout=10)
    assert r.text == ""
    # The server keeps serving after bad requests.
    assert stub.Tokenize(inference_pb2.TokenizeRequest(text="ok"), timeout=10).token_count > 0


def test_tokenizer_info(sp_server):
    stub = inference_pb2_grpc.InferenceStub(channel(sp_server))
    info = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10).tokenizer
    assert info.vocab_size == 1256
    assert info.bos_token_id == 1 and info.add_bos_token
    assert info.model_type == "BPE"
    specials = {t.content: t.id for t in info.special_tokens}
    assert specials.get("<s>") == 1 and specials.get("</s>") == 2, specials


def test_text_rpcs_without_a_tokenizer_fail_precondition(server):
    stub = inference_pb2_grpc.InferenceStub(channel(server))
    for call in (lambda: stub.Tokenize(inference_pb2.TokenizeRequest(text="x"), timeout=10),
                 lambda: stub.Detokenize(inference_pb2.DetokenizeRequest(token_ids=[1]),
                                         timeout=10)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "has no tokenizer.json" in err.value.details()


def test_tokenizer_larger_than_the_model_refuses_to_start(tmp_path, model_dir):
    d = tmp_path / "mismatch"
    shutil.copytree(model_dir, d, ignore=shutil.ignore_patterns("adapters", "expected*"))
    shutil.copy(os.path.join(TOKENIZERS, "sentencepiece_bpe", "tokenizer.json"),
                d / "tokenizer.json")
    proc = subprocess.run([LORASERVE, f"--model={d}", "--address=127.0.0.1:0",
                           "--metrics_address=127.0.0.1:0"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "tokenizer.json has 1256 tokens but the model's vocab_size is 256" in proc.stderr


# ---- Generate / GenerateStream -----------------------------------------------------------------

def greedy(max_tokens=8, **kwargs):
    return inference_pb2.GenerateRequest(
        sampling=inference_pb2.SamplingParams(temperature=0.0),
        stopping=inference_pb2.StoppingCriteria(max_new_tokens=max_tokens, ignore_eos=True),
        output=inference_pb2.OutputOptions(return_token_ids=True), **kwargs)


def test_generate_greedy_is_deterministic_and_matches_token_ids(sp_server):
    stub = inference_pb2_grpc.InferenceStub(channel(sp_server))
    first, call = stub.Generate.with_call(greedy(text="Hello world", request_id="r-1"),
                                          timeout=30)
    assert dict(call.initial_metadata())["x-request-id"] == "r-1"
    assert first.request_id == "r-1"
    assert len(first.token_ids) == 8
    assert first.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert first.usage.completion_tokens == 8
    assert first.adapter.id == "" and first.adapter.version == ""
    second = stub.Generate(greedy(text="Hello world"), timeout=30)
    assert second.request_id and second.request_id != "r-1"
    assert (second.text, list(second.token_ids)) == (first.text, list(first.token_ids))
    ids = stub.Tokenize(inference_pb2.TokenizeRequest(text="Hello world"), timeout=10).token_ids
    assert first.usage.prompt_tokens == len(ids)
    by_ids = stub.Generate(greedy(token_ids=inference_pb2.TokenIds(ids=ids)), timeout=30)
    assert (by_ids.text, list(by_ids.token_ids)) == (first.text, list(first.token_ids))
    decoded = stub.Detokenize(inference_pb2.DetokenizeRequest(token_ids=first.token_ids),
                              timeout=10).text
    assert first.text == decoded


def test_generate_stream_matches_unary(sp_server):
    stub = inference_pb2_grpc.InferenceStub(channel(sp_server))
    unary = stub.Generate(greedy(text="Hello world"), timeout=30)
    chunks = list(stub.GenerateStream(greedy(text="Hello world", request_id="s-1"), timeout=30))
    header, deltas, final = chunks[0], chunks[1:-1], chunks[-1]
    assert header.request_id == "s-1" and header.usage.prompt_tokens == unary.usage.prompt_tokens
    assert header.text == "" and not header.token_ids
    assert header.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED
    assert all(c.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED for c in deltas)
    assert final.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == 8
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert all(c.request_id == "s-1" for c in chunks)


def test_generate_logprobs(sp_server):
    stub = inference_pb2_grpc.InferenceStub(channel(sp_server))
    request = greedy(text="Hello world")
    request.output.top_logprobs = 5
    unary = stub.Generate(request, timeout=30)
    assert len(unary.logprobs) == len(unary.token_ids) == 8
    for token_id, pos in zip(unary.token_ids, unary.logprobs):
        assert pos.token.token_id == token_id
        # Greedy takes the most likely token: rank 1, and the first alternative.
        assert pos.rank == 1
        assert [t.logprob for t in pos.top] == sorted((t.logprob for t in pos.top), reverse=True)
        assert len(pos.top) == 5 and pos.top[0].token_id == token_id
        assert pos.top[0].logprob == pos.token.logprob <= 0.0
        assert sum(math.exp(t.logprob) for t in pos.top) <= 1.0 + 1e-5
        assert pos.token.piece and pos.token.decoded
    # The pieces' bytes make up the text (no special tokens, no stop strings here), but for the
    # space a SentencePiece decoder strips from the first token of a text.
    joined = b"".join(p.token.decoded for p in unary.logprobs).decode()
    assert joined.endswith(unary.text) and not joined[:len(joined) - len(unary.text)].strip()
    streamed = [p for c in stub.GenerateStream(request, timeout=30) for p in c.logprobs]
    assert streamed == list(unary.logprobs)
    # Sampled tokens at a high temperature are not always the argmax; ranks say so.
    hot = greedy(text="Hello world", max_tokens=16)
    hot.sampling.temperature = 5.0
    hot.sampling.seed = 7
    hot.output.logprobs = True
    sampled = stub.Generate(hot, timeout=30)
    assert len(sampled.logprobs) == 16 and all(not p.top for p in sampled.logprobs)
    assert any(p.rank > 1 for p in sampled.logprobs)
    plain = stub.Generate(greedy(text="Hello world"), timeout=30)
    assert not plain.logprobs
    request.output.top_logprobs = 21
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_logprobs" in err.value.details()


def test_generate_priority_and_queue_limit(server_factory, sp_model_dir):
    srv = server_factory(f"--model={sp_model_dir}", "--kv_cache_bytes=1048576", "--threads=1",
                         "--default_max_queue_seconds=30")
    stub = inference_pb2_grpc.InferenceStub(channel(srv))
    info = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)
    assert info.scheduler.default_max_queue_seconds == 30
    plain = stub.Generate(greedy(text="Hello world"), timeout=30)
    # Both only order or bound the wait; the output is the same.
    urgent = stub.Generate(greedy(text="Hello world", priority=100, max_queue_seconds=5),
                           timeout=30)
    assert list(urgent.token_ids) == list(plain.token_ids)


def test_generate_stop_strings(sp_server):
    stub = inference_pb2_grpc.InferenceStub(channel(sp_server))
    full = stub.Generate(greedy(text="Hello world", max_tokens=24), timeout=30).text
    assert len(full) >= 8, full
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = full.index(stop)
    for include in (False, True):
        request = greedy(text="Hello world", max_tokens=24)
        request.stopping.stop_strings.append(stop)
        request.stopping.include_stop_string_in_output = include
        unary = stub.Generate(request, timeout=30)
        assert unary.finish_reason == inference_pb2.FINISH_REASON_STOP_STRING
        assert unary.text == full[:cut + (len(stop) if include else 0)]
        chunks = list(stub.GenerateStream(request, timeout=30))
        assert "".join(c.text for c in chunks) == unary.text
        assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_STOP_STRING


def test_generate_errors(sp_server, server):
    stub = inference_pb2_grpc.InferenceStub(channel(sp_server))
    bad = [
        inference_pb2.GenerateRequest(
            text="x", sampling=inference_pb2.SamplingParams(top_p=1.5)),
        inference_pb2.GenerateRequest(text="x", sampling=inference_pb2.SamplingParams(
            temperature=float("nan"))),
        inference_pb2.GenerateRequest(text="x",
                                      stopping=inference_pb2.StoppingCriteria(max_new_tokens=0)),
        inference_pb2.GenerateRequest(text="x",
                                      stopping=inference_pb2.StoppingCriteria(max_new_tokens=1000)),
        inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[5, 99999])),
        inference_pb2.GenerateRequest(),
        inference_pb2.GenerateRequest(text="x", request_id="bad id!"),
        inference_pb2.GenerateRequest(text="x", priority=101),
        inference_pb2.GenerateRequest(text="x", max_queue_seconds=0),
        inference_pb2.GenerateRequest(text="x", max_queue_seconds=-1),
    ]
    for request in bad:
        for call in (lambda r: stub.Generate(r, timeout=10),
                     lambda r: list(stub.GenerateStream(r, timeout=10))):
            with pytest.raises(grpc.RpcError) as err:
                call(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
    for call in (lambda r: stub.Generate(r, timeout=10),
                 lambda r: list(stub.GenerateStream(r, timeout=10))):
        with pytest.raises(grpc.RpcError) as err:
            call(greedy(text="x", adapter_id="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in err.value.details()
    # No tokenizer: text prompts fail the precondition, token ids work.
    plain = inference_pb2_grpc.InferenceStub(channel(server))
    with pytest.raises(grpc.RpcError) as err:
        plain.Generate(greedy(text="x"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    out = plain.Generate(greedy(token_ids=inference_pb2.TokenIds(ids=[1, 5, 9])), timeout=30)
    assert len(out.token_ids) == 8 and out.text == ""


def test_generate_with_adapter(tmp_path, server_factory, model_dir):
    root = tmp_path / "adapters"
    shutil.copytree(os.path.join(model_dir, "adapters", "attn_r4"), root / "attn_r4")
    srv = server_factory(f"--model={model_dir}", f"--adapter_root={root}",
                         "--adapter_pool_bytes=8388608", "--adapter_page_bytes=65536",
                         "--max_lora_rank=64", "--kv_cache_bytes=4194304", "--threads=1")
    stub = inference_pb2_grpc.InferenceStub(channel(srv))
    prompt = inference_pb2.TokenIds(ids=[1, 17, 42, 99, 7, 3])
    base = stub.Generate(greedy(max_tokens=16, token_ids=prompt), timeout=30)
    lora = stub.Generate(greedy(max_tokens=16, token_ids=prompt, adapter_id="attn_r4"),
                         timeout=30)
    assert lora.adapter.id == "attn_r4"
    assert len(lora.adapter.version) == 64
    assert list(lora.token_ids) != list(base.token_ids)
    chunks = list(stub.GenerateStream(greedy(max_tokens=16, token_ids=prompt,
                                             adapter_id="attn_r4"), timeout=30))
    assert chunks[0].adapter.id == "attn_r4" and chunks[0].adapter.version == lora.adapter.version
    assert [t for c in chunks for t in c.token_ids] == list(lora.token_ids)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(greedy(token_ids=prompt, adapter_id="missing"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_generate_concurrent_and_cancelled_stream(sp_server):
    stub = inference_pb2_grpc.InferenceStub(channel(sp_server))
    expected = stub.Generate(greedy(max_tokens=12, text="Hello world"), timeout=30)
    # A long stream cancelled after its first token chunk.
    stream = stub.GenerateStream(greedy(max_tokens=200, text="Once upon a time"), timeout=60)
    header = next(stream)
    assert header.usage.prompt_tokens > 0
    next(stream)
    futures = [stub.Generate.future(greedy(max_tokens=12, text="Hello world"), timeout=60)
               for _ in range(16)]
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    for f in futures:
        r = f.result()
        assert list(r.token_ids) == list(expected.token_ids)
        assert r.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    deadline = time.time() + 10
    while time.time() < deadline:
        info = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)
        if info.scheduler.num_running_requests == 0 and info.kv_cache.used_blocks == 0:
            break
        time.sleep(0.05)
    assert info.scheduler.num_running_requests == 0 and info.kv_cache.used_blocks == 0


def test_loractl_generate(tmp_path, server_factory, model_dir, sp_server):
    # A text prompt on the model with a tokenizer: the text streams to stdout.
    out = subprocess.run([LORACTL, f"--address={sp_server.grpc}", "generate", "--max_tokens=6",
                          "hello world"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "FINISH_REASON_" in out.stderr and "completion tokens]" in out.stderr, out.stderr
    # Token ids and an adapter on the fixture model: the adapter is named in the summary.
    root = tmp_path / "adapters"
    shutil.copytree(os.path.join(model_dir, "adapters", "attn_r4"), root / "attn_r4")
    srv = server_factory(f"--model={model_dir}", f"--adapter_root={root}",
                         "--kv_cache_bytes=4194304", "--threads=1")
    base = [LORACTL, f"--address={srv.grpc}", "generate", "--token_ids=3,17,29", "--max_tokens=4"]
    out = subprocess.run(base + ["--adapter=attn_r4"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "token_ids: " in out.stdout and "adapter attn_r4 " in out.stderr, (out.stdout, out.stderr)
    assert "3 prompt + 4 completion tokens" in out.stderr, out.stderr
    missing = subprocess.run(base + ["--adapter=nope"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr, missing.stderr
