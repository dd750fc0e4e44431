"""Crafts malformed GGUF model files for the model-file tests; nothing is downloaded.

A tiny but valid llama model is written in pure Python (random F32 weights, a byte-level SPM
vocabulary of 267 tokens, about 300 KB); each case then breaks exactly one thing in it. Run as a
script to see what every case does to llama.cpp itself, each in its own child process (with
edgesink's checks bypassed), and what edgesink makes of it::

    .venv/bin/python tests/craft_gguf.py            # a table: case, raw llama.cpp outcome, edgesink
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

# GGUF value types (gguf.h)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}
GGML_F32 = 0


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


@dataclass
class KV:
    """One metadata pair; ``raw`` replaces the encoded value (after the type), ``raw_all`` the whole pair."""

    key: str
    type: int
    value: object = None
    item_type: int | None = None  # for arrays
    raw: bytes | None = None
    raw_all: bytes | None = None

    def encode(self) -> bytes:
        if self.raw_all is not None:
            return self.raw_all
        head = _str(self.key) + struct.pack("<I", self.type)
        if self.raw is not None:
            return head + self.raw
        if self.type == ARR:
            items = list(self.value)
            body = struct.pack("<IQ", self.item_type, len(items)) + b"".join(_value(self.item_type, v) for v in items)
            return head + body
        return head + _value(self.type, self.value)


def _value(vtype: int, value) -> bytes:
    return _str(value) if vtype == STR else struct.pack(_SCALAR[vtype], value)


@dataclass
class Tensor:
    name: str
    shape: list[int]  # ggml order: shape[0] is the row length
    data: bytes
    ggml_type: int = GGML_F32
    offset: int | None = None  # None: where it belongs
    n_dims: int | None = None  # None: len(shape)


@dataclass
class Gguf:
    kvs: list[KV]
    tensors: list[Tensor]
    magic: bytes = b"GGUF"
    version: int = 3
    n_tensors: int | None = None  # None: the real count
    n_kv: int | None = None
    pad_to: int = 32  # the alignment the bytes are actually laid out with

    def kv(self, key: str) -> KV:
        return next(k for k in self.kvs if k.key == key)

    def set(self, key: str, **changes) -> "Gguf":
        self.kvs = [replace(k, **changes) if k.key == key else k for k in self.kvs]
        return self

    def drop(self, key: str) -> "Gguf":
        self.kvs = [k for k in self.kvs if k.key != key]
        return self

    def to_bytes(self) -> bytes:
        out = bytearray(self.magic + struct.pack("<I", self.version))
        out += struct.pack("<qq", len(self.tensors) if self.n_tensors is None else self.n_tensors,
                           len(self.kvs) if self.n_kv is None else self.n_kv)
        for kv in self.kvs:
            out += kv.encode()
        offsets, size = [], 0
        for t in self.tensors:
            offsets.append(size)
            size += _pad(len(t.data), self.pad_to)
        for t, off in zip(self.tensors, offsets):
            n_dims = len(t.shape) if t.n_dims is None else t.n_dims
            out += _str(t.name) + struct.pack("<I", n_dims) + b"".join(struct.pack("<q", d) for d in t.shape)
            out += struct.pack("<iQ", t.ggml_type, off if t.offset is None else t.offset)
        out += bytes(_pad(len(out), self.pad_to) - len(out))
        for t in self.tensors:
            out += t.data + bytes(_pad(len(t.data), self.pad_to) - len(t.data))
        return bytes(out)


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


# -- the tiny valid model ----------------------------------------------------------------------

N_EMBD, N_FF, N_HEAD = 64, 128, 4
WORDS = ["▁the", "▁a", "▁and", "▁of", "▁to", "▁in", "▁is", "▁it"]
TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + WORDS
N_VOCAB = len(TOKENS)


def tiny_model(seed: int = 0) -> Gguf:
    """A small, valid llama model that llama.cpp loads and runs (random weights)."""
    rng = np.random.default_rng(seed)

    def weights(*shape):  # ggml order (row length first) -> bytes of a C-order array
        return (rng.standard_normal(shape[::-1]) * 0.05).astype(np.float32).tobytes()

    def ones(n):
        return np.ones(n, dtype=np.float32).tobytes()

    kvs = [
        KV("general.architecture", STR, "llama"),
        KV("general.name", STR, "tiny"),
        KV("general.alignment", U32, 32),
        KV("llama.context_length", U32, 256),
        KV("llama.embedding_length", U32, N_EMBD),
        KV("llama.block_count", U32, 1),
        KV("llama.feed_forward_length", U32, N_FF),
        KV("llama.rope.dimension_count", U32, N_EMBD // N_HEAD),
        KV("llama.attention.head_count", U32, N_HEAD),
        KV("llama.attention.head_count_kv", U32, N_HEAD),
        KV("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        KV("tokenizer.ggml.model", STR, "llama"),
        KV("tokenizer.ggml.tokens", ARR, TOKENS, item_type=STR),
        KV("tokenizer.ggml.scores", ARR, [0.0] * 3 + [-1000.0] * 256 + [-1.0 * i for i in range(len(WORDS))],
           item_type=F32),
        KV("tokenizer.ggml.token_type", ARR, [2, 3, 3] + [6] * 256 + [1] * len(WORDS), item_type=I32),
        KV("tokenizer.ggml.bos_token_id", U32, 1),
        KV("tokenizer.ggml.eos_token_id", U32, 2),
        KV("tokenizer.ggml.unknown_token_id", U32, 0),
    ]
    tensors = [
        Tensor("token_embd.weight", [N_EMBD, N_VOCAB], weights(N_EMBD, N_VOCAB)),
        Tensor("output_norm.weight", [N_EMBD], ones(N_EMBD)),
        Tensor("output.weight", [N_EMBD, N_VOCAB], weights(N_EMBD, N_VOCAB)),
        Tensor("blk.0.attn_norm.weight", [N_EMBD], ones(N_EMBD)),
        *(Tensor(f"blk.0.attn_{n}.weight", [N_EMBD, N_EMBD], weights(N_EMBD, N_EMBD))
          for n in ("q", "k", "v", "output")),
        Tensor("blk.0.ffn_norm.weight", [N_EMBD], ones(N_EMBD)),
        Tensor("blk.0.ffn_gate.weight", [N_EMBD, N_FF], weights(N_EMBD, N_FF)),
        Tensor("blk.0.ffn_up.weight", [N_EMBD, N_FF], weights(N_EMBD, N_FF)),
        Tensor("blk.0.ffn_down.weight", [N_FF, N_EMBD], weights(N_FF, N_EMBD)),
    ]
    return Gguf(kvs, tensors)


# -- the cases ---------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    what: str  # what is broken
    make: Callable[[Path], Path]  # writes the file (or folder) under a folder, returns its path
    expect: str = ""  # a word the error message must contain (case-insensitive)
    tags: set = field(default_factory=set)


CASES: dict[str, Case] = {}


def case(what: str, expect: str = ""):
    """Register a builder ``f() -> bytes | Gguf`` as a case named after the function."""
    def register(f):
        def make(folder: Path) -> Path:
            path = folder / f"{f.__name__}.gguf"
            built = f()
            path.write_bytes(built.to_bytes() if isinstance(built, Gguf) else built)
            return path
        CASES[f.__name__] = Case(f.__name__, what, make, expect)
        return f
    return register


def _valid_bytes() -> bytes:
    return tiny_model().to_bytes()


def _with_tensor(g: Gguf, name: str, **changes) -> Gguf:
    g.tensors = [replace(t, **changes) if t.name == name else t for t in g.tensors]
    return g


@case("an empty file", "empty")
def empty_file():
    return b""


@case("a text file, not a GGUF", "not a GGUF")
def not_gguf():
    return b"This is a README, not a model.\n" * 40


def _make_directory(folder: Path) -> Path:
    path = folder / "a_directory.gguf"
    path.mkdir()
    return path


CASES["directory"] = Case("directory", "a directory named like a model", _make_directory, "directory")


@case("bad magic (GGUG)", "not a GGUF")
def bad_magic():
    g = tiny_model()
    g.magic = b"GGUG"
    return g


@case("GGUF version 0", "version")
def version_zero():
    g = tiny_model()
    g.version = 0
    return g


@case("GGUF version 1 (no longer supported)", "version")
def version_one():
    g = tiny_model()
    g.version = 1
    return g


@case("a future GGUF version (99)", "version")
def version_future():
    g = tiny_model()
    g.version = 99
    return g


@case("truncated in the fixed header (10 bytes)", "truncated")
def truncated_header():
    return _valid_bytes()[:10]


@case("truncated in the middle of the metadata", "truncated")
def truncated_metadata():
    return _valid_bytes()[:600]


@case("truncated in the tensor data (last 4 KB missing)", "truncated")
def truncated_tensor_data():
    return _valid_bytes()[:-4096]


@case("absurd tensor count (2**62)", "tensor count")
def absurd_tensor_count():
    g = tiny_model()
    g.n_tensors = 2**62
    return g


@case("negative tensor count", "tensor count")
def negative_tensor_count():
    g = tiny_model()
    g.n_tensors = -1
    return g


@case("absurd metadata count (2**62)", "metadata count")
def absurd_kv_count():
    g = tiny_model()
    g.n_kv = 2**62
    return g


@case("tensor dimensions whose product overflows int64", "overflow")
def dims_overflow():
    return _with_tensor(tiny_model(), "output_norm.weight", shape=[2**31, 2**31, 2**31, 2])


@case("a tensor far bigger than the file", "past the end")
def tensor_past_end():
    return _with_tensor(tiny_model(), "output_norm.weight", shape=[N_EMBD, 2**30])


@case("five tensor dimensions", "dimensions")
def too_many_dims():
    return _with_tensor(tiny_model(), "output_norm.weight", shape=[N_EMBD, 1, 1, 1, 1])


@case("a tensor offset past the end of the file", "offset")
def offset_past_end():
    return _with_tensor(tiny_model(), "blk.0.ffn_down.weight", offset=2**40)


@case("a misaligned tensor offset", "offset")
def offset_misaligned():
    return _with_tensor(tiny_model(), "blk.0.ffn_down.weight", offset=32 * 1000 + 3)


@case("an unknown ggml tensor type (1000)", "type")
def tensor_bad_type():
    return _with_tensor(tiny_model(), "output_norm.weight", ggml_type=1000)


@case("two tensors with the same name", "duplicate")
def duplicate_tensor():
    g = tiny_model()
    g.tensors[2] = replace(g.tensors[2], name=g.tensors[0].name)
    return g


@case("alignment 0", "alignment")
def alignment_zero():
    return tiny_model().set("general.alignment", value=0)


@case("alignment 48 (not a power of two)", "alignment")
def alignment_not_pow2():
    return tiny_model().set("general.alignment", value=48)


@case("alignment 2**31 (huge)", "alignment")
def alignment_huge():
    return tiny_model().set("general.alignment", value=2**31)


@case("alignment stored as a string", "alignment")
def alignment_wrong_type():
    return tiny_model().set("general.alignment", type=STR, value="32")


@case("a metadata string claiming 2**60 bytes", "length")
def string_absurd_length():
    return tiny_model().set("general.name", raw=struct.pack("<Q", 2**60) + b"tiny")


@case("a metadata key claiming 2**60 bytes", "length")
def key_absurd_length():
    g = tiny_model()
    g.kvs.insert(1, KV("x", U32, raw_all=struct.pack("<Q", 2**60) + b"general.name"))
    return g


@case("a metadata array claiming 2**60 items", "length")
def array_absurd_length():
    return tiny_model().set("tokenizer.ggml.scores", raw=struct.pack("<IQ", F32, 2**60) + b"\0" * 64)


@case("an unknown metadata value type (77)", "type")
def kv_bad_type():
    return tiny_model().set("general.name", type=77, raw=_str("tiny"))


@case("two metadata pairs with the same key", "duplicate")
def duplicate_key():
    g = tiny_model()
    g.kvs.append(KV("general.name", STR, "again"))
    return g


@case("tokenizer tokens as an int32 array", "tokenizer.ggml.tokens")
def tokens_wrong_type():
    return tiny_model().set("tokenizer.ggml.tokens", item_type=I32, value=list(range(N_VOCAB)))


@case("tokenizer scores as a string array", "tokenizer.ggml.scores")
def scores_wrong_type():
    return tiny_model().set("tokenizer.ggml.scores", item_type=STR, value=["0"] * N_VOCAB)


@case("tokenizer token types as a uint8 array", "tokenizer.ggml.token_type")
def token_type_wrong_type():
    return tiny_model().set("tokenizer.ggml.token_type", item_type=U8, value=[1] * N_VOCAB)


@case("tokenizer scores shorter than the vocabulary", "tokenizer.ggml.scores")
def scores_too_short():
    return tiny_model().set("tokenizer.ggml.scores", value=[0.0] * 10)


@case("no end-of-sequence token id", "eos")
def missing_eos():
    return tiny_model().drop("tokenizer.ggml.eos_token_id")


@case("an end-of-sequence token id beyond the vocabulary", "eos")
def eos_out_of_range():
    return tiny_model().set("tokenizer.ggml.eos_token_id", value=1_000_000)


@case("an unknown architecture name", "architecture")
def unknown_architecture():
    g = tiny_model().set("general.architecture", value="frobnicator")
    for kv in g.kvs:
        if kv.key.startswith("llama."):
            kv.key = "frobnicator." + kv.key[len("llama."):]
    return g


@case("block_count 0", "block_count")
def zero_layers():
    return tiny_model().set("llama.block_count", value=0)


@case("block_count 100000 (beyond llama.cpp's layer limit)", "block_count")
def absurd_layers():
    return tiny_model().set("llama.block_count", value=100_000)


@case("nextn_predict_layers above block_count", "nextn_predict_layers")
def nextn_above_layers():
    g = tiny_model()
    g.kvs.append(KV("llama.nextn_predict_layers", U32, 5))
    return g


@case("head_count 0", "shape")
def zero_heads():
    return tiny_model().set("llama.attention.head_count", value=0)


@case("an expert count beyond llama.cpp's limit", "expert")
def absurd_experts():
    g = tiny_model()
    g.kvs.append(KV("llama.expert_count", U32, 100_000))
    return g


@case("experts used in a model without experts", "expert")
def experts_used_without_experts():
    g = tiny_model()
    g.kvs.append(KV("llama.expert_used_count", U32, 2))
    return g


@case("an unknown rope scaling type", "rope")
def bad_rope_scaling():
    g = tiny_model()
    g.kvs.append(KV("llama.rope.scaling.type", STR, "wobbly"))
    return g


@case("context_length stored as a string", "context_length")
def context_length_wrong_type():
    return tiny_model().set("llama.context_length", type=STR, value="256")


@case("a tensor with the wrong shape for the model", "shape")
def wrong_tensor_shape():
    return _with_tensor(tiny_model(), "blk.0.attn_q.weight", shape=[N_EMBD, N_EMBD // 2],
                        data=bytes(N_EMBD * N_EMBD * 2))


@case("a required tensor missing", "tensor")
def missing_tensor():
    g = tiny_model()
    g.tensors = [t for t in g.tensors if t.name != "blk.0.ffn_up.weight"]
    return g


def write_valid(folder: Path) -> Path:
    path = folder / "tiny-valid.gguf"
    path.write_bytes(_valid_bytes())
    return path


# -- running a case against raw llama.cpp, in a child process -------------------------------------

_RAW_LOAD = """
import sys
from edgesink._native import C
p = C.llama_model_default_params()
p.n_gpu_layers = 0
m = C.llama_model_load_from_file(sys.argv[1].encode(), p)
sys.exit(0 if m else 3)
"""

_EDGESINK_LOAD = """
import sys, edgesink
try:
    edgesink.load(sys.argv[1]).close()
except edgesink.ModelLoadError as e:
    print(type(e).__name__, str(e)[:200])
    sys.exit(3)
"""


def outcome(returncode: int) -> str:
    if returncode == 0:
        return "loads"
    if returncode == 3:
        return "error"
    if returncode < 0:
        return f"crash:{signal.Signals(-returncode).name}"
    return f"exit:{returncode}"


def run_child(code: str, path: Path, timeout: float = 60) -> tuple[str, str]:
    env = dict(os.environ, GGML_NO_BACKTRACE="1")  # an abort runs no debugger
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout,
                       env=env)
    lines = (r.stdout + r.stderr).strip().splitlines()
    return outcome(r.returncode), lines[-1] if lines else ""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"{'case':28} {'raw llama.cpp':14} edgesink")
        print(f"{'tiny-valid':28} {run_child(_RAW_LOAD, write_valid(folder))[0]:14}")
        for c in CASES.values():
            path = c.make(folder)
            raw, _ = run_child(_RAW_LOAD, path)
            ours, msg = run_child(_EDGESINK_LOAD, path)
            print(f"{c.name:28} {raw:14} {ours:8} {msg}", flush=True)


if __name__ == "__main__":
    main()
