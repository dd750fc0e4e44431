"""Write a llama-architecture GGUF with random weights (for exactness and speed checks).

Real models are quantized, and llama.cpp quantizes activations for quantized matrix products, so
two mathematically equal computations (say, RoPE at positions p and p+d) differ there by ~1% in
the logits. With F32 weights nothing is quantized, and equal computations agree to float
precision: this is the model for tests that must see exactness. The vocabulary is copied from a
real GGUF so that tokenization works.

    python tests/random_model.py OUT.gguf --like models/cache/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter

TOKENIZER_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def _field_value(reader: GGUFReader, key: str):
    field = reader.fields[key]
    if len(field.types) > 1:  # an array
        if field.types[1].name == "STRING":
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [int(field.parts[i][0]) for i in field.data]
    value = field.parts[field.data[0]]
    return bytes(value).decode("utf-8") if field.types[0].name == "STRING" else value[0]


def write_random_llama(out: Path, like: Path, *, n_embd: int = 128, n_head: int = 4, n_head_kv: int = 2,
                       n_layer: int = 4, n_ff: int = 256, n_ctx_train: int = 8192, dtype: str = "f32",
                       seed: int = 0) -> Path:
    """A random llama model at ``out`` with the vocabulary of the GGUF at ``like``."""
    reader = GGUFReader(like)
    tokens = _field_value(reader, "tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    np_type = {"f32": np.float32, "f16": np.float16}[dtype]
    head_dim = n_embd // n_head

    writer = GGUFWriter(str(out), "llama")
    writer.add_name("edgesink random llama")
    writer.add_block_count(n_layer)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model(_field_value(reader, "tokenizer.ggml.model"))
    writer.add_tokenizer_pre(_field_value(reader, "tokenizer.ggml.pre"))
    writer.add_token_list(tokens)
    writer.add_token_types(_field_value(reader, "tokenizer.ggml.token_type"))
    writer.add_token_merges(_field_value(reader, "tokenizer.ggml.merges"))
    writer.add_bos_token_id(int(_field_value(reader, "tokenizer.ggml.bos_token_id")))
    writer.add_eos_token_id(int(_field_value(reader, "tokenizer.ggml.eos_token_id")))
    writer.add_add_bos_token(False)

    def weight(name, *shape, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np_type))

    def ones(name, n):
        writer.add_tensor(name, np.ones(n, dtype=np.float32))

    weight("token_embd.weight", n_vocab, n_embd, scale=1.0)
    for i in range(n_layer):
        ones(f"blk.{i}.attn_norm.weight", n_embd)
        weight(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd)
        weight(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        weight(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        weight(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim)
        ones(f"blk.{i}.ffn_norm.weight", n_embd)
        weight(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        weight(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        weight(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    ones("output_norm.weight", n_embd)
    weight("output.weight", n_vocab, n_embd)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--like", type=Path, required=True, help="a GGUF whose vocabulary to copy")
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-head-kv", type=int, default=2)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-ff", type=int, default=256)
    parser.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    args = parser.parse_args()
    write_random_llama(args.out, args.like, n_embd=args.n_embd, n_head=args.n_head, n_head_kv=args.n_head_kv,
                       n_layer=args.n_layer, n_ff=args.n_ff, dtype=args.dtype)


if __name__ == "__main__":
    main()
