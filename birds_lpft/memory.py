"""A workaround for glibc's malloc (Linux): each batch's large activations would otherwise come back as fresh pages.

:func:`reusing_freed_memory` keeps freed memory in the process for the next batch; :func:`release_freed_memory` hands
it back once a loop ends. Where malloc is not glibc's (macOS, musl, Windows) both do nothing. The module can go once
the allocator keeps large blocks itself: compare ``python -m tools.bench speed`` with it as a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes


def _glibc(name: str, *args: int) -> bool:
    """Call glibc's malloc function ``name``; False, and nothing done, where there is none."""
    try:  # the symbols already loaded (not ctypes.util.find_library, which may run a compiler)
        return bool(getattr(ctypes.CDLL(None), name)(*args))
    except (AttributeError, OSError, TypeError):  # not glibc (macOS, musl) or not a POSIX dlopen (Windows)
        return False


def release_freed_memory() -> None:
    """Hand the memory freed so far back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    A prefetching thread allocates every batch from its own malloc arena, and glibc keeps what is freed
    there for that thread alone: without this, the tail's working set (allocated by the main thread) would
    come on top of the extraction's freed batches instead of taking their place.
    """
    _glibc("malloc_trim", 0)


# glibc's mallopt parameters, and the values its dynamic thresholds settle at once a large block is freed: setting
# them ends glibc's own adjustment, which cannot be resumed, so leaving restores these instead
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_SETTLED = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}
KEPT_FOR_REUSE = 1 << 30  # above any one activation tensor of a batch
_reuse_depth = 0


@contextlib.contextmanager
def reusing_freed_memory():
    """Inside, memory that one batch frees stays in the process for the next batch (entered on the main thread).

    glibc otherwise hands large freed blocks straight back to the OS and trims its heap's free top, so the kernel
    faults in and zero-fills each batch's largest activations again, a large share of the trunk's time. Inside,
    both thresholds are ``KEPT_FOR_REUSE``; leaving the outermost one releases what was kept and sets
    ``GLIBC_SETTLED``.
    """
    global _reuse_depth
    if _reuse_depth == 0:
        _glibc("mallopt", M_MMAP_THRESHOLD, KEPT_FOR_REUSE)
        _glibc("mallopt", M_TRIM_THRESHOLD, KEPT_FOR_REUSE)
    _reuse_depth += 1
    try:
        yield
    finally:
        _reuse_depth -= 1
        if _reuse_depth == 0:
            for param, value in GLIBC_SETTLED.items():
                _glibc("mallopt", param, value)
            release_freed_memory()
