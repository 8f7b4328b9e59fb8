"""Step timing and peak memory, for the CLIs' reports."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager, suppress


class Stopwatch:
    """Records named step durations: ``with sw("extract"): ...``; ``sw.seconds`` maps name -> seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def report(self) -> str:
        return ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Prefers ``VmHWM`` of ``/proc/self/status``: Linux carries a parent's peak across fork+exec into ``ru_maxrss``,
    so a child of a large parent would report the parent's peak there; ``VmHWM`` counts this process image alone.
    """
    with suppress(OSError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
