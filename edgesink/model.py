"""A loaded GGUF model: weights, vocabulary and metadata, shared by any number of sessions."""

from __future__ import annotations

import ctypes
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import _native, gguf_check
from ._native import C
from .errors import ClosedError, ModelLoadError, ModelNotFoundError, SettingsError, TextTooLongError
from .library_check import check_library
from .session import Session

LOAD_MODE_NONE, LOAD_MODE_MMAP = 0, 1  # enum llama_load_mode
# int32_t llama_tokenize(..., const char * text, int32_t text_len, llama_token * tokens, int32_t n_tokens_max, ...):
# both lengths are int32_t, and n_tokens_max is the text's length + 2.
MAX_TOKENIZE_BYTES = 2**31 - 1 - 2
CPU_BACKENDS = ("CPU", "BLAS", "RPC")  # backends whose presence means no GPU of this machine
# What llama.cpp logs while loading, the only place it says where the layers went.
USING_DEVICE = re.compile(r"using device (\S+) \((.*?)\) \(")
OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


@dataclass(frozen=True)
class Offload:
    """Where a model's layers went: the devices llama.cpp used and how many layers it offloaded."""

    devices: tuple[str, ...]  # ggml device names ("Vulkan0", "CUDA0"); empty: every layer on the CPU
    descriptions: tuple[str, ...]
    layers: int  # layers offloaded (the output layer counts as one)
    of: int  # layers that could be

    @property
    def on_gpu(self) -> bool:
        """Whether layers went to a device other than the CPU (``device="CPU"`` names the CPU itself)."""
        return self.layers > 0 and any(not d.startswith("CPU") for d in self.devices)

    def __str__(self) -> str:
        if not self.on_gpu:
            return "CPU"
        return f"{self.layers}/{self.of} layers on {', '.join(f'{d} ({x})' for d, x in zip(self.devices, self.descriptions))}"


class Model:
    """Weights loaded once; each :meth:`session` gets its own KV cache on top of them.

    ``edgesink.load`` makes one from a path, a registry name or a Hub spec; ``Model(path)`` takes
    a local file only. Close it (or use it as a context manager) to free the weights;
    sessions still open on it are closed first.
    """

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = -1, use_mmap: bool = True,
                 check: str = "full", device: str | None = None):
        """``check``: ``"full"`` (default) checks the GGUF header in Python, then lets llama.cpp load
        the file once in a child process (remembered per file content), so a file that would abort
        llama.cpp raises ModelLoadError instead of killing this process; ``"header"`` only the
        Python check; ``"none"`` trusts the file. See :mod:`edgesink.gguf_check`.

        Whatever ``check``, the file is hashed here (once per file version, then remembered):
        :attr:`sha256` and saved sessions describe the bytes loaded, even if the file later changes.

        ``n_gpu_layers`` (-1: all) go to ``device`` (a ggml device name, ``Vulkan0``, ``CUDA1``: see
        ``edgesink info``), or by default to the GPUs llama.cpp finds. :attr:`offload` says where they
        went; a GPU build that found no usable GPU warns that the model runs on the CPU.
        """
        self._model = None
        self._contexts: dict = {}  # each session's cache on these weights -> that session's lock
        self.path = Path(path)
        if check not in ("full", "header", "none"):
            raise SettingsError(f"check must be 'full', 'header' or 'none', got {check!r}")
        if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int):
            raise SettingsError(f"n_gpu_layers must be an integer (-1: all layers), got {n_gpu_layers!r}")
        if self.path.is_dir():
            raise ModelLoadError(f"{self.path} is a directory, not a GGUF model file")
        if not self.path.exists():
            raise ModelNotFoundError(f"no model file at {self.path}")
        identity = _file_identity(self.path)
        if check != "none":
            gguf_check.check_gguf(self.path)
        self._sha256: str = gguf_check.file_sha256(self.path)
        if check == "full":
            gguf_check.probe_once(self.path, self._sha256)
        check_library()
        _native.warn_if_stock()
        params = C.llama_model_default_params()
        # -1 means "every layer": llama.cpp clamps it to the model's layer count.
        params.n_gpu_layers = 2**31 - 1 if n_gpu_layers < 0 else n_gpu_layers
        params.load_mode = LOAD_MODE_MMAP if use_mmap else LOAD_MODE_NONE
        self._devices = _device_list(device)  # NULL-terminated; kept alive while llama.cpp may read it
        if self._devices is not None:
            params.devices = ctypes.cast(self._devices, ctypes.c_void_p)  # declared void * by the bindings
        with _native.captured_log() as log:
            self._model = C.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {self.path}: not a valid GGUF model it supports")
        self.offload: Offload = _offload_from_log(log)
        if n_gpu_layers != 0:
            _warn_if_cpu_only(self.offload)
        if _file_identity(self.path) != identity:  # the hash would not describe what llama.cpp read
            C.llama_model_free(self._model)
            self._model = None
            raise ModelLoadError(f"{self.path} changed while it was being loaded; load it again")
        self._vocab_ptr = C.llama_model_get_vocab(self._model)
        self.n_vocab: int = C.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train: int = C.llama_model_n_ctx_train(self._model)
        self.n_layer: int = C.llama_model_n_layer(self._model)
        self.n_swa: int = C.llama_model_n_swa(self._model)
        self.architecture: str = self.metadata("general.architecture") or "unknown"
        self.add_bos: bool = bool(C.llama_vocab_get_add_bos(self._vocab))
        self.bos_token: int = C.llama_vocab_bos(self._vocab)
        self._piece_cache: dict[int, bytes] = {}

    # -- lifetime -----------------------------------------------------------------------------

    @property
    def handle(self):
        """The ``llama_model *`` (for the engine; ClosedError once closed)."""
        self.check_open()
        return self._model

    @property
    def _vocab(self):
        """The ``llama_vocab *``, which lives inside the weights: ClosedError once they are freed."""
        self.check_open()
        return self._vocab_ptr

    def check_open(self) -> None:
        """Raise :class:`ClosedError` if the weights were freed."""
        if not self._model:
            raise ClosedError("this model is closed")

    def close(self) -> None:
        """Free the weights, after closing every session still open on them. Idempotent.

        Afterwards every method that needs the weights or the vocabulary (tokenize, detokenize,
        metadata, session, ...) and every method of those sessions raises :class:`ClosedError`;
        what was read at load (``path``, ``n_vocab``, ``architecture``, ...) stays readable.
        """
        if getattr(self, "_model", None):
            for cache, lock in list(self._contexts.items()):
                with lock:  # waits for a step another thread is running on that session
                    cache.close()
            self._contexts.clear()
            C.llama_model_free(self._model)
            self._model = None

    def attach(self, cache, lock) -> None:
        """Register a context built on these weights (anything with ``close()``), to be closed,
        holding ``lock``, before the weights are freed: a context never outlives its model."""
        self.check_open()
        self._contexts[cache] = lock

    def detach(self, cache) -> None:
        """Forget a context registered with :meth:`attach` (it was closed by its owner)."""
        self._contexts.pop(cache, None)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    def session(self, **options) -> Session:
        """A new streaming session on this model; options as :class:`edgesink.Session`.

        Closing the model closes its sessions first (their use then raises :class:`ClosedError`).
        """
        self.check_open()
        return Session(self, **options)

    # -- metadata -----------------------------------------------------------------------------

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as text, or None when the key is absent."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = C.llama_model_meta_val_str(self.handle, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    @property
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template from its metadata, if it has one."""
        raw = C.llama_model_chat_template(self.handle, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    @property
    def sha256(self) -> str:
        """The sha256 of the file as it was loaded (computed at load: the file may since be gone)."""
        return self._sha256

    @property
    def size_bytes(self) -> int:
        return int(C.llama_model_size(self.handle))

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        C.llama_model_desc(self.handle, buf, 256)
        return buf.value.decode("utf-8", errors="replace")

    # -- vocabulary ---------------------------------------------------------------------------

    def tokenize(self, text: str | bytes, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``.

        ``special=False`` (the default) keeps strings such as ``<|im_start|>`` literal text, so
        user input can never inject control tokens; only chat templates pass ``special=True``.
        """
        if isinstance(text, str):
            _check_tokenize_length(len(text))  # UTF-8 is never shorter: refuse before encoding
            data = text.encode("utf-8", errors="replace")
        elif isinstance(text, (bytes, bytearray, memoryview)):
            _check_tokenize_length(memoryview(text).nbytes)  # before copying
            data = bytes(text)
        else:
            raise ValueError(f"tokenize takes str or bytes, got {type(text).__name__}")
        _check_tokenize_length(len(data))
        n_max = len(data) + 2
        while True:
            buf = (C.llama_token * n_max)()
            n = C.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, special)
            if n >= 0:
                return list(buf[:n])
            n_max = -n

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (may be part of a multi-byte character)."""
        self.check_open()  # even when remembered: a closed model answers nothing
        piece = self._piece_cache.get(token)
        if piece is None:
            self.check_token(token)
            buf = ctypes.create_string_buffer(64)
            n = C.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            piece = self._piece_cache[token] = buf.raw[:n]
        return piece

    def token_text(self, token: int) -> str:
        """A token as text, control tokens included (``<|im_end|>``), for templates."""
        self.check_token(token)
        buf = ctypes.create_string_buffer(256)
        n = C.llama_token_to_piece(self._vocab, token, buf, 256, 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", errors="replace")

    def detokenize(self, tokens) -> str:
        """Text of a token sequence (invalid UTF-8 replaced)."""
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self._vocab, token))

    def check_token(self, token: int) -> None:
        if not 0 <= int(token) < self.n_vocab:
            raise ValueError(f"token id {token} is out of range: this model's vocabulary has {self.n_vocab} tokens")


def _check_tokenize_length(n_bytes: int) -> None:
    if n_bytes > MAX_TOKENIZE_BYTES:
        raise TextTooLongError(f"cannot tokenize {n_bytes} bytes of text at once (llama.cpp's limit is "
                               f"{MAX_TOKENIZE_BYTES}); split it, or stream it with Session.feed")


def _file_identity(path: Path) -> tuple | None:
    """What changes whenever a file's bytes do: device, inode, size, modification and change time."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)



def _device_list(name: str | None):
    """``ggml_backend_dev_t[]`` holding the named device and NULL, or None (llama.cpp's default choice)."""
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise SettingsError(f"device must be a device name such as 'Vulkan0' (see edgesink info), got {name!r}")
    handle = _native.device_handle(name)
    if not handle:
        known = ", ".join(d["name"] for d in _native.devices()) or "none"
        raise SettingsError(f"no device named {name!r} here; the devices are: {known} (edgesink info lists them)")
    return (ctypes.c_void_p * 2)(handle, None)


def _offload_from_log(lines: list[str]) -> Offload:
    """Where the layers went, read from llama.cpp's log of the load."""
    used = [m.groups() for m in map(USING_DEVICE.search, lines) if m]
    counts = [m for m in map(OFFLOADED.search, lines) if m]
    layers, of = (int(counts[-1].group(1)), int(counts[-1].group(2))) if counts else (0, 0)
    return Offload(tuple(d for d, _ in used), tuple(x for _, x in used), layers if used else 0, of)


def _warn_if_cpu_only(offload: Offload) -> None:
    """A GPU build asked for GPU layers that all stayed on the CPU: say so, never silently."""
    gpu_backends = [b for b in _native.backends() if b not in CPU_BACKENDS]
    if gpu_backends and not offload.on_gpu:
        hint = (" A CPU-type Vulkan device (Mesa's lavapipe) is used only when asked for: "
                "GGML_VK_VISIBLE_DEVICES=0." if "Vulkan" in gpu_backends else "")
        warnings.warn(f"edgesink: this library has the {', '.join(gpu_backends)} backend but found no device it "
                      f"could use, so every layer runs on the CPU.{hint}", RuntimeWarning, stacklevel=3)
