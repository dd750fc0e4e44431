"""Memory figures: process RSS (now and peak) and the size of a KV cache."""

from __future__ import annotations

import resource

# Bytes per stored value of the llama.cpp cache types (q8_0: blocks of 32 values + an f16 scale).
TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
              "q4_1": 20 / 32, "q4_0": 18 / 32}


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux; else the peak)."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else peak_rss_mb()


def anon_swap_mb() -> float | None:
    """Anonymous resident memory plus swap of this process, in MiB (Linux only, else None).

    Unlike RSS it leaves out the file-backed pages of the mapped model, which the kernel may
    drop and reload at will: growth here is memory the process itself holds on to.
    """
    anon, swap = _status_kb("RssAnon"), _status_kb("VmSwap")
    return None if anon is None else (anon + (swap or 0)) / 1024


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    kb = _status_kb("VmHWM")
    if kb is None:  # macOS reports bytes, Linux kilobytes
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024
    return kb / 1024


def kv_cache_bytes(model, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes of the K and V caches of ``n_ctx`` cells over all layers."""
    from ..options import estimate_kv_bytes

    return estimate_kv_bytes(model, n_ctx, bytes_per_value=(TYPE_BYTES[type_k] + TYPE_BYTES[type_v]) / 2)
