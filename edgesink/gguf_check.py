"""Checking a GGUF model file before llama.cpp loads it into this process.

llama.cpp turns most broken files into an error return, but some reach an assertion that aborts
the whole process (measured on the pinned llama.cpp with ``tests/craft_gguf.py``: 6 of 46 crafted
cases, all semantic: ``block_count`` 0 or above 512, ``nextn_predict_layers`` above the layer
count, an expert count above 1024, experts used without experts, an unknown rope scaling type).
Two defences, in this order:

1. :func:`check_gguf`, pure Python: every structural rule of ggml's ``gguf.cpp`` (magic, version,
   counts, lengths, types, dimensions, alignment, offsets), the tensor data against the file size,
   the tokenizer arrays and end-of-sequence id, and the hyper-parameters that llama.cpp asserts on
   for every architecture. It reads only the header (about 25 ms for the 98 MB default model,
   most of it walking the 49,152 tokens and 48,900 merges) and names the cause.
2. :func:`probe_load`: llama.cpp itself loads the file in a child process, without reading the
   weights (``no_alloc``), builds a small context and tokenizes a line, so an assertion in
   per-architecture code (157 architecture files hold some 560 of them) kills the child, not us.
   About 0.5 s (0.35 s of it starting Python), so the verdict is remembered per file content (its
   sha256, which loading computes anyway) and library, and paid once. The child runs isolated
   (``python -I``, in the package's folder): code where the user stands (a ``json.py``, an
   ``edgesink/`` folder) is never imported, so it can neither run nor fake a verdict.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import _native
from ._native import C
from .child import CWD, child_env, isolated_python, library_file
from .errors import ModelLoadError
from .filecache import cache_dir, cached_sha256, write_json_cache

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3  # the newest version the pinned llama.cpp reads
MAX_STRING = 1 << 30  # GGUF_MAX_STRING_LENGTH
MAX_ARRAY = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS
MAX_NAME = 64  # GGML_MAX_NAME: tensor names are shorter
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
NO_VOCAB = ("none", "no_vocab")

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FORMATS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<b",
            U64: "<Q", I64: "<q", F64: "<d"}
_SIZES = {t: struct.calcsize(f) for t, f in _FORMATS.items()}
_INTEGER = {U8, I8, U16, I16, U32, I32, U64, I64}
TYPE_NAMES = {U8: "u8", I8: "i8", U16: "u16", I16: "i16", U32: "u32", I32: "i32", F32: "f32", BOOL: "bool",
              STR: "str", ARR: "array", U64: "u64", I64: "i64", F64: "f64"}

# ggml type -> (block size, bytes per block), as the pinned ggml reports them (a test compares).
GGML_TYPES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
    42: (64, 18),
}


@dataclass(frozen=True)
class ArrayInfo:
    """An array value, summarised: its item type and length (items are not kept)."""

    item_type: int
    length: int


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to the data section
    nbytes: int


@dataclass
class GgufInfo:
    """What :func:`check_gguf` read from a file's header."""

    version: int
    alignment: int
    data_offset: int
    file_size: int
    metadata: dict = field(default_factory=dict)  # scalars and strings; arrays as ArrayInfo
    value_types: dict = field(default_factory=dict)  # key -> GGUF type of the value
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None


class _Bad(Exception):
    """A reason the file is refused (turned into ModelLoadError with the path)."""


class _Reader:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _Bad(f"truncated: {what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")

    def scalar(self, vtype: int, what: str):
        n = _SIZES[vtype]
        self.need(n, what)
        value = struct.unpack_from(_FORMATS[vtype], self.buf, self.pos)[0]
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar(U32, what)

    def string_length(self, what: str) -> int:
        n = self.scalar(U64, f"the length of {what}")
        if n > MAX_STRING:
            raise _Bad(f"{what} claims a length of {n} bytes (llama.cpp's limit is {MAX_STRING})")
        self.need(n, what)
        return n

    def string(self, what: str) -> str:
        n = self.string_length(what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int, what: str) -> None:
        buf, pos, size = self.buf, self.pos, self.size
        unpack = struct.Struct("<Q").unpack_from
        for i in range(count):
            if size - pos < 8:
                self.pos = pos
                raise _Bad(f"truncated: {what}[{i}] at byte {pos} runs past the end of the file ({size} bytes)")
            n = unpack(buf, pos)[0]
            if n > MAX_STRING or n > size - pos - 8:
                self.pos = pos
                raise _Bad(f"{what}[{i}] claims a length of {n} bytes, past the end of the file")
            pos += 8 + n
        self.pos = pos


def check_gguf(path: "str | os.PathLike") -> GgufInfo:
    """Read and check the header of a GGUF file; raise :class:`ModelLoadError` naming the cause."""
    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not a GGUF model file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelLoadError(f"{path} is empty, not a GGUF model file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                try:
                    return _parse(buf, size)
                except _Bad as e:
                    raise ModelLoadError(f"{path} is not a usable GGUF model: {e}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from e


def _parse(buf, size: int) -> GgufInfo:
    r = _Reader(buf, size)
    r.need(4, "the magic")
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise _Bad(f"not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
    r.pos = 4
    version = r.u32("the version")
    if version == 0 or version == 1 or (version & 0xFFFF) == 0 or version > GGUF_VERSION:
        why = {0: "is invalid", 1: "is no longer supported"}.get(version, "is not supported")
        if version and (version & 0xFFFF) == 0:
            why = "is not supported (a file of the other byte order?)"
        raise _Bad(f"GGUF version {version} {why}; this llama.cpp reads versions 2 to {GGUF_VERSION}")
    n_tensors = r.scalar(I64, "the tensor count")
    n_kv = r.scalar(I64, "the metadata count")
    # Each tensor info takes at least 24 bytes, each metadata pair at least 13: bound the counts by the file.
    if not 0 <= n_tensors <= (size - r.pos) // 24:
        raise _Bad(f"tensor count {n_tensors} is impossible for a file of {size} bytes")
    if not 0 <= n_kv <= (size - r.pos) // 13:
        raise _Bad(f"metadata count {n_kv} is impossible for a file of {size} bytes")
    info = GgufInfo(version=version, alignment=DEFAULT_ALIGNMENT, data_offset=0, file_size=size)
    for i in range(n_kv):
        _read_kv(r, info, i)
    _check_alignment(info)
    _read_tensor_infos(r, info, n_tensors)
    _check_tensor_data(r, info)
    _check_semantics(info)
    return info


def _read_kv(r: _Reader, info: GgufInfo, i: int) -> None:
    key = r.string(f"metadata key {i}")
    if not key:
        raise _Bad(f"metadata key {i} is empty")
    if key in info.metadata:
        raise _Bad(f"duplicate metadata key {key!r}")
    vtype = r.u32(f"the type of {key}")
    if vtype == STR:
        value = r.string(key)
    elif vtype == ARR:
        item_type = r.u32(f"the item type of {key}")
        n = r.scalar(U64, f"the length of {key}")
        if item_type not in _SIZES and item_type != STR:
            raise _Bad(f"array {key} has an invalid item type {item_type}")
        if n > MAX_ARRAY:
            raise _Bad(f"array {key} claims a length of {n} items (llama.cpp's limit is {MAX_ARRAY})")
        if item_type == STR:
            r.skip_strings(n, key)
        else:
            r.need(n * _SIZES[item_type], f"array {key} ({n} items)")
            r.pos += n * _SIZES[item_type]
        value = ArrayInfo(item_type, n)
    elif vtype in _SIZES:
        value = r.scalar(vtype, key)
    else:
        raise _Bad(f"metadata {key!r} has an invalid value type {vtype}")
    info.metadata[key] = value
    info.value_types[key] = vtype


def _check_alignment(info: GgufInfo) -> None:
    if "general.alignment" not in info.metadata:
        return
    if info.value_types["general.alignment"] != U32:
        raise _Bad(f"general.alignment must be a u32, not {TYPE_NAMES[info.value_types['general.alignment']]}")
    a = info.metadata["general.alignment"]
    if a == 0 or a & (a - 1):
        raise _Bad(f"general.alignment {a} is not a power of two")
    if a > info.file_size:
        raise _Bad(f"general.alignment {a} is larger than the whole file")
    info.alignment = a


def _read_tensor_infos(r: _Reader, info: GgufInfo, n_tensors: int) -> None:
    names = set()
    for i in range(n_tensors):
        name = r.string(f"the name of tensor {i}")
        if len(name.encode()) >= MAX_NAME:
            raise _Bad(f"tensor {i} has a name of {len(name.encode())} bytes (limit {MAX_NAME - 1})")
        if name in names:
            raise _Bad(f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = r.u32(f"the dimension count of {name}")
        if n_dims > MAX_DIMS:
            raise _Bad(f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
        shape = tuple(r.scalar(I64, f"a dimension of {name}") for _ in range(n_dims))
        if any(d < 0 for d in shape):
            raise _Bad(f"tensor {name} has a negative dimension {shape}")
        n_elements = 1
        for d in shape:
            n_elements *= d
        if n_elements >= 2**63:
            raise _Bad(f"tensor {name} has dimensions {shape} whose product overflows int64")
        ggml_type = r.scalar(I32, f"the type of {name}")
        if ggml_type not in GGML_TYPES:
            raise _Bad(f"tensor {name} has an unknown or removed ggml type {ggml_type}")
        block, block_bytes = GGML_TYPES[ggml_type]
        if shape and shape[0] % block:
            raise _Bad(f"tensor {name}: row length {shape[0]} is not a multiple of its type's block size {block}")
        offset = r.scalar(U64, f"the offset of {name}")
        info.tensors.append(TensorInfo(name, shape, ggml_type, offset, n_elements // block * block_bytes))
    info.data_offset = _pad(r.pos, info.alignment)


def _check_tensor_data(r: _Reader, info: GgufInfo) -> None:
    if info.tensors and info.data_offset > info.file_size:
        raise _Bad(f"truncated: the tensor data would start at byte {info.data_offset}, past the end of the file")
    expected = 0
    for t in info.tensors:
        if t.offset != expected:
            raise _Bad(f"tensor {t.name} has offset {t.offset}, expected {expected} "
                       f"(tensors must be packed in order, aligned to {info.alignment})")
        end = info.data_offset + t.offset + t.nbytes
        if end > info.file_size:
            what = "truncated" if t.nbytes <= info.file_size else "impossibly large"
            raise _Bad(f"{what}: the data of tensor {t.name} ({t.nbytes} bytes) runs past the end of the "
                       f"file ({info.file_size} bytes)")
        expected += _pad(t.nbytes, info.alignment)


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


# -- meaning: what llama.cpp asserts on (every architecture) or what edgesink needs -----------------

def _check_semantics(info: GgufInfo) -> None:
    meta, types = info.metadata, info.value_types
    arch = meta.get("general.architecture")
    if arch is None:
        raise _Bad("no general.architecture in the metadata")
    if types["general.architecture"] != STR:
        raise _Bad("general.architecture is not a string")
    _check_hparams(info, arch)
    _check_tokenizer(info)


def _int(info: GgufInfo, key: str, default: int = 0) -> int:
    value = info.metadata.get(key)
    return value if isinstance(value, int) and info.value_types.get(key) in _INTEGER else default


def _check_hparams(info: GgufInfo, arch: str) -> None:
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    if key("block_count") in info.metadata:
        n_layer = _int(info, key("block_count"), default=-1)
        if n_layer != -1 and not 0 < n_layer <= LLAMA_MAX_LAYERS:
            raise _Bad(f"{key('block_count')} is {n_layer}; llama.cpp needs 1 to {LLAMA_MAX_LAYERS} layers")
        for sub in ("nextn_predict_layers", "posnet.block_count", "convnext.block_count"):
            if _int(info, key(sub)) > n_layer >= 0:
                raise _Bad(f"{key(sub)} ({_int(info, key(sub))}) is more than block_count ({n_layer})")
    n_expert = _int(info, key("expert_count"))
    used = info.metadata.get(key("expert_used_count"))
    used_max = 0 if isinstance(used, ArrayInfo) else _int(info, key("expert_used_count"))  # arrays: llama.cpp checks
    groups, groups_used = _int(info, key("expert_group_count")), _int(info, key("expert_group_used_count"))
    if n_expert > LLAMA_MAX_EXPERTS:
        raise _Bad(f"{key('expert_count')} is {n_expert}; llama.cpp allows at most {LLAMA_MAX_EXPERTS} experts")
    if used_max > n_expert:
        raise _Bad(f"{key('expert_used_count')} ({used_max}) is more than expert_count ({n_expert})")
    if n_expert > 0:
        bad = (not isinstance(used, ArrayInfo) and used_max == 0) or groups >= n_expert or (
            groups > 1 and (n_expert % groups or not 0 < groups_used < groups))
    else:
        bad = groups != 0
    if bad:
        raise _Bad(f"inconsistent expert settings (expert_count {n_expert}, expert_used_count {used_max}, "
                   f"expert_group_count {groups}, expert_group_used_count {groups_used})")
    scaling = info.metadata.get(key("rope.scaling.type"))
    if isinstance(scaling, str) and scaling not in ROPE_SCALING_TYPES:
        raise _Bad(f"{key('rope.scaling.type')} is {scaling!r}; llama.cpp knows {', '.join(ROPE_SCALING_TYPES)}")


def _check_tokenizer(info: GgufInfo) -> None:
    meta = info.metadata
    model = meta.get("tokenizer.ggml.model")
    if model is None or model in NO_VOCAB:
        return
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, ArrayInfo) or tokens.item_type != STR:
        raise _Bad("tokenizer.ggml.tokens must be an array of strings")
    n_vocab = tokens.length
    for name, allowed in (("scores", (F32, I32)), ("token_type", (I32,))):
        value = meta.get(f"tokenizer.ggml.{name}")
        if value is None:
            continue
        if not isinstance(value, ArrayInfo) or value.item_type not in allowed:
            raise _Bad(f"tokenizer.ggml.{name} must be an array of {' or '.join(TYPE_NAMES[t] for t in allowed)}")
        if value.length < n_vocab:
            raise _Bad(f"tokenizer.ggml.{name} has {value.length} items for {n_vocab} tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None and (not isinstance(merges, ArrayInfo) or merges.item_type != STR):
        raise _Bad("tokenizer.ggml.merges must be an array of strings")
    end_keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
    if not any(k in meta for k in end_keys):
        raise _Bad("the vocabulary has no end-of-sequence token id (tokenizer.ggml.eos_token_id): "
                   "generation could never end by itself")
    for key in end_keys:
        if key in meta:
            value = _int(info, key, default=-1)
            if not 0 <= value < n_vocab:
                raise _Bad(f"{key} {meta[key]!r} (eos) is not a token of the {n_vocab}-token vocabulary")


# -- loading in a child process -------------------------------------------------------------------

PROBE_TIMEOUT_S = 300
_PROBE_CACHE_VERSION = 2  # 2: keyed by the file's sha256 (1 was path, size and mtime)

# The child's whole program. Isolated (-I), Python puts neither the current folder nor PYTHONPATH
# nor the user's site-packages on sys.path, so the folders this process imports from come in argv.
_CHILD_PROGRAM = ("import sys; sys.path[:0] = sys.argv[2:]; "
                  "from edgesink.gguf_check import _probe_child; sys.exit(_probe_child(sys.argv[1]))")


def probe_load(path: "str | os.PathLike", timeout: float = PROBE_TIMEOUT_S) -> None:
    """Let llama.cpp load ``path`` in a child process first; raise ModelLoadError if it fails or dies."""
    path = Path(path)
    try:
        r = subprocess.run(probe_command(path), env=probe_env(), cwd=CWD,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"llama.cpp took more than {timeout:.0f} s to read the header of {path}; "
                             "refusing it") from None
    if r.returncode == 0:
        return
    reason = _log_reason(r.stderr.decode("utf-8", errors="replace"))
    if r.returncode < 0:
        try:
            sig = signal.Signals(-r.returncode).name
        except ValueError:
            sig = f"signal {-r.returncode}"
        raise ModelLoadError(f"llama.cpp crashed ({sig}) loading {path}: {reason or 'no message'}; "
                             "the file is damaged or describes a model llama.cpp cannot run")
    raise ModelLoadError(f"llama.cpp could not load {path}: {reason or 'not a valid GGUF model it supports'}")


def probe_command(path: Path) -> list[str]:
    """The child's command line: isolated Python, the file's absolute path, then the import folders."""
    return isolated_python(_CHILD_PROGRAM, str(Path(path).absolute()))


def probe_env() -> dict[str, str]:
    """The child's environment: the folder of the very libllama this process loaded, as an absolute path."""
    return dict(child_env(), GGML_NO_BACKTRACE="1")  # an abort runs no debugger


def _log_reason(log: str) -> str:
    """The most telling line of llama.cpp's log: an assertion, else the last error."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for marker in ("GGML_ASSERT", "error loading model:", "error", "failed"):
        hits = [line for line in lines if marker in line]
        if hits:
            line = hits[-1] if marker != "error loading model:" else hits[0]
            return line.split("error loading model:")[-1].strip()[:300]
    return ""


def probe_once(path: Path, sha256: str) -> None:
    """:func:`probe_load`, unless a file with this content passed it before with this library."""
    key = _probe_key(sha256)
    if not _probe_cached(key):
        probe_load(path)
        _remember_probe(key)


def file_sha256(path: Path) -> str:
    """The file's sha256 (remembered per file identity, see ``filecache.cached_sha256``)."""
    try:
        return cached_sha256(path)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from e


def _probe_key(sha256: str) -> str:
    return f"{_PROBE_CACHE_VERSION}|{sha256}|{_library_id()}"


def _library_id() -> str:
    lib = library_file()
    try:
        st = lib.stat()
    except OSError:
        st = None
    return f"{_native.upstream_commit()}|{lib}|{st.st_size if st else 0}|{st.st_mtime_ns if st else 0}"


def _cache_file() -> Path:
    return cache_dir() / "probed.json"


def _probe_cached(key: str) -> bool:
    try:
        return key in json.loads(_cache_file().read_text())
    except (OSError, ValueError, TypeError):
        return False


def _remember_probe(key: str) -> None:
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
        if not isinstance(known, list):
            known = []
    except (OSError, ValueError):
        known = []
    known = [k for k in known if isinstance(k, str) and k != key][-200:]
    known.append(key)
    write_json_cache(cache, known)


def _probe_child(path: str) -> int:
    """In the child: load without weights, make a small context, tokenize. 0 ok, 3 refused."""
    @C.llama_log_callback
    def to_stderr(level, text, user_data):  # the parent reads the reason from here
        sys.stderr.write(text.decode("utf-8", errors="replace"))

    C.llama_log_set(to_stderr, ctypes.c_void_p(0))
    params = C.llama_model_default_params()
    params.n_gpu_layers = 0
    params.no_alloc = True  # shapes and memory plans only: no weight is read
    params.load_mode = 0  # LLAMA_LOAD_MODE_NONE: no_alloc cannot map the file
    model = C.llama_model_load_from_file(path.encode(), params)
    if not model:
        return 3
    cparams = C.llama_context_default_params()
    n_train = C.llama_model_n_ctx_train(model)
    cparams.n_ctx = min(256, n_train) if n_train > 0 else 256
    cparams.n_batch = cparams.n_ubatch = min(32, cparams.n_ctx)
    cparams.n_threads = cparams.n_threads_batch = 1
    ctx = C.llama_init_from_model(model, cparams)  # builds the compute graph: per-architecture asserts
    if not ctx:
        return 3
    vocab = C.llama_model_get_vocab(model)
    if C.llama_vocab_n_tokens(vocab) > 0:
        text = b"Hello, world! \xc3\xa9\n<|im_start|>"
        buf = (C.llama_token * 64)()
        n = C.llama_tokenize(vocab, text, len(text), buf, 64, True, True)
        piece = ctypes.create_string_buffer(256)
        for t in buf[:max(n, 0)]:
            C.llama_token_to_piece(vocab, t, piece, 256, 0, True)
    C.llama_free(ctx)
    C.llama_model_free(model)
    return 0

