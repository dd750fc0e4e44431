"""results.md and eviction_cost.png from the GPU check's gpu.json (benchmarks/gpu/check.py).

    .venv/bin/python benchmarks/gpu/report.py benchmarks/results/gpu     # re-render from gpu.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LIBRARIES = ("patched", "stock", "patched, CUDA graphs off")
MODES = (("kept-forward", "sinks forward"), ("window-back", "window back"))


def latency_rows(data: dict) -> list[dict]:
    """One row per (library, n_ctx): dense and eviction medians, their ratios and graph reuse."""
    rows = []
    for library in LIBRARIES:
        result = data.get(f"latency {library}", {}).get("result")
        for run in (result or {}).get("runs", []):
            row = {"library": library, "n_ctx": run["n_ctx"]}
            for mode, _ in MODES:
                m = run[mode]
                row[mode] = {**m, "ratio": m["evict_ms"] / m["dense_ms"]}
            rows.append(row)
    return rows


def _latency_table(rows: list[dict]) -> list[str]:
    lines = ["| library | n_ctx | dense step | evict 1, sinks forward | evict 1, window back | graphs reused (dense / evict) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        kf, wb = r["kept-forward"], r["window-back"]
        lines.append(f"| {r['library']} | {r['n_ctx']} | {kf['dense_ms']:.2f} ms | {kf['evict_ms']:.2f} ms ({kf['ratio']:.2f}x) "
                     f"| {wb['evict_ms']:.2f} ms ({wb['ratio']:.2f}x) "
                     f"| {kf.get('graphs_reused_dense', '?')} / {kf.get('graphs_reused_evict', '?')} |")
    return lines


def _failed_steps(data: dict) -> list[str]:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict) and value.get("rc") not in (None, 0):
            lines.append(f"- **{key}** failed (rc {value['rc']}, log `{value.get('log')}`):")
            lines += ["", "```", value.get("tail", "")[-1500:], "```", ""]
    return lines


def _tests_line(data: dict) -> str:
    tests = data.get("tests")
    if not tests:
        return "not run"
    last = [line for line in tests["tail"].splitlines() if " passed" in line or " failed" in line or " error" in line]
    return f"rc {tests['rc']}, {tests['seconds']} s: {last[-1].strip('= ') if last else 'no summary'} (log `{tests['log']}`)"


def _loads_line(data: dict) -> str:
    loads = data.get("load")
    if not loads:
        return "not run"
    return "; ".join(f"{name} {codes}" for name, codes in loads.items() if name != "backtrace")


def write_report(data: dict, out: Path) -> None:
    info = data.get("info", {})
    devices = "; ".join(f"{d['name']} ({d['description']})" for d in info.get("devices", [])) or "unknown"
    rows = latency_rows(data)
    lines = ["# GPU check", "", f"Command: `{data.get('command', '?')}`", "",
             f"- devices: {devices}", f"- backends: {', '.join(info.get('backends', [])) or 'unknown'}",
             f"- patch level: {info.get('patch_level', '?')}", f"- loads (exit codes): {_loads_line(data)}",
             f"- tests: {_tests_line(data)}",
             f"- latency model: {json.dumps(data.get('latency model', {}))}", "",
             "## One-token eviction against a dense step (medians of interleaved steps, all layers offloaded)", "",
             *(_latency_table(rows) if rows else ["no latency measured"]), "", *_failed_steps(data)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    if rows:
        _plot(rows, out / "eviction_cost.png")


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (make .venv/.bench-deps): no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for library in LIBRARIES:
        for mode, label in MODES:
            points = sorted((r["n_ctx"], r[mode]["ratio"]) for r in rows if r["library"] == library)
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{library}: {label}")
    ax.axhline(1.10, color="grey", linestyle="--", linewidth=1, label="1.10x target")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n_ctx")
    ax.set_ylabel("one-token eviction / dense step")
    ax.set_title("Cost of evicting one token per step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    write_report(json.loads((folder / "gpu.json").read_text()), folder)
