"""Training's kernel choice: the input gradient of strided depthwise convolutions from the fp32 kernel under bf16
autocast, the numbers as before."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_finetune import TINY, TRAINER, Spy, _class_acts
from torch import nn

from birds_lpft.models.net import NetConfig, build_net

from finetune.datamodule import TrunkCacheData
from finetune.kernels import fp32_depthwise_input_grads, is_strided_depthwise
from finetune.module import CpuBf16Kernels
from finetune.train import train_tops


def _hooked(module: nn.Module) -> list[nn.Module]:
    """The modules whose forward is replaced on the instance."""
    return [m for m in module.modules() if "forward" in vars(m)]


def test_only_strided_depthwise_convolutions_are_chosen():
    assert is_strided_depthwise(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8))
    assert not is_strided_depthwise(nn.Conv2d(8, 8, 3, stride=1, padding=1, groups=8))  # its bf16 kernel is fast
    assert not is_strided_depthwise(nn.Conv2d(8, 8, 3, stride=2, padding=1))  # a full convolution
    assert not is_strided_depthwise(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2))  # grouped
    assert not is_strided_depthwise(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, padding_mode="reflect"))
    assert not is_strided_depthwise(nn.Linear(8, 8))

    class SamePadded(nn.Conv2d):  # like timm's Conv2dSame: its own forward, which the replacement would skip
        def forward(self, x):
            return super().forward(F.pad(x, (0, 1, 0, 1)))

    assert not is_strided_depthwise(SamePadded(8, 8, 3, stride=2, groups=8))
    net = build_net(NetConfig("mobilenet_v2", 3, 11))
    chosen = [name for name, m in net.tail.named_modules() if is_strided_depthwise(m)]
    assert chosen == ["14.conv.1.0"]  # block 14's 3x3 stride-2 convolution: the one stride in the tail from 11


def _step(conv: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, kernels: bool):
    """Output, input gradient and weight (and bias) gradients of one bf16-autocast pass, with or without the
    kernel choice."""
    x = x.clone().requires_grad_()
    conv.zero_grad()
    with fp32_depthwise_input_grads(conv) if kernels else torch.enable_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        y.backward(g)
    return y.detach(), x.grad, [p.grad.clone() for p in conv.parameters()]


@pytest.mark.parametrize("bias, dtype", [(False, torch.bfloat16), (True, torch.float32)])
def test_the_numbers_are_the_bf16_kernels_and_only_the_input_gradient_comes_from_fp32(bias, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=bias)
    x = torch.randn(4, 16, 12, 12).to(dtype).contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 16, 6, 6).bfloat16()
    y0, gx0, gp0 = _step(conv, x, g, kernels=False)
    y1, gx1, gp1 = _step(conv, x, g, kernels=True)
    assert y1.dtype == torch.bfloat16 and torch.equal(y1, y0)  # the forward is autocast's own
    assert len(gp1) == 1 + bias  # weight (and bias) too
    assert all(torch.equal(a, b) for a, b in zip(gp1, gp0, strict=True))
    assert gx1.dtype == gx0.dtype == dtype
    # the input gradient: the same fp32 sums, rounded to bf16 as the bf16 kernel rounds them (at most a tie apart)
    torch.testing.assert_close(gx1, gx0, rtol=2**-7, atol=0)
    assert (gx1 != gx0).float().mean() < 1e-3
    assert not _hooked(conv)


def test_without_autocast_the_convolution_is_the_plain_one_and_a_failure_restores_the_module():
    conv = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
    x = torch.randn(2, 8, 8, 8)
    with fp32_depthwise_input_grads(conv) as found:
        assert found == 1 and _hooked(conv) == [conv] and torch.equal(conv(x), nn.Conv2d.forward(conv, x))
    with pytest.raises(RuntimeError), fp32_depthwise_input_grads(conv), torch.autocast("cpu", dtype=torch.bfloat16):
        conv(torch.randn(2, 3, 8, 8))  # wrong channel count: raises inside the conv
    assert not _hooked(conv) and list(conv.state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("precision, device, hooked", [("bf16-mixed", "cpu", True), ("32-true", "cpu", False),
                                                       ("bf16-mixed", "cuda", False)])
def test_the_callback_hooks_only_bf16_on_a_cpu_and_unhooks_at_teardown_or_on_an_exception(precision, device, hooked):
    net = build_net(NetConfig("mobilenet_v2", 3, 11))
    module = SimpleNamespace(device=torch.device(device), top=net.top())
    trainer = SimpleNamespace(precision=precision)
    for leave in ("teardown", "on_exception"):
        callback = CpuBf16Kernels()
        callback.on_fit_start(trainer, module)
        assert bool(_hooked(net)) == hooked
        getattr(callback, leave)(trainer, module, "fit" if leave == "teardown" else RuntimeError())
        assert not _hooked(net)


class HookSpy(Spy):
    """Also records which tail modules have their forward replaced at each training step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.steps[-1]["hooked"] = [n for n, m in pl_module.net.tail.named_modules() if "forward" in vars(m)]


@pytest.mark.parametrize("precision, hooked", [("bf16", ["14.conv.1.0"]), ("fp32", [])])
def test_a_fit_replaces_the_tails_strided_depthwise_forward_only_under_bf16(precision, hooked):
    cfg = replace(TINY, train_precision=precision)
    net = build_net(NetConfig("mobilenet_v2", 3, cfg.trunk_split))  # the fast preset's tail starts at block 14
    acts, y = _class_acts(16, 3, seed=3)
    data = TrunkCacheData.from_stacks(y.numpy(), acts, [], np.arange(len(y)), cfg)
    spy = HookSpy()
    train_tops(net, data, cfg, progress=False, callbacks=[spy], **TRAINER)
    assert spy.steps and all(step["hooked"] == hooked for step in spy.steps)
    assert not _hooked(net)
