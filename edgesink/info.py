"""What ``edgesink info`` reports: versions, the loaded library, backends, devices, the default model."""

from __future__ import annotations

from pathlib import Path

from . import _native
from .fetch.registry import default_model_name, load_registry
from .library_check import library_report, pin
from .model import CPU_BACKENDS
from .version import __version__


def pinned_commit() -> str | None:
    """The llama.cpp commit pinned in native/upstream.json, else what the library says."""
    pinned = pin()
    return pinned["llama_cpp_commit"] if pinned else _native.upstream_commit()


def offload_target(devices: list[dict]) -> str:
    """Where a model's layers go by default: llama.cpp's rule (discrete GPUs, else integrated ones)."""
    gpus = [d for d in devices if d["type"] == "GPU"] or [d for d in devices if d["type"] == "IGPU"]
    if gpus:
        return ", ".join(f"{d['name']} ({d['description']})" for d in gpus)
    gpu_backends = [b for b in _native.backends() if b not in CPU_BACKENDS]
    if gpu_backends:
        return (f"the CPU: the {', '.join(gpu_backends)} backend found no device it uses"
                + (" (lavapipe needs GGML_VK_VISIBLE_DEVICES=0)" if "Vulkan" in gpu_backends else ""))
    return "the CPU (a CPU-only build)"


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
        "layers_go_to": offload_target(_native.devices()),
        "library_check": library_report(),
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
            f"{d['name']} ({d['type']}, {d['description']}" + (f", {d['memory_total'] / 2**30:.1f} GiB)"
                                                               if d["memory_total"] else ")")
            for d in info["devices"]) or "unknown"),
        f"layers go to      {info['layers_go_to']}",
        *_check_lines(info["library_check"]),
        f"default model     {info['default_model']}: {info['default_model_path']} ({size})",
    ]
    return "\n".join(lines)


def _check_lines(check: dict) -> list[str]:
    """The library checks, a line each."""
    sizes = ", ".join(f"{name} {v['bindings']}" + ("" if v["library"] in (None, v["bindings"]) else f" != {v['library']}")
                      for name, v in check["struct_sizes"].items())
    known = all(v["library"] is not None for v in check["struct_sizes"].values())
    loaded = "; ".join(f"{name}: {', '.join(paths)}" for name, paths in check["loaded_libraries"].items())
    return [
        f"bindings          {check['bindings']}",
        f"struct sizes      {sizes} ({'checked against the library' if known else 'the library cannot say'})",
        f"ggml commit       {check['ggml_commit']} (libllama built against {check['ggml_commit_built_with'] or 'unknown'})",
        f"loaded libraries  {loaded or 'unknown (no /proc/self/maps)'}",
        "library check     " + ("ok" if not check["problems"] else "PROBLEMS: " + "; ".join(check["problems"])),
    ]
