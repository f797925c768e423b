"""Exceptions of the loraserve client: one class per gRPC status code the API documents, all
carrying the code, the server's message and (for generation calls) the request id."""
from typing import Dict, Optional, Type

import grpc


class LoraserveError(Exception):
    """A call failed. `code` is the grpc.StatusCode, `message` the server's explanation (what
    was expected and what was found; meant for people, not for parsing)."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: Optional[str] = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    @property
    def retryable(self) -> bool:
        """True for UNAVAILABLE, the one code where retrying the same call is always right."""
        return self.code == grpc.StatusCode.UNAVAILABLE


class InvalidArgumentError(LoraserveError):
    """A malformed request or an adapter that fails validation; do not retry unchanged."""


class NotFoundError(LoraserveError):
    """The adapter id is unknown or not READY (never a silent fall-back to the base model)."""


class AlreadyExistsError(LoraserveError):
    """An upload of an existing id with other content and without replace."""


class PermissionDeniedError(LoraserveError):
    """The credential is valid but may not do this (e.g. another tenant's adapter)."""


class UnauthenticatedError(LoraserveError):
    """The credential is missing, malformed or wrong."""


class ResourceExhaustedError(LoraserveError):
    """Queue full, upload over the cap or quota, pool full; retry later with backoff."""


class FailedPreconditionError(LoraserveError):
    """The server or adapter is in a state the call cannot act on."""


class UnavailableError(LoraserveError):
    """The server is starting, draining or unreachable; retry here later or elsewhere."""


class DeadlineExceededError(LoraserveError):
    """The call's deadline passed."""


class CancelledError(LoraserveError):
    """The call was cancelled."""


class DataLossError(LoraserveError):
    """Uploaded bytes did not match the digests declared in the upload header."""


class UnimplementedError(LoraserveError):
    """The server does not provide this RPC or feature."""


class VersionMismatchError(LoraserveError):
    """The server reported a different adapter version than the local files have (raised by
    the client itself after an upload; code DATA_LOSS)."""

    def __init__(self, message: str, local_version: str, server_version: str):
        super().__init__(grpc.StatusCode.DATA_LOSS, message)
        self.local_version = local_version
        self.server_version = server_version


_BY_CODE: Dict[grpc.StatusCode, Type[LoraserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}


def from_rpc_error(error: grpc.RpcError) -> LoraserveError:
    """The LoraserveError subclass for a failed gRPC call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    request_id = None
    if hasattr(error, "initial_metadata"):
        try:
            request_id = dict(error.initial_metadata() or ()).get("x-request-id")
        except Exception:  # pylint: disable=broad-except
            request_id = None  # metadata is unavailable on some failures; it is optional
    cls = _BY_CODE.get(code, LoraserveError)
    return cls(code, message or "", request_id=request_id)
