"""The exceptions edgesink raises. Every one says what went wrong and what to do about it."""


class EdgesinkError(Exception):
    """Base class of edgesink's own errors."""


class ModelLoadError(EdgesinkError):
    """A model file could not be loaded (missing, corrupt, or not a model llama.cpp can run)."""


class LibraryError(ModelLoadError):
    """The native library loaded is not the one this edgesink was built with (another build's libggml,
    bindings of another llama.cpp version): using it could crash the process. The message names both sides."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """No model file at the given path or under the given name."""


class UnsupportedModelError(EdgesinkError, ValueError):
    """The model cannot do what was asked (e.g. a policy that shifts the cache on a recurrent model)."""


class ContextFullError(EdgesinkError):
    """The `dense` policy ran out of cache: it never evicts."""


class DecodeError(EdgesinkError):
    """llama.cpp could not decode a batch (out of cache cells or memory)."""


class ClosedError(EdgesinkError, ValueError):
    """A model or session was used after :meth:`close` (closing a model closes its sessions too)."""


class TextTooLongError(EdgesinkError, ValueError):
    """A text is longer than llama.cpp can tokenize at once (its lengths are 32-bit)."""


class SystemPromptTooLongError(EdgesinkError, ValueError):
    """A chat's system prompt takes more of the cache than a conversation can spare."""


class SettingsError(EdgesinkError, ValueError):
    """A setting that cannot work (out of range, of the wrong type, or not known); the message names it."""


class ContextCreationError(EdgesinkError, ValueError):
    """llama.cpp could not create a session's context (out of memory, or settings it rejects)."""


class TemplateRenderError(EdgesinkError):
    """The chat template failed, tried something the sandbox forbids, or ran away."""


class TemplateRewriteError(TemplateRenderError):
    """The chat template rewrites history that is no longer in the window, so it cannot be re-fed."""


class CorpusError(EdgesinkError, RuntimeError):
    """The benchmark's corpus could not be fetched or read."""


class SessionFileError(EdgesinkError):
    """A session file that cannot be restored here; the message names the cause."""


class SessionSaveError(EdgesinkError, OSError):
    """A session could not be saved, or not durably; the message says what the file at that path now holds."""


class NoFreeSlotError(EdgesinkError, RuntimeError):
    """Every sequence of a shared context holds a session already."""


class Cancelled(EdgesinkError):
    """Feeding stopped because the caller's stop check said so (see ``Session.cancel_when``).

    The stream holds the batches fed before the check fired, each one whole."""
