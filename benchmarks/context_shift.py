#!/usr/bin/env python3
"""The context-shift benchmark: every context policy on one long text (quality, speed, memory).

The same as ``edgesink bench``; see benchmarks/README.md and ``--help``.
"""

from edgesink.bench.cli import bench

if __name__ == "__main__":
    bench(prog_name="context_shift.py")
