"""Is the loaded native library the one that was built, and do the bindings match it?

A library from another build can load without complaint and then crash inside llama.cpp: a ctypes
struct of another size passed by value, a libggml of another commit under a libllama built against
a different one, two copies of libggml in one process. These checks run when the first model
loads (:func:`check_library`) and ``edgesink info`` prints them; each failure is a
:class:`LibraryError` naming both sides.
"""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import llama_cpp

from . import _native
from ._native import C
from .errors import LibraryError

# The structs edgesink passes to llama.cpp by value or fills for it, and their ctypes declarations.
STRUCTS = {"llama_model_params": C.llama_model_params, "llama_context_params": C.llama_context_params,
           "llama_batch": C.llama_batch}
MAPS = Path("/proc/self/maps")
SOURCE_PIN = _native.PACKAGE_DIR.parent / "native" / "upstream.json"  # a source checkout's pin
NATIVE_NAME = re.compile(r"lib(llama|ggml[\w-]*)\.(so|dylib)")


def pin() -> dict | None:
    """The pin (native/upstream.json): llama-cpp-python's version and the llama.cpp commit it vendors;
    None where neither a source checkout nor the installed package holds it."""
    path = SOURCE_PIN if SOURCE_PIN.exists() else _native.installed_path("upstream.json")
    return json.loads(path.read_text()) if path is not None else None


def struct_sizes(structs: dict = STRUCTS) -> dict[str, tuple[int, int | None]]:
    """For each struct: (ctypes' size, the library's own sizeof); None where the library cannot say."""
    return {name: (ctypes.sizeof(cls), _native.struct_size(name)) for name, cls in structs.items()}


def loaded_libraries(maps: str | None = None) -> dict[str, list[Path]]:
    """The native libraries of llama.cpp mapped into this process, by file name: ``libllama.so``,
    ``libggml-base.so``... with every distinct file each name was loaded from (Linux only: empty elsewhere)."""
    if maps is None:
        if not MAPS.exists():
            return {}
        maps = MAPS.read_text()
    found: dict[str, list[Path]] = {}
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path (absent for anonymous maps)
        path = fields[5] if len(fields) == 6 else ""
        name = Path(path).name
        if path.startswith("/") and NATIVE_NAME.fullmatch(name):
            paths = found.setdefault(name, [])
            if Path(path) not in paths:
                paths.append(Path(path))
    return found


def library_problems(structs: dict = STRUCTS, maps: str | None = None) -> list[str]:
    """Every mismatch between the bindings, the loaded libraries and the build; empty when all agree."""
    problems = []
    for name, (ours, theirs) in struct_sizes(structs).items():
        if theirs is not None and ours != theirs:
            problems.append(f"struct {name} is {ours} bytes in the Python bindings but {theirs} in libllama: "
                            "the bindings (llama-cpp-python) and the library come from different llama.cpp versions")
    libraries = loaded_libraries(maps)
    llama = libraries.get("libllama.so", [None])[0]
    for name, paths in sorted(libraries.items()):
        if len(paths) > 1:
            problems.append(f"{len(paths)} copies of {name} are loaded: {', '.join(map(str, paths))}")
        elif llama is not None and paths[0].parent != llama.parent:
            problems.append(f"{name} is loaded from {paths[0].parent}, not from {llama.parent} beside the libllama in "
                            "use: another build's library was found first (LD_LIBRARY_PATH, or loaded earlier)")
    built_with, loaded = _native.built_ggml_commit(), _native.ggml_commit()
    if built_with is not None and loaded != built_with:
        problems.append(f"the loaded libggml reports commit {loaded}, but libllama was built against {built_with}")
    pinned = pin()
    if pinned is not None:
        commit = _native.upstream_commit()
        if commit is not None and commit != pinned["llama_cpp_commit"]:
            problems.append(f"libllama was built from llama.cpp {commit}, but this edgesink pins "
                            f"{pinned['llama_cpp_commit']}")
        if llama_cpp.__version__ != pinned["version"]:
            problems.append(f"the bindings are llama-cpp-python {llama_cpp.__version__}, but this edgesink pins "
                            f"{pinned['version']} (the version whose llama.cpp it builds)")
    return problems


def library_report() -> dict:
    """What ``edgesink info`` shows of the checks."""
    return {"struct_sizes": {k: {"bindings": a, "library": b} for k, (a, b) in struct_sizes().items()},
            "loaded_libraries": {k: [str(p) for p in v] for k, v in loaded_libraries().items()},
            "ggml_commit": _native.ggml_commit(), "ggml_commit_built_with": _native.built_ggml_commit(),
            "bindings": f"llama-cpp-python {llama_cpp.__version__}", "problems": library_problems()}


_checked = False


def check_library() -> None:
    """Raise :class:`LibraryError` naming every mismatch; once per process when all is well."""
    global _checked
    if _checked:
        return
    problems = library_problems()
    if problems:
        raise LibraryError("the native library does not match this edgesink: " + "; ".join(problems)
                           + ". Rebuild it with 'make setup' (or unset EDGESINK_LIB_PATH / LD_LIBRARY_PATH).")
    _checked = True
