"""Fixtures for end-to-end tests: Python stubs generated from proto/ and a running loraserve.

The tests talk to the real `loraserve` binary over gRPC on loopback ports that the server picks
itself (port 0) and reports on its "loraserve ready" line.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

SOURCE_DIR = os.environ.get("LS_SOURCE_DIR", os.path.abspath(os.path.join(__file__, "../../..")))
BINARY_DIR = os.environ.get("LS_BINARY_DIR", os.path.join(SOURCE_DIR, "build"))
LORASERVE = os.path.join(BINARY_DIR, "server", "loraserve")
LORACTL = os.path.join(BINARY_DIR, "client", "loractl")
# admin= and health= appear only with --admin_address / --health_address.
READY_RE = re.compile(
    r"^loraserve ready grpc=(\S+) metrics=(\S+)(?: admin=(\S+))?(?: health=(\S+))?$")


def _generate_stubs():
    """Generates loraserve/v1/*_pb2*.py into a temporary directory and puts it on sys.path."""
    from grpc_tools import protoc  # pylint: disable=import-outside-toplevel
    import grpc_tools  # pylint: disable=import-outside-toplevel

    out = tempfile.mkdtemp(prefix="ls_stubs_")
    proto_root = os.path.join(SOURCE_DIR, "proto")
    protos = sorted(
        os.path.join("loraserve", "v1", f)
        for f in os.listdir(os.path.join(proto_root, "loraserve", "v1"))
        if f.endswith(".proto"))
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out}",
                      f"--grpc_python_out={out}", *protos])
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {protos}")
    sys.path.insert(0, out)
    return out


_generate_stubs()


class ServerProcess:
    """A loraserve child process; `grpc` and `metrics` are its bound host:port addresses, and
    `admin` and `health` those of the optional listeners (None when not asked for)."""

    def __init__(self, args, ready_timeout=60.0):
        self.args = [LORASERVE, "--address=127.0.0.1:0", "--metrics_address=127.0.0.1:0", *args]
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.stderr_lines = []
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        self.admin = self.health = None
        self.grpc, self.metrics = self._wait_ready(ready_timeout)

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        result = {}

        def read():
            for line in self.proc.stdout:
                m = READY_RE.match(line.strip())
                if m:
                    result["addr"] = (m.group(1), m.group(2))
                    self.admin, self.health = m.group(3), m.group(4)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if "addr" not in result:
            self.kill()
            raise RuntimeError("loraserve did not become ready:\n" + "".join(self.stderr_lines))
        return result["addr"]

    def terminate(self, sig=signal.SIGTERM, timeout=30.0):
        """Sends `sig` and returns the exit code."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self):
        return "".join(self.stderr_lines)


@pytest.fixture
def server_factory():
    """Starts servers with the given extra flags; kills any still running at the end."""
    started = []

    def start(*args, **kwargs):
        s = ServerProcess(list(args), **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


# ---- Prometheus (a real server scraping loraserve) ---------------------------------------------

PROMETHEUS = os.environ.get("LS_PROMETHEUS", "/usr/bin/prometheus")


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (for programs that need one given)."""
    import socket  # pylint: disable=import-outside-toplevel
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusProcess:
    """A real Prometheus server with its own temporary config and storage, scraping `targets`
    ("host:port" of /metrics endpoints) every `scrape_interval`. `query` runs an instant query
    through the HTTP API (/api/v1/query) and returns its result list."""

    def __init__(self, targets, workdir, scrape_interval="1s", ready_timeout=60.0):
        import json  # pylint: disable=import-outside-toplevel
        os.makedirs(workdir, exist_ok=True)
        self.config_path = os.path.join(workdir, "prometheus.yml")
        # JSON is YAML: no YAML library needed.
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [{
                "job_name": "loraserve",
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
            }],
        }
        with open(self.config_path, "w", encoding="utf-8") as f:
            json.dump(config, f)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, "prometheus.log")
        self._log = open(self.log_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [PROMETHEUS, f"--config.file={self.config_path}",
             f"--storage.tsdb.path={os.path.join(workdir, 'data')}",
             f"--web.listen-address={self.address}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("prometheus did not become ready:\n" + self.log())
            time.sleep(0.2)

    def _get(self, path):
        import urllib.request  # pylint: disable=import-outside-toplevel
        with urllib.request.urlopen(f"http://{self.address}{path}", timeout=10) as resp:
            return resp.read().decode()

    def _ready(self):
        try:
            self._get("/-/ready")
            return True
        except OSError:
            return False

    def query(self, expr):
        """The result list of an instant query (raises on an API error)."""
        import json  # pylint: disable=import-outside-toplevel
        import urllib.parse  # pylint: disable=import-outside-toplevel
        body = json.loads(self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        return body["data"]["result"]

    def wait_for(self, expr, timeout=30.0):
        """Polls `expr` until it has at least one sample; returns the result list."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    def targets_up(self):
        return [r for r in self.query("up") if r["value"][1] == "1"]

    def log(self):
        self._log.flush()
        with open(self.log_path, encoding="utf-8") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def prometheus_factory(tmp_path):
    """Starts Prometheus servers scraping the given targets; stops them at the end."""
    started = []

    def start(targets, **kwargs):
        p = PrometheusProcess(targets, str(tmp_path / f"prometheus{len(started)}"), **kwargs)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def scrape_metrics(address):
    """The text of http://address/metrics."""
    import urllib.request  # pylint: disable=import-outside-toplevel
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        return resp.read().decode()


def parse_metrics(text):
    """{(name, frozenset of (label, value)): value} from the Prometheus text format (the subset
    prometheus-cpp writes: no timestamps, no escaped quotes inside label values)."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        if not m:
            continue
        labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"', m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def metric_value(samples, name, **labels):
    """The sample of `name` with exactly `labels`; None when absent."""
    return samples.get((name, frozenset(labels.items())))
