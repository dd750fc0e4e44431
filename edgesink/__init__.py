"""edgesink: run a GGUF language model on an endless stream of text, with attention sinks.

    import edgesink
    model = edgesink.load("smollm2-135m")          # a .gguf path or a registry name
    with model.session(n_ctx=2048, policy="sink", sinks=4) as s:
        s.feed(text)
        for piece in s.generate(max_tokens=200, seed=1):
            print(piece, end="")
"""

from .errors import (
    Cancelled,
    ClosedError,
    ContextCreationError,
    ContextFullError,
    CorpusError,
    DecodeError,
    EdgesinkError,
    LibraryError,
    ModelLoadError,
    ModelNotFoundError,
    NoFreeSlotError,
    SessionFileError,
    SessionSaveError,
    SettingsError,
    SystemPromptTooLongError,
    TemplateRenderError,
    TemplateRewriteError,
    TextTooLongError,
    UnsupportedModelError,
)
from .loading import load
from .model import Model
from .policies import POLICY_NAMES, ContextPolicy, Dense, Halve, Recompute, Sink, Window, make_policy
from .sampling import SamplingParams
from .config import SessionConfig
from .contexts import SharedContext
from .session import Session, SessionStats
from .textstream import GenerationChunk
from .version import __version__

__all__ = [
    "Cancelled", "ClosedError", "ContextCreationError", "ContextFullError", "ContextPolicy", "CorpusError", "DecodeError", "Dense", "EdgesinkError", "GenerationChunk", "LibraryError",
    "Halve", "Model", "ModelLoadError", "ModelNotFoundError", "NoFreeSlotError", "POLICY_NAMES", "Recompute",
    "SamplingParams", "Session", "SessionConfig", "SessionFileError", "SessionSaveError", "SessionStats", "SettingsError", "SharedContext", "Sink",
    "SystemPromptTooLongError", "TemplateRenderError", "TemplateRewriteError", "TextTooLongError", "UnsupportedModelError", "Window",
    "__version__", "load", "make_policy",
]
