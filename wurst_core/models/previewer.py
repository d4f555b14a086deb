"""The Previewer: Stage C latents -> a low-resolution RGB image, for live previews while Stage C samples.

Stable Cascade ships such a network (16 x 24 x 24 -> 3 x 192 x 192) without its training code; this one is our
own, trained in ``notebooks/13_previewer.ipynb`` (``training.previewer.PreviewerTask``) against the images behind
the Semantic Compressor's latents, downsampled to its output size. Input: the RAW compressor output, the space
Stage B reads (``Pipeline.unscale_stage_c`` of Stage C's samples), so one Previewer serves any Stage C trained on
that compressor whatever its data scaling. Output: (B, 3, h * upscale, w * upscale), unbounded during training;
``preview`` clamps it to [0, 1].

Layout: a 1x1 stem to ``c`` channels, ``depth`` residual 3x3 blocks at the latent resolution (where the semantics
are decoded), then one (nearest x2, 3x3 conv, GELU) stage per doubling with halving widths (at least ``c_min``),
and a 1x1 head to RGB. It is a few per cent of Stage B + Stage A's cost, which is the point of a preview.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from ..io import save_model_checkpoint
from .blocks import check_input


@dataclass(frozen=True)
class PreviewerConfig:
    c_in: int = 16     # Semantic Compressor latent channels
    c: int = 512       # width at the latent resolution
    depth: int = 4     # residual blocks at the latent resolution
    upscale: int = 8   # output side / latent side (a power of two): 24 x 24 -> 192 x 192 as Stable Cascade's
    c_min: int = 32    # narrowest upsampling stage

    def __post_init__(self) -> None:
        if min(self.c_in, self.c, self.c_min) < 1 or self.depth < 0:
            raise ValueError(f"PreviewerConfig widths must be positive and depth >= 0: {self}")
        if self.upscale < 1 or self.upscale & (self.upscale - 1):
            raise ValueError(f"upscale must be a power of two, got {self.upscale}")


PREVIEWER_SIZES: dict[str, PreviewerConfig] = {
    "paper": PreviewerConfig(),                              # 16 x 24 x 24 -> 192 px, as Stable Cascade's
    "tiny": PreviewerConfig(c=64, depth=2, c_min=16),        # 16 x 4 x 4 -> 32 px (half the 64 px image)
    "parity": PreviewerConfig(c=16, depth=1, c_min=8),       # tests and the smoke profile
}


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.gelu(self.conv1(self.norm(x))))


class Previewer(nn.Module):
    """``previewer(latents) -> rgb``: raw compressor latents (B, c_in, h, w) -> (B, 3, h*upscale, w*upscale)."""

    def __init__(self, config: PreviewerConfig = PreviewerConfig()) -> None:
        super().__init__()
        self.config = cfg = config
        self.stem = nn.Conv2d(cfg.c_in, cfg.c, 1)
        self.blocks = nn.Sequential(*[_Residual(cfg.c) for _ in range(cfg.depth)])
        stages: list[nn.Module] = []
        c = cfg.c
        for _ in range(cfg.upscale.bit_length() - 1):
            out = max(cfg.c_min, c // 2)
            stages += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, out, 3, padding=1), nn.GELU()]
            c = out
        self.up = nn.Sequential(*stages)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, latents: Tensor) -> Tensor:
        check_input("latents", latents, 4, self.config.c_in)
        return self.head(self.up(self.blocks(self.stem(latents))))

    @torch.no_grad()
    def preview(self, latents: Tensor) -> Tensor:
        """Images in [0, 1] (float32) from raw compressor latents, in the previewer's own dtype and device."""
        p = next(self.parameters())
        return self(latents.to(p.device, p.dtype)).float().clamp(0, 1)


def save_previewer(model: Previewer, directory: str | os.PathLike) -> Path:
    """``model.safetensors`` + ``model.json`` ({"stage": "previewer", "config"}), written atomically."""
    meta = {"format": "wurst_core", "stage": "previewer", "config": dataclasses.asdict(model.config)}
    save_model_checkpoint(directory, model.state_dict(), meta, name="model")
    return Path(directory)


def load_previewer(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Previewer:
    """A Previewer saved by :func:`save_previewer`, in eval mode; a clear error for another folder."""
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} holds no previewer (no model.json): train one with "
                                "notebooks/13_previewer.ipynb")
    meta = json.loads(meta_path.read_text())
    if meta.get("stage") != "previewer":
        raise ValueError(f"{directory} holds a {meta.get('stage')!r} checkpoint, not a previewer")
    model = Previewer(PreviewerConfig(**meta["config"]))
    model.load_state_dict(load_file(directory / "model.safetensors"))
    return model.to(device).eval()
