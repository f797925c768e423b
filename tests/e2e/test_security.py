"""Issue 6, must show 7: the admin token, tenant keys, TLS and mutual TLS on every listener, a
separate Admin listener, and the plaintext health listener, against the real loraserve binary.

Certificates are made per test with the `openssl` command line tool."""
import json
import os
import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import LORASERVE
from loraserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

FIXTURE_MODEL = os.path.join(os.environ.get("LS_SOURCE_DIR", "."), "tests", "golden", "fixtures",
                             "llama_gqa")
ADMIN_TOKEN = "admin-token-7c1f0e9b2a5d4e8f"
KEY_A = "tenant-a-key-5f2e8c1d9b7a6e3f"
KEY_B = "tenant-b-key-0a9b8c7d6e5f4a3b"
PROMPT = inference_pb2.TokenIds(ids=[1, 17, 42, 99])


def generate_request(adapter_id="", max_tokens=4):
    return inference_pb2.GenerateRequest(
        token_ids=PROMPT, adapter_id=adapter_id,
        sampling=inference_pb2.SamplingParams(temperature=0.0),
        stopping=inference_pb2.StoppingCriteria(max_new_tokens=max_tokens, ignore_eos=True),
        output=inference_pb2.OutputOptions(return_token_ids=True))


def wait_for_log(srv, text, timeout=10.0):
    """Asserts that `text` shows up in the server's stderr, which is read on its own thread and
    may trail the ready line a little."""
    import time  # pylint: disable=import-outside-toplevel
    deadline = time.monotonic() + timeout
    while text not in srv.log():
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{srv.log()}"
        time.sleep(0.02)


def bearer(secret):
    return (("authorization", f"Bearer {secret}"),)


def code_of(call):
    """The status code `call()` ends with (OK when it returns)."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.fixture
def adapter_root(tmp_path):
    """Three copies of the fixture's attention adapter: a-1 and b-1 belong to one tenant each,
    `shared` to both."""
    root = tmp_path / "adapters"
    for name in ("a-1", "b-1", "shared"):
        shutil.copytree(os.path.join(FIXTURE_MODEL, "adapters", "attn_r4"), root / name)
    return root


@pytest.fixture
def secrets(tmp_path):
    """The admin token file and the tenant keys file: tenant-a may use a-* and shared and the
    base model; tenant-b b-* and shared, not the base model (its key sent as a digest)."""
    import hashlib  # pylint: disable=import-outside-toplevel
    token = tmp_path / "admin_token"
    token.write_text(f"\n  {ADMIN_TOKEN}  \n")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"name": "tenant-a", "key": KEY_A, "adapters": ["a-*", "shared", ""]},
        {"name": "tenant-b", "key_sha256": hashlib.sha256(KEY_B.encode()).hexdigest(),
         "adapters": ["b-*", "shared"]},
    ]}))
    token.chmod(0o600)
    keys.chmod(0o600)
    return [f"--admin_token_file={token}", f"--inference_keys_file={keys}"]


def start(server_factory, adapter_root, *flags):
    return server_factory(f"--model={FIXTURE_MODEL}", f"--adapter_root={adapter_root}",
                          "--kv_cache_bytes=4194304", "--kv_block_tokens=8", "--threads=1",
                          "--adapter_pool_bytes=8388608", "--adapter_page_bytes=65536", *flags)


# ---- Admin token -------------------------------------------------------------------------------

def test_admin_needs_the_token(server_factory, adapter_root, secrets):
    srv = start(server_factory, adapter_root, *secrets)
    admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(srv.grpc))

    def list_code(metadata):
        return code_of(lambda: admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10,
                                                  metadata=metadata))

    assert list_code(()) == grpc.StatusCode.UNAUTHENTICATED
    assert list_code(bearer("not-the-admin-token-000")) == grpc.StatusCode.UNAUTHENTICATED
    assert list_code((("authorization", f"Basic {ADMIN_TOKEN}"),)) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert list_code((("authorization", ADMIN_TOKEN),)) == grpc.StatusCode.UNAUTHENTICATED
    assert list_code(bearer(ADMIN_TOKEN[:-1])) == grpc.StatusCode.UNAUTHENTICATED
    # A tenant key is a known identity without admin rights.
    assert list_code(bearer(KEY_A)) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10, metadata=())
    assert "authorization: Bearer" in err.value.details()
    # Auth comes before anything else, mutations included.
    for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED),
                           (bearer(KEY_B), grpc.StatusCode.PERMISSION_DENIED)):
        assert code_of(lambda m=metadata: admin.LoadAdapter(
            admin_pb2.LoadAdapterRequest(adapter_id="a-1"), timeout=10, metadata=m)) == code
        assert code_of(lambda m=metadata: admin.DeleteAdapter(
            admin_pb2.DeleteAdapterRequest(adapter_id="a-1"), timeout=10, metadata=m)) == code

    # The right token, with the scheme in any case and surrounding spaces.
    listed = admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10,
                                metadata=(("authorization", f"bearer  {ADMIN_TOKEN} "),))
    assert {a.id for a in listed.adapters} == {"a-1", "b-1", "shared"}
    got = admin.GetAdapter(admin_pb2.GetAdapterRequest(adapter_id="b-1"), timeout=10,
                           metadata=bearer(ADMIN_TOKEN))
    assert got.adapter.id == "b-1"
    # Secrets never reach the log; the option line names the files only.
    log = srv.log()
    for secret in (ADMIN_TOKEN, KEY_A, KEY_B):
        assert secret not in log
    wait_for_log(srv, "admin RPCs: need the admin token; inference: needs one of 2 API keys")
    assert "accessible to other users" not in srv.log()  # the fixture's files are 0600


def test_admin_is_open_without_a_token_file_and_says_so(server_factory, adapter_root):
    srv = start(server_factory, adapter_root)
    admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(srv.grpc))
    listed = admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10)
    assert len(listed.adapters) == 3
    wait_for_log(srv, "Admin RPCs are unauthenticated and served on --address")


# ---- Tenant keys -------------------------------------------------------------------------------

def test_tenant_keys_limit_adapters(server_factory, adapter_root, secrets):
    srv = start(server_factory, adapter_root, *secrets)
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(srv.grpc))

    def gen_code(adapter_id, metadata):
        return code_of(lambda: stub.Generate(generate_request(adapter_id), timeout=30,
                                             metadata=metadata))

    def stream_code(adapter_id, metadata):
        return code_of(lambda: list(stub.GenerateStream(generate_request(adapter_id), timeout=30,
                                                        metadata=metadata)))

    ok, denied = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
    for call in (gen_code, stream_code):
        # tenant-a: its own adapters, the shared one and the base model.
        assert call("a-1", bearer(KEY_A)) == ok
        assert call("shared", bearer(KEY_A)) == ok
        assert call("", bearer(KEY_A)) == ok
        assert call("b-1", bearer(KEY_A)) == denied
        # tenant-b by x-api-key: no base model (its entry does not list "").
        assert call("b-1", (("x-api-key", KEY_B),)) == ok
        assert call("shared", (("x-api-key", KEY_B),)) == ok
        assert call("a-1", (("x-api-key", KEY_B),)) == denied
        assert call("", (("x-api-key", KEY_B),)) == denied
        # Without a key, or with an unknown one.
        assert call("a-1", ()) == grpc.StatusCode.UNAUTHENTICATED
        assert call("", bearer("unknown-key-0123456789")) == grpc.StatusCode.UNAUTHENTICATED
        assert call("", (("authorization", f"Basic {KEY_A}"),)) == \
            grpc.StatusCode.UNAUTHENTICATED
        # The admin token is not an inference key.
        assert call("", bearer(ADMIN_TOKEN)) == denied
        # Whether another tenant's adapter exists is not revealed: an existing one and a
        # missing one are refused alike; inside a tenant's own patterns, missing is NOT_FOUND.
        assert call("b-999", bearer(KEY_A)) == denied
        assert call("a-999", bearer(KEY_A)) == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(generate_request("b-1"), timeout=30, metadata=bearer(KEY_A))
    assert err.value.details() == 'API key "tenant-a" may not use adapter_id "b-1"'
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(generate_request("b-999"), timeout=30, metadata=bearer(KEY_A))
    assert err.value.details() == 'API key "tenant-a" may not use adapter_id "b-999"'

    # The adapter really serves the tenant that may use it.
    served = stub.Generate(generate_request("a-1", max_tokens=8), timeout=30,
                           metadata=bearer(KEY_A))
    assert served.adapter.id == "a-1" and len(served.token_ids) == 8

    # Adapter-free RPCs need a known key (any tenant) or the admin token.
    info = inference_pb2.GetModelInfoRequest()
    assert code_of(lambda: stub.GetModelInfo(info, timeout=10)) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: stub.GetModelInfo(info, timeout=10, metadata=(("x-api-key", KEY_B),))) \
        == ok
    assert code_of(lambda: stub.GetModelInfo(info, timeout=10, metadata=bearer(ADMIN_TOKEN))) \
        == ok
    tokenize = inference_pb2.TokenizeRequest(text="x")
    assert code_of(lambda: stub.Tokenize(tokenize, timeout=10)) == \
        grpc.StatusCode.UNAUTHENTICATED
    # Past auth, the fixture model has no tokenizer.
    assert code_of(lambda: stub.Tokenize(tokenize, timeout=10, metadata=bearer(KEY_B))) == \
        grpc.StatusCode.FAILED_PRECONDITION
    # Health stays open for probes.
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.grpc))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("keys, needle", [
    ({"keys": [{"name": "a", "key": "short", "adapters": []}]}, "5 characters long"),
    ({"keys": [{"name": "a", "key": KEY_A, "adapters": ["../x"]}]}, "patterns use adapter id"),
    ({"keys": [{"name": "a", "key": KEY_A, "adapters": []}], "admins": []},
     'unknown field "admins"'),
    ({"keys": [{"name": "a", "key": ADMIN_TOKEN, "adapters": []}]}, "equals the admin token"),
])
def test_bad_keys_file_refuses_to_start(tmp_path, keys, needle):
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    (tmp_path / "token").write_text(ADMIN_TOKEN)
    (tmp_path / "token").chmod(0o644)
    proc = subprocess.run([LORASERVE, f"--model={FIXTURE_MODEL}", "--address=127.0.0.1:0",
                           "--metrics_address=127.0.0.1:0", f"--admin_token_file={tmp_path}/token",
                           f"--inference_keys_file={tmp_path}/keys.json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"--inference_keys_file={tmp_path}/keys.json" in proc.stderr and needle in proc.stderr
    assert KEY_A not in proc.stderr and ADMIN_TOKEN not in proc.stderr
    # Secret files readable by others work, with a warning.
    assert f"--admin_token_file={tmp_path}/token is accessible to other users (mode 0644)" in \
        proc.stderr


# ---- Listeners ---------------------------------------------------------------------------------

def test_admin_address_separates_admin(server_factory, adapter_root):
    srv = start(server_factory, adapter_root, "--admin_address=127.0.0.1:0",
                "--health_address=127.0.0.1:0")
    assert srv.admin and srv.health and len({srv.grpc, srv.admin, srv.health}) == 3
    main_channel = grpc.insecure_channel(srv.grpc)
    admin_channel = grpc.insecure_channel(srv.admin)
    # Admin is not served on the main address at all, and inference not on the admin one.
    assert code_of(lambda: admin_pb2_grpc.AdminStub(main_channel).ListAdapters(
        admin_pb2.ListAdaptersRequest(), timeout=10)) == grpc.StatusCode.UNIMPLEMENTED
    assert code_of(lambda: inference_pb2_grpc.InferenceStub(admin_channel).Generate(
        generate_request(), timeout=10)) == grpc.StatusCode.UNIMPLEMENTED
    listed = admin_pb2_grpc.AdminStub(admin_channel).ListAdapters(
        admin_pb2.ListAdaptersRequest(), timeout=10)
    assert len(listed.adapters) == 3
    assert len(inference_pb2_grpc.InferenceStub(main_channel).Generate(
        generate_request(), timeout=30).token_ids) == 4
    # The health listener serves health only.
    health_channel = grpc.insecure_channel(srv.health)
    for service in ("", "loraserve.v1.Inference", "loraserve.v1.Admin"):
        assert health_pb2_grpc.HealthStub(health_channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    assert code_of(lambda: inference_pb2_grpc.InferenceStub(health_channel).GetModelInfo(
        inference_pb2.GetModelInfoRequest(), timeout=10)) == grpc.StatusCode.UNIMPLEMENTED
    assert code_of(lambda: admin_pb2_grpc.AdminStub(health_channel).ListAdapters(
        admin_pb2.ListAdaptersRequest(), timeout=10)) == grpc.StatusCode.UNIMPLEMENTED
    wait_for_log(srv, f"Admin on {srv.admin}, health on {srv.health}")
    assert "Admin RPCs are unauthenticated" not in srv.log()


def test_listener_flags_are_checked():
    def run(*flags):
        return subprocess.run([LORASERVE, "--address=127.0.0.1:0", "--metrics_address=127.0.0.1:0",
                               *flags], capture_output=True, text=True, timeout=60)

    for flags, needle in (
            (["--admin_address=127.0.0.1"], "--admin_address=127.0.0.1: no port"),
            (["--health_address=127.0.0.1:x"], "--health_address"),
            (["--address=127.0.0.1:7", "--admin_address=127.0.0.1:7"],
             "--address and --admin_address are both 127.0.0.1:7"),
            (["--tls_cert_file=/etc/hostname"], "TLS needs both"),
            (["--tls_client_ca_file=/etc/hostname"], "client certificates need TLS"),
            (["--admin_token_file=/nonexistent/token"], "--admin_token_file=/nonexistent/token"),
            (["--keepalive_time=0s"], "--keepalive_time=0: must be at least 1ms"),
            (["--max_connection_age=-1s"], "--max_connection_age")):
        proc = run(*flags)
        assert proc.returncode == 2, (flags, proc.stderr)
        assert needle in proc.stderr, (flags, proc.stderr)


def test_keepalive_and_connection_age_apply(server_factory, adapter_root):
    """--max_connection_age: the server sends GOAWAY after it; the channel reconnects and calls
    keep working."""
    srv = start(server_factory, adapter_root, "--keepalive_time=30s", "--keepalive_timeout=5s",
                "--max_connection_age=500ms", "--max_connection_age_grace=5s")
    wait_for_log(srv, "keepalive_time=30s keepalive_timeout=5s max_connection_age=500ms "
                      "max_connection_age_grace=5s")
    import time  # pylint: disable=import-outside-toplevel
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(srv.grpc))
    for _ in range(3):
        assert len(stub.Generate(generate_request(), timeout=30).token_ids) == 4
        time.sleep(0.7)


# ---- TLS and mutual TLS ------------------------------------------------------------------------

def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
            cwd=d)


def make_cert(d, name, ca, usage, san=None):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    ext = f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else "")
    (d / f"{name}.ext").write_text(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
            cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server certificate (localhost, 127.0.0.1) and a client certificate, and a
    second CA that signed a rogue client certificate."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue_ca")
    make_cert(d, "server", "ca", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    make_cert(d, "client", "ca", "clientAuth")
    make_cert(d, "rogue", "rogue_ca", "clientAuth")
    return d


def read(path):
    with open(path, "rb") as f:
        return f.read()


def tls_channel(address, pki, client=None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(pki / "ca.pem"),
        private_key=read(pki / f"{client}.key") if client else None,
        certificate_chain=read(pki / f"{client}.pem") if client else None)
    return grpc.secure_channel(address, creds)


def tls_flags(pki, mutual):
    flags = [f"--tls_cert_file={pki / 'server.pem'}", f"--tls_key_file={pki / 'server.key'}"]
    if mutual:
        flags.append(f"--tls_client_ca_file={pki / 'ca.pem'}")
    return flags


def generate_code(channel, metadata=()):
    return code_of(lambda: inference_pb2_grpc.InferenceStub(channel).Generate(
        generate_request(), timeout=10, metadata=metadata))


def assert_health_plaintext_serving(address):
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    for service in ("", "loraserve.v1.Inference"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_tls_round_trip(server_factory, adapter_root, pki):
    srv = start(server_factory, adapter_root, *tls_flags(pki, mutual=False),
                "--admin_address=127.0.0.1:0", "--health_address=127.0.0.1:0")
    wait_for_log(srv, f"serving gRPC on {srv.grpc} (TLS)")
    channel = tls_channel(srv.grpc, pki)
    out = inference_pb2_grpc.InferenceStub(channel).Generate(generate_request("a-1"), timeout=30)
    assert out.adapter.id == "a-1" and len(out.token_ids) == 4
    chunks = list(inference_pb2_grpc.InferenceStub(channel).GenerateStream(
        generate_request("a-1"), timeout=30))
    assert [t for c in chunks for t in c.token_ids] == list(out.token_ids)
    # The admin listener is TLS too.
    listed = admin_pb2_grpc.AdminStub(tls_channel(srv.admin, pki)).ListAdapters(
        admin_pb2.ListAdaptersRequest(), timeout=10)
    assert len(listed.adapters) == 3
    # Plaintext is refused on both TLS listeners.
    assert generate_code(grpc.insecure_channel(srv.grpc)) == grpc.StatusCode.UNAVAILABLE
    assert code_of(lambda: admin_pb2_grpc.AdminStub(grpc.insecure_channel(srv.admin)).ListAdapters(
        admin_pb2.ListAdaptersRequest(), timeout=10)) == grpc.StatusCode.UNAVAILABLE
    # A client that does not trust the server's CA refuses it.
    untrusting = grpc.secure_channel(srv.grpc, grpc.ssl_channel_credentials(
        root_certificates=read(pki / "rogue_ca.pem")))
    assert generate_code(untrusting) == grpc.StatusCode.UNAVAILABLE
    # Kubernetes probes: plaintext health while TLS is on.
    assert_health_plaintext_serving(srv.health)


def test_mutual_tls_round_trip(server_factory, adapter_root, pki, secrets):
    srv = start(server_factory, adapter_root, *tls_flags(pki, mutual=True), *secrets,
                "--admin_address=127.0.0.1:0", "--health_address=127.0.0.1:0")
    wait_for_log(srv, f"serving gRPC on {srv.grpc} (mutual TLS)")
    channel = tls_channel(srv.grpc, pki, client="client")
    stub = inference_pb2_grpc.InferenceStub(channel)
    out = stub.Generate(generate_request("a-1"), timeout=30, metadata=bearer(KEY_A))
    assert out.adapter.id == "a-1" and len(out.token_ids) == 4
    # Keys still apply over mTLS.
    assert generate_code(channel, bearer(KEY_B)) == grpc.StatusCode.PERMISSION_DENIED
    # No client certificate, or one from another CA: the handshake fails.
    assert generate_code(tls_channel(srv.grpc, pki), bearer(KEY_A)) == grpc.StatusCode.UNAVAILABLE
    assert generate_code(tls_channel(srv.grpc, pki, client="rogue"), bearer(KEY_A)) == \
        grpc.StatusCode.UNAVAILABLE
    # Admin over mTLS with the token.
    admin = admin_pb2_grpc.AdminStub(tls_channel(srv.admin, pki, client="client"))
    assert len(admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10,
                                  metadata=bearer(ADMIN_TOKEN)).adapters) == 3
    assert code_of(lambda: admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10)) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: admin_pb2_grpc.AdminStub(tls_channel(srv.admin, pki)).ListAdapters(
        admin_pb2.ListAdaptersRequest(), timeout=10, metadata=bearer(ADMIN_TOKEN))) == \
        grpc.StatusCode.UNAVAILABLE
    assert_health_plaintext_serving(srv.health)


def test_bad_tls_files_refuse_to_start(tmp_path, pki):
    def run(*flags):
        return subprocess.run([LORASERVE, "--address=127.0.0.1:0", "--metrics_address=127.0.0.1:0",
                               *flags], capture_output=True, text=True, timeout=60)

    mismatch = run(f"--tls_cert_file={pki / 'server.pem'}", f"--tls_key_file={pki / 'client.key'}")
    assert mismatch.returncode == 1
    assert "the key does not match the certificate" in mismatch.stderr, mismatch.stderr
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    junk = run(f"--tls_cert_file={tmp_path / 'junk.pem'}", f"--tls_key_file={pki / 'server.key'}")
    assert junk.returncode == 1
    assert f"--tls_cert_file={tmp_path / 'junk.pem'}: no PEM certificate" in junk.stderr
    bad_ca = run(f"--tls_cert_file={pki / 'server.pem'}", f"--tls_key_file={pki / 'server.key'}",
                 f"--tls_client_ca_file={tmp_path / 'junk.pem'}")
    assert bad_ca.returncode == 1
    assert "--tls_client_ca_file" in bad_ca.stderr
