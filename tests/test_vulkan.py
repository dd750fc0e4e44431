"""The GPU code path, on Vulkan: weights and KV cache in device buffers, the K-shift and the cell moves
as device graphs. ``make vulkan-check`` runs these against the Vulkan build (build/vulkan) on Mesa's
lavapipe, a Vulkan driver that runs on the CPU, so every CI run tests them; ``make test`` leaves them
out (marker ``vulkan``). Every model here is loaded with all its layers offloaded, and each test
first asserts that they are on the Vulkan device: a check that quietly ran on the CPU fails.

lavapipe is ~50x slower than ggml's CPU backend, so this is a chosen set, on small caches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import edgesink
from edgesink import Session
from edgesink.bindings import C
from test_patch import TEXT, _decode, _noise_floor, _stream_logits, first_4_cells_one_position_off

pytestmark = pytest.mark.vulkan
REPO = Path(__file__).resolve().parents[1]
VULKAN_STOCK_LIB = REPO / "build" / "vulkan-stock" / "lib"


def on_vulkan(model) -> edgesink.Model:
    """The model, after asserting that every layer went to a Vulkan device."""
    offload = model.offload
    assert offload.devices and all(d.startswith("Vulkan") for d in offload.devices), \
        f"{model.path.name}: layers on {offload}, not on Vulkan (GGML_VK_VISIBLE_DEVICES=0 and the Vulkan build?)"
    assert offload.layers == offload.of > 0, str(offload)
    return model


@pytest.fixture(scope="module")
def vk_random(random_model):
    return on_vulkan(random_model)


@pytest.fixture(scope="module")
def vk_model(model):
    return on_vulkan(model)


@pytest.fixture(scope="module")
def cpu_random(random_model):
    """The random F32 model again, every layer on the CPU: the reference for Vulkan's arithmetic."""
    with edgesink.load(random_model.path, n_gpu_layers=0) as m:
        assert not m.offload.on_gpu
        yield m


def test_the_vulkan_build_offloads_to_lavapipe_and_info_says_so(vk_model, measured):
    info = subprocess.run([str(Path(sys.executable).with_name("edgesink")), "info", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr[-2000:]
    data = json.loads(info.stdout)
    assert "Vulkan" in data["backends"] and data["patch_level"] >= 5
    vulkan = [d for d in data["devices"] if d["name"].startswith("Vulkan")]
    assert vulkan and "llvmpipe" in vulkan[0]["description"]  # lavapipe: Mesa's software Vulkan
    assert data["layers_go_to"].startswith("Vulkan0") and data["library_check"]["problems"] == []
    measured("layers", str(vk_model.offload))  # the log shows the device every other test here ran on


def test_without_the_device_variable_the_cpu_fallback_is_a_warning(model_path):
    """ggml hides CPU-type Vulkan devices (lavapipe) unless GGML_VK_VISIBLE_DEVICES names them: the
    layers then stay on the CPU, and the user is told so."""
    env = {k: v for k, v in os.environ.items() if k != "GGML_VK_VISIBLE_DEVICES"}
    child = subprocess.run([sys.executable, "-W", "always", "-c",
                            f"import edgesink; m = edgesink.load({str(model_path)!r}); print('on', m.offload)"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "on CPU" in child.stdout
    assert "has the Vulkan backend but found no device it could use" in child.stderr
    assert "GGML_VK_VISIBLE_DEVICES=0" in child.stderr


@pytest.mark.parametrize("type_k", ["f32", "f16"])
def test_a_shift_equals_a_fresh_decode(vk_random, type_k, measured):
    tokens = vk_random.tokenize(TEXT)
    fresh = _decode(vk_random, tokens, 13, type_k, flash_attn=False)
    shifted = _decode(vk_random, tokens, 0, type_k, flash_attn=False, shift=13)
    one_off = _decode(vk_random, tokens, 0, type_k, flash_attn=False, shift=13, sabotage=first_4_cells_one_position_off)
    floor = _noise_floor(vk_random, tokens, type_k, False)
    delta, error = float(np.abs(shifted - fresh).max()), float(np.abs(one_off - fresh).max())
    measured(f"Vulkan, random F32 model, K {type_k}", f"shift vs fresh {delta:.5f} (floor {floor:.5f}); "
             f"first 4 cells one position off {error:.4f}")
    limit = max(2 * floor, 1e-3)
    assert delta <= limit < error


def first_4_cells_lost(mem, p0: int) -> None:
    """The 4 oldest cells gone (the sinks, in a stream)."""
    C.llama_memory_seq_rm(mem, 0, p0, p0 + 4)


@pytest.mark.parametrize("type_k", ["f16", "q8_0"])
@pytest.mark.parametrize("flash_attn", [False, True])
def test_sinks_forward_equal_window_back(vk_random, prose, type_k, flash_attn, measured):
    """As tests/test_patch.py on the CPU. A q8_0 K cache re-quantizes the moved keys, so there the
    limit is wider (5x the floor) and catches lost sinks, not a misplaced one: measured on lavapipe,
    forward against back 0.055 with a floor of 0.013 (K q8_0, flash attention on)."""
    tokens = vk_random.tokenize(prose[:3000])[:110]  # 46 one-token evictions into a 64-token cache
    floor = _noise_floor(vk_random, tokens[:48], type_k, flash_attn)
    forward = _stream_logits(vk_random, tokens, "kept-forward", type_k, flash_attn, n_ctx=64)
    back = _stream_logits(vk_random, tokens, "window-back", type_k, flash_attn, n_ctx=64)
    damage = first_4_cells_one_position_off if type_k == "f16" else first_4_cells_lost
    damaged = _stream_logits(vk_random, tokens, "kept-forward", type_k, flash_attn, n_ctx=64, sabotage=damage)
    delta, error = float(np.abs(forward - back).max()), float(np.abs(damaged - back).max())
    limit = max((3 if type_k == "f16" else 5) * floor, 0.01 * back.std())
    measured(f"Vulkan, K {type_k}, flash attention {flash_attn}",
             f"forward vs back {delta:.4f} (floor {floor:.4f}, limit {limit:.4f}); {damage.__name__}: {error:.4f}")
    assert delta <= limit < error


def test_the_patched_shift_is_bitwise_the_stock_shift_on_vulkan(vk_random):
    """The stock libllama built against the same Vulkan ggml (build/vulkan-stock) rotates every cell;
    the patched one only the moved ones: the same logits, bit for bit, both on the Vulkan device
    (the random model: lavapipe runs the real one too slowly for every CI run)."""
    script = """
import sys, json, edgesink, edgesink.bindings
m = edgesink.load(sys.argv[1])
tokens = m.tokenize(sys.argv[2])[:120]
out = {"patch": edgesink.bindings.patch_level(), "on": list(m.offload.devices)}
for mode in ("kept-forward", "window-back"):
    with edgesink.Session(m, n_ctx=64, policy="sink", batch_size=4, shift_mode=mode, n_threads=1,
                          refresh_every=10**9, rebase_every=10**9) as s:
        s.feed_tokens(tokens)
        out[mode] = s.next_logits().tolist()
print(json.dumps(out))
"""
    results = []
    for lib in (None, VULKAN_STOCK_LIB):
        env = {**os.environ, **({"EDGESINK_LIB_PATH": str(lib)} if lib else {})}
        child = subprocess.run([sys.executable, "-W", "ignore", "-c", script, str(vk_random.path), TEXT * 3],
                               env=env, capture_output=True, text=True, timeout=900)
        assert child.returncode == 0, child.stderr[-2000:]
        results.append(json.loads(child.stdout.splitlines()[-1]))
    patched, stock = results
    assert patched["patch"] >= 5 and stock["patch"] == 0
    assert patched["on"] == stock["on"] == ["Vulkan0"]
    for mode in ("kept-forward", "window-back"):
        assert np.array_equal(np.array(patched[mode]), np.array(stock[mode])), mode


@pytest.mark.parametrize("policy", ["sink", "window", "halve", "dense", "recompute"])
def test_every_policy_streams_past_n_ctx(vk_random, prose, policy):
    tokens = vk_random.tokenize(prose[:2000])[:150]
    n_ctx = 64 if policy != "dense" else 256
    with vk_random.session(n_ctx=n_ctx, policy=policy, n_threads=1) as s:
        s.feed_tokens(tokens)
        text = s.generate_text(8, temperature=0)
        assert s.stats.tokens_seen >= len(tokens) + 1 and s.stats.tokens_in_cache <= n_ctx
        if policy in ("sink", "window", "halve"):
            assert s.stats.evictions > 0
        assert text and np.isfinite(s.next_logits()).all()


def test_a_save_on_vulkan_restores_exactly_on_vulkan(vk_random, tmp_path):
    tokens = vk_random.tokenize(TEXT * 3)[:150]
    with vk_random.session(n_ctx=96, n_threads=1) as saver:
        saver.feed_tokens(tokens)
        saver.save(tmp_path / "vk.session")
        expected = saver.next_logits()
        with Session.restore(tmp_path / "vk.session", vk_random, n_threads=1) as restored:
            assert np.array_equal(restored.next_logits(), expected)
            saver.feed_tokens(tokens[:20]), restored.feed_tokens(tokens[:20])
            assert np.array_equal(restored.next_logits(), saver.next_logits())


# Vulkan's arithmetic against the CPU's on the random F32 model (K f16, n_ctx 96, 150 tokens): what
# the two backends differ by, and what a sink one position off does. Measured on lavapipe (Mesa
# 22.3.6, LLVM 15): the backends 0.0016-0.0037 apart; a sink one position off 0.074.
# The limit sits between.
BACKENDS_LIMIT = 0.015


def _streamed(model, tokens, sabotage=None):
    with model.session(n_ctx=96, n_threads=1, batch_size=4, refresh_every=10**9, rebase_every=10**9) as s:
        s.feed_tokens(tokens[:-1])
        if sabotage:
            sabotage(s.cache.mem, s.cache.w0 - s.cache.n_kept)
        s.feed_tokens(tokens[-1:])
        return s.next_logits()


def test_vulkan_agrees_with_the_cpu_within_a_limit_a_misplaced_sink_exceeds(vk_random, cpu_random, measured):
    tokens = vk_random.tokenize(TEXT * 3)[:150]
    vulkan, cpu = _streamed(vk_random, tokens), _streamed(cpu_random, tokens)
    one_off = _streamed(cpu_random, tokens, sabotage=first_4_cells_one_position_off)
    apart, error = float(np.abs(vulkan - cpu).max()), float(np.abs(one_off - cpu).max())
    measured("Vulkan vs CPU after 54 evictions", f"{apart:.2e}; a sink one position off: {error:.4f} "
             f"(limit {BACKENDS_LIMIT})")
    assert apart < BACKENDS_LIMIT < error


def test_a_save_made_on_the_cpu_continues_on_vulkan_within_the_backends_limit(vk_random, cpu_random, tmp_path):
    """Decided: a session file carries no backend, so a CPU save restores on Vulkan (and back); it
    continues within what the two backends' arithmetic differs by (BACKENDS_LIMIT), not bitwise."""
    tokens = vk_random.tokenize(TEXT * 3)[:150]
    with cpu_random.session(n_ctx=96, n_threads=1) as on_cpu:
        on_cpu.feed_tokens(tokens)
        on_cpu.save(tmp_path / "cpu.session")
    with vk_random.session(n_ctx=96, n_threads=1) as twin, \
            Session.restore(tmp_path / "cpu.session", vk_random, n_threads=1) as restored:
        twin.feed_tokens(tokens)
        for more in ([], tokens[:30]):
            twin.feed_tokens(more), restored.feed_tokens(more)
            assert np.abs(restored.next_logits() - twin.next_logits()).max() < BACKENDS_LIMIT
        assert restored.cached_tokens() == twin.cached_tokens()


def test_a_short_real_chat_past_n_ctx(vk_model):
    with vk_model.session(n_ctx=64, n_threads=1) as s:  # lavapipe decodes SmolLM2 at ~1 token/s
        s.start_chat("You are terse.")
        replies = ["".join(s.chat(q, max_tokens=8, temperature=0))
                   for q in ("What is the capital of France?", "And of Spain?", "Name a colour.", "Another one?")]
        assert all(replies) and s.stats.evictions > 0 and s.stats.tokens_in_cache <= 64
        assert s.messages[0] == {"role": "system", "content": "You are terse."}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CPU-fallback warning for a model that is on the GPU
        chosen = on_vulkan(edgesink.load(vk_model.path, device="Vulkan0"))  # a device asked for by name
        assert chosen.offload.devices == ("Vulkan0",)
        chosen.close()
