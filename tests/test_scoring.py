"""The scoring arithmetic alone (no model): NLLs from logits and the positions to score."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgesink.scoring import position_mask, token_nll


def test_nll_of_uniform_and_of_peaked_logits():
    uniform = np.zeros((1, 1000), dtype=np.float32)
    assert token_nll(uniform, np.array([7]))[0] == pytest.approx(math.log(1000))
    peaked = np.array([[0.0, 2.0, 0.0]], dtype=np.float32)  # p(1) = e^2 / (e^2 + 2)
    assert token_nll(peaked, np.array([1]))[0] == pytest.approx(-math.log(math.e ** 2 / (math.e ** 2 + 2)))


def test_huge_logits_do_not_overflow():
    logits = np.array([[1e4, 1e4 - 1.0], [-1e4, 0.0]], dtype=np.float32)  # exp(1e4) overflows without the shift
    nll = token_nll(logits, np.array([0, 1]))
    assert np.isfinite(nll).all()
    assert nll[0] == pytest.approx(math.log(1 + math.exp(-1))) and nll[1] == pytest.approx(0.0)


def test_position_mask():
    assert position_mask([0, 3], 5).tolist() == [True, False, False, True, False]
    assert not position_mask([], 3).any()
    for bad in ([5], [-1]):
        with pytest.raises(ValueError, match=r"token indices in \[0, 5\)"):
            position_mask(bad, 5)
