"""Batched feature extraction in RAM: images -> network activations, nothing written to disk."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from probe.data import Source, open_rgb


class ImageDataset(Dataset):
    """``(transform(image), index)`` for each source; images are decoded on access, never cached on disk."""

    def __init__(self, sources: Sequence[Source], names: Sequence[str], transform: Callable):
        self.sources, self.names, self.transform = list(sources), list(names), transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        return self.transform(open_rgb(self.sources[i], self.names[i])), i


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (AVX512-BF16 / AMX), where they are ~2x faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' where the CPU supports it natively, else 'fp32'."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return precision


def autocast(precision: str):
    """A CPU autocast context for 'bf16', a no-op for 'fp32'."""
    if resolve_precision(precision) == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class ExtractStats:
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


@torch.inference_mode()
def extract(
    fn: Callable[[torch.Tensor], torch.Tensor],
    loader: DataLoader,
    *,
    precision: str = "fp32",
    out_dtype: torch.dtype = torch.float32,
    desc: str = "features",
    progress: bool = True,
) -> tuple[torch.Tensor, ExtractStats]:
    """Run ``fn`` over every batch of ``loader`` and stack the outputs in RAM, in dataset order.

    Inputs go in channels-last, which is ~1.7x faster for MobileNet-style convolutions on a CPU.

    Returns:
        (outputs of shape (N, ...) in ``out_dtype``, throughput stats)
    """
    n, out, start = len(loader.dataset), None, time.perf_counter()
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for x, index in loader:
            with autocast(precision):
                y = fn(x.contiguous(memory_format=torch.channels_last))
            if out is None:  # preallocate once: no list of chunks and no second copy from torch.cat
                out = torch.empty((n, *y.shape[1:]), dtype=out_dtype)
            out[index] = y.to(out_dtype)
            bar.update(len(x))
    stats = ExtractStats(n, time.perf_counter() - start)
    if progress:
        print(f"{desc}: {stats.images} images in {stats.seconds:.1f}s ({stats.images_per_s:.1f} img/s)")
    return out.contiguous(), stats
