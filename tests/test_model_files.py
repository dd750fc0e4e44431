"""Broken model files end in ModelLoadError with a message, never in a dead process.

The files are crafted by ``craft_gguf.py`` (a tiny valid llama model with one thing broken each).
Every case is loaded in this very process: if a defence were missing, llama.cpp would abort the
test run itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

import edgesink
import edgesink.gguf_check as gc
from edgesink import EdgesinkError, ModelLoadError, Session, TextTooLongError, _native
from edgesink import model as model_module
from edgesink._native import LIB
from edgesink.gguf_check import GGML_TYPES, check_gguf
from edgesink.persistence import read_session_file
from conftest import REPO
from craft_gguf import _EDGESINK_LOAD, _RAW_LOAD, CASES, run_child, tiny_model, write_valid

# Measured on the pinned llama.cpp: these make llama_model_load_from_file abort the process.
ABORTS_RAW_LLAMA_CPP = {"zero_layers", "absurd_layers", "nextn_above_layers", "absurd_experts",
                        "experts_used_without_experts", "bad_rope_scaling"}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crafted")
    return {name: c.make(folder) for name, c in CASES.items()} | {"valid": write_valid(folder)}


def test_there_are_enough_cases():
    assert len(CASES) >= 15


@pytest.mark.parametrize("name", sorted(CASES))
def test_broken_file_raises_model_load_error(crafted, name):
    path = crafted[name]
    with pytest.raises(ModelLoadError) as err:
        edgesink.load(path)
    message = str(err.value)
    assert str(path) in message
    assert CASES[name].expect.lower() in message.lower(), message
    # Nothing else broke: a valid model still loads and decodes here, in this process.
    _load_and_decode(crafted["valid"], check="header")


def test_structural_cases_are_caught_without_llama_cpp(crafted):
    """The pure-Python check alone names the cause of all but the few llama.cpp must judge."""
    judged_by_llama_cpp = {"unknown_architecture", "zero_heads", "context_length_wrong_type",
                           "wrong_tensor_shape", "missing_tensor"}
    caught = set()
    for name in CASES:
        try:
            check_gguf(crafted[name])
        except ModelLoadError:
            caught.add(name)
    assert caught == set(CASES) - judged_by_llama_cpp
    assert ABORTS_RAW_LLAMA_CPP <= caught


def test_the_probe_turns_llama_cpp_errors_into_messages(crafted):
    with pytest.raises(ModelLoadError, match="unknown model architecture: 'frobnicator'"):
        edgesink.load(crafted["unknown_architecture"])


def test_which_cases_abort_raw_llama_cpp(crafted):
    """Why the defences exist: without them these files kill the process (each run in a child)."""
    outcomes = {name: run_child(_RAW_LOAD, crafted[name])[0] for name in sorted(ABORTS_RAW_LLAMA_CPP)}
    assert all(o == "crash:SIGABRT" for o in outcomes.values()), outcomes
    assert run_child(_RAW_LOAD, crafted["valid"])[0] == "loads"


def test_the_probe_survives_a_file_that_aborts_llama_cpp(crafted, monkeypatch):
    """With the Python check off, the child process takes the abort and the parent reports it."""
    import edgesink.gguf_check as gc

    monkeypatch.setattr(gc, "check_gguf", lambda path: None)
    with pytest.raises(ModelLoadError, match=r"crashed \(SIGABRT\).*GGML_ASSERT\(hparams.n_layer_all > 0"):
        edgesink.load(crafted["zero_layers"])


def test_edgesink_load_in_a_child_exits_cleanly_for_every_case(crafted):
    """The same through a fresh process, as an application would see it: an error, never a signal."""
    for name in ("zero_layers", "bad_rope_scaling", "missing_tensor", "truncated_tensor_data"):
        assert run_child(_EDGESINK_LOAD, crafted[name])[0] == "error", name


def test_the_real_model_loads_after_all_that(model_path, crafted):
    for name in ("zero_layers", "missing_tensor", "alignment_huge"):
        with pytest.raises(ModelLoadError):
            edgesink.load(crafted[name])
    with edgesink.load(model_path) as m:
        with m.session(n_ctx=128) as s:
            s.feed("The capital of France is")
            assert s.generate_text(max_tokens=4, top_k=1, temperature=1.0)


def test_probe_verdict_is_remembered(crafted, monkeypatch):
    probed = []
    real_probe = gc.probe_load
    monkeypatch.setattr(gc, "probe_load", lambda path, *args, **kwargs: (probed.append(path),
                                                                          real_probe(path, *args, **kwargs)))
    edgesink.load(crafted["valid"]).close()
    edgesink.load(crafted["valid"]).close()
    assert probed == [crafted["valid"]]  # one child for two loads: the second trusted the verdict


def test_header_check_of_the_default_model_is_cheap(model_path):
    check_gguf(model_path)
    start = time.perf_counter()
    info = check_gguf(model_path)
    elapsed = time.perf_counter() - start
    # gguf's own reader (another implementation) counts the same tensors: 30 blocks of 9, embedding, norm
    assert info.architecture == "llama" and len(info.tensors) == len(GGUFReader(model_path).tensors)
    assert elapsed < 0.5  # about 25 ms here; generous for a loaded machine


def test_ggml_type_table_matches_the_library():
    blck = LIB.ggml_blck_size
    blck.restype, blck.argtypes = ctypes.c_int64, [ctypes.c_int]
    size = LIB.ggml_type_size
    size.restype, size.argtypes = ctypes.c_size_t, [ctypes.c_int]
    lib_table = {t: (blck(t), size(t)) for t in range(43) if blck(t) > 0}  # GGML_TYPE_COUNT = 43
    assert lib_table == GGML_TYPES


def test_check_option_is_validated(model_path):
    with pytest.raises(ValueError, match="check must be"):
        edgesink.load(model_path, check="sometimes")


def _load_and_decode(path, **options) -> None:
    with edgesink.load(path, **options) as m:
        assert m.n_vocab == 267
        with m.session(n_ctx=64, policy="sink") as s:
            nll = s.score("the and of")
            assert np.isfinite(nll[1:]).all()


# -- the probe's child process and the remembered verdict -------------------------------------------

def hostile_folder(folder, marker):
    """A folder holding code that must never run: a json.py and edgesink/ and pip/ packages that leave
    ``marker`` behind and fake a successful exit."""
    code = f"open({str(marker)!r}, 'a').write('ran\\n')\nimport os\nos._exit(0)\n"
    folder.mkdir()
    (folder / "json.py").write_text(code)
    for package in ("edgesink", "pip"):
        (folder / package).mkdir()
        for name in ("__init__.py", "__main__.py", "gguf_check.py"):
            (folder / package / name).write_text(code)
    return folder


def test_the_probe_never_runs_code_from_the_current_folder(crafted, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.chdir(hostile_folder(tmp_path / "cwd", marker))
    gc.probe_load(crafted["valid"])
    with pytest.raises(ModelLoadError, match=r"crashed \(SIGABRT\)"):  # the verdict is llama.cpp's, not faked
        gc.probe_load(crafted["zero_layers"])
    with pytest.raises(ModelLoadError, match="unknown model architecture"):
        edgesink.load(crafted["unknown_architecture"])
    assert not marker.exists()


def test_the_probe_child_is_isolated_and_told_which_library(crafted):
    command = gc.probe_command(Path("relative.gguf"))
    assert command[:3] == [sys.executable, "-I", "-c"]
    assert command[4] == str(Path("relative.gguf").absolute())
    assert all(Path(p).is_absolute() for p in command[5:])
    assert Path(gc.probe_env()["EDGESINK_LIB_PATH"]) == Path(_native.LIB._name).resolve().parent


def test_the_probe_child_loads_a_library_named_by_a_relative_path(crafted, tmp_path):
    """EDGESINK_LIB_PATH relative to where the user stands still names the same library in the child."""
    if not (REPO / "build" / "stock" / "lib").is_dir():
        pytest.skip("no stock library built (make stock-lib)")
    code = ("import sys, edgesink._native as n, edgesink.gguf_check as gc; gc.probe_load(sys.argv[1]); "
            "print(n.LIB._name)")
    env = dict(os.environ, EDGESINK_LIB_PATH="build/stock/lib", HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code, str(crafted["valid"])], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "build/stock/lib/libllama.so"


def test_a_remembered_verdict_is_tied_to_the_content(crafted, tmp_path, monkeypatch):
    """Other bytes at the same path, of the same size and modification time, are probed again."""
    probed = []
    real_probe = gc.probe_load
    monkeypatch.setattr(gc, "probe_load", lambda path, **kw: (probed.append(path), real_probe(path, **kw)))
    path = tmp_path / "m.gguf"
    shutil.copy(crafted["valid"], path)
    edgesink.load(path).close()
    edgesink.load(path).close()
    assert len(probed) == 1  # remembered
    before = os.stat(path)
    other = tiny_model(seed=1).to_bytes()
    assert len(other) == before.st_size and other != path.read_bytes()
    with open(path, "r+b") as f:  # in place: the same inode
        f.write(other)
    while True:  # the same modification time; the change time moves on (at the clock's granularity)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        if os.stat(path).st_ctime_ns != before.st_ctime_ns:
            break
        time.sleep(0.01)
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    with edgesink.load(path) as m:
        assert len(probed) == 2
        assert m.sha256 == hashlib.sha256(other).hexdigest()


# -- the model's sha256 is the loaded file's --------------------------------------------------------

def test_save_records_the_loaded_file_after_it_is_deleted_or_replaced(crafted, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copy(crafted["valid"], path)
    loaded = hashlib.sha256(path.read_bytes()).hexdigest()
    with edgesink.load(path) as m:
        with m.session(n_ctx=64) as s:
            s.feed("the and of")
            fed = s.stats.tokens_seen
            path.unlink()
            s.save(tmp_path / "deleted.state")
            path.write_bytes(tiny_model(seed=1).to_bytes())  # pulled again: other bytes at the same path
            s.save(tmp_path / "replaced.state")
        for name in ("deleted.state", "replaced.state"):
            header, _ = read_session_file(tmp_path / name)
            assert header["model_sha256"] == loaded
            with Session.restore(tmp_path / name, m) as restored:
                assert restored.stats.tokens_seen == fed


def test_a_file_changed_while_loading_is_refused(crafted, tmp_path, monkeypatch):
    """The hash a model records must describe the bytes llama.cpp loaded."""
    path = tmp_path / "m.gguf"
    shutil.copy(crafted["valid"], path)
    real_load = model_module.C.llama_model_load_from_file

    def load_then_replace(*args):
        handle = real_load(*args)
        path.with_suffix(".new").write_bytes(tiny_model(seed=2).to_bytes())
        path.with_suffix(".new").replace(path)
        return handle

    monkeypatch.setattr(model_module.C, "llama_model_load_from_file", load_then_replace)
    with pytest.raises(ModelLoadError, match="changed while"):
        edgesink.load(path)


# -- tokenizing: llama.cpp takes the length as an int32 ---------------------------------------------

def test_tokenize_refuses_text_beyond_llama_cpps_int32(model, tmp_path, monkeypatch):
    sparse = tmp_path / "sparse"  # 2 GiB and more of text that takes no memory: a sparse file, mapped
    with open(sparse, "wb") as f:
        f.truncate(2**31 + 16)
    with open(sparse, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with memoryview(mapped) as view, pytest.raises(TextTooLongError, match="2147483664 bytes") as err:
            model.tokenize(view)
    assert isinstance(err.value, ValueError) and isinstance(err.value, EdgesinkError)
    monkeypatch.setattr(model_module, "MAX_TOKENIZE_BYTES", 100)
    assert len(model.tokenize(b"a" * 100)) > 0  # at the bound: fine
    for too_long in (b"a" * 101, "\u00e9" * 51, "a" * 101):  # bytes, and a str of 102 / 101 UTF-8 bytes
        with pytest.raises(TextTooLongError):
            model.tokenize(too_long)


def test_the_benchmark_worker_never_runs_code_from_the_current_folder(tmp_path, monkeypatch):
    """The bench's worker processes start isolated too: a job that fails still never ran the folder's code."""
    from edgesink.bench.worker import WorkerError, run_in_worker

    marker = tmp_path / "ran"
    monkeypatch.chdir(hostile_folder(tmp_path / "cwd", marker))
    log = tmp_path / "worker.log"
    with pytest.raises(WorkerError, match="failed"):  # the hostile json.py would exit 0 and fake success
        run_in_worker({"kind": "no-such-job", "variant": "x"}, log=log)
    assert not marker.exists()
    assert "edgesink/bench/worker.py" in log.read_text()  # the real worker ran, and failed on the job
