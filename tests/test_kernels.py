"""Training's kernel choice: strided depthwise convolutions in fp32 under bf16 autocast, nothing else moved."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_finetune import TINY, TRAINER, Spy, _class_acts
from torch import nn

from probe.backbone import NetConfig, build_net

from finetune.datamodule import TrunkCacheData
from finetune.kernels import fp32_strided_depthwise, is_strided_depthwise
from finetune.module import CpuBf16Kernels
from finetune.train import train_tops


def _hooked(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if m._forward_pre_hooks or m._forward_hooks]


def test_only_strided_depthwise_convolutions_are_chosen():
    assert is_strided_depthwise(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8))
    assert not is_strided_depthwise(nn.Conv2d(8, 8, 3, stride=1, padding=1, groups=8))  # its bf16 kernel is fast
    assert not is_strided_depthwise(nn.Conv2d(8, 8, 3, stride=2, padding=1))  # a full convolution
    assert not is_strided_depthwise(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2))  # grouped
    assert not is_strided_depthwise(nn.Linear(8, 8))
    net = build_net(NetConfig("mobilenet_v2", 3, 11))
    chosen = [name for name, m in net.tail.named_modules() if is_strided_depthwise(m)]
    assert chosen == ["14.conv.1.0"]  # block 14's 3x3 stride-2 convolution: the one stride in the tail from 11


def test_inside_the_block_the_strided_depthwise_conv_runs_in_fp32_and_the_rest_in_bf16():
    torch.manual_seed(0)
    dw, pw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.Conv2d(8, 4, 1)
    net, x = nn.Sequential(dw, pw), torch.randn(2, 8, 8, 8)
    seen = {}
    dw.register_forward_hook(lambda m, a, out: seen.update(dw=out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16 and seen["dw"].dtype == torch.bfloat16  # before: bf16 everywhere
        with fp32_strided_depthwise(net) as hooked:
            out = net(x)
            assert torch.is_autocast_enabled("cpu")  # back on after the conv, for the next layer
        assert hooked == 1 and out.dtype == torch.bfloat16
    assert seen["dw"].dtype == torch.float32
    assert torch.equal(seen["dw"], F.conv2d(x, dw.weight, dw.bias, stride=2, padding=1, groups=8))  # plain fp32
    assert _hooked(net) == [dw]  # only the test's own hook is left
    assert list(net.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_a_failing_forward_leaves_autocast_and_the_modules_as_they_were():
    dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError), fp32_strided_depthwise(dw):
            dw(torch.randn(2, 3, 8, 8))  # wrong channel count: raises inside the conv
        assert torch.is_autocast_enabled("cpu")
    assert not _hooked(dw)


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
    """Also records which tail modules carry forward hooks at each training step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.steps[-1]["hooked"] = [n for n, m in pl_module.net.tail.named_modules() if m._forward_pre_hooks]


@pytest.mark.parametrize("precision, hooked", [("bf16", ["14.conv.1.0"]), ("fp32", [])])
def test_a_fit_runs_the_tails_strided_depthwise_conv_in_fp32_only_under_bf16(precision, hooked):
    cfg = replace(TINY, train_precision=precision)
    net = build_net(NetConfig("mobilenet_v2", 3, cfg.trunk_split))  # the fast preset's tail starts at block 14
    acts, y = _class_acts(16, 3, seed=3)
    data = TrunkCacheData.from_stacks(y.numpy(), acts, [], np.arange(len(y)), cfg)
    spy = HookSpy()
    train_tops(net, data, cfg, progress=False, callbacks=[spy], **TRAINER)
    assert spy.steps and all(step["hooked"] == hooked for step in spy.steps)
    assert not _hooked(net)
