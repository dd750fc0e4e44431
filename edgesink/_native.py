"""Loading libllama: edgesink's patched build first, a stock one only as a fallback.

llama-cpp-python supplies the ctypes bindings; it reads ``LLAMA_CPP_LIB_PATH`` once, when
``llama_cpp`` is first imported. This module sets that variable to edgesink's own library folder
before the import, so every binding in the process talks to the patched library. The bindings for
the symbols edgesink adds (``native/include/edgesink.h``) live here, each with its C signature.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

LIB_PATH_ENV = "EDGESINK_LIB_PATH"  # a folder holding libllama; overrides the packaged one
PACKAGE_DIR = Path(__file__).resolve().parent


def installed_path(relative: str) -> Path | None:
    """Where a file that CMake installed into the package lives, or None if it is not there.

    In a regular install that is next to the Python files; in an editable install the Python
    files stay in the source tree while CMake's outputs go to site-packages.
    """
    candidates = [PACKAGE_DIR / relative]
    try:
        candidates.append(Path(importlib.metadata.distribution("edgesink").locate_file(f"edgesink/{relative}")))
    except importlib.metadata.PackageNotFoundError:
        pass
    return next((c for c in candidates if c.exists()), None)


def _library_folder() -> Path | None:
    override = os.environ.get(LIB_PATH_ENV)
    if override:
        return Path(override)
    return installed_path("lib")


_folder = _library_folder()
if _folder is not None and "llama_cpp" not in sys.modules:
    os.environ["LLAMA_CPP_LIB_PATH"] = str(_folder)

import llama_cpp  # noqa: E402  (must follow the environment set-up above)
import llama_cpp.llama_cpp as C  # noqa: E402

LIB: ctypes.CDLL = C._lib
LIBRARY_FOLDER: Path | None = Path(os.environ["LLAMA_CPP_LIB_PATH"]) if "LLAMA_CPP_LIB_PATH" in os.environ else None


def _optional_function(name: str, restype, argtypes):
    """A function of LIB, or None when this libllama does not export it (a stock build)."""
    try:
        fn = getattr(LIB, name)
    except AttributeError:
        return None
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


# int32_t edgesink_patch_level(void);
_edgesink_patch_level = _optional_function("edgesink_patch_level", ctypes.c_int32, [])

# const char * edgesink_upstream_commit(void);
_edgesink_upstream_commit = _optional_function("edgesink_upstream_commit", ctypes.c_char_p, [])


# size_t edgesink_struct_size(const char * name);
_edgesink_struct_size = _optional_function("edgesink_struct_size", ctypes.c_size_t, [ctypes.c_char_p])

# const char * edgesink_ggml_commit(void);
_edgesink_ggml_commit = _optional_function("edgesink_ggml_commit", ctypes.c_char_p, [])


def struct_size(name: str) -> int | None:
    """The library's own sizeof of a llama.h struct; None where it cannot say (a stock library)."""
    if not _edgesink_struct_size:
        return None
    size = int(_edgesink_struct_size(name.encode()))
    return size or None


def built_ggml_commit() -> str | None:
    """The ggml commit the loaded libllama was built against; None for a stock library."""
    return _edgesink_ggml_commit().decode() if _edgesink_ggml_commit else None


def patch_level() -> int:
    """Number of edgesink patches in the loaded libllama; 0 for a stock library."""
    return int(_edgesink_patch_level()) if _edgesink_patch_level else 0


def upstream_commit() -> str | None:
    """The llama.cpp commit the patched library reports, or None for a stock library."""
    return _edgesink_upstream_commit().decode() if _edgesink_upstream_commit else None


_warned_stock = False


def warn_if_stock() -> None:
    """Warn once per process that the loaded libllama lacks edgesink's patches."""
    global _warned_stock
    if patch_level() == 0 and not _warned_stock:
        _warned_stock = True
        warnings.warn(
            "edgesink: the loaded libllama is a stock build without edgesink's K-shift patch; "
            "sink eviction falls back to shifting the whole window (slower). "
            "Run 'make setup' to build the patched library.",
            RuntimeWarning,
            stacklevel=3,
        )


# llama.cpp's log is read as well as shown: a model load reads from it where its layers went
# (llama.cpp has no function that says so). Each capture collects every line while it is open.
_captures: list[list[str]] = []
_verbose = False


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """The lines llama.cpp logs (in any thread) while the block runs, shown or not."""
    lines: list[str] = []
    _captures.append(lines)
    try:
        yield lines
    finally:
        _captures.remove(lines)


# void llama_log_set(ggml_log_callback log_callback, void * user_data);
@C.llama_log_callback
def _log_sink(level, text, user_data):  # pragma: no cover - called from C
    line = text.decode("utf-8", errors="replace")
    for lines in list(_captures):
        lines.append(line)
    if _verbose:
        sys.stderr.write(line)


def set_verbose(verbose: bool) -> None:
    """Show llama.cpp's log on stderr (verbose) or keep it quiet (the default); either way it can be
    read with :func:`captured_log`."""
    global _verbose
    _verbose = verbose
    C.llama_log_set(_log_sink, ctypes.c_void_p(0))


set_verbose(os.environ.get("EDGESINK_VERBOSE") == "1")
C.llama_backend_init()


# -- ggml backends and devices (exported by libggml, reached through libllama's dependencies) ----

# size_t ggml_backend_reg_count(void);
_reg_count = _optional_function("ggml_backend_reg_count", ctypes.c_size_t, [])
# ggml_backend_reg_t ggml_backend_reg_get(size_t index);
_reg_get = _optional_function("ggml_backend_reg_get", ctypes.c_void_p, [ctypes.c_size_t])
# const char * ggml_backend_reg_name(ggml_backend_reg_t reg);
_reg_name = _optional_function("ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p])
# size_t ggml_backend_dev_count(void);
_dev_count = _optional_function("ggml_backend_dev_count", ctypes.c_size_t, [])
# ggml_backend_dev_t ggml_backend_dev_get(size_t index);
_dev_get = _optional_function("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t])
# const char * ggml_backend_dev_name(ggml_backend_dev_t device);
_dev_name = _optional_function("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p])
# const char * ggml_backend_dev_description(ggml_backend_dev_t device);
_dev_description = _optional_function("ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p])
# void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total);
_dev_memory = _optional_function("ggml_backend_dev_memory", None,
                                 [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)])


# enum ggml_backend_dev_type { CPU, GPU, IGPU, ACCEL, META };
DEVICE_TYPES = ("CPU", "GPU", "IGPU", "ACCEL", "META")
# enum ggml_backend_dev_type ggml_backend_dev_type(ggml_backend_dev_t device);
_dev_type = _optional_function("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p])
# ggml_backend_dev_t ggml_backend_dev_by_name(const char * name);
_dev_by_name = _optional_function("ggml_backend_dev_by_name", ctypes.c_void_p, [ctypes.c_char_p])
# const char * ggml_commit(void);   (libggml-base: the commit the loaded ggml was built from)
_ggml_commit = _optional_function("ggml_commit", ctypes.c_char_p, [])


def ggml_commit() -> str | None:
    """The commit the loaded libggml reports (None if it cannot say)."""
    return _ggml_commit().decode() if _ggml_commit else None


def device_handle(name: str):
    """The ``ggml_backend_dev_t`` of a device by its ggml name (``Vulkan0``, ``CUDA0``, ``CPU``), or None."""
    return _dev_by_name(name.encode()) if _dev_by_name else None


def backends() -> list[str]:
    """Names of the ggml backends compiled into the loaded library (e.g. ["CPU"], ["CUDA", "CPU"])."""
    if not (_reg_count and _reg_get and _reg_name):
        return []
    return [_reg_name(_reg_get(i)).decode() for i in range(_reg_count())]


def devices() -> list[dict]:
    """The devices ggml can use: name, description, type (``CPU``, ``GPU``, ``IGPU``...) and memory (bytes)."""
    if not (_dev_count and _dev_get and _dev_name and _dev_description):
        return []
    found = []
    for i in range(_dev_count()):
        dev = _dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        if _dev_memory:
            _dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind = DEVICE_TYPES[_dev_type(dev)] if _dev_type and 0 <= _dev_type(dev) < len(DEVICE_TYPES) else "unknown"
        found.append({"name": _dev_name(dev).decode(), "description": _dev_description(dev).decode(),
                      "type": kind, "memory_free": free.value, "memory_total": total.value})
    return found
