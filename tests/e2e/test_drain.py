"""Issue 6, must show 9: SIGTERM with live streams. Health goes NOT_SERVING (on the main and the
health listener), a new call on an already open channel gets UNAVAILABLE (admin mutations
too), the streams in flight finish, and the process exits 0. A second signal exits at once with
128 + the signal number; --drain_timeout cancels what outlives it.

The model is a random Llama written here, large enough (4096 positions, hidden 256) that a few
thousand-token streams run for seconds on one CPU thread."""
import array
import json
import random
import signal
import struct
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

NUM_STREAMS = 4
STREAM_TOKENS = 4000


def write_llama(path, vocab_size=256, hidden=256, intermediate=512, layers=2, heads=4,
                kv_heads=2, max_positions=4096, seed=5):
    """A random fp32 Llama (tied embeddings) in the Hugging Face layout, standard library only.
    Weights tile one small random pool, which is quick to write and varied enough."""
    rng = random.Random(seed)
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "vocab_size": vocab_size, "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2,
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
    pool = array.array("f", (rng.uniform(-0.1, 0.1) for _ in range(65537)))
    header, blobs, offset = {}, [], 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        data = array.array("f", [1.0]) * n if len(shape) == 1 else (pool * (n // len(pool) + 1))[:n]
        raw = data.tobytes()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    with open(path / "model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("drain_model") / "model"
    write_llama(d)
    return d


def start(server_factory, model, *flags):
    return server_factory(f"--model={model}", "--threads=1", "--kv_cache_bytes=67108864",
                          "--health_address=127.0.0.1:0", *flags)


def long_request():
    return inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=[1, 5, 9]),
        sampling=inference_pb2.SamplingParams(temperature=0.0),
        stopping=inference_pb2.StoppingCriteria(max_new_tokens=STREAM_TOKENS, ignore_eos=True),
        output=inference_pb2.OutputOptions(return_token_ids=True))


class Stream:
    """One GenerateStream read to its end on a thread, after its first token chunk arrived."""

    def __init__(self, stub):
        self.call = stub.GenerateStream(long_request(), timeout=120)
        self.header = next(self.call)
        self.chunks = [next(self.call)]
        self.error = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for chunk in self.call:
                self.chunks.append(chunk)
        except grpc.RpcError as err:
            self.error = err

    def join(self, timeout):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream still running"

    def tokens(self):
        return sum(len(c.token_ids) for c in self.chunks)


def health_status(channel, service=""):
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10).status


def wait_until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def exit_log(srv):
    """The whole stderr of an exited server (its reader thread has reached the end)."""
    srv._stderr_thread.join(10)  # pylint: disable=protected-access
    return srv.log()


def code_of(call):
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def test_sigterm_drains_live_streams(server_factory, slow_model):
    srv = start(server_factory, slow_model, "--drain_timeout=120s")
    channel = grpc.insecure_channel(srv.grpc)
    health_channel = grpc.insecure_channel(srv.health)
    stub = inference_pb2_grpc.InferenceStub(channel)
    admin = admin_pb2_grpc.AdminStub(channel)
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(health_channel) == health_pb2.HealthCheckResponse.SERVING
    streams = [Stream(stub) for _ in range(NUM_STREAMS)]

    srv.proc.send_signal(signal.SIGTERM)
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    wait_until(lambda: health_status(channel) == not_serving)
    for service in ("", "loraserve.v1.Inference", "loraserve.v1.Admin"):
        assert health_status(channel, service) == not_serving, service
        assert health_status(health_channel, service) == not_serving, service
    # The streams are still running: the drain has something to wait for.
    info = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)
    assert info.server.state == inference_pb2.SERVER_STATE_DRAINING
    assert info.scheduler.num_running_requests + info.scheduler.num_waiting_requests > 0
    assert all(s.thread.is_alive() for s in streams)
    # New calls on the open channel are refused, admin mutations included.
    refused = {
        "Generate": lambda: stub.Generate(long_request(), timeout=10),
        "GenerateStream": lambda: list(stub.GenerateStream(long_request(), timeout=10)),
        "Detokenize": lambda: stub.Detokenize(inference_pb2.DetokenizeRequest(token_ids=[1]),
                                              timeout=10),
        "LoadAdapter": lambda: admin.LoadAdapter(admin_pb2.LoadAdapterRequest(adapter_id="x"),
                                                 timeout=10),
        "DeleteAdapter": lambda: admin.DeleteAdapter(
            admin_pb2.DeleteAdapterRequest(adapter_id="x"), timeout=10),
    }
    for name, call in refused.items():
        code, details = code_of(call)
        assert code == grpc.StatusCode.UNAVAILABLE, (name, code, details)
        assert "draining" in details, (name, details)

    # Every stream runs to its end; then the process exits 0.
    for s in streams:
        s.join(timeout=120)
        assert s.error is None, s.error
        assert s.tokens() == STREAM_TOKENS
        assert s.chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert s.chunks[-1].usage.completion_tokens == STREAM_TOKENS
    assert srv.proc.wait(timeout=60) == 0, srv.log()
    log = exit_log(srv)
    assert "SIGTERM: draining" in log and "cancelling" not in log, log


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_second_signal_exits_at_once_nonzero(server_factory, slow_model, second):
    srv = start(server_factory, slow_model, "--drain_timeout=120s")
    channel = grpc.insecure_channel(srv.grpc)
    stub = inference_pb2_grpc.InferenceStub(channel)
    streams = [Stream(stub) for _ in range(NUM_STREAMS)]
    srv.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: stub.GetModelInfo(inference_pb2.GetModelInfoRequest(),
                                         timeout=10).server.state ==
               inference_pb2.SERVER_STATE_DRAINING)
    start_time = time.monotonic()
    srv.proc.send_signal(second)
    assert srv.proc.wait(timeout=10) == 128 + second, srv.log()
    assert time.monotonic() - start_time < 6.0
    for s in streams:
        s.join(timeout=10)
        # Cut off: an error, never a normal end.
        assert s.error is not None and s.tokens() < STREAM_TOKENS
        assert s.error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), s.error
    assert "again: cancelling in-flight RPCs and exiting" in exit_log(srv)


def test_drain_timeout_cancels_what_is_left(server_factory, slow_model):
    srv = start(server_factory, slow_model, "--drain_timeout=500ms")
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(srv.grpc))
    streams = [Stream(stub) for _ in range(NUM_STREAMS)]
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=30) == 0, srv.log()
    for s in streams:
        s.join(timeout=10)
        assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE, s.error
        assert s.tokens() < STREAM_TOKENS
    assert "cancelling" in exit_log(srv)


def test_warm_up_runs_before_ready(server_factory, slow_model):
    """Start-up's other end: one short base-model generation before the ready line, logged with
    its duration, leaving no KV blocks or requests behind."""
    srv = start(server_factory, slow_model)
    # stderr is read on its own thread: the line may trail the ready line on stdout a little.
    wait_until(lambda: "warm-up: 8 prompt + 2 generated tokens in " in srv.log(), timeout=10)
    info = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(srv.grpc)).GetModelInfo(
        inference_pb2.GetModelInfoRequest(), timeout=10)
    assert info.kv_cache.used_blocks == 0
    assert info.scheduler.num_running_requests == 0 and info.scheduler.num_waiting_requests == 0
