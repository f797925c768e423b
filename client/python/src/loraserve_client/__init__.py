"""Python client for loraserve.

    from loraserve_client import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate("Hello", adapter="my-adapter", max_tokens=16).text)
        for chunk in client.stream("Hello", max_tokens=16):
            print(chunk.text, end="", flush=True)

The generated stubs are importable as `loraserve.v1.inference_pb2` etc. See docs/client.md.
"""
from .client import (MAX_CHUNK_BYTES, Chunk, Client, Completion, LocalAdapter, Stream, Usage,
                     adapter_version, file_sha256, read_adapter_folder)
from .errors import (AlreadyExistsError, CancelledError, DataLossError, DeadlineExceededError,
                     FailedPreconditionError, InvalidArgumentError, LoraserveError, NotFoundError,
                     PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError,
                     UnavailableError, UnimplementedError, VersionMismatchError, from_rpc_error)

__version__ = "0.1.0"

__all__ = [
    "MAX_CHUNK_BYTES", "AlreadyExistsError", "CancelledError", "Chunk", "Client", "Completion",
    "DataLossError", "DeadlineExceededError", "FailedPreconditionError", "InvalidArgumentError",
    "LocalAdapter", "LoraserveError", "NotFoundError", "PermissionDeniedError",
    "ResourceExhaustedError", "Stream", "UnauthenticatedError", "UnavailableError",
    "UnimplementedError", "Usage", "VersionMismatchError", "adapter_version", "file_sha256",
    "from_rpc_error", "read_adapter_folder",
]
