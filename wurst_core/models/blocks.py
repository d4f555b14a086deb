"""Building blocks shared by Stage B (DiffNeXt) and Stage C (the prior).

Layouts as released, so the .pt files load unchanged (docs/reference.md#shared-blocks):
every LayerNorm is ``elementwise_affine=False, eps=1e-6`` (no LN weights in any state dict); the prior's
``ResBlock`` concatenates its skip *before* the depthwise conv, Stage B's ``ResBlockStageB`` *after* it;
attention is ``nn.MultiheadAttention``-shaped (packed ``in_proj_weight``), so the released ``.pt`` files load
unchanged, but it is computed with ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, without affine parameters (eps 1e-6)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), (self.c,), eps=1e-6).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on channels-last input: ``gamma * (x * N(x)) + beta + x`` (gamma, beta start at 0)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # L2 norm over H, W per channel
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * n) + self.beta + x


class TimestepBlock(nn.Module):
    """Affine modulation by the timestep embedding: ``x * (1 + a) + b``."""

    def __init__(self, c: int, c_r: int) -> None:
        super().__init__()
        self.mapper = nn.Linear(c_r, c * 2)

    def forward(self, x: torch.Tensor, r_embed: torch.Tensor) -> torch.Tensor:
        a, b = self.mapper(r_embed)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + a) + b


def _channelwise(c_in: int, c: int, dropout: float) -> nn.Sequential:
    # ConvNeXt-V2 inverted bottleneck, applied channels-last: indices 0/2/4 are the official key names.
    return nn.Sequential(nn.Linear(c_in, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout),
                         nn.Linear(c * 4, c))


class ResBlock(nn.Module):
    """Stage C's ConvNeXt block: the skip (if any) is concatenated BEFORE the depthwise conv."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = _channelwise(c, c, dropout)

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        res = x
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        x = self.norm(self.depthwise(x))
        return self.channelwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + res


class ResBlockStageB(nn.Module):
    """Stage B's ConvNeXt block: the skip (U-Net skip and/or the Semantic Compressor map) is concatenated AFTER
    depthwise conv + LayerNorm, into the first Linear (official ``ResBlockStageB``)."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = _channelwise(c + c_skip, c, dropout)

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        res = x
        x = self.norm(self.depthwise(x))
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        return self.channelwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + res


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout (packed q/k/v ``in_proj``), so
    the released checkpoints load as they are, computed with ``F.scaled_dot_product_attention``."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        if nhead < 1 or c % nhead:
            raise ValueError(f"attention width {c} is not divisible by nhead={nhead}")
        self.nhead = nhead
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * c, c))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * c))
        self.out_proj = nn.Linear(c, c)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's init
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q: (B, Lq, C) queries; kv: (B, Lkv, C) tokens used as both keys and values."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        out = F.scaled_dot_product_attention(self._heads(F.linear(q, w_q, b_q)), self._heads(F.linear(kv, w_k, b_k)),
                                             self._heads(F.linear(kv, w_v, b_v)),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.nhead, -1)).transpose(1, 2)  # (B, L, C) -> (B, heads, L, C/heads)


class AttnBlock(nn.Module):
    """Cross-attention to the conditioning tokens, with the official self-attention trick: the normalised
    feature-map tokens are prepended to the keys/values, so one attention does both self- and cross-attention."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c)
        # ModuleDict only to reproduce the official key path `attention.attn.in_proj_weight`.
        self.attention = nn.ModuleDict({"attn": MultiheadAttention(c, nhead, dropout)})
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        kv = self.kv_mapper(cond)
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.self_attn:
            kv = torch.cat([tokens, kv], dim=1)
        out = self.attention["attn"](tokens, kv)
        return x + out.transpose(1, 2).reshape(x.shape)


def r_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the continuous timestep r in [0, 1] (official ``gen_r_embedding``): (B,) -> (B, c_r).

    ``r`` is scaled by 10000 so that [0, 1] spans the usual integer-timestep frequency range.
    """
    if r.ndim != 1:
        raise ValueError(f"r must have shape (B,), got {tuple(r.shape)}")
    r = r * max_positions
    half = c_r // 2
    freqs = torch.arange(half, device=r.device).float().mul(-math.log(max_positions) / (half - 1)).exp()
    emb = r[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb.to(dtype=r.dtype)


def expand_r(r: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Accept r as a float, a 0-d tensor or a (B,) tensor; return a float (B,) tensor."""
    r = torch.as_tensor(r, device=device)
    if not torch.is_floating_point(r):
        r = r.float()
    if r.ndim == 0:
        r = r.expand(batch)
    if r.shape != (batch,):
        raise ValueError(f"r must be a scalar or have shape ({batch},), got {tuple(r.shape)}")
    return r


def check_input(name: str, x: torch.Tensor, ndim: int, channels: int | None = None) -> None:
    """Raise a clear error for a tensor of the wrong rank or channel count."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1 if ndim == 4 else -1] != channels:
        dim = "channels (dim 1)" if ndim == 4 else "features (last dim)"
        raise ValueError(f"{name} must have {channels} {dim}, got shape {tuple(x.shape)}")
