"""Checking what callers pass to the engine: every bad setting is a ValueError that names it.

Ranges that need the model or n_ctx are checked where those are known (the session, the
policies); these are the ones that can be judged from the values alone, before anything loads.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from . import _native
from ._native import C
from .policies import ContextPolicy
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .model import Model

CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
MAX_THREADS = 512  # GGML_MAX_N_THREADS: more makes llama.cpp crash (measured: SIGSEGV at 100000)


def not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, np.integer))


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    """``value`` must be None or an integer in [low, high]."""
    if value is None:
        return
    if not_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}" if high is not None
                         else f"{name} must be >= {low}, got {value}")


def check_session_options(policy, *, sinks, evict_chunk, batch_size, n_threads, flash_attn, refresh_every,
                          rebase_every) -> None:
    """Session settings checked before anything is loaded (ranges that need n_ctx come later)."""
    _check_int("sinks", sinks, 0)
    _check_int("evict_chunk", evict_chunk, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("n_threads", n_threads, 1, MAX_THREADS)
    _check_int("refresh_every", refresh_every, 1)
    _check_int("rebase_every", rebase_every, 1)
    if flash_attn not in (None, True, False):
        raise ValueError(f"flash_attn must be True, False or None (llama.cpp decides), got {flash_attn!r}")
    if isinstance(policy, str):
        if sinks and policy in ("window", "dense", "recompute"):
            raise ValueError(f"policy {policy!r} keeps no sinks; use policy 'sink' (or 'halve') to keep {sinks}")
        if evict_chunk not in (None, 1) and policy in ("halve", "dense", "recompute"):
            raise ValueError(f"policy {policy!r} has no evict_chunk; it belongs to 'sink' and 'window'")
    elif not isinstance(policy, ContextPolicy):
        raise ValueError(f"policy must be a policy name or a ContextPolicy object, got {policy!r}")


_SAMPLING_INTS = ("top_k", "repeat_last_n", "seed")
_SAMPLING_FLOATS = ("temperature", "top_p", "min_p", "repeat_penalty")


def default_threads() -> int:
    """The CPUs this process may run on (a container's or ``taskset``'s share, not the host's).

    llama.cpp's threads spin-wait for each other at every operation, so more threads than
    usable CPUs slows decoding down by an order of magnitude instead of helping.
    """
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def sampling_params(sampling: dict) -> SamplingParams:
    """SamplingParams from keyword arguments, with wrong names and types as ValueError."""
    unknown = set(sampling) - set(_SAMPLING_INTS) - set(_SAMPLING_FLOATS)
    if unknown:
        raise ValueError(f"unknown sampling setting(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(_SAMPLING_FLOATS + _SAMPLING_INTS)}")
    for name in _SAMPLING_INTS:
        if sampling.get(name) is not None and not_int(sampling[name]):
            raise ValueError(f"{name} must be an integer, got {sampling[name]!r}")
    for name in _SAMPLING_FLOATS:
        value = sampling.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    return SamplingParams(**sampling)


def stop_strings(stop) -> list[str]:
    """One stop string or several; a bare string is one stop string, not a set of characters."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(x, str) for x in stops):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    return stops


def cache_type(name: str) -> int:
    if name not in CACHE_TYPES:
        raise ValueError(f"unknown cache type {name!r}; choose one of {', '.join(CACHE_TYPES)}")
    return CACHE_TYPES[name]


def kept_forward_mode(shift_mode: str) -> bool:
    if shift_mode == "auto":
        return _native.patch_level() > 0
    if shift_mode in ("kept-forward", "window-back"):
        return shift_mode == "kept-forward"
    raise ValueError(f"shift_mode must be 'auto', 'kept-forward' or 'window-back', got {shift_mode!r}")


def check_n_ctx(model: "Model", n_ctx: int, type_k: str, type_v: str) -> int:
    if not isinstance(n_ctx, int) or n_ctx < 2:
        raise ValueError(f"n_ctx must be an integer >= 2, got {n_ctx!r}")
    if model.n_ctx_train and n_ctx > model.n_ctx_train:
        raise ValueError(
            f"n_ctx {n_ctx} is larger than the {model.n_ctx_train} tokens {model.path.name} was trained on; "
            "a longer stream needs no larger n_ctx: the cache evicts"
        )
    cache_type(type_k), cache_type(type_v)
    kv_bytes = estimate_kv_bytes(model, n_ctx)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if kv_bytes > physical:
        raise ValueError(f"n_ctx {n_ctx} needs about {kv_bytes / 2**30:.1f} GiB of KV cache, more than this machine's memory")
    return n_ctx


def estimate_kv_bytes(model: "Model", n_ctx: int, bytes_per_value: float = 2.0) -> int:
    """Bytes of a KV cache of n_ctx tokens (K and V, all layers); F16 unless told the bytes per value."""
    n_embd = C.llama_model_n_embd(model.handle)
    n_head = max(1, C.llama_model_n_head(model.handle))
    n_head_kv = C.llama_model_n_head_kv(model.handle) or n_head
    return int(2 * n_ctx * model.n_layer * (n_embd // n_head) * n_head_kv * bytes_per_value)
