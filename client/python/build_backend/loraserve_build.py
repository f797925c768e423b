"""In-tree PEP 517 build backend for loraserve-client.

It generates the gRPC/protobuf stubs from the loraserve protos with grpc_tools and writes a pure
Python wheel with the standard library (zipfile), so the package installs offline with
`pip install --no-build-isolation client/python` in an environment that has grpcio-tools but
neither setuptools' bdist_wheel nor the `wheel` package.

The wheel holds two top-level packages:
  loraserve_client/   the wrapper (src/loraserve_client)
  loraserve/v1/       the generated stubs (*_pb2.py, *_pb2_grpc.py, *_pb2.pyi). `loraserve` and
                      `loraserve.v1` are namespace packages (no __init__.py), because protoc's
                      generated code imports `from loraserve.v1 import ...`.

Where the protos come from: $LORASERVE_PROTO_DIR, else ./proto (inside an sdist), else
../../proto (the repository checkout).
"""
import base64
import csv
import hashlib
import io
import os
import sys
import tarfile
import tempfile
import zipfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "py3-none-any"


def _pyproject():
    try:
        import tomllib  # pylint: disable=import-outside-toplevel
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # pylint: disable=import-outside-toplevel
    with open(os.path.join(HERE, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _proto_dir():
    candidates = [os.environ.get("LORASERVE_PROTO_DIR", ""), os.path.join(HERE, "proto"),
                  os.path.join(HERE, "..", "..", "proto")]
    for candidate in candidates:
        if candidate and os.path.isdir(os.path.join(candidate, "loraserve", "v1")):
            return os.path.abspath(candidate)
    raise RuntimeError("loraserve protos not found: expected loraserve/v1/*.proto under "
                       "$LORASERVE_PROTO_DIR, ./proto or ../../proto (looked in "
                       f"{[c for c in candidates if c]})")


def _protos(proto_dir):
    v1 = os.path.join(proto_dir, "loraserve", "v1")
    return sorted(os.path.join("loraserve", "v1", f) for f in os.listdir(v1)
                  if f.endswith(".proto"))


def _generate_stubs(out_dir):
    """Runs protoc (grpc_tools) over the protos; returns the generated files, relative."""
    import grpc_tools  # pylint: disable=import-outside-toplevel
    from grpc_tools import protoc  # pylint: disable=import-outside-toplevel

    proto_dir = _proto_dir()
    protos = _protos(proto_dir)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={out_dir}",
                      f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos])
    if rc != 0:
        raise RuntimeError(f"protoc failed with code {rc} on {protos} in {proto_dir}")
    generated = []
    for root, _, files in os.walk(out_dir):
        for name in files:
            generated.append(os.path.relpath(os.path.join(root, name), out_dir))
    return sorted(generated)


def _runtime_floors():
    """Generated code refuses a grpcio older than the grpcio-tools that generated it, and a
    protobuf runtime older than its protoc; the wheel requires at least those."""
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    grpc_version = metadata.version("grpcio-tools")
    protobuf = metadata.version("protobuf").split(".")
    return grpc_version, ".".join(protobuf[:2])


def _dist_name(project):
    return project["name"].replace("-", "_")


def _metadata(project):
    grpc_floor, protobuf_floor = _runtime_floors()
    lines = ["Metadata-Version: 2.1", f"Name: {project['name']}",
             f"Version: {project['version']}", f"Summary: {project.get('description', '')}",
             f"Requires-Python: {project.get('requires-python', '>=3.8')}"]
    for dep in project.get("dependencies", []):
        name = dep.split(">")[0].split("=")[0].strip()
        if name == "grpcio":
            dep = f"grpcio>={grpc_floor}"
        elif name == "protobuf":
            dep = f"protobuf>={protobuf_floor}"
        lines.append(f"Requires-Dist: {dep}")
    return "\n".join(lines) + "\n"


def _record_line(path, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [path, f"sha256={digest}", str(len(data))]


def _package_files():
    """(archive path, absolute path) of the wrapper package's sources."""
    src = os.path.join(HERE, "src")
    out = []
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith((".pyc", ".pyo")):
                continue
            full = os.path.join(root, name)
            out.append((os.path.relpath(full, src).replace(os.sep, "/"), full))
    return sorted(out)


# ---- PEP 517 hooks -----------------------------------------------------------------------------

def get_requires_for_build_wheel(config_settings=None):  # pylint: disable=unused-argument
    return []


def get_requires_for_build_sdist(config_settings=None):  # pylint: disable=unused-argument
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    # pylint: disable=unused-argument
    project = _pyproject()
    dist = _dist_name(project)
    dist_info = f"{dist}-{project['version']}.dist-info"
    wheel_name = f"{dist}-{project['version']}-{TAG}.whl"
    entries = []  # (archive path, bytes)
    for arc, full in _package_files():
        with open(full, "rb") as f:
            entries.append((arc, f.read()))
    with tempfile.TemporaryDirectory(prefix="loraserve_stubs_") as out:
        for rel in _generate_stubs(out):
            with open(os.path.join(out, rel), "rb") as f:
                entries.append((rel.replace(os.sep, "/"), f.read()))
    entries.append((f"{dist_info}/METADATA", _metadata(project).encode()))
    entries.append((f"{dist_info}/WHEEL", (
        "Wheel-Version: 1.0\nGenerator: loraserve_build\nRoot-Is-Purelib: true\n"
        f"Tag: {TAG}\n").encode()))
    entries.append((f"{dist_info}/top_level.txt", b"loraserve\nloraserve_client\n"))
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for arc, data in entries:
        writer.writerow(_record_line(arc, data))
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    entries.append((f"{dist_info}/RECORD", record.getvalue().encode()))
    os.makedirs(wheel_directory, exist_ok=True)
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel_name), "w",
                         zipfile.ZIP_DEFLATED) as whl:
        for arc, data in entries:
            info = zipfile.ZipInfo(arc, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            whl.writestr(info, data)
    return wheel_name


def build_sdist(sdist_directory, config_settings=None):
    # pylint: disable=unused-argument
    """A source archive that builds without the repository: the protos are copied in."""
    project = _pyproject()
    base = f"{_dist_name(project)}-{project['version']}"
    name = f"{base}.tar.gz"
    proto_dir = _proto_dir()
    os.makedirs(sdist_directory, exist_ok=True)
    with tarfile.open(os.path.join(sdist_directory, name), "w:gz") as tar:
        for rel in ("pyproject.toml", os.path.join("build_backend", "loraserve_build.py")):
            tar.add(os.path.join(HERE, rel), arcname=f"{base}/{rel}")
        for arc, full in _package_files():
            tar.add(full, arcname=f"{base}/src/{arc}")
        for rel in _protos(proto_dir):
            tar.add(os.path.join(proto_dir, rel), arcname=f"{base}/proto/{rel}")
        info = tarfile.TarInfo(f"{base}/PKG-INFO")
        data = _metadata(project).encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return name


if __name__ == "__main__":  # python build_backend/loraserve_build.py OUT_DIR: build a wheel
    print(build_wheel(sys.argv[1] if len(sys.argv) > 1 else "dist"))
