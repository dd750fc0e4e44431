"""The raw llama.cpp bindings edgesink runs on, for tools that measure below the Session.

``C`` is llama-cpp-python's ctypes module bound to the libllama edgesink loaded (its functions
are llama.h's, documented there); a session's context is ``session.cache.ctx``. Calling them
on a session's context bypasses its bookkeeping: measure with them, do not change the stream.
"""

from ._native import LIBRARY_FOLDER, C, built_ggml_commit, ggml_commit, patch_level, upstream_commit

__all__ = ["C", "LIBRARY_FOLDER", "built_ggml_commit", "ggml_commit", "patch_level", "upstream_commit"]
