"""The Baseline LDM: a single-stage text-conditional latent diffusion U-Net (paper §4, "Baselines").

The paper's baseline is "a U-Net-based 1B parameter LDM on SD 2.1 first stage and text-conditioning model", trained
for as many GPU-hours as Stage C. This is that design in the workbench's conventions: one network that denoises the
first stage's latents directly from text, against Würstchen's two-stage route through the 42:1 semantic map.

* Levels ``widths[i]`` at halving resolutions; each level has ``blocks`` residual blocks on the way down and
  ``blocks + 1`` on the way up (one per skip, as in SD's U-Net), the skips concatenated on the way up.
* Residual block: GroupNorm, SiLU, 3x3 conv, then the timestep modulation (``TimestepBlock`` after the second
  GroupNorm: ADM's scale-shift norm), SiLU, dropout, 3x3 conv, plus a 1x1 conv on the skip where widths change.
* ``AttnBlock`` (shared with Stages B and C: self-attention over the feature map and cross-attention to the text
  tokens in one attention) after every residual block of the ``attn_levels`` and in the middle block.
* Time: ``r`` as Stage C takes it, ``r_embedding(r, c_r)`` then a two-layer MLP to ``4 * widths[0]`` (SD's width).
* Text: ``(B, L, c_cond)`` tokens through Stage C's ``cond_mapper`` (Linear, LeakyReLU, Linear), then each
  attention block's own key/value mapper.
* Output: a 3x3 conv to ``c_in`` channels, zero at init: the objective's target (eps by default), no A/B head.

Not in ``models.NETWORKS``: the checkpoint layouts (``layouts.py``) and the architecture study know only the four
Würstchen networks, so the baseline keeps its own checkpoint helpers (``save_baseline`` / ``load_baseline``: the
same ``model.safetensors`` + ``model.json`` folder, stage ``"baseline"``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .. import io
from .blocks import AttnBlock, TimestepBlock, check_input, expand_r, r_embedding

STAGE = "baseline"  # the "stage" written into model.json


@dataclass(frozen=True)
class BaselineConfig:
    c_in: int = 4                                     # latent channels (SD's f8 autoencoder: 4)
    c_cond: int = 1024                                # text-token width (SD 2.1's OpenCLIP-H: 1024)
    widths: tuple[int, ...] = (384, 768, 1536, 1536)  # channels per level, halving resolution between levels
    blocks: int = 2                                   # residual blocks per level on the way down (+1 on the way up)
    attn_levels: tuple[int, ...] = (0, 1, 2)          # levels with an AttnBlock after each residual block
    nhead: int = 8                                    # attention heads at every level and in the middle
    c_r: int = 64                                     # sinusoidal timestep width (Stage C's)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not self.widths or min(self.widths) < 1 or min(self.c_in, self.c_cond, self.blocks, self.nhead) < 1:
            raise ValueError(f"BaselineConfig sizes must be positive: {self}")
        if self.c_r < 4:
            raise ValueError(f"c_r must be >= 4, got {self.c_r}")
        if any(not 0 <= i < len(self.widths) for i in self.attn_levels) or len(set(self.attn_levels)) != len(self.attn_levels):
            raise ValueError(f"attn_levels {self.attn_levels} must be distinct levels in [0, {len(self.widths)})")
        for i in (*self.attn_levels, len(self.widths) - 1):  # the middle block attends at the deepest width
            if self.widths[i] % self.nhead:
                raise ValueError(f"width {self.widths[i]} of level {i} is not divisible by nhead={self.nhead}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def downscale(self) -> int:
        """Spatial factor between the input latent and the deepest level: latent sides must be multiples of it."""
        return 2 ** (len(self.widths) - 1)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "BaselineConfig":
        """The inverse of ``dataclasses.asdict`` through JSON (lists back to tuples); unknown keys are an error."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"BaselineConfig has no field(s) {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


BASELINE_SIZES: dict[str, BaselineConfig] = {
    # SD 2.1's U-Net layout (2 blocks per level, attention at the three finest levels and in the middle) widened
    # from 320 to 384 base channels so that it reaches the paper's ~1B parameters with this lighter attention block
    "paper": BaselineConfig(),
    # the tiny Stage C's budget on the tiny Stage A's 16 x 16 latent (64 px): parameters and training FLOPs per
    # step of the same order (tests/test_baseline.py measures both)
    "tiny": BaselineConfig(c_in=4, c_cond=128, widths=(24, 48, 96), blocks=1, attn_levels=(1, 2), nhead=4),
    "parity": BaselineConfig(c_in=4, c_cond=32, widths=(16, 32), blocks=1, attn_levels=(1,), nhead=2),
}


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c)  # SD's 32 groups, fewer where a tiny width is not a multiple of 32


class UNetResBlock(nn.Module):
    """Residual conv block with the timestep as a scale and shift of the second normalisation (ADM)."""

    def __init__(self, c_in: int, c_out: int, c_t: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.time = TimestepBlock(c_out, c_t)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_embed: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.time(self.norm2(h), t_embed)
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # nearest + conv: no checkerboard


class UNetStep(nn.Module):
    """One residual block of a level, followed by its attention block where the level attends."""

    def __init__(self, c_in: int, c_out: int, cfg: BaselineConfig, attend: bool) -> None:
        super().__init__()
        c_t = 4 * cfg.widths[0]
        self.res = UNetResBlock(c_in, c_out, c_t, cfg.dropout)
        self.attn = AttnBlock(c_out, cfg.c_cond, cfg.nhead, self_attn=True, dropout=cfg.dropout) if attend else None

    def forward(self, x: torch.Tensor, t_embed: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.res(x, t_embed)
        return self.attn(x, cond) if self.attn is not None else x


class BaselineUNet(nn.Module):
    """``model(x, r, text_tokens) -> prediction`` of the objective's target (eps by default), shape of ``x``."""

    def __init__(self, config: BaselineConfig = BaselineConfig()) -> None:
        super().__init__()
        self.config = cfg = config
        w, c_t = cfg.widths, 4 * cfg.widths[0]
        self.r_mapper = nn.Sequential(nn.Linear(cfg.c_r, c_t), nn.SiLU(), nn.Linear(c_t, c_t))
        self.cond_mapper = nn.Sequential(nn.Linear(cfg.c_cond, cfg.c_cond), nn.LeakyReLU(0.2),
                                         nn.Linear(cfg.c_cond, cfg.c_cond))
        self.conv_in = nn.Conv2d(cfg.c_in, w[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips, c = [w[0]], w[0]  # the widths the up path receives, conv_in's output first
        for i, c_level in enumerate(w):
            for _ in range(cfg.blocks):
                self.down.append(UNetStep(c, c_level, cfg, i in cfg.attn_levels))
                c = c_level
                skips.append(c)
            if i < len(w) - 1:
                self.down.append(Downsample(c))
                skips.append(c)
        self.mid = nn.ModuleList([UNetStep(c, c, cfg, attend=True), UNetStep(c, c, cfg, attend=False)])
        self.up = nn.ModuleList()
        for i, c_level in reversed(list(enumerate(w))):
            for _ in range(cfg.blocks + 1):
                self.up.append(UNetStep(c + skips.pop(), c_level, cfg, i in cfg.attn_levels))
                c = c_level
            if i > 0:
                self.up.append(Upsample(c))
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.c_in, 3, padding=1))
        self._init_special()

    @torch.no_grad()
    def _init_special(self) -> None:
        # zero output conv (the network starts at a zero prediction, as SD's and Stage C's) and timestep
        # modulation starting at the identity (Stage C's init); the rest keeps PyTorch's defaults
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        for m in (self.cond_mapper[0], self.cond_mapper[2]):
            nn.init.normal_(m.weight, std=0.02)  # Stage C's small text projection
        for m in self.modules():
            if isinstance(m, TimestepBlock):
                nn.init.zeros_(m.mapper.weight)
                nn.init.zeros_(m.mapper.bias)

    def forward(self, x: torch.Tensor, r: torch.Tensor | float, text_tokens: torch.Tensor) -> torch.Tensor:
        """x (B, c_in, h, w) noised latents, h and w multiples of ``config.downscale``; r (B,) continuous timestep in
        [0, 1] (Stage C's ``r``); text_tokens (B, L, c_cond)."""
        cfg = self.config
        check_input("x", x, 4, cfg.c_in)
        check_input("text_tokens", text_tokens, 3, cfg.c_cond)
        if text_tokens.shape[0] != x.shape[0]:
            raise ValueError(f"text_tokens batch {text_tokens.shape[0]} != x batch {x.shape[0]}")
        if x.shape[-2] % cfg.downscale or x.shape[-1] % cfg.downscale:
            raise ValueError(f"latent height and width must be multiples of {cfg.downscale}, got {tuple(x.shape[-2:])}")
        # SiLU once here instead of in every block's mapper: SD's time embedding feeds each block through a SiLU
        t_embed = F.silu(self.r_mapper(r_embedding(expand_r(r, x.shape[0], x.device), cfg.c_r).to(x.dtype)))
        cond = self.cond_mapper(text_tokens)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, t_embed, cond)
            skips.append(h)
        for block in self.mid:
            h = block(h, t_embed, cond)
        for block in self.up:
            h = block(h) if isinstance(block, Upsample) else block(torch.cat([h, skips.pop()], dim=1), t_embed, cond)
        return self.out(h)


def save_baseline(model: BaselineUNet, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``model.json`` ({"stage": "baseline", "config"}) atomically, as ``save_model``
    does for the Würstchen networks; returns the folder."""
    meta = {"format": "wurst_core", "stage": STAGE, "config": dataclasses.asdict(model.config)}
    io.save_model_checkpoint(directory, model.state_dict(), meta, name="model")
    return Path(directory)


def load_baseline(directory: str | os.PathLike, device: str | torch.device = "cpu") -> BaselineUNet:
    """The network written by :func:`save_baseline`, in eval mode; a mismatching file raises (strict load)."""
    directory = Path(directory)
    meta = json.loads((directory / "model.json").read_text())
    if meta.get("stage") != STAGE:
        raise ValueError(f"{directory} holds stage {meta.get('stage')!r}, not the baseline U-Net")
    model = BaselineUNet(BaselineConfig.from_dict(meta["config"]))
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    return model.to(device).eval()
