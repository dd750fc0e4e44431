"""From the raw results of the jobs to the figures the report shows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .config import DEFAULT_SINKS, BenchConfig, Job, Variant, same_quality_as_chunk_1
from .quality import perplexity, segment_perplexities

ROW_KEYS = ("policy", "n_ctx", "sinks", "evict_chunk", "cache_type_k", "tokens_scored", "ppl",
            "ms_per_token_median", "ms_per_token_p95", "feed_tokens_per_s", "peak_rss_mb")


@dataclass
class Measured:
    job: Job
    result: dict
    nll: np.ndarray | None = None  # quality jobs: NLL per stream position (NaN where not scored)


def _round(x, digits=3):
    return None if x is None else round(float(x), digits)


def _median_p95(ms) -> tuple[float, float]:
    return float(np.median(ms)), float(np.percentile(ms, 95))


def shared_positions(sample: np.ndarray, measured: list[Measured], n_ctx: int, n_tokens: int) -> np.ndarray:
    """The sample positions below ``n_tokens`` that recompute scored at ``n_ctx`` (all, without recompute)."""
    positions = sample[sample < n_tokens]
    for m in measured:
        if m.job.kind == "quality" and m.job.variant.context_policy.recomputes and m.job.variant.n_ctx == n_ctx:
            positions = positions[np.isfinite(m.nll[positions])] if len(positions) else positions
    return positions


def summarize(config: BenchConfig, measured: list[Measured], sample: np.ndarray) -> dict:
    """Rows (one per variant) and the sections of the report."""
    quality = {}  # variant -> Measured (the longest stream if measured twice)
    for m in measured:
        if m.job.kind == "quality":
            old = quality.get(m.job.variant)
            if old is None or m.job.n_tokens > old.job.n_tokens:
                quality[m.job.variant] = m
    latency = {m.job.variant: m for m in measured if m.job.kind == "latency"}
    variants = list(dict.fromkeys([m.job.variant for m in measured if m.job.kind in ("quality", "latency")]))
    own = dict(quality)
    shared = {}  # variants whose quality is that of chunk 1 (not run twice)
    for v in variants:
        chunk_1 = dataclasses.replace(v, evict_chunk=1)
        if v not in quality and same_quality_as_chunk_1(v) and chunk_1 in quality:
            quality[v] = shared[v] = quality[chunk_1]

    rows = []
    for v in variants:
        q, lat = quality.get(v), latency.get(v)
        row = {**v.to_dict(), "label": v.label}
        if q is not None:
            positions = shared_positions(sample, measured, v.n_ctx, q.job.n_tokens)
            row["ppl"], row["tokens_scored"] = perplexity(q.nll, positions)
            row.update(_against_recompute(q, own, positions))
            row["ppl_all"], row["tokens_all"] = (perplexity(q.nll) if v.policy != "recompute" else (None, 0))
            row["stream_tokens"] = q.job.n_tokens
            row["feed_scored_tokens_per_s"] = q.result["tokens_fed"] / q.result["seconds"]
            row["quality_of_chunk_1"] = v in shared
        if lat is not None:
            row["ms_per_token_median"], row["ms_per_token_p95"] = _median_p95(lat.result["ms"])
            row["feed_tokens_per_s"] = lat.result["feed_tokens_per_s"]
        peaks = [m.result["peak_rss_mb"] for m in measured if m.job.variant == v and not m.job.stock]
        row["peak_rss_mb"] = max(peaks) if peaks else None
        row["kv_cache_mb"] = (q or lat).result["kv_cache_bytes"] / 2**20
        rows.append(row)
    rows.sort(key=lambda r: _row_order(r, config))
    return {
        "rows": rows,
        "speedup": _speedups(rows),
        "overhead": _overhead(measured),
        "segments": _segments(config, own, sample, measured),
        "stream_curves": _stream_curves(config, own, sample, measured),
        "sinks_sweep": _sinks_sweep(config, own),
        "cache_types": _cache_types(config, own),
        "soak": next((m.result for m in measured if m.job.kind == "soak"), None),
        "jobs": [{"label": m.job.label, "wall_seconds": _round(m.result["wall_seconds"], 2),
                  "cpu_seconds": _round(m.result["cpu_seconds"], 2)} for m in measured],
    }


def _row_order(row: dict, config: BenchConfig) -> tuple:
    """Per K type, the policy rows per n_ctx first, then the sinks sweep."""
    swept = row["policy"] == "sink" and row["sinks"] != DEFAULT_SINKS
    return (config.cache_types.index(row["cache_type_k"]), swept, row["n_ctx"],
            POLICY_ORDER.index(row["policy"]), row["sinks"], row["evict_chunk"] or 0)


POLICY_ORDER = ("dense", "window", "sink", "halve", "recompute")


def json_row(row: dict) -> dict:
    """A row with exactly the keys of the JSON results format (None where not measured)."""
    found = {}
    for key in ROW_KEYS:
        value = row.get(key)
        found[key] = _round(value) if isinstance(value, float) else value
    if found["tokens_scored"] is None:
        found["tokens_scored"] = 0
    return found


def _against_recompute(q: Measured, quality: dict, positions: np.ndarray) -> dict:
    """Perplexity change against recompute on the shared positions, with its standard error.

    Paired per position: the error is std(NLL - NLL_recompute) / sqrt(n), as a percentage.
    """
    v = q.job.variant
    # recompute never shifts, so the K type of its reference matters little: prefer the same one
    refs = [m for w, m in quality.items()
            if w.context_policy.recomputes and w.n_ctx == v.n_ctx and m.job.n_tokens >= q.job.n_tokens]
    ref = min(refs, key=lambda m: m.job.variant.cache_type_k != v.cache_type_k) if refs else None
    if ref is None or v.context_policy.recomputes:
        return {}
    d = q.nll[positions] - ref.nll[positions]
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return {}
    return {"vs_recompute_pct": 100 * float(np.expm1(d.mean())),
            "vs_recompute_se_pct": 100 * float(d.std(ddof=1) / np.sqrt(len(d)))}


def _speedups(rows: list[dict]) -> list[dict]:
    found = []
    for n_ctx in sorted({r["n_ctx"] for r in rows}):
        def ms(policy, **match):
            for r in rows:
                if (r["policy"] == policy and r["n_ctx"] == n_ctx and r.get("ms_per_token_median")
                        and all(r.get(k) == v for k, v in match.items())):
                    return r["ms_per_token_median"]
            return None

        sink, recompute = ms("sink", evict_chunk=1, sinks=DEFAULT_SINKS), ms("recompute")
        if sink and recompute:
            found.append({"n_ctx": n_ctx, "sink_ms": sink, "recompute_ms": recompute, "speedup": recompute / sink})
    return found


def _overhead(measured: list[Measured]) -> list[dict]:
    """Eviction step vs dense step at the same fill, per n_ctx and library (rounds pooled)."""
    pooled: dict[tuple, dict] = {}
    for m in measured:
        if m.job.kind != "overhead":
            continue
        key = (m.job.variant.n_ctx, "stock" if m.job.stock else "patched")
        entry = pooled.setdefault(key, {"evict": [], "dense": [], "result": m.result})
        entry["evict"] += m.result["evict_ms"]
        entry["dense"] += m.result["dense_ms"]
    found = []
    for (n_ctx, library), e in sorted(pooled.items()):
        evict, dense = np.asarray(e["evict"]), np.asarray(e["dense"])
        found.append({
            "n_ctx": n_ctx, "library": library, "patch_level": e["result"]["patch_level"],
            "shift": "kept-forward" if e["result"]["kept_forward"] else "window-back", "steps": len(evict),
            "dense_ms_median": float(np.median(dense)), "evict_ms_median": float(np.median(evict)),
            "ratio_median": float(np.median(evict) / np.median(dense)),
            # means include the rare re-base / refresh of kept-forward eviction
            "dense_ms_mean": float(dense.mean()), "evict_ms_mean": float(evict.mean()),
            "ratio_mean": float(evict.mean() / dense.mean()),
        })
    return found


def _segments(config: BenchConfig, quality: dict, sample: np.ndarray, measured: list[Measured]) -> list[dict]:
    """Perplexity per segment along the long streams (main n_ctx), on all positions and on the sample."""
    found = []
    for v, m in _main_variants(config, quality):
        positions = shared_positions(sample, measured, v.n_ctx, m.job.n_tokens)
        on_sample = segment_perplexities(m.nll, config.segments, positions)
        on_all = segment_perplexities(m.nll, config.segments) if v.policy != "recompute" else None
        for i, seg in enumerate(on_sample):
            found.append({**v.to_dict(), "label": v.label, "segment": i, "start": seg["start"], "end": seg["end"],
                          "ppl_sample": seg["ppl"], "scored_sample": seg["scored"],
                          "ppl_all": on_all[i]["ppl"] if on_all else None,
                          "scored_all": on_all[i]["scored"] if on_all else 0})
    return found


def _sinks_sweep(config: BenchConfig, quality: dict) -> list[dict]:
    """Perplexity (all positions of the sweep's prefix) per n_ctx and number of sinks."""
    found = []
    n = config.sweep_length
    for n_ctx in config.n_ctx:
        for s in config.sinks:
            v = Variant.of("sink", n_ctx, config.base_type, sinks=s)
            m = quality.get(v) or (quality.get(Variant.of("window", n_ctx, config.base_type)) if s == 0 else None)
            if m is not None:
                ppl, scored = perplexity(m.nll[:n])
                found.append({"n_ctx": n_ctx, "sinks": s, "ppl": ppl, "tokens": scored})
    return found


def _cache_types(config: BenchConfig, quality: dict) -> list[dict]:
    """Per-segment perplexity of the shifting policies per K-cache type, and its change against f32."""
    found = []
    for v, m in quality.items():
        if v.n_ctx != config.main_n_ctx or v.policy not in ("sink", "halve") or v.evict_chunk not in (None, 1) \
                or v.sinks != DEFAULT_SINKS or len(config.cache_types) < 2:
            continue
        ref = quality.get(Variant(v.policy, v.n_ctx, v.sinks, v.evict_chunk, "f32"))
        segs = segment_perplexities(m.nll, config.segments)
        ref_segs = segment_perplexities(ref.nll, config.segments) if ref is not None else None
        for i, seg in enumerate(segs):
            ref_ppl = ref_segs[i]["ppl"] if ref_segs else None
            found.append({**v.to_dict(), "label": v.label, "segment": i, "start": seg["start"], "end": seg["end"],
                          "ppl": seg["ppl"], "vs_f32_pct": 100 * (seg["ppl"] / ref_ppl - 1) if ref_ppl else None})
    return found


STREAM_SEGMENTS = 40  # points of the per-segment curves in the log-perplexity plot


def _main_variants(config: BenchConfig, quality: dict):
    """The long quality runs at the main n_ctx with the first K type, one per policy variant."""
    for v, m in quality.items():
        if (v.n_ctx == config.main_n_ctx and m.job.n_tokens == config.tokens and v.cache_type_k == config.base_type
                and (v.policy != "sink" or v.sinks == DEFAULT_SINKS)):
            yield v, m


def _stream_curves(config: BenchConfig, quality: dict, sample: np.ndarray, measured: list[Measured]) -> list[dict]:
    """Log-perplexity along the main stream: per segment on all positions, and running on the sample."""
    found = []
    for v, m in _main_variants(config, quality):
        edges = np.linspace(0, len(m.nll), STREAM_SEGMENTS + 1).astype(int)
        seg_nll = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            part = m.nll[lo:hi][np.isfinite(m.nll[lo:hi])]
            seg_nll.append(float(part.mean()) if len(part) and v.policy != "recompute" else None)
        positions = shared_positions(sample, measured, v.n_ctx, m.job.n_tokens)
        values = m.nll[positions]
        ok = np.isfinite(values)
        running = np.cumsum(values[ok]) / np.arange(1, ok.sum() + 1)
        found.append({**v.to_dict(), "label": v.label,
                      "segment_mid": ((edges[:-1] + edges[1:]) / 2).tolist(), "segment_nll": seg_nll,
                      "sample_positions": positions[ok].tolist(), "sample_running_nll": running.tolist()})
    return found
