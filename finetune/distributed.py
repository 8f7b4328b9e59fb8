"""What stage two needs from the process group, written once for one process and for DDP: gathering every
rank's rows in rank order, and each rank's share of the images."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch


def gather_rows(trainer: L.Trainer | None, x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` (n_r, ...), concatenated in rank order; ``x`` itself in one process."""
    if trainer is None or trainer.world_size == 1:
        return x
    device = trainer.strategy.root_device
    sizes = trainer.strategy.all_gather(torch.tensor([len(x)], device=device)).flatten().tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: len(x)] = x.to(device)
    stacked = trainer.strategy.all_gather(padded)  # (world, max n, ...)
    return torch.cat([stacked[r, :n] for r, n in enumerate(sizes)]).cpu()


def shards_by_rank(trainer: L.Trainer, shard: np.ndarray) -> list[list[int]]:
    """Each rank's extracted image indices, as the ranks themselves report them ((rank, index) pairs)."""
    pairs = torch.stack([torch.full((len(shard),), trainer.global_rank), torch.as_tensor(shard)], 1)
    rows = gather_rows(trainer, pairs).numpy()
    return [sorted(rows[rows[:, 0] == r, 1].tolist()) for r in range(trainer.world_size)]
