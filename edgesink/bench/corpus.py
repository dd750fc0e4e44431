"""The benchmark's token stream: a long text, tokenized once, repeated if a run needs more."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..corpus import austen_path
from ..textstream import Utf8Stream, text_pieces

PIECE_BYTES = 65_536  # the file is read and tokenized in pieces (bounded memory)


def text_source(path: "str | Path | None") -> tuple[str, Iterator[str]]:
    """A name for the text and its pieces: ``path`` (any UTF-8 file) or Jane Austen's novels."""
    if path is None:
        path, name = austen_path(), "Jane Austen's six novels (Debian r-cran-janeaustenr)"
    else:
        name = Path(path).name
    return name, _pieces(Path(path))


def _pieces(path: Path) -> Iterator[str]:
    """The file's text in pieces, cut as ``edgesink feed`` cuts a file (so both tokenize alike)."""
    utf8 = Utf8Stream()
    with open(path, "rb") as f:
        while chunk := f.read(PIECE_BYTES):
            yield from text_pieces(chunk, utf8)
    if tail := utf8.flush():
        yield tail


def stream_tokens(model, path: "str | Path | None", n_tokens: int) -> tuple[str, np.ndarray]:
    """The first ``n_tokens`` tokens of the text (the text repeated if it is shorter), as int32."""
    name, pieces = text_source(path)
    found: list[np.ndarray] = []
    total = 0
    for piece in pieces:
        ids = np.asarray(model.tokenize(piece), dtype=np.int32)
        found.append(ids)
        total += len(ids)
        if total >= n_tokens:
            break
    if total == 0:
        raise ValueError(f"the text {name} has no tokens")
    tokens = np.concatenate(found)
    if len(tokens) < n_tokens:
        tokens = np.resize(tokens, n_tokens)  # repeats the text from its start
    return name, tokens[:n_tokens]


def uniform_sample(n_tokens: int, n_positions: int, seed: int = 0) -> np.ndarray:
    """Sorted positions in [1, n_tokens): one at random in each of ``n_positions`` equal strata.

    Position 0 has nothing before it and is never scored.
    """
    n_positions = min(n_positions, n_tokens - 1)
    edges = np.linspace(1, n_tokens, n_positions + 1)
    rng = np.random.default_rng(seed)
    lo, hi = np.floor(edges[:-1]).astype(np.int64), np.floor(edges[1:]).astype(np.int64)
    picks = lo + (rng.random(n_positions) * np.maximum(hi - lo, 1)).astype(np.int64)
    return np.unique(np.clip(picks, 1, n_tokens - 1))
