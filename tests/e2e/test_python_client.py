"""The Python client (client/python, package loraserve_client, installed into the project's
virtual environment by scripts/setup.sh) against the real loraserve binary: generate, stream,
tokenize, model info, typed errors, the admin round trip with a chunked upload, credentials and
TLS; and the package's offline wheel build."""
import json
import os
import subprocess
import sys
import zipfile

import grpc
import pytest

from conftest import SOURCE_DIR
from loraserve.v1 import adapter_pb2, inference_pb2, inference_pb2_grpc
# Shared fixtures and helpers of the loractl tests (same servers, same adapters).
from test_loractl import (ADAPTER_FLAGS, FIXTURE_MODEL, KEY_A, MODULE_SHAPES, TOKEN,  # noqa: F401
                          adapter_root, adapter_server, make_certs, text_server,
                          write_lora, wrong_version_server)

try:
    import loraserve_client
    from loraserve_client import Client
except ImportError as error:  # pragma: no cover - the set-up script installs it
    raise ImportError("loraserve_client is not installed in this environment: run "
                      "scripts/setup.sh (it pip-installs client/python into .venv)") from error


def test_package_is_installed_and_builds_offline(tmp_path):
    # The tests use the installed package, not the source tree.
    assert loraserve_client.__file__.startswith(sys.prefix), loraserve_client.__file__
    assert not loraserve_client.__file__.startswith(os.path.join(SOURCE_DIR, "client"))
    # The wheel builds without network or build isolation, stubs generated from proto/.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-index",
         "--no-deps", "-w", str(tmp_path), os.path.join(SOURCE_DIR, "client", "python")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    wheels = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    assert wheels == ["loraserve_client-0.1.0-py3-none-any.whl"], wheels
    with zipfile.ZipFile(tmp_path / wheels[0]) as whl:
        names = set(whl.namelist())
        assert {"loraserve_client/__init__.py", "loraserve_client/client.py",
                "loraserve_client/py.typed", "loraserve/v1/admin_pb2.py",
                "loraserve/v1/admin_pb2_grpc.py", "loraserve/v1/inference_pb2_grpc.py",
                "loraserve/v1/adapter_pb2.pyi"} <= names, names
        # Namespace packages: protoc's code imports `from loraserve.v1 import ...`.
        assert "loraserve/__init__.py" not in names
        metadata = whl.read("loraserve_client-0.1.0.dist-info/METADATA").decode()
        assert "Requires-Dist: grpcio>=" in metadata and "Requires-Dist: protobuf>=" in metadata
        # Generated from the protos of this checkout.
        with open(os.path.join(SOURCE_DIR, "proto", "loraserve", "v1", "admin.proto"),
                  encoding="utf-8") as f:
            proto_has_unload_force = "bool force = 2;" in f.read().split(
                "message UnloadAdapterRequest")[1].split("}")[0]
        generated = whl.read("loraserve/v1/admin_pb2.pyi").decode()
        unload = generated.split("class UnloadAdapterRequest")[1].split("class ")[0]
        assert ("force" in unload) == proto_has_unload_force


def greedy_stub_request(prompt, max_tokens):
    return inference_pb2.GenerateRequest(
        text=prompt, sampling=inference_pb2.SamplingParams(temperature=0.0),
        stopping=inference_pb2.StoppingCriteria(max_new_tokens=max_tokens, ignore_eos=True),
        output=inference_pb2.OutputOptions(return_token_ids=True))


def test_generate_stream_tokenize_and_errors(text_server):
    raw = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(text_server.grpc))
    expected = raw.Generate(greedy_stub_request("Hello world", 12), timeout=30)
    with Client(text_server.grpc) as client:
        out = client.generate("Hello world", max_tokens=12, temperature=0, ignore_eos=True,
                              request_id="py-1")
        assert out.text == expected.text and out.token_ids == list(expected.token_ids)
        assert out.finish_reason == "length" and out.request_id == "py-1"
        assert (out.adapter_id, out.adapter_version) == ("", "")
        assert out.usage.completion_tokens == 12
        assert out.usage.prompt_tokens == expected.usage.prompt_tokens
        assert out.response.timings.total_seconds > 0

        ids = client.tokenize("Hello world")
        assert ids == list(raw.Tokenize(inference_pb2.TokenizeRequest(text="Hello world"),
                                        timeout=10).token_ids)
        assert client.tokenize("Hello world", add_special_tokens=False) == ids[1:]
        by_ids = client.generate(ids, max_tokens=12, temperature=0, ignore_eos=True)
        assert by_ids.token_ids == out.token_ids
        assert client.detokenize(out.token_ids) == out.text

        stream = client.stream("Hello world", max_tokens=12, temperature=0, ignore_eos=True)
        chunks = list(stream)
        assert chunks[0].usage.prompt_tokens == out.usage.prompt_tokens
        assert chunks[0].adapter_id == "" and chunks[0].finish_reason is None
        assert "".join(c.text for c in chunks) == out.text
        assert [t for c in chunks for t in c.token_ids] == out.token_ids
        assert stream.final is chunks[-1] and stream.final.finish_reason == "length"
        assert stream.final.usage.completion_tokens == 12

        # Sampling with a seed repeats; stop strings end generation early.
        a = client.generate("Hello world", max_tokens=16, temperature=0.8, top_p=0.9, top_k=40,
                            seed=7, ignore_eos=True)
        b = client.generate("Hello world", max_tokens=16, temperature=0.8, top_p=0.9, top_k=40,
                            seed=7, ignore_eos=True)
        assert a.token_ids == b.token_ids and a.seed == 7
        stop = out.text[len(out.text) // 2:len(out.text) // 2 + 2]
        cut = client.generate("Hello world", max_tokens=12, temperature=0, ignore_eos=True,
                              stop=[stop])
        assert cut.finish_reason == "stop_string"
        assert cut.text == out.text[:out.text.index(stop)]

        info = client.model_info()
        assert info.model_loaded and info.tokenizer.vocab_size == 1256

        # Errors carry the gRPC code and the server's message, typed by code.
        with pytest.raises(loraserve_client.NotFoundError) as err:
            client.generate("x", adapter="nope", max_tokens=2)
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "nope" in err.value.message
        assert isinstance(err.value, loraserve_client.LoraserveError)
        assert not err.value.retryable
        with pytest.raises(loraserve_client.InvalidArgumentError) as err:
            client.generate("x", top_p=1.5)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.value.message
        with pytest.raises(loraserve_client.InvalidArgumentError):
            list(client.stream("x", max_tokens=0))

        # Cancelling a stream ends it with CancelledError.
        long = client.stream("Once upon a time", max_tokens=200, temperature=0, ignore_eos=True)
        next(long)
        long.cancel()
        with pytest.raises(loraserve_client.CancelledError):
            list(long)

    with Client("127.0.0.1:1", timeout=5) as down:
        with pytest.raises(loraserve_client.UnavailableError) as err:
            down.model_info()
        assert err.value.retryable


def test_admin_round_trip(adapter_server, tmp_path):
    big, other = tmp_path / "big", tmp_path / "other"
    # Large enough values that the adapter visibly changes greedy outputs.
    big_version = write_lora(big, 256, modules=tuple(MODULE_SHAPES), seed=11, amplitude=0.3)
    other_version = write_lora(other, 8, seed=12)
    assert loraserve_client.adapter_version(str(big)) == big_version
    total = os.path.getsize(big / "adapter_config.json") + os.path.getsize(
        big / "adapter_model.safetensors")
    assert total > 2_000_000

    with Client(adapter_server.grpc) as client:
        assert [a.id for a in client.list_adapters()] == ["attn_r4"]

        progress = []
        up = client.upload_adapter(str(big), "big", chunk_bytes=256 << 10,
                                   progress=lambda done, all_: progress.append((done, all_)))
        assert up.adapter.version == big_version and up.report.version == big_version
        assert up.adapter.state == adapter_pb2.ADAPTER_STATE_READY
        assert up.received_bytes == total
        # One callback per chunk (at most 256 KiB each), increasing, ending at the total.
        assert len(progress) >= total // (256 << 10)
        assert [p[0] for p in progress] == sorted(p[0] for p in progress)
        assert progress[-1] == (total, total)

        out = client.generate([3, 17, 29], adapter="big", max_tokens=4, temperature=0,
                              ignore_eos=True)
        assert (out.adapter_id, out.adapter_version) == ("big", big_version)
        base = client.generate([3, 17, 29], max_tokens=4, temperature=0, ignore_eos=True)
        assert base.token_ids != out.token_ids

        info = client.get_adapter("big")
        assert info.version == big_version and info.rank == 256
        assert client.pin_adapter("big").pinned
        assert client.get_adapter("big").tier == adapter_pb2.ADAPTER_TIER_DEVICE
        with pytest.raises(loraserve_client.FailedPreconditionError):
            client.unload_adapter("big")  # pinned
        assert not client.unpin_adapter("big").pinned
        assert client.unload_adapter("big").state == adapter_pb2.ADAPTER_STATE_DISABLED
        with pytest.raises(loraserve_client.NotFoundError):
            client.generate([3, 17, 29], adapter="big", max_tokens=2)
        ready = client.list_adapters(states=[adapter_pb2.ADAPTER_STATE_READY])
        assert "big" not in [a.id for a in ready]
        loaded = client.load_adapter("big")
        assert loaded.adapter.state == adapter_pb2.ADAPTER_STATE_READY
        assert loaded.report.version == big_version

        # Same content again: nothing sent beyond the header, nothing changed.
        again = client.upload_adapter(str(big), "big")
        assert again.report.unchanged and again.adapter.version == big_version
        with pytest.raises(loraserve_client.AlreadyExistsError) as err:
            client.upload_adapter(str(other), "big")
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
        replaced = client.upload_adapter(str(other), "big", replace=True)
        assert replaced.adapter.version == other_version
        assert client.generate([3, 17, 29], adapter="big", max_tokens=2).adapter_version == \
            other_version
        parked = client.upload_adapter(str(other), "parked", load=False)
        assert parked.adapter.state == adapter_pb2.ADAPTER_STATE_DISABLED
        assert [a.id for a in client.list_adapters(prefix="par")] == ["parked"]

        with pytest.raises(loraserve_client.FailedPreconditionError):
            client.delete_adapter("big")  # enabled
        deleted = client.delete_adapter("big", force=True)
        assert deleted.freed_disk_bytes > 0
        with pytest.raises(loraserve_client.NotFoundError):
            client.get_adapter("big")
        with pytest.raises(loraserve_client.InvalidArgumentError):
            client.load_adapter("../escape")
        with pytest.raises(ValueError):
            client.upload_adapter(str(other), "x", chunk_bytes=(1 << 20) + 1)
        pickle = tmp_path / "pickle"
        pickle.mkdir()
        (pickle / "adapter_config.json").write_text("{}")
        (pickle / "adapter_model.bin").write_bytes(b"\x80\x04")
        with pytest.raises(ValueError, match="safe_serialization"):
            client.upload_adapter(str(pickle), "p")


def test_upload_refuses_a_server_that_stored_another_version(wrong_version_server, tmp_path):
    address, _ = wrong_version_server
    version = write_lora(tmp_path / "a", 4)
    with Client(address) as client:
        with pytest.raises(loraserve_client.VersionMismatchError) as err:
            client.upload_adapter(str(tmp_path / "a"), "x")
    assert err.value.local_version == version and err.value.server_version == "0" * 64
    assert err.value.code == grpc.StatusCode.DATA_LOSS


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
                    reason="needs the openssl command")
def test_credentials_and_tls(server_factory, adapter_root, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certs(certs)
    token_file = tmp_path / "admin_token"
    token_file.write_text(TOKEN)
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [
        {"name": "tenant-a", "key": KEY_A, "adapters": ["attn_*", ""]}]}))
    srv = server_factory(f"--model={FIXTURE_MODEL}", f"--adapter_root={adapter_root}",
                         f"--admin_token_file={token_file}",
                         f"--inference_keys_file={keys_file}",
                         f"--tls_cert_file={certs / 'server.pem'}",
                         f"--tls_key_file={certs / 'server.key'}", *ADAPTER_FLAGS)
    tls = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
    with Client(srv.grpc, api_key=KEY_A, admin_token=TOKEN, credentials=tls) as client:
        assert [a.id for a in client.list_adapters()] == ["attn_r4"]
        out = client.generate([3, 17, 29], adapter="attn_r4", max_tokens=2)
        assert out.adapter_id == "attn_r4" and len(out.adapter_version) == 64
    with Client(srv.grpc, credentials=tls) as anonymous:
        with pytest.raises(loraserve_client.UnauthenticatedError):
            anonymous.list_adapters()
        with pytest.raises(loraserve_client.UnauthenticatedError):
            anonymous.generate([3, 17, 29], max_tokens=2)
    with Client(srv.grpc, api_key=KEY_A, admin_token=KEY_A, credentials=tls) as tenant:
        with pytest.raises(loraserve_client.PermissionDeniedError):
            tenant.get_adapter("attn_r4")  # an inference key is not an admin token
