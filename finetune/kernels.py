"""Workaround for a oneDNN defect (torch 2.4 and 2.14 alike): in bf16 on a CPU, the input gradient of a *strided
depthwise* convolution runs in a generic grouped kernel (``brgconv_strided``), far slower than the fp32 one and a large
share of the tail's training step. Under bf16 autocast those layers keep their bf16 forward and weight gradient and
take the input gradient from the fp32 kernel on the same bf16 operands, rounded back to bf16 (no setting changes).
It can go once ``ONEDNN_VERBOSE=1`` shows that bf16 ``backward_data`` run by a kernel other than ``brgconv_strided``.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def is_strided_depthwise(module: nn.Module) -> bool:
    """A 2-d convolution with one channel per group in and out, a stride above 1 and nn.Conv2d's own forward (a
    subclass's, timm's 'same'-padding one say, is left alone)."""
    return (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward
            and module.groups > 1 and module.padding_mode == "zeros"
            and module.in_channels == module.groups == module.out_channels and max(module.stride) > 1)


class _Fp32InputGrad(torch.autograd.Function):
    """``F.conv2d`` in the autocast dtype, exactly as autocast runs it, whose input gradient comes from the fp32
    kernel (the operands are exact in fp32) rounded back to that dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d,
                dtype: torch.dtype) -> torch.Tensor:
        xl, wl = x.to(dtype), weight.to(dtype)  # autocast's own casts
        bl = bias.to(dtype) if bias is not None else None
        ctx.save_for_backward(xl, wl)
        ctx.conv, ctx.dtypes, ctx.has_bias = conv, (x.dtype, weight.dtype), bias is not None
        return F.conv2d(xl, wl, bl, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xl, wl = ctx.saved_tensors
        c = ctx.conv
        args = ([c.out_channels] if ctx.has_bias else None, c.stride, c.padding, c.dilation, False, [0, 0], c.groups)
        needs = ctx.needs_input_grad
        gx = gw = gb = None
        if needs[0]:
            gx = torch.ops.aten.convolution_backward(g.float(), xl.float(), wl.float(), *args, [True, False, False])[0]
            gx = gx.to(xl.dtype).to(ctx.dtypes[0])
        if needs[1] or needs[2]:
            _, gw, gb = torch.ops.aten.convolution_backward(g, xl, wl, *args, [False, needs[1], needs[2]])
            gw = gw.to(ctx.dtypes[1]) if needs[1] else None
            gb = gb.float() if needs[2] else None
        return gx, gw, gb, None, None


def _forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution with the fp32 input gradient under CPU autocast; as ever without autocast."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return _Fp32InputGrad.apply(x, conv.weight, conv.bias, conv, torch.get_autocast_dtype("cpu"))
    return nn.Conv2d.forward(conv, x)


@contextmanager
def fp32_depthwise_input_grads(module: nn.Module):
    """Within the block, every strided depthwise convolution in ``module`` takes its input gradient from the fp32
    kernel under CPU autocast; only the instances' ``forward`` is replaced, until exit. Yields how many it found."""
    convs = [m for m in module.modules() if is_strided_depthwise(m) and "forward" not in vars(m)]
    for conv in convs:
        conv.forward = types.MethodType(_forward, conv)  # an instance attribute shadows the class's forward
    try:
        yield len(convs)
    finally:
        for conv in convs:
            del conv.forward
