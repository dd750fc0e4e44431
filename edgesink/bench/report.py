"""Writing the results: the JSON of the issue's format, CSV files, details and a Markdown report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .machine import summary_line
from .summary import json_row

CSV_KEYS = ("label", "policy", "n_ctx", "sinks", "evict_chunk", "cache_type_k", "stream_tokens", "tokens_scored",
            "ppl", "vs_recompute_pct", "vs_recompute_se_pct", "tokens_all", "ppl_all", "ms_per_token_median", "ms_per_token_p95",
            "feed_tokens_per_s", "feed_scored_tokens_per_s", "kv_cache_mb", "peak_rss_mb", "quality_of_chunk_1")


def results_json(header: dict, summary: dict) -> dict:
    """``{"model", "machine", "results": [...]}``, the format the issue fixes."""
    return {"model": header["model"], "machine": header["machine"],
            "results": [json_row(r) for r in summary["rows"]]}


def write_all(out: Path, header: dict, summary: dict, json_path: str | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    # Rounded once, here, to results.json's 3 decimals: results.json, the CSV, details.json and the report
    # then hold the same figures, and a report re-rendered from the CSV prints what the first did
    # (a figure rounded twice, to 4 decimals and then to 3 or 2, can move its last digit).
    summary = {**summary, "rows": [_rounded(r) for r in summary["rows"]],
               "segments": [_rounded(s) for s in summary["segments"]]}
    written = []
    data = results_json(header, summary)
    for path in [out / "results.json"] + ([Path(json_path)] if json_path else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
        written.append(path)
    written.append(_write_csv(out / "results.csv", summary["rows"], CSV_KEYS))
    if summary["segments"]:
        written.append(_write_csv(out / "segments.csv", summary["segments"], list(summary["segments"][0])))
    else:
        (out / "segments.csv").unlink(missing_ok=True)  # a re-rendered run may have had one
    details = {**header, **summary}  # everything the report is made from: see rerender()
    (out / "details.json").write_text(json.dumps(details, indent=1, default=float) + "\n")
    (out / "results.md").write_text(markdown(header, summary))
    return written + [out / "details.json", out / "results.md"]


def _write_csv(path: Path, rows: list[dict], keys) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keys), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def _rounded(row: dict) -> dict:
    """``row`` with its floats to 3 decimals, the precision every output of a run keeps."""
    return {k: (round(float(v), 3) if isinstance(v, float) else v) for k, v in row.items()}


def _fmt(x, digits=2, suffix="") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}{suffix}"
    return f"{x}{suffix}"


def _vs(row: dict) -> str:
    if row.get("vs_recompute_pct") is None:
        return "–"
    return f"{row['vs_recompute_pct']:+.1f}% ± {row['vs_recompute_se_pct']:.1f}%"


def _table(headers: list[str], lines: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out) + "\n"


def _intro(header: dict) -> str:
    machine = header["machine"]
    text = (f"# Context-shift benchmark\n\n- model: {header['model']}\n- text: {header['text']}\n"
            f"- machine: {summary_line(machine)}; load average at start {machine['load_average_at_start']}\n"
            f"- libllama: patch level {machine['patch_level']}, llama.cpp {machine['llama_cpp_commit']}; "
            f"stock library: {header.get('stock_lib') or 'not compared'}\n"
            f"- command: `{header['command']}`\n- date: {machine['date']}; run time {header['run_seconds'] / 60:.1f} min\n")
    if header.get("rerendered"):
        text += f"- report re-rendered from the run's JSON, nothing measured again: `{header['rerendered']}`\n"
    return text


def _quality_note(cfg: dict) -> str:
    return (f"\nPerplexity (`ppl`) is on the same positions for every policy at an n_ctx: a uniform sample of "
            f"{cfg['sample']} positions of the first {cfg['tokens']:,} tokens where recompute was scored (fewer for "
            f"the shorter streams). `ppl all` is over every position of the stream. `dense` cannot pass its cache "
            f"and is scored on the first n_ctx tokens only. Tokens are fed in the engine's default batches (n_ctx/16, "
            f"at most 64): a batch of b tokens evicts b first, so while feeding, sink evicts per batch; an eviction "
            f"chunk that divides b computes exactly what chunk 1 does (rows marked \"= chunk 1\" share its run). "
            f"Generation evicts per token.\n")


def _quality_table(rows: list[dict]) -> str:
    return "\n## Quality per policy and n_ctx\n\n" + _table(
        ["policy", "n_ctx", "K type", "stream", "scored", "ppl", "vs recompute (± s.e.)", "ppl all"],
        [[r["label"] + (" (= chunk 1)" if r.get("quality_of_chunk_1") else ""), r["n_ctx"], r["cache_type_k"],
          _fmt(r.get("stream_tokens")), r["tokens_scored"], _fmt(r["ppl"]), _vs(r), _fmt(r.get("ppl_all"))]
         for r in rows])


def markdown(header: dict, summary: dict) -> str:
    """The report: what was run, then one table per question (sections with nothing measured are left out)."""
    rows = summary["rows"]
    quality_rows = [r for r in rows if r.get("ppl") is not None]
    parts = [_intro(header), _quality_note(header["config"]) if quality_rows else ""]
    headline = headlines(header, summary)
    if headline:
        parts.append("\n## Headline\n\n" + "".join(f"- {line}\n" for line in headline))
    if quality_rows:
        parts.append(_quality_table(quality_rows))
    speed_rows = [r for r in rows if r.get("ms_per_token_median") is not None]
    parts.append("\n## Speed and memory (generation at a full cache, greedy)\n\n")
    parts.append(_table(
        ["policy", "n_ctx", "ms/token median", "ms/token p95", "feed tokens/s", "KV cache MiB", "peak RSS MiB"],
        [[r["label"], r["n_ctx"], _fmt(r["ms_per_token_median"]), _fmt(r["ms_per_token_p95"]),
          _fmt(r.get("feed_tokens_per_s"), 0), _fmt(r["kv_cache_mb"], 1), _fmt(r["peak_rss_mb"], 0)] for r in speed_rows]))
    if any(r["policy"] == "recompute" for r in speed_rows):
        parts.append("\n`recompute` feeds lazily; its feed rate is one re-encoding of the window per token.\n")
    if summary["speedup"]:
        parts.append("\n## Speed-up of sink over recompute (per generated token)\n\n")
        parts.append(_table(["n_ctx", "sink ms", "recompute ms", "speed-up"],
                            [[s["n_ctx"], _fmt(s["sink_ms"]), _fmt(s["recompute_ms"]), _fmt(s["speedup"], 1, "×")]
                             for s in summary["speedup"]]))
    if summary["overhead"]:
        parts.append("\n## Eviction overhead: one-token eviction vs a dense step at the same fill\n\n")
        parts.append(_table(
            ["n_ctx", "library", "shift", "steps", "dense ms", "evict ms", "evict/dense (median)", "evict/dense (mean)"],
            [[o["n_ctx"], o["library"], o["shift"], o["steps"], _fmt(o["dense_ms_median"]), _fmt(o["evict_ms_median"]),
              _fmt(o["ratio_median"], 3), _fmt(o["ratio_mean"], 3)] for o in summary["overhead"]]))
        parts.append("\nMedians of interleaved pairs; the means include kept-forward's periodic re-base and refresh.\n")
    if summary["sinks_sweep"]:
        sweep = summary["sinks_sweep"]
        sinks = sorted({s["sinks"] for s in sweep})
        parts.append(f"\n## Perplexity vs number of sinks (sink, chunk 1; all positions of the first "
                     f"{sweep[0]['tokens'] + 1:,} tokens)\n\n")
        lines = []
        for n_ctx in sorted({s["n_ctx"] for s in sweep}):
            by = {s["sinks"]: s["ppl"] for s in sweep if s["n_ctx"] == n_ctx}
            lines.append([n_ctx] + [_fmt(by.get(k)) for k in sinks])
        parts.append(_table(["n_ctx"] + [f"{k} sinks" for k in sinks], lines))
    if summary["cache_types"]:
        parts.append("\n## K-cache type: perplexity per segment (all positions), change against f32\n\n")
        ct = summary["cache_types"]
        segments = sorted({c["segment"] for c in ct})
        lines = []
        for key in dict.fromkeys((c["label"], c["cache_type_k"]) for c in ct):
            segs = {c["segment"]: c for c in ct if (c["label"], c["cache_type_k"]) == key}
            lines.append([key[0], key[1]] + [f"{_fmt(segs[i]['ppl'])} ({_fmt(segs[i]['vs_f32_pct'], 2, '%')})"
                                             for i in segments])
        parts.append(_table(["policy", "K type"] + [f"tokens {ct[i]['start']:,}–" for i in segments], lines))
    soak = summary["soak"]
    if soak:
        parts.append(f"\n## Soak: {soak['segments'][-1]['end']:,} tokens through sink\n\n"
                     f"{soak['tokens_per_s']:.0f} tokens/s; {_soak_speed(soak)}.\n\n"
                     + "".join(f"- {_soak_memory(soak, kind)}\n" for kind in ("rss", "anon_swap")
                               if f"{kind}_after_fill_mb" in soak) + "\n")
        parts.append(_table(["segment", "tokens", "scored", "ppl"],
                            [[i, f"{s['start']:,}–{s['end']:,}", s["scored"], _fmt(s["ppl"])]
                             for i, s in enumerate(soak["segments"])]))
    plots = header.get("plots") or []
    if plots:
        parts.append("\n## Plots\n\n" + "".join(f"![{p}]({p})\n" for p in plots))
    return "".join(parts)


def _find(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def headlines(header: dict, summary: dict) -> list[str]:
    """The figures the issue's targets are about, one line each (what the README quotes)."""
    cfg, rows, lines = header["config"], summary["rows"], []
    main, base = cfg["main_n_ctx"], cfg["cache_types"][0]
    sink = _find(rows, policy="sink", n_ctx=main, sinks=4, evict_chunk=1, cache_type_k=base)
    rec = _find(rows, policy="recompute", n_ctx=main, cache_type_k=base)
    halve = _find(rows, policy="halve", n_ctx=main, cache_type_k=base)
    window = _find(rows, policy="window", n_ctx=main, evict_chunk=1, cache_type_k=base)
    if sink and sink.get("ppl"):
        text = f"quality at n_ctx {main} over {sink['stream_tokens']:,} tokens ({sink['tokens_scored']} shared positions): "
        text += f"sink {sink['ppl']:.2f}"
        if rec and rec.get("ppl"):
            text += f", recompute {rec['ppl']:.2f} (sink {_vs(sink)})"
        if halve and halve.get("ppl"):
            text += f", halve {halve['ppl']:.2f}"
        if window and window.get("ppl"):
            text += f", window {window['ppl']:.2f} ({window['ppl'] / sink['ppl']:.1f}× sink)"
        if window and window.get("ppl_all") and sink.get("ppl_all"):
            text += f"; over all positions sink {sink['ppl_all']:.2f}, window {window['ppl_all']:.2f}"
        lines.append(text)
    if summary["speedup"]:
        s = max(summary["speedup"], key=lambda s: s["n_ctx"])
        lines.append(f"per generated token at n_ctx {s['n_ctx']}: sink {s['sink_ms']:.1f} ms, recompute "
                     f"{s['recompute_ms']:.0f} ms: {s['speedup']:.0f}× faster")
    for n_ctx in sorted({o["n_ctx"] for o in summary["overhead"]}):
        by = {o["library"]: o for o in summary["overhead"] if o["n_ctx"] == n_ctx}
        text = f"one-token eviction over a dense step at n_ctx {n_ctx}: " + ", ".join(
            f"{lib} {100 * (o['ratio_median'] - 1):+.0f}% ({o['evict_ms_median']:.1f} vs {o['dense_ms_median']:.1f} ms)"
            for lib, o in sorted(by.items()))
        lines.append(text)
    drift = {}
    for c in summary["cache_types"]:
        if c["vs_f32_pct"] is not None and c["cache_type_k"] != "f32":
            key = f"{c['label']} K {c['cache_type_k']}"
            drift[key] = max(drift.get(key, 0.0), abs(c["vs_f32_pct"]))
    if drift:
        lines.append("largest per-segment perplexity change against an f32 K cache: "
                     + ", ".join(f"{k} {v:.2f}%" for k, v in drift.items()))
    soak = summary["soak"]
    if soak:
        ppl = [s["ppl"] for s in soak["segments"] if s["ppl"]]
        lines.append(f"soak of {soak['segments'][-1]['end']:,} tokens through sink: {_soak_memory(soak, 'rss')}; "
                     f"perplexity per segment {min(ppl):.2f}–{max(ppl):.2f}; {soak['tokens_per_s']:.0f} tokens/s, "
                     f"{_soak_speed(soak)}")
    return lines


_MEMORY_NAMES = {"rss": "RSS", "anon_swap": "anonymous memory + swap"}


def _soak_memory(soak: dict, kind: str) -> str:
    """One memory figure of a soak: after the first fill, at the end, per quarter and its trend."""
    after, end = soak[f"{kind}_after_fill_mb"], soak[f"{kind}_end_mb"]
    quarters = "/".join(f"{q:.2f}" for q in soak[f"{kind}_quarter_medians_mb"])
    return (f"{_MEMORY_NAMES[kind]} {after:.1f} MiB just after the cache filled, {end:.1f} MiB at the end "
            f"({100 * (end / after - 1):+.2f}%); medians per quarter of the stream {quarters} MiB, "
            f"trend {soak[f'{kind}_trend_mb_per_100k']:+.3f} MiB per 100k tokens")


def _soak_speed(soak: dict) -> str:
    first, last = soak["ms_per_token_first_tenth"], soak["ms_per_token_last_tenth"]
    return (f"streaming cost {first:.3f} ms/token over the first tenth, {last:.3f} over the last "
            f"({100 * (last / first - 1):+.1f}%)")
