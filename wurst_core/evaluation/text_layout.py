"""Can the caption's layout be read from text features? A learned-query probe of what Stage C has to learn.

Stage C places objects by attending from each latent cell to the text tokens. This probe isolates that reading:
one learned query per grid cell attends over frozen text features (as Stage C's attention does) and predicts the
cell's content (empty or the object's colour), trained with a clean cross-entropy signal instead of the denoising
loss. Features from which this reader learns slowly, or not at all, cannot be followed by a prior trained for a
few thousand steps. What it showed on the tiny CLIP: docs/findings.md#text-encoder-token-wise-term.
"""
from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.procedural import COLORS, HPOS, VPOS

N_CELLS = len(HPOS) * len(VPOS)


def layout_targets(attributes: Sequence[dict[str, Any]]) -> Tensor:
    """(N, 9) row-major grid cells: 0 = empty, 1 + index of the object's colour in ``data.procedural.COLORS``."""
    colors = list(COLORS)
    out = torch.zeros(len(attributes), N_CELLS, dtype=torch.long)
    for i, scene in enumerate(attributes):
        for obj in scene["objects"]:
            out[i, VPOS.index(obj["vpos"]) * len(HPOS) + HPOS.index(obj["hpos"])] = 1 + colors.index(obj["color"])
    return out


class LayoutReader(nn.Module):
    """One learned query per grid cell, multi-head attention over the text features, a linear classifier."""

    def __init__(self, width: int, heads: int = 4, classes: int = 1 + len(COLORS)) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(N_CELLS, width) * 0.02)
        self.kv = nn.Linear(width, width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, classes))

    def forward(self, tokens: Tensor) -> Tensor:
        kv = self.kv(tokens)
        return self.head(self.attn(self.queries.expand(tokens.shape[0], -1, -1), kv, kv, need_weights=False)[0])


def layout_probe(train_tokens: Tensor, train_targets: Tensor, val_tokens: Tensor, val_targets: Tensor,
                 steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, eval_at: Sequence[int] | None = None,
                 heads: int = 4, seed: int = 0) -> pd.DataFrame:
    """Train a :class:`LayoutReader` on ``(N, L, width)`` features and ``layout_targets``; one row per evaluation
    step: ``occupied`` (held-out occupied cells right: the number that matters), ``cells`` (all cells; predicting
    "empty" everywhere already scores the empty share) and ``scenes`` (every cell of a scene right)."""
    if train_tokens.dim() != 3 or train_tokens.shape[0] != train_targets.shape[0]:
        raise ValueError(f"train_tokens must be (N, L, width) with N = len(train_targets), got "
                         f"{tuple(train_tokens.shape)} and {tuple(train_targets.shape)}")
    eval_at = sorted(set(eval_at or (steps // 10, steps // 3, steps)) - {0})
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reader = LayoutReader(train_tokens.shape[-1], heads)
    opt = torch.optim.Adam(reader.parameters(), lr)
    rows, occupied = [], val_targets > 0
    for step in range(1, steps + 1):
        idx = torch.randint(0, train_tokens.shape[0], (batch_size,), generator=gen)
        loss = F.cross_entropy(reader(train_tokens[idx]).flatten(0, 1), train_targets[idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in eval_at:
            with torch.no_grad():
                right = torch.cat([reader(val_tokens[i:i + 512]).argmax(-1) for i in range(0, len(val_tokens), 512)])
            right = right == val_targets
            rows.append({"step": step, "occupied": right[occupied].float().mean().item(),
                         "cells": right.float().mean().item(), "scenes": right.all(1).float().mean().item()})
    return pd.DataFrame(rows)
