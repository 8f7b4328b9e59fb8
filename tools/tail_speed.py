"""``python -m tools.tail_speed [--steps 40] [--rounds 2] [--split N] [--memory kept glibc]``: tail training
speed, fp32 vs bf16, and with freed memory kept for the next step (as training runs) or glibc's thresholds.

Times the step that stage two repeats (the tail and head of ``BirdNet`` on cached trunk activations:
forward, cross-entropy, backward, AdamW), for average and GeM pooling, fp32 and bf16-mixed, alternating
in one run so a noisy machine treats every setting alike. bf16 is timed as training runs it (the input
gradient of strided depthwise convolutions from the fp32 kernel, ``finetune.kernels``) and as 'bf16 every
conv' (every kernel in bf16, as before).
Random weights and activations: the speed is the shape's. Prints cached views/s per setting and round,
then the means; writes nothing.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import replace
from itertools import product

import torch
import torch.nn.functional as F

from birds_lpft.extract import autocast
from birds_lpft.memory import reusing_freed_memory
from birds_lpft.models.net import build_net

from finetune.config import PRESETS
from finetune.kernels import fp32_depthwise_input_grads

# 'glibc': its thresholds as they stand, dynamic or (after a 'kept' run) at the values the dynamic ones settle
# at once a 32 MiB block has been freed, which the warm-up steps do
MEMORY = {"kept": reusing_freed_memory, "glibc": nullcontext}
PRECISIONS = {"fp32": (False, True), "bf16": (True, True), "bf16 every conv": (True, False)}  # (bf16, kernels)


def views_per_second(pool: str, bf16: bool, image_size: int, steps: int, split: int, batch: int = 32,
                     kernels: bool = True) -> float:
    """Training steps of a fresh tail + head on random trunk activations, in cached views per second;
    ``kernels``: under bf16, strided depthwise input gradients from the fp32 kernel, as training runs them."""
    torch.manual_seed(0)
    cfg = PRESETS["full"]
    # eval mode: BatchNorm pinned, as in training
    net = build_net(replace(cfg, split=split, pooling=pool, dropout=0.0, members=1).net_config(50)).eval()
    acts = net.forward_trunk(torch.randn(batch, 3, image_size, image_size)).detach()
    y = torch.randint(0, 50, (batch,))
    return _timed_steps(net.top(), acts, y, bf16, steps, kernels)


def _timed_steps(top, acts: torch.Tensor, y: torch.Tensor, bf16: bool, steps: int, kernels: bool = True) -> float:
    """Cached views per second of ``steps`` AdamW steps of ``top`` on one batch, after up to 3 warm-up steps
    (the allocator and oneDNN's kernels); under bf16 with training's kernel choices unless not ``kernels``."""
    with fp32_depthwise_input_grads(top) if bf16 and kernels else nullcontext():
        return _steps_rate(top, acts, y, bf16, steps)


def _steps_rate(top, acts: torch.Tensor, y: torch.Tensor, bf16: bool, steps: int) -> float:
    opt = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with autocast("bf16" if bf16 else "fp32"):  # what Lightning's 'bf16-mixed' does on a CPU
            loss = F.cross_entropy(top(acts).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(min(3, steps)):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(y) / (time.perf_counter() - start)


def tail_step(net, cfg, num_classes: int, steps: int = 20) -> float:
    """Cached views per second of bare training steps of ``net``'s tail + head as ``cfg`` trains it (its
    batch size, cache dtype and training precision), on random cached activations: no loader, no Lightning."""
    from finetune.train import trainer_precision

    net.eval()  # BatchNorm pinned, as in training
    acts = torch.randn(cfg.batch_size, *net.forward_trunk(
        torch.zeros(1, 3, cfg.image_size, cfg.image_size)).shape[1:]).to(getattr(torch, cfg.cache_dtype))
    y = torch.randint(0, num_classes, (cfg.batch_size,))
    return _timed_steps(net.top(), acts, y, trainer_precision(cfg, "cpu") == "bf16-mixed", steps)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--image-size", type=int, default=PRESETS["full"].image_size)
    p.add_argument("--split", type=int, default=PRESETS["full"].trunk_split, help="first trainable block")
    p.add_argument("--pool", nargs="+", choices=("avg", "gem"), default=["avg", "gem"])
    p.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    p.add_argument("--memory", nargs="+", choices=list(MEMORY), default=["kept"],
                   help="'kept': freed memory kept for the next step, as training runs "
                        "(birds_lpft.extract.reusing_freed_memory); 'glibc': glibc's thresholds")
    args = p.parse_args(argv)
    rates: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for pool, precision, memory in product(args.pool, args.precision, args.memory):
            name = f"{pool} {precision}" + (f", memory {memory}" if len(args.memory) > 1 else "")
            bf16, kernels = PRECISIONS[precision]
            with MEMORY[memory]():
                rate = views_per_second(pool, bf16, args.image_size, args.steps, args.split, kernels=kernels)
            rates.setdefault(name, []).append(rate)
            print(f"round {r + 1} {name}: {rates[name][-1]:.0f} views/s", flush=True)
    means = {k: sum(v) / len(v) for k, v in rates.items()}
    print("mean views/s: " + ", ".join(f"{k} {v:.0f}" for k, v in means.items()))
    return means


if __name__ == "__main__":
    main()
