"""The load-time checks that the native library is the one that was built: each is shown to fire on a
deliberately wrong library or size, and none fires on the real build."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgesink
from edgesink import LibraryError, library_check
from edgesink import bindings
from edgesink.bindings import C
from edgesink.cli import main

REPO = Path(__file__).resolve().parents[1]
STOCK_LIB = REPO / "build" / "stock" / "lib"


def test_the_real_build_passes_every_check():
    assert library_check.library_problems() == []
    sizes = library_check.struct_sizes()
    assert set(sizes) == {"llama_model_params", "llama_context_params", "llama_batch"}
    assert all(ours == theirs for ours, theirs in sizes.values())  # the library answered for each
    loaded = library_check.loaded_libraries()
    assert {"libllama.so", "libggml-base.so", "libggml.so"} <= set(loaded)
    assert all(len(paths) == 1 for paths in loaded.values())


def test_a_struct_of_another_size_is_named_with_both_sizes():
    class WiderBatch(ctypes.Structure):  # the bindings of a llama.cpp whose llama_batch grew a field
        _fields_ = [*C.llama_batch._fields_, ("added", ctypes.c_void_p)]

    problems = library_check.library_problems(structs={"llama_batch": WiderBatch})
    size = ctypes.sizeof(C.llama_batch)
    assert problems == [f"struct llama_batch is {size + 8} bytes in the Python bindings but {size} in libllama: "
                        "the bindings (llama-cpp-python) and the library come from different llama.cpp versions"]


MAPS = """\
7f00-7f01 r-xp 00000000 08:01 11 /opt/a/libllama.so
7f01-7f02 r--p 00010000 08:01 11 /opt/a/libllama.so
7f02-7f03 r-xp 00000000 08:01 12 /opt/a/libggml-base.so
7f03-7f04 r-xp 00000000 08:01 13 /opt/b/libggml-base.so
7f04-7f05 r-xp 00000000 08:01 14 /opt/b/libggml-cpu.so
7f05-7f06 rw-p 00000000 00:00 0 [heap]
"""


def test_maps_name_two_copies_and_a_library_from_another_folder():
    loaded = library_check.loaded_libraries(MAPS)
    assert loaded == {"libllama.so": [Path("/opt/a/libllama.so")],
                      "libggml-base.so": [Path("/opt/a/libggml-base.so"), Path("/opt/b/libggml-base.so")],
                      "libggml-cpu.so": [Path("/opt/b/libggml-cpu.so")]}
    problems = library_check.library_problems(maps=MAPS)
    assert "2 copies of libggml-base.so are loaded: /opt/a/libggml-base.so, /opt/b/libggml-base.so" in problems
    assert any(p.startswith("libggml-cpu.so is loaded from /opt/b, not from /opt/a") for p in problems)


def test_another_pin_is_named(monkeypatch):
    monkeypatch.setattr(library_check, "pin", lambda: {"llama_cpp_commit": "0123abc", "version": "0.0.1"})
    problems = library_check.library_problems()
    assert any("built from llama.cpp" in p and "pins 0123abc" in p for p in problems)
    assert any("llama-cpp-python" in p and "pins 0.0.1" in p for p in problems)
    monkeypatch.setattr(library_check, "_checked", False)
    with pytest.raises(LibraryError, match="does not match this edgesink"):
        library_check.check_library()


def run_child(code: str, lib_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    if lib_dir is not None:
        env["EDGESINK_LIB_PATH"] = str(lib_dir)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_second_copy_of_libggml_in_the_process_is_refused_at_load(tmp_path, model_path):
    """The H200 crash's class: two libggml in one process. A model load says so, naming both files."""
    copy = tmp_path / "libggml-base.so"
    shutil.copy(Path(bindings.LIBRARY_FOLDER) / "libggml-base.so", copy)
    child = run_child(f"""
        import ctypes, edgesink
        ctypes.CDLL({str(copy)!r}, mode=ctypes.RTLD_LOCAL)  # another build's copy, loaded beside ours
        try:
            edgesink.load({str(model_path)!r})
        except edgesink.LibraryError as error:
            print("LibraryError:", error)
    """)
    assert "LibraryError: " in child.stdout, child.stderr
    assert "2 copies of libggml-base.so are loaded" in child.stdout and str(copy) in child.stdout


def test_a_libggml_of_another_build_is_refused_at_load(tmp_path, model_path):
    """The patched libllama beside the stock build's libggml-base (another commit): refused, both named."""
    mixed = tmp_path / "lib"
    shutil.copytree(Path(bindings.LIBRARY_FOLDER), mixed)
    shutil.copy(STOCK_LIB / "libggml-base.so", mixed / "libggml-base.so")
    child = run_child(f"""
        import edgesink
        try:
            edgesink.load({str(model_path)!r})
        except edgesink.LibraryError as error:
            print("LibraryError:", error)
    """, lib_dir=mixed)
    built_with = bindings.built_ggml_commit()
    assert built_with and "LibraryError: " in child.stdout, child.stderr
    assert f"but libllama was built against {built_with}" in child.stdout


def test_info_prints_the_checks():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    for line in ("bindings          llama-cpp-python", "struct sizes      llama_model_params",
                 "checked against the library", "ggml commit", "loaded libraries  ", "library check     ok",
                 "layers go to      "):
        assert line in result.output, line


def test_a_device_that_is_not_here_is_a_clear_error(model_path):
    with pytest.raises(edgesink.SettingsError, match="no device named 'Vulkan7' here; the devices are: CPU"):
        edgesink.load(model_path, device="Vulkan7")
