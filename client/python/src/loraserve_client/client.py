"""The loraserve client: generation, streaming, tokenization and adapter administration.

A thin layer over the generated stubs (`loraserve.v1`): it fills requests from keyword
arguments, attaches credentials, turns gRPC errors into LoraserveError subclasses, and returns
small dataclasses for generation and the API's own messages (AdapterInfo, LoadReport, ...)
for everything else. The full API contract is in proto/loraserve/v1/*.proto.
"""
import dataclasses
import hashlib
import os
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import grpc

from loraserve.v1 import (adapter_pb2, admin_pb2, admin_pb2_grpc, inference_pb2,
                          inference_pb2_grpc)

from .errors import LoraserveError, VersionMismatchError, from_rpc_error

# UploadChunk.data holds at most 1 MiB.
MAX_CHUNK_BYTES = 1 << 20
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

Prompt = Union[str, Sequence[int]]
Metadata = Tuple[Tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token counts of one request."""
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Completion:
    """The result of generate()."""
    text: str
    token_ids: List[int]
    finish_reason: str  # "length", "eos", "stop_token" or "stop_string"
    request_id: str
    adapter_id: str  # "" for the base model
    adapter_version: str  # the version that served the request ("" for the base model)
    usage: Usage
    seed: int
    response: inference_pb2.GenerateResponse  # everything else (timings, logprobs, ...)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One message of a stream(). The first (header) chunk has adapter_id/adapter_version and
    the prompt's usage; the last has finish_reason and the final usage; the ones between
    carry text and token ids."""
    text: str
    token_ids: List[int]
    finish_reason: Optional[str]  # None except on the last chunk
    request_id: str
    adapter_id: Optional[str]  # on the header and final chunks ("" = base model), else None
    adapter_version: Optional[str]  # idem: the version serving the request
    usage: Optional[Usage]  # header and final chunk
    chunk: inference_pb2.GenerateChunk


def _finish_reason(value: int) -> str:
    name = inference_pb2.FinishReason.Name(value)
    return name[len("FINISH_REASON_"):].lower()


def _usage(message) -> Usage:
    return Usage(message.prompt_tokens, message.completion_tokens)


def file_sha256(path: str, progress: Optional[Callable[[int, int], None]] = None) -> str:
    """Lowercase hex SHA-256 of a file."""
    return _hash_folder_file(path, [], progress)


def _hash_folder_file(path, extra_digests, progress):
    digest = hashlib.sha256()
    total = os.path.getsize(path)
    done = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(MAX_CHUNK_BYTES)
            if not block:
                break
            digest.update(block)
            for d in extra_digests:
                d.update(block)
            done += len(block)
            if progress:
                progress(done, total)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class LocalAdapter:
    """A PEFT adapter folder as an upload sends it."""
    config: bytes
    config_sha256: str
    weights_path: str
    weights_bytes: int
    weights_sha256: str
    version: str  # sha256(config || 0x00 || weights), as the server computes it


def read_adapter_folder(path: str) -> LocalAdapter:
    """Reads adapter_config.json and hashes adapter_model.safetensors in one pass."""
    config_path = os.path.join(path, CONFIG_FILE)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        for pickle_name in ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth"):
            if os.path.exists(os.path.join(path, pickle_name)):
                raise ValueError(f"{path} has {pickle_name} but no {WEIGHTS_FILE}; loraserve "
                                 "never loads pickles: save with PEFT's save_pretrained(..., "
                                 "safe_serialization=True)")
        raise FileNotFoundError(f"{weights_path} does not exist")
    with open(config_path, "rb") as f:
        config = f.read()
    version = hashlib.sha256(config + b"\0")
    weights_sha256 = _hash_folder_file(weights_path, [version], None)
    return LocalAdapter(config=config, config_sha256=hashlib.sha256(config).hexdigest(),
                        weights_path=weights_path, weights_bytes=os.path.getsize(weights_path),
                        weights_sha256=weights_sha256, version=version.hexdigest())


def adapter_version(path: str) -> str:
    """The version loraserve reports for the adapter in folder `path`."""
    return read_adapter_folder(path).version


class Stream:
    """An iterator of Chunks from stream(). cancel() ends the call; iteration then raises
    CancelledError. After the last chunk, `final` is that chunk."""

    def __init__(self, call):
        self._call = call
        self.final: Optional[Chunk] = None

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        try:
            message = next(self._call)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        header = message.HasField("adapter")
        chunk = Chunk(
            text=message.text, token_ids=list(message.token_ids),
            finish_reason=(_finish_reason(message.finish_reason)
                           if message.finish_reason else None),
            request_id=message.request_id,
            adapter_id=message.adapter.id if header else None,
            adapter_version=message.adapter.version if header else None,
            usage=_usage(message.usage) if message.HasField("usage") else None,
            chunk=message)
        if chunk.finish_reason is not None:
            self.final = chunk
        return chunk

    def cancel(self) -> None:
        self._call.cancel()


class Client:
    """A connection to one loraserve server.

    target: host:port of the server. admin_target: host:port of the Admin service when the
    server listens for it separately (--admin_address); default `target`.
    api_key: sent as `authorization: Bearer <key>` on inference calls (servers with
    --inference_keys_file). admin_token: sent the same way on admin calls (--admin_token_file).
    credentials: grpc.ssl_channel_credentials(...) for TLS / mutual TLS; None: plaintext.
    timeout: default deadline of each call in seconds (None: no deadline); every method also
    takes `timeout`.
    """

    def __init__(self, target: str, api_key: Optional[str] = None,
                 admin_token: Optional[str] = None,
                 credentials: Optional[grpc.ChannelCredentials] = None,
                 admin_target: Optional[str] = None, timeout: Optional[float] = 60.0,
                 options: Sequence[Tuple[str, object]] = ()):
        channel_options = [("grpc.max_receive_message_length", 64 << 20), *options]

        def open_channel(address):
            if credentials is not None:
                return grpc.secure_channel(address, credentials, options=channel_options)
            return grpc.insecure_channel(address, options=channel_options)

        self._channel = open_channel(target)
        self._admin_channel = (self._channel if not admin_target or admin_target == target
                               else open_channel(admin_target))
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._admin_channel)
        self._inference_md: Metadata = ((("authorization", f"Bearer {api_key}"),)
                                        if api_key else ())
        self._admin_md: Metadata = ((("authorization", f"Bearer {admin_token}"),)
                                    if admin_token else ())
        self._timeout = timeout

    # ---- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()
        if self._admin_channel is not self._channel:
            self._admin_channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers --------------------------------------------------------------------------

    def _deadline(self, timeout):
        return self._timeout if timeout is None else timeout

    def _call(self, method, request, metadata, timeout):
        try:
            return method(request, metadata=metadata, timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    @staticmethod
    def _generate_request(prompt: Prompt, adapter: str, max_tokens: Optional[int],
                          temperature: Optional[float], top_p: Optional[float], top_k: int,
                          seed: Optional[int], stop: Sequence[str], ignore_eos: bool,
                          request_id: Optional[str], adapter_version: Optional[str],
                          return_token_ids: bool) -> inference_pb2.GenerateRequest:
        request = inference_pb2.GenerateRequest(
            adapter_id=adapter or "", adapter_version=adapter_version or "",
            request_id=request_id or "")
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(int(i) for i in prompt)
        sampling = request.sampling
        sampling.SetInParent()
        if temperature is not None:
            sampling.temperature = temperature
        if top_p is not None:
            sampling.top_p = top_p
        sampling.top_k = top_k
        if seed is not None:
            sampling.seed = seed
        stopping = request.stopping
        stopping.SetInParent()
        if max_tokens is not None:
            stopping.max_new_tokens = max_tokens
        stopping.stop_strings.extend(stop)
        stopping.ignore_eos = ignore_eos
        request.output.return_token_ids = return_token_ids
        return request

    # ---- inference ------------------------------------------------------------------------

    def generate(self, prompt: Prompt, adapter: str = "", *, max_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, top_p: Optional[float] = None,
                 top_k: int = 0, seed: Optional[int] = None, stop: Sequence[str] = (),
                 ignore_eos: bool = False, request_id: Optional[str] = None,
                 adapter_version: Optional[str] = None, return_token_ids: bool = True,
                 timeout: Optional[float] = None) -> Completion:
        """Generates a completion of `prompt` (text, or a sequence of token ids) with
        `adapter` ("" = the base model). Unset sampling arguments take the server's defaults
        (temperature 1; temperature=0 is greedy)."""
        request = self._generate_request(prompt, adapter, max_tokens, temperature, top_p, top_k,
                                         seed, stop, ignore_eos, request_id, adapter_version,
                                         return_token_ids)
        r = self._call(self._inference.Generate, request, self._inference_md, timeout)
        return Completion(text=r.text, token_ids=list(r.token_ids),
                          finish_reason=_finish_reason(r.finish_reason), request_id=r.request_id,
                          adapter_id=r.adapter.id, adapter_version=r.adapter.version,
                          usage=_usage(r.usage), seed=r.seed, response=r)

    def stream(self, prompt: Prompt, adapter: str = "", *, max_tokens: Optional[int] = None,
               temperature: Optional[float] = None, top_p: Optional[float] = None,
               top_k: int = 0, seed: Optional[int] = None, stop: Sequence[str] = (),
               ignore_eos: bool = False, request_id: Optional[str] = None,
               adapter_version: Optional[str] = None, return_token_ids: bool = True,
               timeout: Optional[float] = None) -> Stream:
        """Like generate(), but returns the chunks as the server produces them. The text of all
        chunks joined equals generate()'s text."""
        request = self._generate_request(prompt, adapter, max_tokens, temperature, top_p, top_k,
                                         seed, stop, ignore_eos, request_id, adapter_version,
                                         return_token_ids)
        call = self._inference.GenerateStream(request, metadata=self._inference_md,
                                              timeout=self._deadline(timeout))
        return Stream(call)

    def tokenize(self, text: str, add_special_tokens: Optional[bool] = None,
                 parse_special: Optional[bool] = None,
                 timeout: Optional[float] = None) -> List[int]:
        """Token ids of `text` with the base model's tokenizer."""
        options = inference_pb2.TokenizeOptions()
        if add_special_tokens is not None:
            options.add_special_tokens = add_special_tokens
        if parse_special is not None:
            options.parse_special = parse_special
        r = self._call(self._inference.Tokenize,
                       inference_pb2.TokenizeRequest(text=text, options=options),
                       self._inference_md, timeout)
        return list(r.token_ids)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: Optional[bool] = None,
                   timeout: Optional[float] = None) -> str:
        """The text of `token_ids`, as a generation would decode it."""
        request = inference_pb2.DetokenizeRequest(token_ids=list(token_ids))
        if skip_special_tokens is not None:
            request.skip_special_tokens = skip_special_tokens
        return self._call(self._inference.Detokenize, request, self._inference_md, timeout).text

    def model_info(self, timeout: Optional[float] = None) -> inference_pb2.GetModelInfoResponse:
        """The server, model, tokenizer, backend, pools and current load."""
        return self._call(self._inference.GetModelInfo, inference_pb2.GetModelInfoRequest(),
                          self._inference_md, timeout)

    # ---- admin ----------------------------------------------------------------------------

    def load_adapter(self, adapter_id: str,
                     timeout: Optional[float] = None) -> admin_pb2.LoadAdapterResponse:
        """Loads, reloads or re-enables the adapter folder `adapter_id` under the server's
        adapter root; the response has the adapter and the load report."""
        return self._call(self._admin.LoadAdapter,
                          admin_pb2.LoadAdapterRequest(adapter_id=adapter_id), self._admin_md,
                          timeout)

    def upload_adapter(self, path: str, adapter_id: str, replace: bool = False,
                       load: bool = True, *, validate_only: bool = False,
                       chunk_bytes: int = MAX_CHUNK_BYTES,
                       progress: Optional[Callable[[int, int], None]] = None,
                       timeout: Optional[float] = None) -> admin_pb2.UploadAdapterResponse:
        """Uploads the PEFT folder `path` (adapter_config.json, adapter_model.safetensors) as
        `adapter_id`, in chunks of at most 1 MiB, and checks that the server stored the version
        of the local files (VersionMismatchError otherwise).

        replace: replace an existing adapter with other content (else ALREADY_EXISTS).
        load: enable it once stored (False stores a new id disabled).
        progress: called with (bytes sent, total bytes) after each chunk.
        Uploading a version the server already holds returns at once (report.unchanged)."""
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
        local = read_adapter_folder(path)
        total = len(local.config) + local.weights_bytes
        header = admin_pb2.UploadHeader(
            adapter_id=adapter_id, replace_existing=replace, load=load, version=local.version,
            validate_only=validate_only, files=[
                admin_pb2.UploadFileInfo(file=admin_pb2.ADAPTER_FILE_CONFIG,
                                         size_bytes=len(local.config),
                                         sha256=local.config_sha256),
                admin_pb2.UploadFileInfo(file=admin_pb2.ADAPTER_FILE_WEIGHTS,
                                         size_bytes=local.weights_bytes,
                                         sha256=local.weights_sha256)])

        def messages() -> Iterable[admin_pb2.UploadAdapterRequest]:
            yield admin_pb2.UploadAdapterRequest(header=header)
            sent = 0
            for offset in range(0, len(local.config), chunk_bytes):
                data = local.config[offset:offset + chunk_bytes]
                yield admin_pb2.UploadAdapterRequest(chunk=admin_pb2.UploadChunk(
                    file=admin_pb2.ADAPTER_FILE_CONFIG, offset=offset, data=data))
                sent += len(data)
                if progress:
                    progress(sent, total)
            with open(local.weights_path, "rb") as f:
                offset = 0
                while offset < local.weights_bytes:
                    data = f.read(min(chunk_bytes, local.weights_bytes - offset))
                    if not data:
                        # The file shrank after hashing; the server then refuses the upload
                        # (fewer bytes than declared) and stores nothing.
                        return
                    yield admin_pb2.UploadAdapterRequest(chunk=admin_pb2.UploadChunk(
                        file=admin_pb2.ADAPTER_FILE_WEIGHTS, offset=offset, data=data))
                    offset += len(data)
                    sent += len(data)
                    if progress:
                        progress(sent, total)

        response = self._call(self._admin.UploadAdapter, messages(), self._admin_md, timeout)
        stored = response.report.version or response.adapter.version
        if stored != local.version:
            raise VersionMismatchError(
                f"the server reports version {stored!r} for {adapter_id} but the local files "
                f"have version {local.version}", local_version=local.version,
                server_version=stored)
        return response

    def unload_adapter(self, adapter_id: str, force: bool = False,
                       timeout: Optional[float] = None) -> adapter_pb2.AdapterInfo:
        """Disables the adapter: new requests get NOT_FOUND; running ones finish. A pinned
        adapter is FAILED_PRECONDITION unless `force`."""
        return self._call(self._admin.UnloadAdapter,
                          admin_pb2.UnloadAdapterRequest(adapter_id=adapter_id, force=force),
                          self._admin_md, timeout).adapter

    def delete_adapter(self, adapter_id: str, force: bool = False,
                       timeout: Optional[float] = None) -> admin_pb2.DeleteAdapterResponse:
        """Removes the adapter's files (force: also when it is enabled)."""
        return self._call(self._admin.DeleteAdapter,
                          admin_pb2.DeleteAdapterRequest(adapter_id=adapter_id, force=force),
                          self._admin_md, timeout)

    def list_adapters(self, prefix: str = "", states: Sequence[int] = (),
                      timeout: Optional[float] = None) -> List[adapter_pb2.AdapterInfo]:
        """Every adapter under the root (all pages), ascending by id; `states` filters by
        adapter_pb2.ADAPTER_STATE_* values."""
        request = admin_pb2.ListAdaptersRequest(id_prefix=prefix, states=list(states))
        adapters: List[adapter_pb2.AdapterInfo] = []
        while True:
            page = self._call(self._admin.ListAdapters, request, self._admin_md, timeout)
            adapters.extend(page.adapters)
            if not page.next_page_token:
                return adapters
            request.page_token = page.next_page_token

    def get_adapter(self, adapter_id: str,
                    timeout: Optional[float] = None) -> adapter_pb2.AdapterInfo:
        """One adapter's state, tier, version, ranks, sizes and usage."""
        return self._call(self._admin.GetAdapter,
                          admin_pb2.GetAdapterRequest(adapter_id=adapter_id), self._admin_md,
                          timeout).adapter

    def pin_adapter(self, adapter_id: str,
                    timeout: Optional[float] = None) -> adapter_pb2.AdapterInfo:
        """Makes the adapter resident and keeps it there until unpinned or unloaded."""
        return self._call(self._admin.PinAdapter,
                          admin_pb2.PinAdapterRequest(adapter_id=adapter_id), self._admin_md,
                          timeout).adapter

    def unpin_adapter(self, adapter_id: str,
                      timeout: Optional[float] = None) -> adapter_pb2.AdapterInfo:
        """Removes the pin; the adapter may then be evicted when the pool needs room."""
        return self._call(self._admin.UnpinAdapter,
                          admin_pb2.UnpinAdapterRequest(adapter_id=adapter_id), self._admin_md,
                          timeout).adapter


__all__ = ["Chunk", "Client", "Completion", "LocalAdapter", "LoraserveError", "Stream", "Usage",
           "adapter_version", "file_sha256", "read_adapter_folder"]
