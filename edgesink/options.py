"""Checks and facts about settings shared by several modules: integer ranges, cache types, threads,
and what a session's cache needs of the machine. Every bad value is a :class:`SettingsError`.
"""

from __future__ import annotations

import os

import numpy as np

from . import _native, seqstate
from .errors import SettingsError


# enum ggml_type values of the KV cache types llama.cpp accepts, and their bytes per value.
CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
              "q4_1": 20 / 32, "q4_0": 18 / 32}  # quantized: a block of 32 values plus its scales
SHIFT_MODES = ("auto", "kept-forward", "window-back")
MAX_THREADS = 512  # GGML_MAX_N_THREADS: more makes llama.cpp crash (measured: SIGSEGV at 100000)


def not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, np.integer))


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """``value`` must be None or an integer in [low, high]."""
    if value is None:
        return
    if not_int(value):
        raise SettingsError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise SettingsError(f"{name} must be in [{low}, {high}], got {value}" if high is not None
                            else f"{name} must be >= {low}, got {value}")


def default_threads() -> int:
    """The CPUs this process may run on (a container's or ``taskset``'s share, not the host's).

    llama.cpp's threads spin-wait for each other at every operation, so more threads than
    usable CPUs slows decoding down by an order of magnitude instead of helping.
    """
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def stop_strings(stop) -> list[str]:
    """One stop string or several; a bare string is one stop string, not a set of characters."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(x, str) for x in stops):
        raise SettingsError(f"stop must be a string or a list of strings, got {stop!r}")
    return stops


# A stream of a shared context re-encodes its kept tokens in place, in front of its window: the
# loaded libllama must take such a batch (patch 0007); a context of its own uses a scratch sequence.
IN_PLACE_REENCODE_LEVEL = 7


def kept_forward_mode(shift_mode: str, *, shared: bool = False, sliding_window: bool = False) -> bool:
    """Whether evictions move the kept cells forward (see :mod:`edgesink.layout`); "auto": where the
    loaded libllama carries edgesink's patch. A ``shared`` context's stream re-encodes its kept tokens
    in place, which needs patch 0007 and a model without a ``sliding_window`` (llama.cpp's SWA cache
    would drop the cells written in front of the window)."""
    if not shared:
        return _native.patch_level() > 0 if shift_mode == "auto" else shift_mode == "kept-forward"
    problem = ("the model's sliding-window cache cannot take kept tokens re-encoded in front of the window"
               if sliding_window else
               f"the loaded libllama (patch level {_native.patch_level()}) cannot re-encode kept tokens in place "
               f"(level {IN_PLACE_REENCODE_LEVEL})" if _native.patch_level() < IN_PLACE_REENCODE_LEVEL else None)
    if shift_mode == "kept-forward" and problem:
        raise SettingsError(f"a shared context's streams cannot move their kept tokens forward here: {problem}; "
                            "use shift_mode 'auto' or 'window-back'")
    return shift_mode == "kept-forward" or (shift_mode == "auto" and problem is None)


def check_n_ctx(model, n_ctx: int, type_k: str, type_v: str) -> None:
    """The checks of n_ctx that need the (loaded) model: its training length, and a cache that fits in memory.

    Modules below :mod:`edgesink.model` take a loaded Model without importing it: the engine's imports
    point one way only."""
    if model.n_ctx_train and n_ctx > model.n_ctx_train:
        raise SettingsError(
            f"n_ctx {n_ctx} is larger than the {model.n_ctx_train} tokens {model.path.name} was trained on; "
            "a longer stream needs no larger n_ctx: the cache evicts"
        )
    kv_bytes = estimate_kv_bytes(model, n_ctx, bytes_per_value=(TYPE_BYTES[type_k] + TYPE_BYTES[type_v]) / 2)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if kv_bytes > physical:
        raise SettingsError(f"n_ctx {n_ctx} needs about {kv_bytes / 2**30:.1f} GiB of KV cache "
                            f"({type_k}/{type_v}), more than this machine's memory")


def estimate_kv_bytes(model, n_ctx: int, bytes_per_value: float = 2.0) -> int:
    """Bytes of a KV cache of n_ctx tokens (K and V, all layers); F16 unless told the bytes per value."""
    return int(n_ctx * seqstate.kv_bytes_per_cell(model, bytes_per_value, bytes_per_value))
