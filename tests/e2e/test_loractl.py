"""loractl against the real loraserve binary: every command and adapters subcommand, exit codes
and one-line error messages, text streamed as it is generated, sampling flags, credentials and
TLS, and the upload of a multi-MB adapter in chunks with its version check."""
import array
import hashlib
import json
import os
import pty
import shutil
import signal
import subprocess
import threading
import time
from concurrent import futures

import grpc
import pytest

from conftest import LORACTL
from loraserve.v1 import adapter_pb2, admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from test_server import FIXTURE_MODEL, TOKENIZERS, write_safetensors, write_tiny_llama

# Shapes of the llama_gqa fixture (tests/golden/fixtures/llama_gqa/config.json).
HIDDEN, KV, INTERMEDIATE, LAYERS, VOCAB = 64, 32, 160, 2, 256
MODULE_SHAPES = {  # module -> (path in the model, in, out)
    "q_proj": ("self_attn", HIDDEN, HIDDEN),
    "k_proj": ("self_attn", HIDDEN, KV),
    "v_proj": ("self_attn", HIDDEN, KV),
    "o_proj": ("self_attn", HIDDEN, HIDDEN),
    "gate_proj": ("mlp", HIDDEN, INTERMEDIATE),
    "up_proj": ("mlp", HIDDEN, INTERMEDIATE),
    "down_proj": ("mlp", INTERMEDIATE, HIDDEN),
}


def write_lora(path, rank, modules=("q_proj", "v_proj"), seed=1, alpha=None, amplitude=0.02):
    """A PEFT LoRA adapter for the llama_gqa fixture (F32, every layer), written with the
    standard library; returns its version: sha256(config || 0x00 || weights)."""
    os.makedirs(path, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
              "lora_alpha": alpha or 2 * rank, "target_modules": list(modules), "bias": "none"}
    tensors = {}
    for layer in range(LAYERS):
        for module in modules:
            group, fan_in, fan_out = MODULE_SHAPES[module]
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            for name, shape in ((f"{prefix}.lora_A.weight", [rank, fan_in]),
                                (f"{prefix}.lora_B.weight", [fan_out, rank])):
                n = shape[0] * shape[1]
                # Small, finite, varied values; `seed` makes adapters differ.
                step = amplitude / 1000
                values = array.array("f", (((i * 7919 + seed * 104729) % 2001 - 1000) * step
                                           for i in range(n)))
                tensors[name] = ("F32", shape, values.tobytes())
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    write_safetensors(os.path.join(path, "adapter_model.safetensors"), tensors)
    return local_version(path)


def local_version(path):
    with open(os.path.join(path, "adapter_config.json"), "rb") as f:
        config = f.read()
    with open(os.path.join(path, "adapter_model.safetensors"), "rb") as f:
        weights = f.read()
    return hashlib.sha256(config + b"\0" + weights).hexdigest()


def loractl(*args, timeout=120, stderr_tty=False):
    """Runs loractl; returns CompletedProcess with text stdout/stderr."""
    if not stderr_tty:
        return subprocess.run([LORACTL, *args], capture_output=True, text=True, timeout=timeout)
    # stderr on a pseudo-terminal, as when a person runs it: the progress bar shows.
    master, slave = pty.openpty()
    proc = subprocess.Popen([LORACTL, *args], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    err = bytearray()
    reader = threading.Thread(target=_drain_pty, args=(master, err), daemon=True)
    reader.start()
    out = proc.communicate(timeout=timeout)[0]
    reader.join(10)
    os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(),
                                       err.decode(errors="replace"))


def _drain_pty(fd, sink):
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO once the child closed its end
            return
        if not data:
            return
        sink.extend(data)


def assert_one_line_error(proc, code, exit_code=1):
    """The command failed with `exit_code` and printed exactly `loractl: CODE: ...`."""
    assert proc.returncode == exit_code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"loractl: {code}: "), proc.stderr
    assert len(lines[0]) > len(f"loractl: {code}: ") + 5, proc.stderr


@pytest.fixture
def plain_server(server_factory):
    return server_factory(f"--model={FIXTURE_MODEL}", "--kv_cache_bytes=4194304", "--threads=1")


@pytest.fixture
def text_server(tmp_path, server_factory):
    """The one-layer model with the SentencePiece-style golden tokenizer: text prompts."""
    d = tmp_path / "sp_model"
    write_tiny_llama(d, 1280)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(TOKENIZERS, "sentencepiece_bpe", name), d / name)
    return server_factory(f"--model={d}", "--kv_cache_bytes=1048576", "--threads=1")


def write_llama(path, vocab_size, hidden, intermediate, layers, heads, kv_heads):
    """A random Llama (F32, tied embeddings) of the given shape, filled from a repeated pattern
    so that a model of tens of MB is written in well under a second."""
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "vocab_size": vocab_size, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1,
        "eos_token_id": 2,
    }
    shapes = {"model.embed_tokens.weight": [vocab_size, hidden], "model.norm.weight": [hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": [hidden],
            p + "post_attention_layernorm.weight": [hidden],
            p + "self_attn.q_proj.weight": [heads * head_dim, hidden],
            p + "self_attn.k_proj.weight": [kv_heads * head_dim, hidden],
            p + "self_attn.v_proj.weight": [kv_heads * head_dim, hidden],
            p + "self_attn.o_proj.weight": [hidden, heads * head_dim],
            p + "mlp.gate_proj.weight": [intermediate, hidden],
            p + "mlp.up_proj.weight": [intermediate, hidden],
            p + "mlp.down_proj.weight": [hidden, intermediate],
        })
    pattern = array.array("f", (((i * 7919) % 2001 - 1000) * 1e-4 for i in range(4099))).tobytes()
    tensors = {}
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        if len(shape) == 1:
            data = array.array("f", [1.0]).tobytes() * n
        else:
            data = (pattern * (n // 4099 + 1))[:4 * n]
        tensors[name] = ("F32", shape, data)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    write_safetensors(os.path.join(path, "model.safetensors"), tensors)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(TOKENIZERS, "sentencepiece_bpe", name), os.path.join(path, name))


@pytest.fixture
def slow_text_server(tmp_path, server_factory):
    """A model large enough (about 7M parameters, one thread) that 200 tokens take a visible
    fraction of a second, so streamed output can be told from output written at the end."""
    d = tmp_path / "slow_model"
    write_llama(d, 1280, hidden=512, intermediate=1408, layers=2, heads=8, kv_heads=4)
    return server_factory(f"--model={d}", "--kv_cache_bytes=16777216", "--threads=1")


ADAPTER_FLAGS = ("--max_lora_rank=512", "--adapter_pool_bytes=67108864",
                 "--adapter_page_bytes=65536", "--kv_cache_bytes=4194304", "--threads=1")


@pytest.fixture
def adapter_root(tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(os.path.join(FIXTURE_MODEL, "adapters", "attn_r4"), root / "attn_r4")
    return root


@pytest.fixture
def adapter_server(server_factory, adapter_root):
    return server_factory(f"--model={FIXTURE_MODEL}", f"--adapter_root={adapter_root}",
                          *ADAPTER_FLAGS)


# ---- health, model-info, usage ------------------------------------------------------------------

def test_health_model_info_and_exit_codes(plain_server):
    s = f"--server={plain_server.grpc}"
    ok = loractl(s, "health")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "SERVING\n", "")
    as_json = loractl(s, "health", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == {"status": "SERVING"}
    assert loractl(s, "health", "loraserve.v1.Inference").stdout == "SERVING\n"
    assert_one_line_error(loractl(s, "health", "no.such.Service"), "NOT_FOUND")
    info = loractl(s, "model-info", "--json")
    assert info.returncode == 0, info.stderr
    parsed = json.loads(info.stdout)
    assert parsed["model_loaded"] is True and parsed["model"]["hidden_size"] == HIDDEN
    # The older --address flag still names the server.
    assert loractl(f"--address={plain_server.grpc}", "health").stdout == "SERVING\n"
    # Nothing listens on port 1: exit 5, one line.
    down = loractl("--server=127.0.0.1:1", "--timeout=5s", "health")
    assert_one_line_error(down, "UNAVAILABLE", exit_code=5)
    # Usage errors: exit 2.
    for args in (["frobnicate"], [s, "health", "a", "b"], [s, "model-info", "x"],
                 [s, "adapters"], [s, "adapters", "frob", "x"], [s, "adapters", "get"],
                 [s, "adapters", "upload", "only-id"], [s, "generate"],
                 [s, "generate", "--token_ids=1,x,3"], [s, "--progress=sometimes", "health"]):
        proc = loractl(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("loractl"), (args, proc.stderr)


# ---- generate ---------------------------------------------------------------------------------------

def test_generate_streams_text_as_it_is_generated(slow_text_server):
    """The completion reaches stdout while the generation is still running, and all of it adds
    up to what the unary Generate returns for the same request."""
    text_server = slow_text_server
    args = [LORACTL, f"--server={text_server.grpc}", "generate", "--max_tokens=200",
            "--temperature=0", "--ignore_eos", "Once upon a time"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = os.read(proc.stdout.fileno(), 65536)  # blocks until loractl writes something
    # Freeze the server right after the first text arrived: 200 tokens take far longer than
    # this, so the stream is unfinished and loractl must still be waiting for it. Output held
    # in a buffer until the end would instead arrive only after loractl had finished.
    os.kill(text_server.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)
        still_running = proc.poll() is None
    finally:
        os.kill(text_server.proc.pid, signal.SIGCONT)
    rest, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert first and still_running, (first, still_running)
    text = (first + rest).decode()
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(text_server.grpc))
    unary = stub.Generate(inference_pb2.GenerateRequest(
        text="Once upon a time", sampling=inference_pb2.SamplingParams(temperature=0.0),
        stopping=inference_pb2.StoppingCriteria(max_new_tokens=200, ignore_eos=True)),
        timeout=60)
    assert text == unary.text + "\n"
    stderr = stderr.decode()
    assert "FINISH_REASON_LENGTH" in stderr and "200 completion tokens]" in stderr, stderr
    assert "adapter (base)" in stderr and "ms to first token" in stderr, stderr


def test_generate_sampling_flags_and_json(text_server):
    s = f"--server={text_server.grpc}"
    sampled = [s, "generate", "--max_tokens=24", "--ignore_eos", "--temperature=0.9",
               "--top_p=0.9", "--top_k=50", "--seed=1234", "Hello world"]
    first, second = loractl(*sampled), loractl(*sampled)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
    other_seed = loractl(*[a if a != "--seed=1234" else "--seed=99" for a in sampled])
    assert other_seed.returncode == 0 and other_seed.stdout != first.stdout

    # --json: one protobuf JSON object per chunk: header, deltas, final.
    greedy = [s, "generate", "--max_tokens=24", "--ignore_eos", "--temperature=0", "Hello world"]
    lines = loractl(*greedy, "--json").stdout.splitlines()
    chunks = [json.loads(line) for line in lines]
    assert len(chunks) >= 3
    assert chunks[0]["usage"]["prompt_tokens"] > 0 and "text" not in chunks[0]
    assert chunks[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert chunks[-1]["usage"]["completion_tokens"] == 24
    full = "".join(c.get("text", "") for c in chunks)
    assert loractl(*greedy).stdout == full + "\n"

    # Stop strings, repeatable: generation ends at the first one that completes.
    stop = full[len(full) // 2:len(full) // 2 + 2]
    stopped = loractl(*greedy, f"--stop={stop}", "--stop=\u2603never")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == full[:full.index(stop)] + "\n"
    assert f'FINISH_REASON_STOP_STRING "{stop}"' in stopped.stderr, stopped.stderr
    last = [json.loads(x) for x in loractl(*greedy, "--stop", stop, "--json").stdout.splitlines()]
    assert last[-1]["matched_stop_string"] == stop

    # A parameter out of range: INVALID_ARGUMENT, exit 1, one line.
    assert_one_line_error(loractl(s, "generate", "--top_p=1.5", "x"), "INVALID_ARGUMENT")
    assert_one_line_error(loractl(s, "generate", "--max_tokens=100000", "x"), "INVALID_ARGUMENT")


def test_generate_with_adapter_and_not_found(adapter_server, adapter_root):
    s = f"--server={adapter_server.grpc}"
    base = [s, "generate", "--token_ids=3,17,29", "--max_tokens=6", "--ignore_eos"]
    lora = loractl(*base, "--adapter=attn_r4")
    assert lora.returncode == 0, lora.stderr
    version = local_version(adapter_root / "attn_r4")
    assert f"adapter attn_r4 {version[:12]}" in lora.stderr, lora.stderr
    plain = loractl(*base)
    assert plain.stdout.startswith("\ntoken_ids: ") and plain.stdout != lora.stdout
    missing = loractl(*base, "--adapter=nope")
    assert_one_line_error(missing, "NOT_FOUND")
    assert "nope" in missing.stderr
    assert_one_line_error(loractl(*base, "--adapter=../etc"), "INVALID_ARGUMENT")


# ---- adapters -----------------------------------------------------------------------------------

def test_adapters_subcommands(adapter_server, adapter_root, tmp_path):
    s = f"--server={adapter_server.grpc}"
    version = local_version(adapter_root / "attn_r4")
    write_lora(adapter_root / "copied_in", 8, seed=3)  # copied in after start: AVAILABLE
    # Adapters in the root are loaded on first use or by `adapters load`.
    first = loractl(s, "adapters", "load", "attn_r4")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"attn_r4: loaded version {version} (READY"), first.stdout

    listed = loractl(s, "adapters", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]
            if line and not line.startswith("(")}
    assert {"attn_r4", "copied_in"} <= set(rows), listed.stdout
    assert rows["attn_r4"][1] == "READY" and rows["attn_r4"][4] == version[:12], listed.stdout
    as_json = json.loads(loractl(s, "adapters", "list", "--json").stdout)
    by_id = {a["id"]: a for a in as_json["adapters"]}
    assert by_id["attn_r4"]["version"] == version and by_id["attn_r4"]["rank"] == 4
    ready = json.loads(loractl(s, "adapters", "list", "--json", "--states=ready").stdout)
    assert [a["id"] for a in ready["adapters"]] == ["attn_r4"]
    prefixed = json.loads(loractl(s, "adapters", "list", "--json", "--prefix=copied").stdout)
    assert [a["id"] for a in prefixed["adapters"]] == ["copied_in"]
    assert loractl(s, "adapters", "list", "--states=sleepy").returncode == 2

    got = loractl(s, "adapters", "get", "attn_r4")
    assert got.returncode == 0, got.stderr
    assert "state:       READY" in got.stdout and version in got.stdout, got.stdout
    assert "q_proj" in got.stdout and "rank:        4" in got.stdout, got.stdout
    assert json.loads(loractl(s, "adapters", "get", "attn_r4", "--json").stdout)["adapter"][
        "version"] == version

    loaded = loractl(s, "adapters", "load", "copied_in")
    assert loaded.returncode == 0, loaded.stderr
    assert "copied_in: loaded version " in loaded.stdout, loaded.stdout
    again = json.loads(loractl(s, "adapters", "load", "copied_in", "--json").stdout)
    assert again["report"]["unchanged"] is True
    gen = [s, "generate", "--token_ids=3,17,29", "--max_tokens=2", "--adapter=copied_in"]
    assert loractl(*gen).returncode == 0

    pinned = loractl(s, "adapters", "pin", "copied_in")
    assert pinned.returncode == 0 and "pinned (tier DEVICE" in pinned.stdout, pinned.stdout
    assert json.loads(loractl(s, "adapters", "get", "copied_in", "--json").stdout)["adapter"][
        "pinned"] is True
    # A pinned adapter is unloaded only with --force.
    assert_one_line_error(loractl(s, "adapters", "unload", "copied_in"), "FAILED_PRECONDITION")
    unpinned = loractl(s, "adapters", "unpin", "copied_in")
    assert unpinned.returncode == 0 and "unpinned" in unpinned.stdout, unpinned.stdout
    assert "pinned" not in json.loads(
        loractl(s, "adapters", "get", "copied_in", "--json").stdout)["adapter"]

    unloaded = loractl(s, "adapters", "unload", "copied_in")
    assert unloaded.returncode == 0 and "copied_in: DISABLED" in unloaded.stdout, unloaded.stdout
    assert_one_line_error(loractl(*gen), "NOT_FOUND")
    assert loractl(s, "adapters", "load", "copied_in").returncode == 0
    assert loractl(*gen).returncode == 0

    # An enabled adapter is deleted only with --force.
    assert_one_line_error(loractl(s, "adapters", "delete", "copied_in"), "FAILED_PRECONDITION")
    deleted = loractl(s, "adapters", "delete", "copied_in", "--force")
    assert deleted.returncode == 0 and "copied_in: deleted" in deleted.stdout, deleted.stdout
    assert not (adapter_root / "copied_in").exists()
    assert_one_line_error(loractl(s, "adapters", "get", "copied_in"), "NOT_FOUND")
    assert_one_line_error(loractl(s, "adapters", "load", "no_such"), "NOT_FOUND")
    assert_one_line_error(loractl(s, "adapters", "load", "../escape"), "INVALID_ARGUMENT")
    # A folder that fails validation: INVALID_ARGUMENT with the reason, on one line.
    bad = adapter_root / "bad_rank"
    write_lora(bad, 4)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(config))
    assert_one_line_error(loractl(s, "adapters", "load", "bad_rank"), "INVALID_ARGUMENT")


def test_upload_multi_mb_adapter_with_progress_and_version_check(adapter_server, tmp_path):
    s = f"--server={adapter_server.grpc}"
    src = tmp_path / "big"
    # Rank 320 on every linear module of both layers, F32: about 2.9 MB of weights, so the
    # upload takes several 1 MiB chunks.
    version = write_lora(src, 320, modules=tuple(MODULE_SHAPES), seed=5)
    weights_bytes = os.path.getsize(src / "adapter_model.safetensors")
    assert weights_bytes > 2_500_000

    up = loractl(s, "adapters", "upload", "big", str(src), stderr_tty=True)
    assert up.returncode == 0, (up.stdout, up.stderr)
    assert up.stdout.strip().startswith(f"big: uploaded version {version} ("), up.stdout
    assert "READY" in up.stdout, up.stdout
    # The progress bar went to the terminal: hashing, then uploading to 100 %.
    assert "hashing" in up.stderr and "uploading" in up.stderr, up.stderr
    assert "100%" in up.stderr and "\r" in up.stderr, up.stderr
    info = json.loads(loractl(s, "adapters", "get", "big", "--json").stdout)["adapter"]
    assert info["version"] == version and info["state"] == "ADAPTER_STATE_READY"
    assert int(info["disk_bytes"]) == weights_bytes + os.path.getsize(src / "adapter_config.json")
    gen = loractl(s, "generate", "--token_ids=3,17,29", "--max_tokens=4", "--adapter=big")
    assert gen.returncode == 0 and f"adapter big {version[:12]}" in gen.stderr, gen.stderr

    # Not a terminal: no progress bar, and the same upload again changes nothing.
    same = loractl(s, "adapters", "upload", "big", str(src))
    assert same.returncode == 0, same.stderr
    assert same.stdout.startswith(f"big: unchanged, the server already has version {version}")
    assert same.stderr == ""

    # Other content under the same id: ALREADY_EXISTS unless --replace.
    other = tmp_path / "other"
    other_version = write_lora(other, 8, seed=9)
    assert_one_line_error(loractl(s, "adapters", "upload", "big", str(other)), "ALREADY_EXISTS")
    replaced = loractl(s, "adapters", "upload", "big", str(other), "--replace", "--json")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(replaced.stdout)["adapter"]["version"] == other_version
    gen = loractl(s, "generate", "--token_ids=3,17,29", "--max_tokens=4", "--adapter=big")
    assert f"adapter big {other_version[:12]}" in gen.stderr, gen.stderr

    # --validate_only stores nothing; --load=false stores a new id disabled.
    checked = loractl(s, "adapters", "upload", "checked", str(src), "--validate_only")
    assert checked.returncode == 0 and "valid, version" in checked.stdout, checked.stderr
    assert_one_line_error(loractl(s, "adapters", "get", "checked"), "NOT_FOUND")
    parked = loractl(s, "adapters", "upload", "parked", str(other), "--load=false")
    assert parked.returncode == 0 and "DISABLED" in parked.stdout, parked.stdout

    # A folder the server rejects: INVALID_ARGUMENT, exit 1, and nothing is stored.
    bad = tmp_path / "bad"
    write_lora(bad, 4)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj", "k_proj"]  # k_proj has no tensors
    (bad / "adapter_config.json").write_text(json.dumps(config))
    assert_one_line_error(loractl(s, "adapters", "upload", "bad", str(bad)), "INVALID_ARGUMENT")
    assert_one_line_error(loractl(s, "adapters", "get", "bad"), "NOT_FOUND")
    assert_one_line_error(loractl(s, "adapters", "upload", "../up", str(other)),
                          "INVALID_ARGUMENT")

    # Local problems: exit 4 with the reason.
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    shutil.copy(src / "adapter_config.json", pickle / "adapter_config.json")
    (pickle / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    local = loractl(s, "adapters", "upload", "p", str(pickle))
    assert local.returncode == 4 and "safe_serialization=True" in local.stderr, local.stderr
    missing = loractl(s, "adapters", "upload", "m", str(tmp_path / "nowhere"))
    assert missing.returncode == 4 and "nowhere" in missing.stderr, missing.stderr


class WrongVersionAdmin(admin_pb2_grpc.AdminServicer):
    """A broken server: accepts every upload and claims to have stored another version."""

    def __init__(self):
        self.received = 0

    def UploadAdapter(self, request_iterator, context):
        for message in request_iterator:
            if message.HasField("chunk"):
                self.received += len(message.chunk.data)
        version = "0" * 64
        return admin_pb2.UploadAdapterResponse(
            adapter=adapter_pb2.AdapterInfo(id="x", version=version),
            report=adapter_pb2.LoadReport(version=version), received_bytes=self.received)


@pytest.fixture
def wrong_version_server():
    """(address, servicer) of a WrongVersionAdmin on a loopback port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = WrongVersionAdmin()
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_upload_refuses_a_server_that_stored_another_version(wrong_version_server, tmp_path):
    address, servicer = wrong_version_server
    version = write_lora(tmp_path / "a", 4)
    proc = loractl(f"--server={address}", "adapters", "upload", "x", str(tmp_path / "a"))
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    assert proc.stderr == (f'loractl: the server reports version "{"0" * 64}" for x but the '
                           f"local files have version {version}\n"), proc.stderr
    assert servicer.received == os.path.getsize(tmp_path / "a" / "adapter_model.safetensors") + \
        os.path.getsize(tmp_path / "a" / "adapter_config.json")


# ---- credentials and TLS --------------------------------------------------------------------------

TOKEN = "admin-token-0123456789abcdef"
KEY_A = "tenant-a-key-0123456789abcdef"


def test_admin_token_and_api_key(server_factory, adapter_root, tmp_path):
    token_file = tmp_path / "admin_token"
    token_file.write_text(TOKEN + "\n")
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [
        {"name": "tenant-a", "key": KEY_A, "adapters": ["attn_*", ""]}]}))
    srv = server_factory(f"--model={FIXTURE_MODEL}", f"--adapter_root={adapter_root}",
                         f"--admin_token_file={token_file}",
                         f"--inference_keys_file={keys_file}", *ADAPTER_FLAGS)
    s = f"--server={srv.grpc}"
    assert_one_line_error(loractl(s, "adapters", "list"), "UNAUTHENTICATED", exit_code=6)
    assert_one_line_error(loractl(s, "adapters", "list", "--admin_token=wrong-token-0123456789"),
                          "UNAUTHENTICATED", exit_code=6)
    # An inference key is not an admin token.
    assert_one_line_error(loractl(s, "adapters", "list", f"--admin_token={KEY_A}"),
                          "PERMISSION_DENIED", exit_code=6)
    ok = loractl(s, "adapters", "list", f"--admin_token_file={token_file}")
    assert ok.returncode == 0 and "attn_r4" in ok.stdout, ok.stderr
    assert loractl(s, "adapters", "get", "attn_r4", f"--admin_token={TOKEN}").returncode == 0
    assert loractl(s, "adapters", "list", f"--admin_token={TOKEN}",
                   f"--admin_token_file={token_file}").returncode == 2

    gen = [s, "generate", "--token_ids=3,17,29", "--max_tokens=2"]
    assert_one_line_error(loractl(*gen), "UNAUTHENTICATED", exit_code=6)
    assert loractl(*gen, f"--api_key={KEY_A}", "--adapter=attn_r4").returncode == 0
    assert loractl(*gen, f"--api_key={KEY_A}").returncode == 0


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "1", "-subj", "/CN=loractl test CA", cwd=d)
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                      ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile",
                 f"{name}.ext", cwd=d)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_and_mutual_tls(server_factory, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certs(certs)
    tls = [f"--tls_cert_file={certs / 'server.pem'}", f"--tls_key_file={certs / 'server.key'}"]
    srv = server_factory(f"--model={FIXTURE_MODEL}", "--kv_cache_bytes=4194304", "--threads=1",
                         *tls)
    s = f"--server={srv.grpc}"
    ca = f"--tls_ca_file={certs / 'ca.pem'}"
    ok = loractl(s, ca, "health")
    assert (ok.returncode, ok.stdout) == (0, "SERVING\n"), ok.stderr
    assert loractl(s, ca, "generate", "--token_ids=1,2,3", "--max_tokens=2").returncode == 0
    # Plaintext to a TLS port, or TLS without trusting the CA: UNAVAILABLE, one line.
    assert_one_line_error(loractl(s, "--timeout=5s", "health"), "UNAVAILABLE", exit_code=5)
    assert_one_line_error(loractl(s, "--tls", "--timeout=5s", "health"), "UNAVAILABLE",
                          exit_code=5)
    # A client certificate without its key is a usage error.
    half = loractl(s, ca, f"--tls_cert_file={certs / 'client.pem'}", "health")
    assert half.returncode == 2 and "--tls_key_file" in half.stderr, half.stderr
    unreadable = loractl(s, f"--tls_ca_file={certs / 'missing.pem'}", "health")
    assert unreadable.returncode == 4 and "missing.pem" in unreadable.stderr, unreadable.stderr

    mtls = server_factory(f"--model={FIXTURE_MODEL}", "--kv_cache_bytes=4194304",
                          "--threads=1", *tls, f"--tls_client_ca_file={certs / 'ca.pem'}")
    m = f"--server={mtls.grpc}"
    client = [f"--tls_cert_file={certs / 'client.pem'}", f"--tls_key_file={certs / 'client.key'}"]
    ok = loractl(m, ca, *client, "health")
    assert (ok.returncode, ok.stdout) == (0, "SERVING\n"), ok.stderr
    assert loractl(m, ca, "--timeout=5s", "health").returncode == 5
