"""The native patch: the patched library is the one loaded, and its K-shift is exact.

How exact is "exact"? Two mathematically equal computations (RoPE attention at positions p and
p + d) differ a little in floating point, and on a quantized model llama.cpp also quantizes the
activations, which turns that into ~1% of the logits. So each comparison here is held against
the noise floor measured in the same test: decoding the same tokens fresh at two offsets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgesink
from edgesink import _native
from edgesink._native import C

REPO = Path(__file__).resolve().parents[1]
# The stock library to compare with; the GPU check points this at a stock build beside the CUDA ggml.
STOCK_LIB = Path(os.environ.get("EDGESINK_STOCK_LIB_PATH") or REPO / "build" / "stock" / "lib")
EDGESINK = str(Path(sys.executable).parent / "edgesink")
TEXT = ("The family of Dashwood had long been settled in Sussex. Their estate was large, and their "
        "residence was at Norland Park, in the centre of their property, where, for many generations, "
        "they had lived in so respectable a manner as to engage the general good opinion of their "
        "surrounding acquaintance.")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory, model_path):
    """An F32 random-weight llama: nothing is quantized, so equal computations agree closely."""
    from random_model import write_random_llama

    path = write_random_llama(tmp_path_factory.mktemp("rand") / "rand.gguf", model_path)
    m = edgesink.load(path)
    yield m
    m.close()


def test_the_patched_library_is_loaded():
    assert _native.patch_level() >= 2
    pin = json.loads((REPO / "native" / "upstream.json").read_text())
    assert _native.upstream_commit() == pin["llama_cpp_commit"]
    assert _native.LIBRARY_FOLDER is not None and (_native.LIBRARY_FOLDER / "libllama.so").exists()


def test_info_reports_the_patch():
    from click.testing import CliRunner

    from edgesink.cli import main

    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["sink_shift_patch"] is True and info["patch_level"] >= 2
    assert "CPU" in info["backends"] and info["devices"]
    pin = json.loads((REPO / "native" / "upstream.json").read_text())
    assert info["llama_cpp_commit"] == pin["llama_cpp_commit"] and info["edgesink"] == edgesink.__version__
    assert info["default_model_bytes"] == Path(info["default_model_path"]).stat().st_size == 98362432


def _decode(model, tokens, pos0, type_k="f32", flash_attn=None, shift=0):
    """Logits after decoding tokens[:-1] at pos0.., optionally shifting them by ``shift``, then tokens[-1]."""
    with edgesink.Session(model, n_ctx=256, policy="dense", type_k=type_k, flash_attn=flash_attn) as s:
        cache = s._cache
        n = len(tokens) - 1
        cache.decode(tokens[:n], pos0, 0, np.zeros(n, np.int8))
        if shift:
            C.llama_memory_seq_add(cache.mem, 0, 0, -1, shift)
        cache.decode(tokens[n:], pos0 + shift + n, 0, np.ones(1, np.int8))
        return cache.last_logits()


def assert_same_choice(a: np.ndarray, b: np.ndarray, floor: float) -> None:
    """The same most likely token, unless the two best are closer than the noise (a real tie)."""
    top2 = np.sort(b)[-2:]
    if top2[1] - top2[0] > 2 * floor:
        assert a.argmax() == b.argmax()


def _noise_floor(model, tokens, type_k, flash_attn) -> float:
    """How much the logits move when the same tokens are decoded fresh 7 positions later."""
    return float(np.abs(_decode(model, tokens, 0, type_k, flash_attn) - _decode(model, tokens, 7, type_k, flash_attn)).max())


@pytest.mark.parametrize("d", [1, 13, 300])
def test_shifting_the_whole_sequence_equals_a_fresh_decode_there(random_model, d, measured):
    tokens = random_model.tokenize(TEXT)
    shifted = _decode(random_model, tokens, 0, shift=d)
    fresh = _decode(random_model, tokens, d)
    floor = _noise_floor(random_model, tokens, "f32", None)
    measured("random F32 model", f"max |dlogit| {np.abs(shifted - fresh).max():.5f} (noise floor {floor:.5f})")
    assert np.abs(shifted - fresh).max() <= max(2 * floor, 1e-3)
    assert_same_choice(shifted, fresh, floor)


def test_shift_equals_fresh_decode_on_the_real_model(model, measured):
    tokens = model.tokenize(TEXT)
    floor = _noise_floor(model, tokens, "f16", None)
    same, deltas = [], []
    for n in range(20, len(tokens), 5):  # eight prefixes: eight next-token choices
        shifted, fresh = _decode(model, tokens[:n], 0, "f16", shift=40), _decode(model, tokens[:n], 40, "f16")
        assert_same_choice(shifted, fresh, floor)
        deltas.append(float(np.abs(shifted - fresh).max()))
        same.append(bool(shifted.argmax() == fresh.argmax()))
        assert deltas[-1] <= 2 * floor, (n, floor)
    measured("SmolLM2, F16 K, 8 prefixes", f"max |dlogit| {min(deltas):.3f}-{max(deltas):.3f} (noise floor "
             f"{floor:.3f}), top-1 same in {sum(same)} of {len(same)}")


def _stream_logits(model, tokens, mode, type_k, flash_attn, n_ctx=128):
    """Next-token logits after streaming ``tokens`` through a sink session moving cells one way."""
    with edgesink.Session(model, n_ctx=n_ctx, policy="sink", sinks=4, batch_size=4, type_k=type_k,
                          flash_attn=flash_attn, shift_mode=mode, refresh_every=10**9, rebase_every=10**9) as s:
        s.feed_tokens(tokens)
        assert s.stats.evictions == len(tokens) - n_ctx
        return s.next_logits()


@pytest.mark.parametrize("type_k", ["f16", "q8_0"])
@pytest.mark.parametrize("flash_attn", [False, True])
def test_moving_the_sinks_equals_moving_the_window(model, random_model, prose, type_k, flash_attn, measured):
    """Moving the 4 sink cells forward gives the logits of moving the whole window back."""
    for m in (random_model, model):
        text_tokens = m.tokenize(prose[:4000])
        floor = _noise_floor(m, text_tokens[:100], type_k, flash_attn)
        for n in (250, 400):  # 122 and 272 one-token evictions into a 128-token cache
            forward = _stream_logits(m, text_tokens[:n], "kept-forward", type_k, flash_attn)
            back = _stream_logits(m, text_tokens[:n], "window-back", type_k, flash_attn)
            delta = float(np.abs(forward - back).max())
            measured(f"{m.path.name} after {n} tokens", f"max |dlogit| {delta:.4f} (noise floor {floor:.4f}, "
                     f"logit std {back.std():.2f}), top-1 {'same' if forward.argmax() == back.argmax() else 'DIFFERS'}")
            if m is model:
                assert forward.argmax() == back.argmax()
            else:  # random weights: near-flat logits, where the top two may tie within the noise
                assert_same_choice(forward, back, floor)
            # Each path re-rounds its moved keys 120-270 times here, the noise floor measures one
            # offset change: measured ratios were 0.6-2.5, and 3.9 for the random model's tiny
            # F16 floor (0.0038 against 0.001, logits of std 1; SmolLM2: 0.40-1.27 against 0.50-0.76).
            # A wrong rotation moves logits by about their std, far above this tolerance.
            assert delta <= max(3 * floor, 0.01 * back.std()), (m.path.name, n, floor)


STOCK_SCRIPT = """
import sys, json, numpy as np, edgesink
m = edgesink.load(sys.argv[1])
tokens = m.tokenize(sys.argv[2])[:200]
out = {}
for mode in ("kept-forward", "window-back"):
    with edgesink.Session(m, n_ctx=128, policy="sink", batch_size=4, type_k=sys.argv[3], shift_mode=mode,
                          refresh_every=10**9, rebase_every=10**9) as s:
        s.feed_tokens(tokens)
        out[mode] = s.next_logits().tolist()
print(json.dumps({"patch": edgesink._native.patch_level(), "logits": out}))
"""


def _logits_with_library(lib_path, model_path, type_k):
    env = dict(os.environ)
    if lib_path:
        env["EDGESINK_LIB_PATH"] = str(lib_path)
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", STOCK_SCRIPT, str(model_path), TEXT * 3, type_k],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("type_k", ["f16", "f32"])
def test_patched_shift_is_bitwise_the_stock_shift(model_path, type_k):
    """Rotating only the moved cells gives exactly what stock llama.cpp gives rotating every cell by 0."""
    assert (STOCK_LIB / "libllama.so").exists(), "build the stock library first: make stock-lib"
    patched = _logits_with_library(None, model_path, type_k)
    stock = _logits_with_library(STOCK_LIB, model_path, type_k)
    assert patched["patch"] >= 2 and stock["patch"] == 0
    for mode in ("kept-forward", "window-back"):
        assert np.array_equal(np.array(patched["logits"][mode]), np.array(stock["logits"][mode])), mode


STOCK_USE_SCRIPT = """
import sys, edgesink
for _ in range(2):  # two loads, two streams that evict: one warning
    m = edgesink.load(sys.argv[1])
    with m.session(n_ctx=64, policy="sink") as s:
        s.feed(sys.argv[2])
        print("evictions", s.stats.evictions)
    m.close()
"""


def test_a_stock_library_still_works_warns_once_and_info_says_so(model_path):
    assert (STOCK_LIB / "libllama.so").exists(), "build the stock library first: make stock-lib"
    env = {**os.environ, "EDGESINK_LIB_PATH": str(STOCK_LIB)}
    # -W always: Python's own once-per-location filter must not be what keeps it to one warning.
    used = subprocess.run([sys.executable, "-W", "always", "-c", STOCK_USE_SCRIPT, str(model_path), TEXT * 2],
                          env=env, capture_output=True, text=True, timeout=300)
    assert used.returncode == 0, used.stderr[-2000:]
    assert [int(line.split()[1]) > 0 for line in used.stdout.splitlines()] == [True, True]
    assert used.stderr.count("stock build without edgesink's K-shift patch") == 1
    info = subprocess.run([EDGESINK, "info", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr[-2000:]
    assert json.loads(info.stdout)["sink_shift_patch"] is False
    text = subprocess.run([EDGESINK, "info"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert "sink-shift patch  NOT active" in text.stdout
