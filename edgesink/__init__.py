"""edgesink: run a GGUF language model on an endless stream of text, with attention sinks.

    import edgesink
    model = edgesink.load("smollm2-135m")          # a .gguf path or a registry name
    with model.session(n_ctx=2048, policy="sink", sinks=4) as s:
        s.feed(text)
        for piece in s.generate(max_tokens=200, seed=1):
            print(piece, end="")
"""

from .errors import (
    ClosedError,
    ContextFullError,
    DecodeError,
    EdgesinkError,
    ModelLoadError,
    ModelNotFoundError,
    SessionFileError,
    SessionSaveError,
    TextTooLongError,
    UnsupportedModelError,
)
from .model import Model, load
from .policies import POLICY_NAMES, ContextPolicy, Dense, Halve, Recompute, Sink, Window, make_policy
from .sampling import SamplingParams
from .session import GenerationChunk, Session, SessionStats

__version__ = "0.1.0"

__all__ = [
    "ClosedError", "ContextFullError", "ContextPolicy", "DecodeError", "Dense", "EdgesinkError", "GenerationChunk",
    "Halve", "Model", "ModelLoadError", "ModelNotFoundError", "POLICY_NAMES", "Recompute",
    "SamplingParams", "Session", "SessionFileError", "SessionSaveError", "SessionStats", "Sink",
    "TextTooLongError", "UnsupportedModelError", "Window",
    "__version__", "load", "make_policy",
]
