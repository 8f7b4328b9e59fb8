"""The speed work's pieces: the prefetching thread and the allocator workaround (their effect is the benchmark's
to show, ``python -m tools.bench speed``; it is never asserted here)."""

from __future__ import annotations

import threading

import pytest

from birds_lpft import extract
from birds_lpft import memory as features
from birds_lpft.extract import prefetched
from birds_lpft.memory import release_freed_memory


def test_prefetched_keeps_order_and_raises_the_threads_error():
    assert list(prefetched(range(50))) == list(range(50))

    def broken():
        yield 1
        raise ValueError("bad image")

    got = []
    with pytest.raises(ValueError, match="bad image"):
        for item in prefetched(broken()):
            got.append(item)
    assert got == [1]


def test_leaving_a_prefetched_loop_early_stops_its_thread():
    before = threading.active_count()
    for item in prefetched(iter(range(10**6))):
        if item == 3:
            break
    assert threading.active_count() == before


def test_a_prefetched_loop_hands_its_memory_back_once_its_thread_has_stopped(monkeypatch):
    calls = []
    monkeypatch.setattr(extract, "release_freed_memory", lambda: calls.append(threading.active_count()))
    before = threading.active_count()
    assert list(prefetched(range(5))) == list(range(5))
    for item in prefetched(iter(range(10**6))):
        if item == 3:
            break
    assert calls == [before, before]  # each loop once, after the join (no thread of its own left)


@pytest.mark.parametrize("libc", [lambda name: object(),  # no malloc_trim: not glibc (musl, macOS)
                                  lambda name: (_ for _ in ()).throw(OSError("no dlopen"))])
def test_releasing_memory_without_glibc_is_a_no_op(monkeypatch, libc):
    monkeypatch.setattr(features.ctypes, "CDLL", libc)
    release_freed_memory()


def test_only_the_outermost_reuse_sets_and_restores_the_thresholds(monkeypatch):
    calls = []
    monkeypatch.setattr(features, "_glibc", lambda name, *args: calls.append((name, *args)))
    with features.reusing_freed_memory():
        with features.reusing_freed_memory():
            assert len(calls) == 2
        assert len(calls) == 2  # the inner exit leaves the outer's setting alone
    kept, settled = features.KEPT_FOR_REUSE, features.GLIBC_SETTLED
    assert calls == [("mallopt", features.M_MMAP_THRESHOLD, kept), ("mallopt", features.M_TRIM_THRESHOLD, kept),
                     *(("mallopt", *item) for item in settled.items()), ("malloc_trim", 0)]


@pytest.mark.parametrize("libc", [lambda name: object(), lambda name: (_ for _ in ()).throw(OSError("no dlopen"))])
def test_reusing_memory_without_glibc_is_a_no_op(monkeypatch, libc):
    monkeypatch.setattr(features.ctypes, "CDLL", libc)
    with features.reusing_freed_memory():
        pass
    assert features._reuse_depth == 0
