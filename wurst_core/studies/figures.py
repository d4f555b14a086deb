"""Figures the study notebooks share: image grids with captions, loss curves, saving."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch


def save_figure(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def image_grid(rows: list[torch.Tensor], titles: list[str] | None = None, captions: list[str] | None = None,
               scale: float = 1.2):
    """A matplotlib figure: one row per tensor (N,3,H,W) in [0,1], with optional row titles and column captions."""
    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(scale * n, scale * len(rows) + (0.6 if captions else 0)),
                             squeeze=False)
    for r, imgs in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0 and titles:
                ax.set_ylabel(titles[r], fontsize=8)
            if r == 0 and captions:
                ax.set_title("\n".join(_wrap(captions[c], 18)), fontsize=5)
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + [cur]


def loss_figure(history: pd.DataFrame, keys: tuple[str, ...] = ("loss",)):
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        if k in history:
            ax.plot(history["step"], history[k])
            ax.set_xlabel("step"), ax.set_title(k)
            if k in ("loss", "mse", "vq"):
                ax.set_yscale("log")
    fig.tight_layout()
    return fig
