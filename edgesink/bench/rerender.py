"""Re-writing a run's report and plots from the JSON it saved, measuring nothing again.

A run saves everything its report is made from in ``details.json``. After a change to the
report (a new figure computed from the saved series, a clearer table), ``edgesink bench
--report-only --out DIR`` brings an old run's ``results.md`` and plots up to date. Runs
saved before ``details.json`` held the rows get them back from ``results.csv``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .report import write_all
from .runner import draw_plots
from .soak import memory_figures

SUMMARY_KEYS = ("rows", "speedup", "overhead", "segments", "stream_curves", "sinks_sweep", "cache_types", "soak",
                "jobs")


def load_run(out: Path) -> tuple[dict, dict]:
    """The header and summary a run saved in ``out``; FileNotFoundError if there is none."""
    details_file = out / "details.json"
    if not details_file.exists():
        raise FileNotFoundError(f"no benchmark run in {out}: {details_file.name} is missing")
    details = json.loads(details_file.read_text())
    header = {k: v for k, v in details.items() if k not in SUMMARY_KEYS}
    summary = {k: details.get(k) or ([] if k != "soak" else None) for k in SUMMARY_KEYS}
    if not summary["rows"]:
        summary["rows"] = _rows_from_csv(out / "results.csv")
    if summary["soak"]:
        summary["soak"].update(memory_figures(summary["soak"]["series"], header["config"]["main_n_ctx"]))
    return header, summary


def rerender(out: Path, command: str) -> list[str]:
    """Re-write ``out``'s report and plots from its saved JSON; returns the plots written."""

    header, summary = load_run(out)
    old_plots = set(header.get("plots") or [])
    header["rerendered"] = command
    header["plots"] = draw_plots(out, summary, header) if old_plots else []
    for stale in old_plots - set(header["plots"]):
        (out / stale).unlink(missing_ok=True)
    write_all(out, header, summary)
    return header["plots"]


def _rows_from_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str):
    if text in ("", "True", "False"):
        return {"": None, "True": True, "False": False}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text

