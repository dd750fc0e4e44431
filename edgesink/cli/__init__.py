"""The ``edgesink`` command line, a thin layer over the public API.

:mod:`.commands` holds the commands, :mod:`.chat` the interactive chat loop, :mod:`.feeding`
the streaming of files with progress, and :mod:`.stats` the one line of session stats they print.
"""

from .commands import main

__all__ = ["main"]
