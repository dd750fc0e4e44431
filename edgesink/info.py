"""What ``edgesink info`` reports: versions, the loaded library, backends, devices, the default model."""

from __future__ import annotations

import json
from pathlib import Path

from . import _native
from .fetch.registry import default_model_name, load_registry
from .version import __version__

PIN_FILE = _native.PACKAGE_DIR.parent / "native" / "upstream.json"


def pinned_commit() -> str | None:
    """The llama.cpp commit pinned in native/upstream.json (source checkouts), else what the library says."""
    if PIN_FILE.exists():
        return json.loads(PIN_FILE.read_text())["llama_cpp_commit"]
    return _native.upstream_commit()


def system_info() -> dict:
    """Everything ``edgesink info`` prints, as a dict."""
    entry = load_registry()[default_model_name()]
    model_path: Path = entry.local_path
    return {
        "edgesink": __version__,
        "llama_cpp_commit": pinned_commit(),
        "library": str(_native.LIBRARY_FOLDER) if _native.LIBRARY_FOLDER else "llama-cpp-python's own",
        "sink_shift_patch": _native.patch_level() > 0,
        "patch_level": _native.patch_level(),
        "backends": _native.backends(),
        "devices": _native.devices(),
        "default_model": entry.name,
        "default_model_path": str(model_path),
        "default_model_bytes": model_path.stat().st_size if model_path.exists() else None,
    }


def format_info(info: dict) -> str:
    patch = (f"active (level {info['patch_level']})" if info["sink_shift_patch"]
             else "NOT active: stock libllama, sink eviction shifts the whole window")
    size = (f"{info['default_model_bytes'] / 1e6:.1f} MB" if info["default_model_bytes"]
            else "not fetched (edgesink pull " + info["default_model"] + ")")
    lines = [
        f"edgesink          {info['edgesink']}",
        f"llama.cpp commit  {info['llama_cpp_commit']}",
        f"libllama          {info['library']}",
        f"sink-shift patch  {patch}",
        f"backends          {', '.join(info['backends']) or 'unknown'}",
        "devices           " + ("; ".join(
            f"{d['name']} ({d['description']}" + (f", {d['memory_total'] / 2**30:.1f} GiB)" if d["memory_total"] else ")")
            for d in info["devices"]) or "unknown"),
        f"default model     {info['default_model']}: {info['default_model_path']} ({size})",
    ]
    return "\n".join(lines)
