"""The network built on a backbone: trunk -> tail -> pool -> head (:mod:`birds_lpft.models.zoo` derives how each
backbone is split)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import cached_property
from typing import cast

import torch
from torch import nn

from birds_lpft.models.zoo import BackboneSpec, get_spec


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al. 2018): (mean over space of x^p)^(1/p), p learnt.

    Between average (p = 1) and max pooling (p -> infinity), it weights the strongest, most local responses more,
    which suits fine-grained classes told apart by small parts. (B, F, h, w) -> (B, F).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GeMPool.apply(x, self.p, self.eps)


class _GeMPool(torch.autograd.Function):
    """GeM with its backward written out: autograd's gradient in fewer elementwise passes over the (B, F, h, w)
    maps (a visible share of a tail step), without the branch through ``top`` (zero: GeM is homogeneous)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor:
        z = x.to(torch.promote_types(x.dtype, torch.float32)).clamp(min=eps)  # fp32 even under bf16 autocast
        top = z.amax(dim=(2, 3), keepdim=True)  # scaled by the maximum, z^p never overflows, whatever p becomes
        z = z / top
        zp = z.pow(p)
        s = zp.mean(dim=(2, 3))
        y = s.pow(1.0 / p) * top.flatten(1)
        ctx.save_for_backward(x, p, z, zp, s, y, top)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, p, z, zp, s, y, top = ctx.saved_tensors
        gx = gp = None
        if ctx.needs_input_grad[0]:  # dy/dx = y / (s h w top) z^(p-1); none where the clamp held x at eps
            scale = (g * y / (s * z.shape[2] * z.shape[3])).unsqueeze(-1).unsqueeze(-1) / top
            gx = ((zp / z) * scale).masked_fill_(x < ctx.eps, 0).to(x.dtype)
        if ctx.needs_input_grad[1]:  # dy/dp = y (mean(z^p ln z) / (p s) - ln s / p^2)
            gp = (g * y * ((zp * z.log()).mean(dim=(2, 3)) / (p * s) - s.log() / p**2)).sum()
        return gx, gp, None


def make_pool(pooling: str) -> nn.Module:
    """'avg' or 'gem': a module mapping (B, F, h, w) -> (B, F)."""
    if pooling == "avg":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    if pooling == "gem":
        return GeM()
    raise ValueError(f"pooling must be 'avg' or 'gem', got {pooling!r}")


class TailHead(nn.Module):
    """The trainable top of the network: tail blocks, pooling, dropout and head (the very modules it is given, so
    training it trains the network that holds them). Its forwards are :class:`BirdNet`'s of the same names.
    """

    def __init__(self, tail: nn.Sequential, pool: nn.Module, dropout: nn.Dropout, head: nn.Linear):
        super().__init__()
        self.tail = tail
        self.pool = pool
        self.dropout = dropout
        self.head = head

    def forward_tail(self, a: torch.Tensor) -> torch.Tensor:
        a = a.float().contiguous(memory_format=torch.channels_last)  # the layout the net's convolutions run fastest in
        return self.tail(a)

    def forward_head(self, maps: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        f = self.pool(maps)
        return f if pre_logits else self.head(self.dropout(f))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_tail(a))


class BirdNet(nn.Module):
    """Backbone blocks split into a frozen ``trunk`` and a trainable ``tail``, then pool, dropout, ``head``.

    Names follow timm: ``forward_features(x)`` (B, 3, H, W) -> unpooled maps (B, F, h, w); ``forward_head(maps)``
    pools and classifies them -> (B, K) logits (or (B, F) pooled features with ``pre_logits``). Training on
    cached trunk activations enters half-way: ``forward_tail(a)`` (B, C, h', w') -> (B, F, h, w), and
    ``forward_from_trunk(a)`` -> logits. :meth:`top` is the trainable part as one module.
    """

    def __init__(self, blocks: nn.Sequential, width: int, num_classes: int, split: int, dropout: float = 0.0,
                 pooling: str = "avg"):
        super().__init__()
        if not 0 <= split <= len(blocks):
            raise ValueError(f"split must be in 0..{len(blocks)}, got {split}")
        self.trunk = blocks[:split]
        self.tail = blocks[split:]
        self.pool = make_pool(pooling)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def top(self) -> TailHead:
        """Tail, pooling, dropout and head: the very modules the net holds (wrapped on each call, since registering
        the wrapper would duplicate the state dict)."""
        return TailHead(self.tail, self.pool, self.dropout, self.head)

    def tops(self) -> list[TailHead]:
        """Every trainable top the net averages over: its own alone (an ensemble has more)."""
        return [self.top()]

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward_tail(self, a: torch.Tensor) -> torch.Tensor:
        return self.top().forward_tail(a)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tail(self.forward_trunk(x))

    def forward_head(self, maps: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.top().forward_head(maps, pre_logits)

    def forward_from_trunk(self, a: torch.Tensor) -> torch.Tensor:
        """Trunk activations (B, C, h', w') -> logits (B, K)."""
        return self.top()(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_trunk(self.forward_trunk(x))


class EnsembleNet(BirdNet):
    """A :class:`BirdNet` whose ``extra`` holds ``members - 1`` more tails and heads.

    Member 0 is the net's own tail and head, so the state dict is a single model's plus ``extra.*``.
    """

    def __init__(self, *args, members: int, **kwargs):
        super().__init__(*args, **kwargs)
        if members < 2:
            raise ValueError(f"an ensemble has at least 2 members, got {members}")
        self.extra = nn.ModuleList(copy.deepcopy(self.top()) for _ in range(members - 1))

    @property
    def members(self) -> int:
        return 1 + len(self.extra)

    def member(self, i: int) -> TailHead:
        """Member ``i``'s tail and head: the very modules the net holds, so training them trains the net."""
        return self.top() if i == 0 else cast(TailHead, self.extra[i - 1])  # ``extra`` holds copies of top()

    def tops(self) -> list[TailHead]:
        return [self.member(i) for i in range(self.members)]

    def forward_from_trunk(self, a: torch.Tensor) -> torch.Tensor:
        """Trunk activations (B, C, h', w') -> logits (B, K), every member's in fp32, averaged."""
        return torch.stack([self.member(i)(a).float() for i in range(self.members)]).mean(0)


@dataclass(frozen=True)
class NetConfig:
    """Everything needed to rebuild a :class:`BirdNet` without downloading (``FinetuneConfig.net_config``)."""

    backbone: str
    num_classes: int
    split: int
    dropout: float = 0.0
    pooling: str = "avg"
    members: int = 1

    @cached_property
    def spec(self) -> BackboneSpec:
        """The backbone, resolved once."""
        return get_spec(self.backbone)


@torch.inference_mode()
def trunk_bytes(net: BirdNet, image_size: int, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of one image's trunk activations at ``image_size`` in ``dtype``: what one cached view costs."""
    param = next(net.trunk.parameters(), None)
    x = torch.zeros(1, 3, image_size, image_size, device=param.device if param is not None else "cpu")
    shape = net.forward_trunk(x.contiguous(memory_format=torch.channels_last)).shape[1:]
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def nonfinite(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of a state dict's floating-point tensors that hold NaN or infinite values."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def build_net(cfg: NetConfig, state_dict: dict | None = None) -> BirdNet:
    """Build a randomly initialised :class:`BirdNet` (an :class:`EnsembleNet` when ``cfg.members`` > 1).

    ``state_dict`` is the whole backbone's (e.g. the pretrained file), loaded first; the head is always new.
    To restore a trained BirdNet, call ``load_state_dict`` on the result instead.
    """
    spec = cfg.spec
    model = spec.build()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    args = (spec.blocks(model), spec.width, cfg.num_classes, cfg.split, cfg.dropout, cfg.pooling)
    net = BirdNet(*args) if cfg.members == 1 else EnsembleNet(*args, members=cfg.members)
    return net.to(memory_format=torch.channels_last)  # the layout oneDNN's CPU convolutions run fastest in
