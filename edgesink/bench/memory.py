"""Memory figures: process RSS (now and peak) and the size of a KV cache."""

from __future__ import annotations

import resource
import sys

from ..options import TYPE_BYTES, estimate_kv_bytes


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
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024
    return kb / 1024


def kv_cache_bytes(model, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes of the K and V caches of ``n_ctx`` cells over all layers."""
    return estimate_kv_bytes(model, n_ctx, bytes_per_value=(TYPE_BYTES[type_k] + TYPE_BYTES[type_v]) / 2)
