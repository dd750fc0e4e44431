"""``edgesink.load``: from what a user typed (a path, a registry name, a Hub spec) to a loaded Model.

It joins the two halves that know nothing of each other: finding or fetching the file
(:mod:`edgesink.fetch`, which may download) and loading it (:class:`edgesink.Model`).
"""

from __future__ import annotations

import os

from .model import Model
from .fetch.resolve import resolve_model


def load(model: "str | os.PathLike | Model | None", **options) -> Model:
    """Load a model from a ``.gguf`` path, a registry name (see ``edgesink models``) or a Hub spec
    (``owner/repo:QUANT``); None loads the default model. Options as :class:`Model`.

    A :class:`Model` passed in is returned as it is.
    """
    if isinstance(model, Model):
        return model
    return Model(resolve_model(model), **options)
