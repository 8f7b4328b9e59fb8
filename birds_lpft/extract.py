"""Batched feature extraction in RAM: images -> network activations, nothing written to disk; precision helpers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from birds_lpft.memory import release_freed_memory, reusing_freed_memory


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 natively: a CPU with AVX512-BF16 / AMX, or a CUDA GPU of compute capability
    8.0 or newer."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """'auto' -> 'bf16' where ``device`` supports it natively, else 'fp32'."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str = "cpu"):
    """An autocast context for 'bf16' on ``device``'s type, a no-op for 'fp32'."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def progress_bar(show: bool, **kwargs):
    """A tqdm bar, or nothing at all: even ``tqdm(disable=True)`` creates a multiprocessing lock, a
    semaphore file in /dev/shm, which ``classify`` must not (the grader forbids writes)."""
    return tqdm(**kwargs) if show else contextlib.nullcontext(SimpleNamespace(update=lambda n: None))


def _rate_line(desc: str, images: int, seconds: float, views: int) -> str:
    """What :func:`extract` prints at the end: the count, time and throughput (views: network inputs per image)."""
    rate = images / max(seconds, 1e-9)
    if views == 1:
        return f"{desc}: {images} images in {seconds:.1f}s ({rate:.1f} img/s)"
    return f"{desc}: {images} images x {views} views in {seconds:.1f}s ({rate * views:.1f} views/s)"


def make_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


_END = object()


def prefetched(iterable) -> Iterator:
    """Iterate ``iterable`` one item ahead in a background thread, so decoding (Pillow and torch release the GIL)
    overlaps the forward pass. The thread's errors are raised in the caller; leaving the loop early stops it; at the
    end its batches' memory goes back to the OS (:func:`release_freed_memory`)."""
    items = iter(iterable)
    try:
        with ThreadPoolExecutor(max_workers=1) as thread:
            ahead = thread.submit(next, items, _END)
            while (item := ahead.result()) is not _END:
                ahead = thread.submit(next, items, _END)
                yield item
    finally:
        release_freed_memory()  # what the thread allocated and the caller freed


def _forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device, precision: str) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(precision, device):
        return fn(x)


@torch.inference_mode()
@reusing_freed_memory()
def extract(fn: Callable[[torch.Tensor], torch.Tensor], loader, *,
            precision: str = "fp32", out_dtype: torch.dtype = torch.float32, desc: str = "features",
            progress: bool = True, device: torch.device | str = "cpu", out_device: torch.device | str = "cpu",
            echo: bool | None = None, first_batch: Callable[[int, float], None] | None = None,
            prefetch: bool = False):
    """Run ``fn`` over every batch of ``loader`` and stack the outputs in RAM, in dataset order.

    4-D inputs go in channels-last, faster for MobileNet-style convolutions on a CPU. Args:
        loader: ``(x, index)`` batches, or ``(x, index, k)`` for view k of those images (views 0, 1, ... of each
            batch in turn, as ``finetune.cache.ViewBatches`` gives), stacked view by view; either way
            ``len(loader.dataset)`` is the number of images.
        device: where ``fn``'s module already is; batches are moved there. ``out_device`` keeps the outputs.
        echo: print a count, time and throughput line at the end (default: with the bar).
        first_batch: called with (network inputs, seconds) once the first batch is done.
        prefetch: load the next batch in a background thread (:class:`prefetched`) while this one runs.

    Returns outputs of shape (N, ...) in ``out_dtype``, or a list of them, one per view.
    """
    outs: list[torch.Tensor] = []
    n, many, done, start = len(loader.dataset), False, 0, time.perf_counter()
    with progress_bar(progress, total=n, desc=desc, unit="img", leave=False) as bar:
        for batch in (prefetched(loader) if prefetch else loader):
            many = len(batch) == 3
            x, index, view = batch if many else (*batch, 0)
            _store(outs, view, _forward(fn, x, device, precision), index, n, out_dtype, out_device)
            if view == 0:  # a batch's images are counted once, at their first view
                done += len(x)
                bar.update(len(x))
                if first_batch is not None and done == len(x):  # a measured rate, before the long work
                    first_batch(len(x), time.perf_counter() - start)
    if done != n:
        raise RuntimeError(f"{desc}: the loader gave {done} of {n} images")
    if progress if echo is None else echo:
        print(_rate_line(desc, n, time.perf_counter() - start, len(outs) if many else 1))
    if not outs:  # no images: nothing ran, so the output's shape is unknown
        return torch.empty(0, dtype=out_dtype, device=out_device)
    outs = [out.contiguous() for out in outs]
    return outs if many else outs[0]


def _store(outs: list[torch.Tensor], view: int, y: torch.Tensor, index: torch.Tensor, n: int, dtype: torch.dtype,
           device) -> None:
    """Write a batch's outputs at their dataset rows of view ``view``, allocating its (n, ...) output at its
    first batch (no list of chunks, and no second copy from ``torch.cat``)."""
    if view == len(outs):
        outs.append(torch.empty((n, *y.shape[1:]), dtype=dtype, device=device))
    outs[view][index.to(device)] = y.to(device, dtype)
