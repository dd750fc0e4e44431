"""The arithmetic of scoring: negative log-likelihoods from logits, and which positions to score."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row (natural log), in float64 for stability."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return log_z - logits[np.arange(len(targets)), targets]


def position_mask(positions: Iterable[int], n: int) -> np.ndarray:
    """A boolean mask of length ``n``, True at ``positions`` (indices in [0, n), else ValueError)."""
    mask = np.zeros(n, dtype=bool)
    idx = np.fromiter(positions, dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"positions must be token indices in [0, {n})")
    mask[idx] = True
    return mask
