"""PNG plots of a run (matplotlib, the optional ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path

COLORS = {"dense": "black", "window": "tab:red", "sink": "tab:blue", "halve": "tab:green", "recompute": "tab:purple"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(label: str, policy: str) -> str:
    return "tab:cyan" if policy == "sink" and "chunk 1)" not in label else COLORS.get(policy, "gray")


def _save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return True


def _finish(fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str, **grid) -> bool:
    """Label a one-panel plot, add its legend and grid, and save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, **grid)
    return _save(fig, path)


def plot_all(out: Path, summary: dict, header: dict) -> list[str]:
    """Every plot the results allow; returns the file names written."""
    written = []
    for name, fn in (("logppl_stream.png", _logppl_stream), ("latency_vs_cache.png", _latency),
                     ("ppl_vs_sinks.png", _sinks), ("cache_type_drift.png", _cache_types),
                     ("eviction_overhead.png", _overhead), ("soak.png", _soak)):
        if fn(out / name, summary, header):
            written.append(name)
    return written


def _logppl_stream(path: Path, summary: dict, header: dict) -> bool:
    curves = summary["stream_curves"]
    if not curves:
        return False
    plt = _plt()
    n_ctx = curves[0]["n_ctx"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8.5, 7.5), sharex=True)
    for c in curves:
        color, label = _color(c["label"], c["policy"]), c["label"]
        pts = [(x, y) for x, y in zip(c["segment_mid"], c["segment_nll"]) if y is not None]
        if pts:
            style = dict(lw=3) if c["policy"] == "dense" else dict(marker=".")
            top.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=color, label=label, **style)
        bottom.plot(c["sample_positions"], c["sample_running_nll"], "-", color=color, label=label,
                    lw=2.5 if c["policy"] in ("recompute", "dense") else 1.2)
    for ax in (top, bottom):
        ax.axvline(n_ctx, color="gray", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    top.set_ylabel("mean NLL per segment (nats)\nall positions")
    top.set_title(f"{header['model_name']}: log-perplexity along the stream, n_ctx {n_ctx}")
    n = max(len(c["sample_positions"]) for c in curves)
    bottom.set_ylabel(f"running log-perplexity (nats)\non the {n} shared sampled positions")
    bottom.set_xlabel("position in the stream (tokens); dotted: n_ctx")
    return _save(fig, path)


def _latency(path: Path, summary: dict, header: dict) -> bool:
    rows = [r for r in summary["rows"] if r.get("ms_per_token_median") is not None]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["n_ctx"])
        x = [r["n_ctx"] for r in mine]
        med = [r["ms_per_token_median"] for r in mine]
        p95 = [r["ms_per_token_p95"] for r in mine]
        color = _color(label, mine[0]["policy"])
        ax.errorbar(x, med, yerr=[[0] * len(x), [p - m for p, m in zip(p95, med)]], fmt="o-", color=color,
                    label=label, capsize=3, lw=1.2)
    stock = [o for o in summary["overhead"] if o["library"] == "stock"]
    if stock:
        ax.plot([o["n_ctx"] for o in stock], [o["evict_ms_median"] for o in stock], "x:", color="tab:orange",
                label="sink(4, chunk 1), stock libllama")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return _finish(fig, ax, path, xlabel="cache size n_ctx (tokens)",
                   ylabel="ms per generated token (median; bar to p95)",
                   title=f"{header['model_name']}: per-token latency at a full cache", which="both")


def _sinks(path: Path, summary: dict, header: dict) -> bool:
    sweep = summary["sinks_sweep"]
    if len({s["sinks"] for s in sweep}) < 2:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for n_ctx in sorted({s["n_ctx"] for s in sweep}):
        mine = sorted((s for s in sweep if s["n_ctx"] == n_ctx), key=lambda s: s["sinks"])
        ax.plot([s["sinks"] for s in mine], [s["ppl"] for s in mine], "o-", label=f"n_ctx {n_ctx}")
    ax.set_xticks(sorted({s["sinks"] for s in sweep}))
    return _finish(fig, ax, path, xlabel="attention sinks kept (0: window)",
                   ylabel=f"perplexity, all positions of the first {sweep[0]['tokens'] + 1:,} tokens",
                   title=f"{header['model_name']}: perplexity vs sinks", which="both")


def _cache_types(path: Path, summary: dict, header: dict) -> bool:
    ct = [c for c in summary["cache_types"] if c["vs_f32_pct"] is not None and c["cache_type_k"] != "f32"]
    if not ct:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {"f16": "-", "q8_0": "--", "bf16": "-."}
    for key in dict.fromkeys((c["label"], c["policy"], c["cache_type_k"]) for c in ct):
        mine = [c for c in ct if (c["label"], c["policy"], c["cache_type_k"]) == key]
        ax.plot([(c["start"] + c["end"]) / 2 for c in mine], [c["vs_f32_pct"] for c in mine],
                styles.get(key[2], ":"), marker="o", color=_color(key[0], key[1]), label=f"{key[0]}, K {key[2]}")
    ax.axhline(0, color="gray", lw=0.8)
    return _finish(fig, ax, path, xlabel="position in the stream (tokens)",
                   ylabel="segment perplexity vs f32 K cache (%)",
                   title=f"{header['model_name']}: K-cache type drift, n_ctx {ct[0]['n_ctx']}")


def _overhead(path: Path, summary: dict, header: dict) -> bool:
    ov = summary["overhead"]
    if not ov:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sizes = sorted({o["n_ctx"] for o in ov})
    libraries = sorted({o["library"] for o in ov})
    width = 0.8 / len(libraries)
    for i, lib in enumerate(libraries):
        by = {o["n_ctx"]: o["ratio_median"] for o in ov if o["library"] == lib}
        xs = [k + (i - (len(libraries) - 1) / 2) * width for k in range(len(sizes))]
        ax.bar(xs, [100 * (by.get(n, float("nan")) - 1) for n in sizes], width,
               color="tab:blue" if lib == "patched" else "tab:orange", label=f"{lib} libllama")
    ax.axhline(10, color="gray", ls=":", lw=1, label="10%")
    ax.set_xticks(range(len(sizes)), [str(n) for n in sizes])
    return _finish(fig, ax, path, xlabel="cache size n_ctx (tokens)",
                   ylabel="one-token eviction step over a dense step (%)",
                   title=f"{header['model_name']}: eviction overhead (medians)", axis="y")


def _soak(path: Path, summary: dict, header: dict) -> bool:
    soak = summary["soak"]
    if not soak:
        return False
    plt = _plt()
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    segs = [s for s in soak["segments"] if s["ppl"]]
    a.step([s["start"] for s in segs] + [segs[-1]["end"]], [s["ppl"] for s in segs] + [segs[-1]["ppl"]],
           where="post", color="tab:blue")
    a.set_ylabel("perplexity per segment")
    a.set_ylim(0, max(s["ppl"] for s in segs) * 1.2)
    a.set_title(f"{header['model_name']}: soak through sink — {soak['segments'][-1]['end']:,} tokens")
    series = soak["series"]
    done = [s[0] for s in series]
    for column, kind, color in ((2, "rss", "tab:red"), (3, "anon_swap", "tab:purple")):
        if f"{kind}_after_fill_mb" in soak:
            b.plot(done, [s[column] for s in series], color=color, label=kind.replace("_", "+").upper())
            b.axhline(soak[f"{kind}_after_fill_mb"], color=color, ls=":", lw=1)
    b.set_ylim(0, max(s[2] for s in series) * 1.2)
    b.set_ylabel("memory (MiB)")
    b.legend(fontsize=8, title="dotted: just after the cache filled", title_fontsize=7)
    c.plot(done, soak["ms_per_token_chunks"], color="tab:green", lw=1)
    c.set_ylim(0, max(soak["ms_per_token_chunks"]) * 1.2)
    c.set_ylabel("ms per streamed token")
    c.set_xlabel("tokens streamed")
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
    return _save(fig, path)
