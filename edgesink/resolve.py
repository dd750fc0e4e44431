"""Turning what a user typed (a path, a registry name) into a model file on disk."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError
from .hub import HubSpec, download, is_hub_spec, parse_spec
from .registry import default_model_path, load_registry


def resolve_model(spec: "str | os.PathLike | None") -> Path:
    """The local file for ``spec``: a ``.gguf`` path, a registry name, or None for the default."""
    if spec is None:
        return default_model_path()
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists() or text.endswith(".gguf"):
        if not path.exists():
            raise ModelNotFoundError(f"no model file at {path}")
        return path
    registry = load_registry()
    if text in registry:
        entry = registry[text]
        if entry.pypi:
            if not entry.local_path.exists():
                raise ModelNotFoundError(f"model {text} is not fetched yet; run 'edgesink pull {text}'")
            return entry.local_path
        return download(HubSpec(repo=entry.repo, file=entry.file))
    if is_hub_spec(text):
        return download(parse_spec(text))
    raise ModelNotFoundError(
        f"{text!r} is neither a .gguf file nor a known model name; 'edgesink models' lists the names"
    )
