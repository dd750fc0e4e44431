"""A description of the machine and software a run was made on, written into the results."""

from __future__ import annotations

import json
from pathlib import Path
import os
import platform
import time

from .. import _native
from ..info import pinned_commit
from ..options import default_threads
from ..version import __version__


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def describe_machine(threads: int | None = None) -> dict:
    """CPU, cores, memory, OS, Python, the libllama loaded and how busy the machine was."""

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads or default_threads(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "edgesink": __version__,
        "llama_cpp_commit": pinned_commit(),
        "backends": _native.backends(),
        "patch_level": _native.patch_level(),
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def summary_line(machine: dict) -> str:
    return (f"{machine['cpu']}, {machine['cores']} cores ({machine['threads']} threads used), "
            f"{machine['memory_gib']} GiB, {machine['os']}, Python {machine['python']}")


def repo_relative(path) -> str:
    """A path as committed results should name it: relative to the repository when inside it (this
    machine's absolute paths mean nothing elsewhere), else as given."""
    root = Path(__file__).resolve().parents[2]
    resolved = Path(path).resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def publish(report: dict, json_path: str | None = None) -> None:
    """Print a script's result as JSON, with the machine it ran on, and save it if asked."""
    report = {"machine": describe_machine(report.get("threads")), **report}
    text = json.dumps(report, indent=2)
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")
