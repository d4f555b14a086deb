"""Stage B: the DiffNeXt decoder, a latent diffusion U-Net in Stage A's space (paper §3.1; official ``DiffNeXt``).

It denoises unquantised Stage A latents (B, 4, 256, 256 at 1024 px) conditioned on the Semantic Compressor map
``C_sc`` (B, 16, 24, 24) and on text tokens (CLIP-H ``last_hidden_state``, (B, 77, 1024)).

* Embedding: PixelUnshuffle(2) + 1x1 conv + LayerNorm2d, then four levels (320/640/1280/1280 channels, 128²..16²).
* Level i repeats the letters of ``level_config[i]`` ``blocks[i]`` times: C = ``ResBlockStageB``,
  T = ``TimestepBlock``, A = ``AttnBlock`` (self-attention + text cross-attention).
* ``C_sc`` injection (paper: "project C_sc ... in each block of the model and concatenate"): at every level with
  ``inject_effnet``, ``C_sc`` is resized to the level's resolution (bicubic, antialiased, align_corners, in float32),
  mapped by that level's 1x1 conv to ``c_cond`` channels and concatenated as the skip of every ResBlock of the level.
  The first up ResBlock of each level below the deepest also gets the U-Net skip (``[level_skip, C_sc]``).
* Output head: ``a, b`` from the classifier, ``b = sigmoid(b) * (1 - 2e-3) + 1e-3``, ``eps = (x - a) / b``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AttnBlock, LayerNorm2d, ResBlockStageB, TimestepBlock, check_input, expand_r, r_embedding


@dataclass(frozen=True)
class StageBConfig:
    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024                     # attention-conditioning width and C_sc mapper output width
    c_hidden: tuple[int, ...] = (320, 640, 1280, 1280)
    nhead: tuple[int, ...] = (-1, 10, 20, 20)  # -1: level without attention
    blocks: tuple[int, ...] = (4, 4, 14, 4)
    level_config: tuple[str, ...] = ("CT", "CTA", "CTA", "CTA")
    inject_effnet: tuple[bool, ...] = (False, True, True, True)
    effnet_embd: int = 16                  # Semantic Compressor channels
    clip_embd: int = 1024                  # text-token width
    kernel_size: int = 3
    dropout: float = 0.1
    self_attn: bool = True

    def __post_init__(self) -> None:
        n = len(self.c_hidden)
        for name in ("nhead", "blocks", "level_config", "inject_effnet"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"StageBConfig.{name} has {len(getattr(self, name))} entries, c_hidden has {n}")
        for i, letters in enumerate(self.level_config):
            if not letters or set(letters) - set("CTA"):
                raise ValueError(f"level_config[{i}]={letters!r}: use the letters C, T and A")
            if "A" in letters and (self.nhead[i] < 1 or self.c_hidden[i] % self.nhead[i]):
                raise ValueError(f"level {i}: c_hidden={self.c_hidden[i]} needs a positive nhead dividing it, got {self.nhead[i]}")
            if self.inject_effnet[i] and "C" not in letters:
                raise ValueError(f"level {i} injects C_sc but has no ResBlock (C) to receive it")
        if min(self.c_in, self.c_out, self.patch_size, self.c_cond, self.effnet_embd, self.clip_embd) < 1 or self.c_r < 4:
            raise ValueError(f"StageBConfig sizes must be positive (c_r >= 4): {self}")
        if self.kernel_size % 2 == 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"kernel_size must be odd and dropout in [0, 1): {self}")

    @property
    def downscale(self) -> int:
        """The latent height/width must be a multiple of this."""
        return self.patch_size * 2 ** (len(self.c_hidden) - 1)


STAGE_B_SIZES: dict[str, StageBConfig] = {
    "paper": StageBConfig(),  # released v2 decoder (warp-ai/wuerstchen): 1,055,365,280 parameters
    # tiny: patch 1 keeps a full-resolution level; fresh images, so no dropout (docs/findings.md#stage-b-patch-size)
    "tiny": StageBConfig(c_cond=64, patch_size=1, c_hidden=(32, 64, 128), nhead=(-1, -1, 4), blocks=(1, 2, 2),
                         level_config=("CT", "CT", "CTA"), inject_effnet=(False, True, True), dropout=0.0,
                         clip_embd=128),
    # the small sizes of the parity tests against diffusers (docs/reference.md#parity-sizes)
    "parity": StageBConfig(c_cond=32, c_hidden=(16, 32, 32, 32), nhead=(-1, 2, 2, 2), blocks=(1, 1, 2, 1),
                           clip_embd=24),
}


class StageB(nn.Module):
    """``model(x, r, sc_latent, text_tokens) -> eps``; keys and shapes are those of ``model_v2_stage_b.pt``."""

    def __init__(self, config: StageBConfig = StageBConfig()) -> None:
        super().__init__()
        self.config = cfg = config
        levels = len(cfg.c_hidden)
        self.clip_mapper = nn.Linear(cfg.clip_embd, cfg.c_cond)
        # one C_sc mapper per level of the down path, then per level of the up path (deepest first); None where
        # the level gets no injection (ModuleList keeps the indices of the official keys effnet_mappers.{1..6})
        inject = list(cfg.inject_effnet) + list(reversed(cfg.inject_effnet))
        self.effnet_mappers = nn.ModuleList(
            [nn.Conv2d(cfg.effnet_embd, cfg.c_cond, kernel_size=1) if i else None for i in inject])
        self.seq_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(nn.PixelUnshuffle(cfg.patch_size),
                                       nn.Conv2d(cfg.c_in * cfg.patch_size ** 2, cfg.c_hidden[0], kernel_size=1),
                                       LayerNorm2d(cfg.c_hidden[0]))
        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList()
            if i > 0:
                level.append(nn.Sequential(LayerNorm2d(cfg.c_hidden[i - 1]),
                                           nn.Conv2d(cfg.c_hidden[i - 1], cfg.c_hidden[i], kernel_size=2, stride=2)))
            c_skip = cfg.c_cond if cfg.inject_effnet[i] else 0
            for _ in range(cfg.blocks[i]):
                level.extend(self._block(letter, i, c_skip) for letter in cfg.level_config[i])
            self.down_blocks.append(level)
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.ModuleList()
            for j in range(cfg.blocks[i]):
                for k, letter in enumerate(cfg.level_config[i]):
                    # the first block of every level but the deepest also takes the U-Net skip of its level
                    # (official: only used when that block is a ResBlock)
                    c_skip = cfg.c_hidden[i] if i < levels - 1 and j == k == 0 else 0
                    c_skip += cfg.c_cond if cfg.inject_effnet[i] else 0
                    level.append(self._block(letter, i, c_skip))
            if i > 0:
                level.append(nn.Sequential(LayerNorm2d(cfg.c_hidden[i]),
                                           nn.ConvTranspose2d(cfg.c_hidden[i], cfg.c_hidden[i - 1], kernel_size=2, stride=2)))
            self.up_blocks.append(level)
        self.clf = nn.Sequential(LayerNorm2d(cfg.c_hidden[0]),
                                 nn.Conv2d(cfg.c_hidden[0], 2 * cfg.c_out * cfg.patch_size ** 2, kernel_size=1),
                                 nn.PixelShuffle(cfg.patch_size))
        self.apply(self._init_weights)
        self._init_special()

    def _block(self, letter: str, level: int, c_skip: int) -> nn.Module:
        cfg = self.config
        if letter == "C":
            return ResBlockStageB(cfg.c_hidden[level], c_skip, kernel_size=cfg.kernel_size, dropout=cfg.dropout)
        if letter == "T":
            return TimestepBlock(cfg.c_hidden[level], cfg.c_r)
        return AttnBlock(cfg.c_hidden[level], cfg.c_cond, cfg.nhead[level], self_attn=cfg.self_attn, dropout=cfg.dropout)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def _init_special(self) -> None:
        # official init: small conditioning mappers, tiny input embedding, zero output conv, residual branches
        # scaled by sqrt(1/sum(blocks)), timestep modulation starting at the identity
        for m in self.effnet_mappers:
            if m is not None:
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.clip_mapper.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, gain=0.02)
        nn.init.zeros_(self.clf[1].weight)
        scale = (1 / sum(self.config.blocks)) ** 0.5
        for level in list(self.down_blocks) + list(self.up_blocks):
            for block in level:
                if isinstance(block, ResBlockStageB):
                    block.channelwise[-1].weight.mul_(scale)
                elif isinstance(block, TimestepBlock):
                    nn.init.zeros_(block.mapper.weight)

    def _sc_map(self, index: int, sc_latent: torch.Tensor, size: torch.Size) -> torch.Tensor | None:
        mapper = self.effnet_mappers[index]
        if mapper is None:
            return None
        # resized in float32 (bicubic is not implemented for every half type), as the official code does
        sc = F.interpolate(sc_latent.float(), size=size, mode="bicubic", antialias=True, align_corners=True)
        return mapper(sc.to(sc_latent.dtype))

    def _run(self, block: nn.Module, x: torch.Tensor, r_embed: torch.Tensor, cond: torch.Tensor,
             skip: torch.Tensor | None) -> torch.Tensor:
        if isinstance(block, ResBlockStageB):
            return block(x, skip)
        if isinstance(block, AttnBlock):
            return block(x, cond)
        if isinstance(block, TimestepBlock):
            return block(x, r_embed)
        return block(x)  # the down/up-sampling Sequential

    def forward(self, x: torch.Tensor, r: torch.Tensor | float, sc_latent: torch.Tensor,
                text_tokens: torch.Tensor) -> torch.Tensor:
        """x (B, c_in, H, W) noised Stage A latents; r (B,) in [0, 1]; sc_latent (B, 16, h, w) the RAW Semantic
        Compressor output (``stage_c_output * 42 - 1`` at sampling time); text_tokens (B, L, clip_embd)."""
        cfg = self.config
        check_input("x", x, 4, cfg.c_in)
        check_input("sc_latent", sc_latent, 4, cfg.effnet_embd)
        check_input("text_tokens", text_tokens, 3, cfg.clip_embd)
        if x.shape[-2] % cfg.downscale or x.shape[-1] % cfg.downscale:
            raise ValueError(f"x height and width must be multiples of {cfg.downscale}, got {tuple(x.shape[-2:])}")
        if not sc_latent.shape[0] == text_tokens.shape[0] == x.shape[0]:
            raise ValueError(f"batch sizes differ: x {x.shape[0]}, sc_latent {sc_latent.shape[0]}, text_tokens {text_tokens.shape[0]}")
        r_embed = r_embedding(expand_r(r, x.shape[0], x.device), cfg.c_r).to(x.dtype)
        cond = self.seq_norm(self.clip_mapper(text_tokens))
        x_in, x = x, self.embedding(x)
        levels = len(self.down_blocks)

        level_outputs = []
        for i, level in enumerate(self.down_blocks):
            sc = None
            for block in level:
                if sc is None and isinstance(block, ResBlockStageB):  # after the downsampler: level resolution
                    sc = self._sc_map(i, sc_latent, x.shape[-2:])
                x = self._run(block, x, r_embed, cond, sc)
            level_outputs.insert(0, x)  # deepest first

        x = level_outputs[0]
        for i, level in enumerate(self.up_blocks):
            sc = self._sc_map(levels + i, sc_latent, x.shape[-2:])  # the upsampler is last: x is at level size
            for j, block in enumerate(level):
                skip = sc
                if j == 0 and i > 0:  # the level's U-Net skip enters its first block (the deepest has none)
                    skip = level_outputs[i] if sc is None else torch.cat([level_outputs[i], sc], dim=1)
                x = self._run(block, x, r_embed, cond, skip)

        a, b = self.clf(x).chunk(2, dim=1)
        b = b.sigmoid() * (1 - 2e-3) + 1e-3
        return (x_in - a) / b
