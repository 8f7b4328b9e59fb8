"""Kernel choices of the tail's training that change no setting, only which CPU kernel does the work.

oneDNN (torch 2.4 and 2.14 alike) computes the input gradient of a *strided depthwise* convolution in bf16
with a generic grouped kernel (``brgconv_strided``, one group per channel) that is 8-16x slower than its fp32
kernel: in a bf16 training step of MobileNetV2's tail from block 11, block 14's stride-2 depthwise conv took
about a fifth of the step. Every other convolution is faster in bf16 (docs/speed.md). So under bf16 autocast
on a CPU those layers alone run in fp32, which is also the more precise choice.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def is_strided_depthwise(module: nn.Module) -> bool:
    """A 2-d convolution with one input and one output channel per group, and a stride above 1."""
    return (isinstance(module, nn.Conv2d) and module.groups > 1
            and module.in_channels == module.groups == module.out_channels and max(module.stride) > 1)


@contextmanager
def fp32_strided_depthwise(module: nn.Module):
    """Within the block, every strided depthwise convolution in ``module`` runs in fp32 with autocast off
    inside it (its input cast up; the next layer's autocast casts down again): forward hooks, removed on exit,
    so the modules and their state dict are untouched."""
    inside = []  # the autocast contexts entered by the pre-hooks, left by the hooks (LIFO, as calls nest)

    def enter(conv: nn.Module, args: tuple) -> tuple:
        ctx = torch.autocast(args[0].device.type, enabled=False)
        ctx.__enter__()
        inside.append(ctx)
        return (args[0].float(), *args[1:])

    def leave(conv: nn.Module, args: tuple, out) -> None:
        inside.pop().__exit__(None, None, None)

    handles = []
    for conv in filter(is_strided_depthwise, module.modules()):
        handles += [conv.register_forward_pre_hook(enter), conv.register_forward_hook(leave, always_call=True)]
    try:
        yield len(handles) // 2
    finally:
        for handle in handles:
            handle.remove()
