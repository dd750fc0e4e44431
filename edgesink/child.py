"""Starting edgesink's own Python child processes so that nothing where the user stands runs in them.

``python -m edgesink.x`` puts the current folder first on ``sys.path``: a ``json.py`` or an
``edgesink/`` folder there would be imported by the child. Children run isolated instead (``-I``:
no current folder, no PYTHONPATH, no user site-packages) in the package's folder, and are told
explicitly where to import from and which libllama to load.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import llama_cpp

from . import _native


def isolated_python(program: str, *args: str) -> list[str]:
    """The command line of an isolated child running ``program`` (Python source) with ``args``.

    ``program`` finds the import folders after the ``args`` in ``sys.argv``: begin it with
    ``import sys; sys.path[:0] = sys.argv[N:]`` where N is ``len(args) + 1``.
    """
    return [sys.executable, "-I", "-c", program, *args, *import_folders()]


def import_folders() -> list[str]:
    """Where this process found edgesink and llama_cpp, then the rest of its sys.path: absolute
    entries only, and never the current folder."""
    own = [str(Path(__file__).resolve().parents[1]), str(Path(llama_cpp.__file__).resolve().parents[1])]
    try:
        here = os.path.realpath(os.getcwd())
    except OSError:  # the current folder was deleted
        here = None
    rest = [p for p in sys.path if p and os.path.isabs(p) and os.path.realpath(p) != here]
    return list(dict.fromkeys(own + rest))


def library_file() -> Path:
    """The libllama loaded here (resolved: a relative EDGESINK_LIB_PATH meant the folder we started in)."""
    return Path(_native.LIB._name).resolve()


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child that loads libllama: with no ``base``, this one, naming the very
    libllama this process loaded; a ``base`` that names a library folder keeps it, made absolute."""
    env = dict(os.environ if base is None else base)
    named = env.get(_native.LIB_PATH_ENV) if base is not None else None
    env[_native.LIB_PATH_ENV] = str(Path(named).resolve()) if named else str(library_file().parent)
    return env


CWD = _native.PACKAGE_DIR  # a child's working folder: the package's own, never the user's
