"""The Admin service against the real loraserve binary (issue 6, "Must show" 2, 3, 5 and 6).

- admin churn (load, unload, replace by upload, pin, delete) for a minute under streaming
  traffic over several adapters: nothing lost or corrupted, unloaded ids NOT_FOUND, versions
  switch exactly at the replace;
- 50 failing loads and uploads (hostile safetensors, bad configs, traversal ids, a symlink out
  of the root) during traffic: every good request succeeds, a valid adapter loads afterwards;
- a load that blocks (held by the adapter_load_pause failpoint on both loader threads): base
  and resident-adapter requests, streamed and unary, complete with their outputs alone while
  the blocked requests wait, then those complete too; admin calls on the blocked id whose
  deadline passes while they wait for its turn end with DEADLINE_EXCEEDED and change nothing;
  a FIFO in place of an adapter file is refused at once, never opened;
- GetAdapter's last_load_report describes the id's last load, failed or not;
- uploads: a multi-MB adapter in chunks; wrong hash, over the cap, over the quota and an
  interrupted stream leave nothing behind; after a restart on the same root the uploaded
  adapter is served and a disabled one is still disabled.
"""
import hashlib
import json
import os
import random
import signal
import shutil
import struct
import threading
import time
import urllib.request

import grpc
import pytest

from loraserve.v1 import adapter_pb2, admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

FIXTURES = os.path.join(os.environ.get("LS_SOURCE_DIR", "."), "tests", "golden", "fixtures",
                        "llama_gqa")
CHURN_SECONDS = float(os.environ.get("LS_CHURN_SECONDS", "60"))
PROMPTS = [[1, 17, 42, 99, 7, 3], [5, 9, 200, 31], [2, 77, 13, 13, 64, 128, 9]]
POOL_FLAGS = ["--adapter_pool_bytes=16777216", "--adapter_page_bytes=65536",
              "--max_lora_rank=512", "--kv_cache_bytes=4194304", "--threads=1"]


# ---- helpers ---------------------------------------------------------------------------------

def start(server_factory, root, *flags):
    return server_factory(f"--model={FIXTURES}", f"--adapter_root={root}", *POOL_FLAGS, *flags)


def stubs(srv):
    ch = grpc.insecure_channel(srv.grpc)
    return admin_pb2_grpc.AdminStub(ch), inference_pb2_grpc.InferenceStub(ch)


def fixture_files(name):
    d = os.path.join(FIXTURES, "adapters", name)
    with open(os.path.join(d, "adapter_config.json"), "rb") as f:
        config = f.read()
    with open(os.path.join(d, "adapter_model.safetensors"), "rb") as f:
        weights = f.read()
    return config, weights


def write_adapter(root, adapter_id, config, weights):
    d = os.path.join(str(root), adapter_id)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "adapter_config.json"), "wb") as f:
        f.write(config)
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(weights)


def version_of(config, weights):
    return hashlib.sha256(config + b"\0" + weights).hexdigest()


def greedy(max_tokens=8, **kwargs):
    return inference_pb2.GenerateRequest(
        sampling=inference_pb2.SamplingParams(temperature=0.0),
        stopping=inference_pb2.StoppingCriteria(max_new_tokens=max_tokens, ignore_eos=True),
        output=inference_pb2.OutputOptions(return_token_ids=True), **kwargs)


def stream_once(inference, adapter_id, prompt, max_tokens=8, timeout=60):
    """(version, tokens) of one streamed greedy request; raises grpc.RpcError."""
    chunks = list(inference.GenerateStream(
        greedy(max_tokens, token_ids=inference_pb2.TokenIds(ids=prompt), adapter_id=adapter_id),
        timeout=timeout))
    versions = {c.adapter.version for c in chunks if c.adapter.version}
    assert len(versions) <= 1, versions
    named = {c.adapter.id for c in chunks if c.adapter.id}
    assert named == ({adapter_id} if adapter_id else set()), (named, adapter_id)
    return (versions.pop() if versions else ""), [t for c in chunks for t in c.token_ids]


def upload_requests(adapter_id, config, weights, chunk=256 * 1024, replace=False, load=True,
                    version="", sha_override=None, sizes_override=None, stop_after=None,
                    stall=None):
    """The request stream of one UploadAdapter: a header, then interleaved chunks."""
    sizes = sizes_override or (len(config), len(weights))
    shas = sha_override or (hashlib.sha256(config).hexdigest(), hashlib.sha256(weights).hexdigest())
    yield admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(
        adapter_id=adapter_id, replace_existing=replace, load=load, version=version,
        files=[admin_pb2.UploadFileInfo(file=admin_pb2.ADAPTER_FILE_CONFIG, size_bytes=sizes[0],
                                        sha256=shas[0]),
               admin_pb2.UploadFileInfo(file=admin_pb2.ADAPTER_FILE_WEIGHTS, size_bytes=sizes[1],
                                        sha256=shas[1])]))
    sent = 0
    for kind, data in ((admin_pb2.ADAPTER_FILE_CONFIG, config),
                       (admin_pb2.ADAPTER_FILE_WEIGHTS, weights)):
        for off in range(0, len(data), chunk):
            if stop_after is not None and sent >= stop_after:
                if stall is not None:
                    stall.wait(60)
                return
            piece = data[off:off + chunk]
            yield admin_pb2.UploadAdapterRequest(
                chunk=admin_pb2.UploadChunk(file=kind, offset=off, data=piece))
            sent += len(piece)


def upload(admin, adapter_id, config, weights, timeout=60, **kwargs):
    return admin.UploadAdapter(upload_requests(adapter_id, config, weights, **kwargs),
                               timeout=timeout)


def code_of(fn):
    try:
        fn()
    except grpc.RpcError as e:  # pylint: disable=no-member
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def root_entries(root):
    return sorted(os.listdir(str(root)))


def no_leftovers(root):
    return [n for n in root_entries(root) if n.startswith(".upload-") or n.startswith(".deleted-")]


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def write_safetensors(tensors):
    """{name: (dtype, shape, bytes)} -> the safetensors bytes (stdlib only)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, data) in sorted(tensors.items()):
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def big_adapter(rank=512, seed=7):
    """An all-linear F32 adapter for the fixture model: about 4.6 MB of weights."""
    rng = random.Random(seed)
    block = struct.pack("<4096f", *[rng.uniform(-0.05, 0.05) for _ in range(4096)])
    shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
              "gate_proj": (64, 160), "up_proj": (64, 160), "down_proj": (160, 64)}
    tensors = {}
    for layer in range(2):
        for mod, (fan_in, fan_out) in shapes.items():
            part = "mlp" if mod in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            base = f"base_model.model.model.layers.{layer}.{part}.{mod}"
            for suffix, shape in (("lora_A.weight", [rank, fan_in]),
                                  ("lora_B.weight", [fan_out, rank])):
                n = shape[0] * shape[1] * 4
                data = (block * (n // len(block) + 1))[:n]
                tensors[f"{base}.{suffix}"] = ("F32", shape, data)
    config = json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 1024,
                         "target_modules": "all-linear", "task_type": "CAUSAL_LM"}).encode()
    return config, write_safetensors(tensors)


# ---- Must show 6: uploads ----------------------------------------------------------------------

def test_upload_in_chunks_failures_leave_nothing_and_restart_keeps_state(tmp_path,
                                                                       server_factory):
    root = tmp_path / "adapters"
    root.mkdir()
    # A leftover of a crashed upload: removed at start.
    os.makedirs(root / ".upload-0123456789abcdef" / "half")
    config, weights = big_adapter()
    assert len(weights) > 4_000_000
    cap, quota = 6_000_000, 9_000_000
    flags = [f"--max_adapter_upload_bytes={cap}", f"--adapter_root_max_bytes={quota}"]
    srv = start(server_factory, root, *flags)
    assert no_leftovers(root) == []
    admin, inference = stubs(srv)

    # Multi-MB upload in 256 KiB chunks, loaded: served at once with the uploaded version.
    resp = upload(admin, "big", config, weights, chunk=256 * 1024, load=True)
    want = version_of(config, weights)
    assert resp.adapter.version == want and resp.report.version == want
    assert resp.received_bytes == len(config) + len(weights)
    assert resp.adapter.state == adapter_pb2.ADAPTER_STATE_READY
    assert resp.report.num_matched_modules == 14
    big_version, big_tokens = stream_once(inference, "big", PROMPTS[0])
    assert big_version == want
    _, base_tokens = stream_once(inference, "", PROMPTS[0])
    assert big_tokens != base_tokens
    assert root_entries(root) == ["big"]

    # Idempotent: the same upload again succeeds unchanged; other content is ALREADY_EXISTS.
    again = upload(admin, "big", config, weights)
    assert again.report.unchanged and again.adapter.version == want
    assert upload(admin, "big", config, weights, version=want).received_bytes == 0
    small_config, small_weights = fixture_files("attn_r4")
    code, msg = code_of(lambda: upload(admin, "big", small_config, small_weights))
    assert code == grpc.StatusCode.ALREADY_EXISTS, msg

    # Each failure leaves nothing: no staging directory, no id.
    failures = {
        "wrong hash": (lambda: upload(admin, "bad-hash", small_config, small_weights,
                                      sha_override=(hashlib.sha256(small_config).hexdigest(),
                                                    "0" * 64)),
                       grpc.StatusCode.DATA_LOSS),
        "over the cap": (lambda: upload(admin, "too-big", small_config, small_weights,
                                        sizes_override=(len(small_config), cap)),
                         grpc.StatusCode.RESOURCE_EXHAUSTED),
        "over the quota": (lambda: upload(admin, "quota", config[:-1] + b" ", weights),
                           grpc.StatusCode.RESOURCE_EXHAUSTED),
        "short file": (lambda: upload(admin, "short", small_config, small_weights,
                                      sizes_override=(len(small_config), len(small_weights) + 1)),
                       grpc.StatusCode.INVALID_ARGUMENT),
        "invalid adapter": (lambda: upload(admin, "invalid", b'{"peft_type": "LORA", "r": 4, '
                                           b'"use_dora": true}', small_weights),
                            grpc.StatusCode.INVALID_ARGUMENT),
        "traversal id": (lambda: upload(admin, "../escape", small_config, small_weights),
                         grpc.StatusCode.INVALID_ARGUMENT),
    }
    for name, (call, want_code) in failures.items():
        code, msg = code_of(call)
        assert code == want_code, (name, code, msg)
        assert wait_until(lambda: root_entries(root) == ["big"]), (name, root_entries(root))
    code, msg = code_of(failures["over the quota"][0])
    assert "--adapter_root_max_bytes" in msg, msg

    # An interrupted stream: the client cancels mid-upload; the staging directory goes.
    stall = threading.Event()
    future = admin.UploadAdapter.future(
        upload_requests("interrupted", small_config, small_weights, chunk=4096, stop_after=8192,
                        stall=stall),
        timeout=60)
    assert wait_until(lambda: any(n.startswith(".upload-") for n in root_entries(root)))
    future.cancel()
    stall.set()
    assert wait_until(lambda: root_entries(root) == ["big"]), root_entries(root)

    # A stored-disabled upload (load=false): NOT_FOUND for requests, listed as DISABLED.
    upload(admin, "quiet", small_config, small_weights, load=False)
    code, _ = code_of(lambda: stream_once(inference, "quiet", PROMPTS[0]))
    assert code == grpc.StatusCode.NOT_FOUND
    listed = {a.id: a for a in admin.ListAdapters(admin_pb2.ListAdaptersRequest(),
                                                  timeout=10).adapters}
    assert listed["quiet"].state == adapter_pb2.ADAPTER_STATE_DISABLED
    assert listed["big"].state == adapter_pb2.ADAPTER_STATE_READY
    assert listed["big"].requests_served >= 1

    metrics = urllib.request.urlopen(f"http://{srv.metrics}/metrics", timeout=10).read().decode()
    assert 'loraserve_adapter_uploads_total{result="hash_mismatch"} 1' in metrics
    assert 'loraserve_adapter_uploads_total{result="too_large"} 1' in metrics
    assert 'loraserve_adapter_uploads_total{result="quota"} 2' in metrics
    assert 'loraserve_adapter_uploads_total{result="cancelled"} 1' in metrics
    assert 'loraserve_adapter_uploads_total{result="exists"} 1' in metrics
    assert "loraserve_adapter_upload_bytes_total" in metrics
    assert "audit who=" in srv.log() and "rpc=UploadAdapter" in srv.log()

    # Restart on the same root: the uploaded adapter is served, the disabled one still disabled.
    assert srv.terminate() == 0
    srv2 = start(server_factory, root, *flags)
    admin2, inference2 = stubs(srv2)
    assert stream_once(inference2, "big", PROMPTS[0]) == (want, big_tokens)
    code, _ = code_of(lambda: stream_once(inference2, "quiet", PROMPTS[0]))
    assert code == grpc.StatusCode.NOT_FOUND
    got = admin2.GetAdapter(admin_pb2.GetAdapterRequest(adapter_id="quiet"), timeout=10)
    assert got.adapter.state == adapter_pb2.ADAPTER_STATE_DISABLED
    # LoadAdapter enables it (persisted too).
    admin2.LoadAdapter(admin_pb2.LoadAdapterRequest(adapter_id="quiet"), timeout=30)
    assert stream_once(inference2, "quiet", PROMPTS[0])[0] == version_of(small_config,
                                                                          small_weights)


# ---- Must show 5: a load that blocks ---------------------------------------------------------------

def unary_once(inference, adapter_id, prompt, max_tokens=8, timeout=60):
    """(version, tokens) of one unary greedy request; raises grpc.RpcError."""
    resp = inference.Generate(
        greedy(max_tokens, token_ids=inference_pb2.TokenIds(ids=prompt), adapter_id=adapter_id),
        timeout=timeout)
    assert resp.adapter.id == adapter_id, (resp.adapter.id, adapter_id)
    return resp.adapter.version, list(resp.token_ids)


def state_of(admin, adapter_id):
    return admin.GetAdapter(admin_pb2.GetAdapterRequest(adapter_id=adapter_id),
                            timeout=10).adapter.state


def test_blocked_load_does_not_stop_other_requests(tmp_path, server_factory, monkeypatch):
    """Must show 5. The store refuses a FIFO at once (below), so a load that *blocks* is made with
    the adapter_load_pause failpoint (docs/adapters.md, "Testing"): every adapter load waits
    while the pause file exists, as a read from a hung network file system would."""
    root = tmp_path / "adapters"
    root.mkdir()
    attn, layers1 = fixture_files("attn_r4"), fixture_files("layers1_excl_r8")
    linear, embed = fixture_files("all_linear_r16_patterns"), fixture_files("embed_head_r8")
    # good*, twin*: loaded before the pause (resident). slow1 / slow2 hold the same files as
    # twin1 / twin2, under ids that are first requested while loads are paused.
    for adapter_id, files in (("good1", attn), ("good2", layers1), ("twin1", linear),
                              ("twin2", embed), ("slow1", linear), ("slow2", embed)):
        write_adapter(root, adapter_id, *files)
    os.makedirs(root / "fifo")
    with open(root / "fifo" / "adapter_config.json", "wb") as f:
        f.write(attn[0])
    fifo = str(root / "fifo" / "adapter_model.safetensors")
    os.mkfifo(fifo)
    # The test holds the FIFO open (read-write, so that opening it does not block the test): a
    # reader would block in read() forever since nothing is ever written.
    holder = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    pause = tmp_path / "pause"
    monkeypatch.setenv("LORASERVE_FAILPOINTS", f"adapter_load_pause={pause}")
    try:
        srv = start(server_factory, root)
        admin, inference = stubs(srv)
        resident = ["", "good1", "good2", "twin1", "twin2"]
        solo = {(a, p): stream_once(inference, a, prompt)
                for a in resident for p, prompt in enumerate(PROMPTS)}
        for a, p in solo:
            assert unary_once(inference, a, PROMPTS[p]) == solo[(a, p)], (a, p)
        for a in resident[1:]:
            assert state_of(admin, a) == adapter_pb2.ADAPTER_STATE_READY

        # Loads now block. A request for slow1 (streamed) and one for slow2 (unary) each start
        # a load, which holds one of the two loader threads.
        pause.write_bytes(b"")
        blocked = {}

        def blocked_request(name, fn, adapter_id):
            try:
                blocked[name] = ("ok", fn(inference, adapter_id, PROMPTS[0], timeout=60))
            except grpc.RpcError as e:  # pylint: disable=no-member
                blocked[name] = ("error", e.code(), e.details())

        waiters = [threading.Thread(target=blocked_request, args=("slow1", stream_once, "slow1")),
                   threading.Thread(target=blocked_request, args=("slow2", unary_once, "slow2"))]
        t_blocked = time.monotonic()
        for t in waiters:
            t.start()
        for a in ("slow1", "slow2"):
            assert wait_until(lambda: state_of(admin, a) == adapter_pb2.ADAPTER_STATE_LOADING), a
        # Both loader threads (the default 2) are held.
        for a in ("slow1", "slow2"):
            assert wait_until(lambda: f'adapter_load_pause: the load of adapter "{a}" waits'
                              in srv.log()), srv.log()[-2000:]

        # Meanwhile: base-model and resident-adapter requests, streamed and unary, concurrent,
        # each with the output it has alone.
        results, errors, lock = [], [], threading.Lock()

        def traffic(seed):
            rng = random.Random(seed)
            for i in range(8):
                a, p = rng.choice(resident), rng.randrange(len(PROMPTS))
                fn = stream_once if i % 2 == 0 else unary_once
                try:
                    got = fn(inference, a, PROMPTS[p], timeout=20)
                except grpc.RpcError as e:  # pylint: disable=no-member
                    with lock:
                        errors.append((a, p, e.code(), e.details()))
                    return  # fail fast: one stuck request is enough
                with lock:
                    results.append(((a, p), got))

        threads = [threading.Thread(target=traffic, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(results) == 32
        for key, got in results:
            assert got == solo[key], key
        assert {a for (a, _), _ in results} == set(resident)
        # All of that completed while the two blocked requests had not: the engine's step loop
        # never waited on the loader threads.
        assert all(t.is_alive() for t in waiters) and not blocked, blocked
        for a in ("slow1", "slow2"):
            assert state_of(admin, a) == adapter_pb2.ADAPTER_STATE_LOADING, a

        # Admin calls on one id take turns; one whose deadline passes while it waits ends with
        # DEADLINE_EXCEEDED and changes nothing. The first LoadAdapter of slow1 holds the id's
        # turn while it waits for the blocked load.
        first = admin.LoadAdapter.future(admin_pb2.LoadAdapterRequest(adapter_id="slow1"),
                                         timeout=60)
        time.sleep(0.3)  # the first call takes the id's turn before the others arrive
        late = [admin.LoadAdapter.future(admin_pb2.LoadAdapterRequest(adapter_id="slow1"),
                                         timeout=0.5) for _ in range(6)]
        late.append(admin.UnloadAdapter.future(
            admin_pb2.UnloadAdapterRequest(adapter_id="slow1"), timeout=0.5))
        for f in late:
            with pytest.raises(grpc.RpcError) as err:
                f.result()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The timed-out calls gave their admin worker threads back (4 in all; the first call
        # holds one): other admin calls still answer.
        assert state_of(admin, "good1") == adapter_pb2.ADAPTER_STATE_READY
        # The server ended them itself (its audit lines), not only the client's deadline.
        assert wait_until(lambda: srv.log().count(
            'rpc=UnloadAdapter id="slow1" result=DEADLINE_EXCEEDED') == 1 and srv.log().count(
            'rpc=LoadAdapter id="slow1" result=DEADLINE_EXCEEDED') == 6), srv.log()[-3000:]
        assert "nothing was changed" in srv.log()
        assert not first.done() and not blocked
        # Every mutation worker (4) now waits on the hung load: slow1's first call and three on
        # slow2. List and Get run on their own threads and still answer.
        stuck = [admin.LoadAdapter.future(admin_pb2.LoadAdapterRequest(adapter_id="slow2"),
                                          timeout=60) for _ in range(3)]
        time.sleep(0.3)
        listed = admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=5)
        assert "good1" in [x.id for x in listed.adapters]
        assert state_of(admin, "slow2") == adapter_pb2.ADAPTER_STATE_LOADING
        assert not any(f.done() for f in stuck)

        # Unblocked: the blocked requests complete, with their twins' outputs alone.
        pause.unlink()
        for t in waiters:
            t.join(60)
        assert time.monotonic() - t_blocked < 25  # inside --adapter_wait_timeout (30 s)
        want1, want2 = solo[("twin1", 0)], solo[("twin2", 0)]
        assert blocked["slow1"] == ("ok", want1), blocked["slow1"]
        for f in stuck:
            assert f.result().adapter.state == adapter_pb2.ADAPTER_STATE_READY
        assert blocked["slow2"] == ("ok", want2), blocked["slow2"]
        loaded = first.result()
        assert loaded.adapter.state == adapter_pb2.ADAPTER_STATE_READY
        assert loaded.adapter.version == want1[0]
        # The Unload that timed out changed nothing: slow1 is still served.
        assert stream_once(inference, "slow1", PROMPTS[1]) == solo[("twin1", 1)]
        # GetAdapter's last_load_report is the load that just finished (it includes the pause).
        got = admin.GetAdapter(admin_pb2.GetAdapterRequest(adapter_id="slow1"), timeout=10)
        report = got.last_load_report
        assert report.version == want1[0] and not report.unchanged and not report.previous_version
        assert report.num_matched_modules == loaded.report.num_matched_modules > 0
        assert report.weight_bytes == loaded.report.weight_bytes > 0
        assert report.load_seconds > 0.5

        # A FIFO in place of an adapter file is refused at once (never opened) for requests and
        # LoadAdapter alike; everything else is still served.
        t0 = time.monotonic()
        code, msg = code_of(lambda: stream_once(inference, "fifo", PROMPTS[1], timeout=30))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "not a regular file" in msg, msg
        code, msg = code_of(lambda: admin.LoadAdapter(
            admin_pb2.LoadAdapterRequest(adapter_id="fifo"), timeout=30))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "not a regular file" in msg, msg
        assert time.monotonic() - t0 < 10
        assert stream_once(inference, "good1", PROMPTS[1]) == solo[("good1", 1)]
        assert srv.proc.poll() is None
        assert srv.terminate() == 0
    finally:
        os.close(holder)


def test_last_load_report_describes_the_last_load_even_a_failed_one(tmp_path, server_factory):
    root = tmp_path / "adapters"
    root.mkdir()
    attn, layers1 = fixture_files("attn_r4"), fixture_files("layers1_excl_r8")
    write_adapter(root, "a", *attn)
    write_adapter(root, "bad", b'{"peft_type": "LORA", "r": 4, "use_dora": true}', attn[1])
    srv = start(server_factory, root)
    admin, inference = stubs(srv)

    def get(adapter_id):
        return admin.GetAdapter(admin_pb2.GetAdapterRequest(adapter_id=adapter_id), timeout=10)

    # Never loaded here: no report.
    assert not get("a").HasField("last_load_report")
    # A load asked for by a request counts too.
    version_a = stream_once(inference, "a", PROMPTS[0])[0]
    report = get("a").last_load_report
    assert report.version == version_a and report.num_matched_modules > 0
    assert report.load_seconds > 0

    # A failed load: reported (no version; the error is the adapter's last_error).
    code, msg = code_of(lambda: admin.LoadAdapter(admin_pb2.LoadAdapterRequest(adapter_id="bad"),
                                                  timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, msg
    got = get("bad")
    assert got.adapter.state == adapter_pb2.ADAPTER_STATE_FAILED
    assert got.HasField("last_load_report") and got.last_load_report.version == ""
    assert got.last_load_report.load_seconds > 0
    assert "use_dora" in got.adapter.last_error

    # A reload whose new files fail: the id keeps serving its version, and the last load is the
    # failed one.
    write_adapter(root, "a", b'{"peft_type": "LORA", "r": 4, "use_dora": true}', attn[1])
    code, msg = code_of(lambda: admin.LoadAdapter(admin_pb2.LoadAdapterRequest(adapter_id="a"),
                                                  timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, msg
    got = get("a")
    assert got.adapter.state == adapter_pb2.ADAPTER_STATE_READY
    assert got.adapter.version == version_a
    assert got.last_load_report.version == "" and "use_dora" in got.adapter.last_error
    assert stream_once(inference, "a", PROMPTS[0])[0] == version_a

    # New files that load: the report names the version it replaced, as LoadAdapter did.
    write_adapter(root, "a", *layers1)
    loaded = admin.LoadAdapter(admin_pb2.LoadAdapterRequest(adapter_id="a"), timeout=30)
    assert loaded.report.previous_version == version_a
    got = get("a")
    assert got.adapter.last_error == ""
    for field in ("version", "previous_version", "unchanged", "num_matched_modules",
                  "weight_bytes", "pool_pages"):
        assert getattr(got.last_load_report, field) == getattr(loaded.report, field), field
    again = admin.LoadAdapter(admin_pb2.LoadAdapterRequest(adapter_id="a"), timeout=30)
    assert again.report.unchanged and get("a").last_load_report.unchanged
    assert srv.terminate() == 0


# ---- Must show 3: failing loads and uploads during traffic --------------------------------------

def hostile_cases(tmp_path, good_config, good_weights):
    """(kind, id, config bytes, weights bytes) of adapters that must not load."""
    header = json.dumps({"x.lora_A.weight": {"dtype": "F32", "shape": [4, 64],
                                             "data_offsets": [0, 1024]}}).encode()
    nan = struct.pack("<f", float("nan")) * 256
    cases = [
        ("huge header length", struct.pack("<Q", 1 << 60) + b"{}"),
        ("header not json", struct.pack("<Q", 8) + b"notjson!"),
        ("offsets past the end", struct.pack("<Q", len(header)) + header + b"\0" * 16),
        ("overlapping offsets", write_safetensors({
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("F32", [4, 64],
                                                                               b"\0" * 1024),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": ("F32", [64, 4],
                                                                               b"\0" * 1024)
        }).replace(b"[1024, 2048]", b"[512, 1536]")),
        ("nan values", write_safetensors({
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("F32", [4, 64],
                                                                               nan),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": ("F32", [64, 4],
                                                                               nan)})),
        ("wrong shapes", write_safetensors({
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("F32", [4, 65],
                                                                               b"\0" * 1040),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": ("F32", [64, 4],
                                                                               b"\0" * 1024)})),
        ("empty file", b""),
    ]
    out = [(kind, f"hostile-{i}", good_config, w) for i, (kind, w) in enumerate(cases)]
    bad_configs = [
        b"{not json",
        b'{"peft_type": "PREFIX_TUNING"}',
        b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true}',
        b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "surprise_option": 1}',
        b'{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", '
        b'"v_proj", "o_proj"]}',  # rank differs from the tensors'
        b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "(unclosed"}',
        b'{"peft_type": "LORA", "r": 4, "r": 4}',
    ]
    out += [(f"bad config {i}", f"badcfg-{i}", c, good_weights) for i, c in enumerate(bad_configs)]
    return out


def test_failing_loads_and_uploads_during_traffic(tmp_path, server_factory):
    root = tmp_path / "adapters"
    root.mkdir()
    good = {"g1": "attn_r4", "g2": "layers1_excl_r8"}
    files = {name: fixture_files(fix) for name, fix in good.items()}
    for name, (c, w) in files.items():
        write_adapter(root, name, c, w)
    cfg, wts = files["g1"]
    cases = hostile_cases(tmp_path, cfg, wts)
    for _, adapter_id, c, w in cases:
        write_adapter(root, adapter_id, c, w)
    outside = tmp_path / "outside"
    write_adapter(outside, "real", cfg, wts)
    os.symlink(str(outside / "real"), str(root / "escape"))
    os.makedirs(root / "fileescape")
    with open(root / "fileescape" / "adapter_config.json", "wb") as f:
        f.write(cfg)
    os.symlink(str(outside / "real" / "adapter_model.safetensors"),
               str(root / "fileescape" / "adapter_model.safetensors"))
    os.makedirs(root / "pickle")
    with open(root / "pickle" / "adapter_config.json", "wb") as f:
        f.write(cfg)
    with open(root / "pickle" / "adapter_model.bin", "wb") as f:
        f.write(b"\x80\x04not really")

    srv = start(server_factory, root)
    admin, inference = stubs(srv)
    expected = {(a, i): stream_once(inference, a, p) for a in ("", "g1", "g2")
                for i, p in enumerate(PROMPTS)}

    stop = threading.Event()
    outcomes, lock = [], threading.Lock()

    def traffic(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            a, i = rng.choice(list(expected))
            try:
                got = stream_once(inference, a, PROMPTS[i])
            except grpc.RpcError as e:  # pylint: disable=no-member
                got = ("error", e.code(), e.details())
            with lock:
                outcomes.append(((a, i), got))

    threads = [threading.Thread(target=traffic, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    ops = []
    load_targets = [adapter_id for _, adapter_id, _, _ in cases] + [
        "escape", "fileescape", "pickle", "../x", "a/b", ".hidden", "", "..", "missing"]
    upload_targets = [(adapter_id, c, w) for _, adapter_id, c, w in cases] + [
        ("../x", cfg, wts), ("a/b", cfg, wts)]
    try:
        while len(ops) < 50:
            for adapter_id in load_targets:
                code, msg = code_of(lambda: admin.LoadAdapter(
                    admin_pb2.LoadAdapterRequest(adapter_id=adapter_id), timeout=30))
                ops.append(("load", adapter_id, code, msg))
            for adapter_id, c, w in upload_targets:
                code, msg = code_of(lambda: upload(admin, "up-" + adapter_id
                                                   if "/" not in adapter_id else adapter_id, c, w))
                ops.append(("upload", adapter_id, code, msg))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert len(ops) >= 50
    for kind, adapter_id, code, msg in ops:
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), \
            (kind, adapter_id, code, msg)
    codes = {(k, i): c for k, i, c, _ in ops}
    assert codes[("load", "escape")] == grpc.StatusCode.PERMISSION_DENIED
    assert codes[("load", "fileescape")] == grpc.StatusCode.PERMISSION_DENIED
    assert codes[("load", "../x")] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes[("upload", "../x")] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes[("load", "pickle")] == grpc.StatusCode.INVALID_ARGUMENT
    # Every good request succeeded with the output it has alone.
    assert len(outcomes) > 20
    for key, got in outcomes:
        assert got == expected[key], (key, got)
    # Nothing half-written was left, and a valid adapter still loads and serves.
    assert no_leftovers(root) == []
    assert not any(n.startswith("up-") for n in root_entries(root))
    write_adapter(root, "late", *fixture_files("all_linear_r16_patterns"))
    loaded = admin.LoadAdapter(admin_pb2.LoadAdapterRequest(adapter_id="late"), timeout=30)
    assert loaded.adapter.state == adapter_pb2.ADAPTER_STATE_READY
    assert stream_once(inference, "late", PROMPTS[0])[0] == loaded.adapter.version
    assert srv.terminate() == 0


# ---- Must show 2: admin churn during streaming traffic -------------------------------------------

def test_admin_churn_during_streaming_traffic(tmp_path, server_factory):
    root = tmp_path / "adapters"
    root.mkdir()
    contents = {name: fixture_files(name) for name in
                ("attn_r4", "layers1_excl_r8", "all_linear_r16_patterns", "embed_head_r8")}
    versions = {name: version_of(*c) for name, c in contents.items()}
    # stable ids are never touched; "swap" is replaced back and forth; "flip" is unloaded and
    # loaded; "gone" is deleted and uploaded again; "pinned" is pinned and unpinned.
    layout = {"stable1": "attn_r4", "stable2": "all_linear_r16_patterns",
              "swap": "attn_r4", "flip": "layers1_excl_r8", "gone": "embed_head_r8",
              "pinned": "layers1_excl_r8"}
    for adapter_id, name in layout.items():
        write_adapter(root, adapter_id, *contents[name])
    srv = start(server_factory, root)
    admin, inference = stubs(srv)

    # What each version (content) produces alone, per prompt.
    alone = {}
    for name, version in versions.items():
        stable_id = [i for i, n in layout.items() if n == name][0]
        for p, prompt in enumerate(PROMPTS):
            v, tokens = stream_once(inference, stable_id, prompt)
            assert v == version
            alone[(version, p)] = tokens
    for p, prompt in enumerate(PROMPTS):
        alone[("", p)] = stream_once(inference, "", prompt)[1]

    records, lock, stop = [], threading.Lock(), threading.Event()
    ids = ["", "stable1", "stable2", "swap", "flip", "gone", "pinned"]

    def traffic(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            adapter_id, p = rng.choice(ids), rng.randrange(len(PROMPTS))
            t0 = time.monotonic()
            try:
                version, tokens = stream_once(inference, adapter_id, PROMPTS[p])
                result = ("ok", version, tokens)
            except grpc.RpcError as e:  # pylint: disable=no-member
                result = ("error", e.code(), e.details())
            with lock:
                records.append((adapter_id, p, t0, time.monotonic(), result))

    threads = [threading.Thread(target=traffic, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    swaps = []  # (start, end, version now current)
    swap_current = versions["attn_r4"]
    not_found_checks = 0
    end = time.monotonic() + CHURN_SECONDS
    step = 0
    try:
        while time.monotonic() < end:
            step += 1
            # Replace "swap" with the other content; requests admitted after see the new one.
            name = "layers1_excl_r8" if swap_current == versions["attn_r4"] else "attn_r4"
            t0 = time.monotonic()
            resp = upload(admin, "swap", *contents[name], replace=True, load=True)
            t1 = time.monotonic()
            assert resp.adapter.version == versions[name]
            assert resp.report.previous_version == swap_current
            swaps.append((t0, t1, versions[name]))
            swap_current = versions[name]
            assert stream_once(inference, "swap", PROMPTS[0])[0] == swap_current

            # Unload "flip": NOT_FOUND at once; then load it again.
            admin.UnloadAdapter(admin_pb2.UnloadAdapterRequest(adapter_id="flip"), timeout=30)
            code, _ = code_of(lambda: stream_once(inference, "flip", PROMPTS[1]))
            assert code == grpc.StatusCode.NOT_FOUND
            not_found_checks += 1
            admin.LoadAdapter(admin_pb2.LoadAdapterRequest(adapter_id="flip"), timeout=30)

            # Pin / unpin; unload of a pinned adapter needs force.
            pinned = admin.PinAdapter(admin_pb2.PinAdapterRequest(adapter_id="pinned"),
                                      timeout=30)
            assert pinned.adapter.pinned and pinned.adapter.tier == adapter_pb2.ADAPTER_TIER_DEVICE
            code, _ = code_of(lambda: admin.UnloadAdapter(
                admin_pb2.UnloadAdapterRequest(adapter_id="pinned"), timeout=30))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            admin.UnpinAdapter(admin_pb2.UnpinAdapterRequest(adapter_id="pinned"), timeout=30)

            # Delete "gone" (force: it is enabled), NOT_FOUND, then upload it again.
            if step % 2 == 0:
                deleted = admin.DeleteAdapter(
                    admin_pb2.DeleteAdapterRequest(adapter_id="gone", force=True), timeout=30)
                assert deleted.freed_disk_bytes > 0
                code, _ = code_of(lambda: stream_once(inference, "gone", PROMPTS[2]))
                assert code == grpc.StatusCode.NOT_FOUND
                code, _ = code_of(lambda: admin.GetAdapter(
                    admin_pb2.GetAdapterRequest(adapter_id="gone"), timeout=10))
                assert code == grpc.StatusCode.NOT_FOUND
                not_found_checks += 1
                upload(admin, "gone", *contents["embed_head_r8"], load=True)
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not_found_checks >= 10 and len(swaps) >= 10, (not_found_checks, len(swaps))

    def swap_version_at(t):
        """The version of "swap" at time t, or None inside a replace window."""
        current = versions["attn_r4"]
        for s, e, v in swaps:
            if t < s:
                return current
            if t <= e:
                return None
            current = v
        return current

    assert len(records) > 100, len(records)
    by_status = {"ok": 0, "error": 0}
    for adapter_id, p, t0, t1, result in records:
        by_status[result[0]] += 1
        if result[0] == "error":
            # Only ids that were unloaded or deleted may be NOT_FOUND; nothing else may fail.
            assert adapter_id in ("flip", "gone") and result[1] == grpc.StatusCode.NOT_FOUND, \
                (adapter_id, result)
            continue
        _, version, tokens = result
        # Not corrupted: the output equals that version's output alone.
        assert tokens == alone[(version, p)], (adapter_id, version[:12], p)
        if adapter_id == "swap":
            admitted = swap_version_at(t0)
            finished = swap_version_at(t1)
            if admitted is not None and admitted == finished:
                assert version == admitted, (t0, t1, version[:12], admitted[:12])
            else:
                assert version in {v for _, _, v in swaps} | {versions["attn_r4"]}
        elif adapter_id:
            assert version == versions[layout[adapter_id]], adapter_id
    assert by_status["ok"] > 100, by_status
    # Nothing left in flight; the audit log names every mutation.
    info = admin.GetAdapter(admin_pb2.GetAdapterRequest(adapter_id="swap"), timeout=10)
    assert info.adapter.in_flight_requests == 0 and not info.adapter.retired_versions
    log = srv.log()
    for rpc in ("UploadAdapter", "UnloadAdapter", "LoadAdapter", "PinAdapter", "UnpinAdapter",
                "DeleteAdapter"):
        assert f"rpc={rpc} " in log, rpc
    assert "result=FAILED_PRECONDITION" in log
    assert no_leftovers(root) == []
    assert srv.terminate() == 0


# ---- Start-up flags, List / Get, drain -------------------------------------------------------------

def test_preload_load_on_demand_paging_and_drain(tmp_path, server_factory):
    root = tmp_path / "adapters"
    root.mkdir()
    write_adapter(root, "a1", *fixture_files("attn_r4"))
    write_adapter(root, "a2", *fixture_files("layers1_excl_r8"))
    write_adapter(root, "a3", *fixture_files("embed_head_r8"))
    open(root / "a3" / ".loraserve-disabled", "wb").close()
    write_adapter(root, "bad", b'{"peft_type": "LORA", "r": 4, "use_dora": true}',
                  fixture_files("attn_r4")[1])

    # A preload that does not load stops the start, naming the id.
    with pytest.raises(RuntimeError) as err:
        start(server_factory, root, "--preload_adapters=a1,bad")
    assert '--preload_adapters: adapter "bad" does not load' in str(err.value), str(err.value)

    srv = start(server_factory, root, "--load_on_demand=false", "--preload_adapters=a1")
    admin, inference = stubs(srv)
    assert stream_once(inference, "a1", PROMPTS[0])[0] == version_of(*fixture_files("attn_r4"))
    code, msg = code_of(lambda: stream_once(inference, "a2", PROMPTS[0]))
    assert code == grpc.StatusCode.NOT_FOUND and "--load_on_demand" in msg, msg
    code, _ = code_of(lambda: admin.PinAdapter(admin_pb2.PinAdapterRequest(adapter_id="a3"),
                                               timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION

    states = {a.id: a.state for a in admin.ListAdapters(admin_pb2.ListAdaptersRequest(),
                                                        timeout=10).adapters}
    assert states == {"a1": adapter_pb2.ADAPTER_STATE_READY,
                      "a2": adapter_pb2.ADAPTER_STATE_AVAILABLE,
                      "a3": adapter_pb2.ADAPTER_STATE_DISABLED,
                      "bad": adapter_pb2.ADAPTER_STATE_AVAILABLE}
    # Paging: one id per page, in id order, the token bound to its filter.
    seen, token = [], ""
    while True:
        page = admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_size=1, page_token=token,
                                                                id_prefix="a"), timeout=10)
        assert page.total_size == 3
        seen += [a.id for a in page.adapters]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["a1", "a2", "a3"]
    first = admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_size=1), timeout=10)
    for bad_token, prefix in ((first.next_page_token, "b"), ("garbage!", "")):
        code, _ = code_of(lambda: admin.ListAdapters(admin_pb2.ListAdaptersRequest(
            page_token=bad_token, id_prefix=prefix), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    only_disabled = admin.ListAdapters(admin_pb2.ListAdaptersRequest(
        states=[adapter_pb2.ADAPTER_STATE_DISABLED]), timeout=10)
    assert [a.id for a in only_disabled.adapters] == ["a3"]
    for adapter_id, want in (("../x", grpc.StatusCode.INVALID_ARGUMENT),
                             ("nope", grpc.StatusCode.NOT_FOUND)):
        code, _ = code_of(lambda: admin.GetAdapter(admin_pb2.GetAdapterRequest(
            adapter_id=adapter_id), timeout=10))
        assert code == want, adapter_id
    loaded = admin.LoadAdapter(admin_pb2.LoadAdapterRequest(adapter_id="a2"), timeout=30)
    assert loaded.adapter.state == adapter_pb2.ADAPTER_STATE_READY
    assert loaded.report.num_matched_modules > 0 and loaded.report.weight_bytes > 0
    assert stream_once(inference, "a2", PROMPTS[0])[0] == loaded.adapter.version
    again = admin.LoadAdapter(admin_pb2.LoadAdapterRequest(adapter_id="a2"), timeout=30)
    assert again.report.unchanged
    got = admin.GetAdapter(admin_pb2.GetAdapterRequest(adapter_id="a2"), timeout=10)
    assert got.adapter.requests_served == 1 and got.adapter.HasField("last_used_time")
    assert got.adapter.tokens_served == 8
    assert got.last_load_report.version == loaded.adapter.version

    # Draining: an upload in progress keeps the server alive; mutations are UNAVAILABLE, List and
    # Get still answer.
    stall = threading.Event()
    cfg, wts = fixture_files("attn_r4")
    future = admin.UploadAdapter.future(
        upload_requests("late", cfg, wts, chunk=4096, stop_after=4096, stall=stall), timeout=60)
    assert wait_until(lambda: any(n.startswith(".upload-") for n in root_entries(root)))
    srv.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: code_of(lambda: admin.UnloadAdapter(
        admin_pb2.UnloadAdapterRequest(adapter_id="a1"), timeout=10))[0] ==
        grpc.StatusCode.UNAVAILABLE)
    code, msg = code_of(lambda: admin.LoadAdapter(admin_pb2.LoadAdapterRequest(adapter_id="a2"),
                                                  timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE and "draining" in msg, msg
    assert len(admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10).adapters) == 4
    future.cancel()
    stall.set()
    assert srv.proc.wait(timeout=30) == 0
    assert no_leftovers(root) == []
    assert "rpc=LoadAdapter " in srv.log() and "result=UNAVAILABLE" in srv.log()
