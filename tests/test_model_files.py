"""Broken model files end in ModelLoadError with a message, never in a dead process.

The files are crafted by ``craft_gguf.py`` (a tiny valid llama model with one thing broken each).
Every case is loaded in this very process: if a defence were missing, llama.cpp would abort the
test run itself.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np
import pytest

import edgesink
from edgesink import ModelLoadError
from edgesink._native import LIB
from edgesink.gguf_check import GGML_TYPES, check_gguf
from craft_gguf import _EDGESINK_LOAD, _RAW_LOAD, CASES, run_child, write_valid

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


def test_probe_verdict_is_remembered(crafted):
    start = time.perf_counter()
    edgesink.load(crafted["valid"]).close()
    first = time.perf_counter() - start
    start = time.perf_counter()
    edgesink.load(crafted["valid"]).close()
    second = time.perf_counter() - start
    assert second < first / 5, (first, second)


def test_header_check_of_the_default_model_is_cheap(model_path):
    check_gguf(model_path)
    start = time.perf_counter()
    info = check_gguf(model_path)
    elapsed = time.perf_counter() - start
    assert info.architecture == "llama" and len(info.tensors) == 272
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
