"""Which words of a caption does a trained prior use? Conditional-loss sensitivity to counterfactual captions.

For held-out images with ground truth, the denoising loss of a text-conditional model is measured with the true
caption and with captions in which one attribute of every object is changed (``data.procedural.counterfactual``:
position, shape, size or colour), or with the empty caption. The same noise and t are used for every caption, so
the relative rise of the loss isolates what the model reads from each attribute: a rise of 0 means that the
model ignores that attribute (it cannot follow it when sampling), whatever the image quality.

This localises failures of compositional accuracy without sampling (what it found:
docs/findings.md#measurement-caption-sensitivity, docs/findings.md#stage-c-steps-and-learning-rate).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..data.procedural import COUNTERFACTUALS, caption, counterfactual
from ..diffusion import Diffusion

DEFAULT_TS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 0.95)


def counterfactual_captions(attributes: Sequence[dict[str, Any]], kinds: Sequence[str] = COUNTERFACTUALS,
                            seed: int = 0) -> dict[str, list[str]]:
    """``{"true": [...], "empty": [...], kind: [...]}``: each scene's caption, the null caption, and captions of its
    counterfactual twin per ``kind``; one fixed template per scene, so only the changed words differ."""
    out = {"true": [caption(a, random.Random(f"{seed}:{i}")) for i, a in enumerate(attributes)],
           "empty": [""] * len(attributes)}
    for kind in kinds:
        rng = random.Random(f"sensitivity:{seed}:{kind}")
        out[kind] = [caption(counterfactual(a, kind, rng), random.Random(f"{seed}:{i}"))
                     for i, a in enumerate(attributes)]
    return out


@torch.no_grad()
def caption_sensitivity(model: Callable[[Tensor, Tensor, Tensor], Tensor], x0: Tensor,
                        tokens: dict[str, Tensor], ts: Sequence[float] = DEFAULT_TS, seed: int = 0,
                        diffusion: Diffusion = Diffusion(), batch_size: int = 64) -> pd.DataFrame:
    """Relative rise of the (unweighted) noise-prediction MSE of ``model(x_t, r, tokens)`` when the true caption's
    tokens ``tokens["true"]`` are replaced by each other entry of ``tokens`` (same x0, noise and t).

    Returns a frame indexed by t with one column per non-true caption set: ``loss / loss_true - 1``.
    """
    if "true" not in tokens:
        raise ValueError("tokens needs the true captions' tokens under 'true'")
    for name, tok in tokens.items():
        if tok.shape[0] != x0.shape[0]:
            raise ValueError(f"tokens[{name!r}] has {tok.shape[0]} rows for {x0.shape[0]} latents")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    rows = {}
    for t in ts:
        tt = torch.full((x0.shape[0],), float(t), device=x0.device)
        x_t, r = diffusion.diffuse(x0, tt, noise), diffusion.schedule.noise_cond(tt).to(x0.device)
        losses = {}
        for name, tok in tokens.items():
            sq = sum((model(x_t[s:s + batch_size], r[s:s + batch_size], tok[s:s + batch_size].to(x0))
                      - noise[s:s + batch_size]).pow(2).sum().item() for s in range(0, x0.shape[0], batch_size))
            losses[name] = sq / noise.numel()
        rows[float(t)] = {k: v / losses["true"] - 1 for k, v in losses.items() if k != "true"}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("t")
