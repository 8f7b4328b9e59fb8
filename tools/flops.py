"""The compute ceiling of the benchmarks: how much arithmetic a step does, and how fast this machine multiplies.

A bare rate (``tools.speed``) says how fast the network runs alone, not whether it could run faster. Counting
its multiply-accumulates and dividing by this machine's dense matrix-multiply rate, in the same precision,
says how close the network itself is to the hardware: a step at 60% of the matmul rate, whose depthwise
convolutions, BatchNorm and pooling cannot reach it, has little left to win without changing what it computes.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from birds_lpft.extract import autocast


def forward_macs(module: nn.Module, x: torch.Tensor) -> list[int]:
    """Multiply-accumulates per sample of every convolution and linear layer in one forward pass of ``x``,
    in the order they run (elementwise work, pooling and BatchNorm are not counted)."""
    macs: list[int] = []

    def count(layer: nn.Module, _inputs, out: torch.Tensor) -> None:
        # every output element is a dot product over the layer's receptive field: in/groups x kh x kw
        macs.append(out.numel() // len(x) * layer.weight[0].numel())

    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for hook in hooks:
            hook.remove()
    return macs


def training_macs(module: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates per sample of one training step: the forward pass, then per layer the gradient of
    its weight and of its input (each as many as its forward), but no input gradient for the first layer,
    whose input (cached activations) needs none."""
    macs = forward_macs(module, x)
    return 3 * sum(macs) - (macs[0] if macs else 0)


def matmul_gflops(precision: str = "fp32", n: int = 1024, repeats: int = 8) -> float:
    """This machine's dense matrix-multiply rate in GFLOP/s (2 per multiply-accumulate) under ``precision``'s
    autocast: the best of ``repeats`` products of two n x n matrices, after one warm-up product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    with torch.inference_mode(), autocast(precision):
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / max(best, 1e-9) / 1e9
