"""Stage C: the text-conditional prior over Semantic Compressor latents (paper §3.2, §3.4; official ``Prior``).

A flat stack (no down/up-sampling: "further compression [is] harmful", §3.4) of ``depth`` triplets
[ConvNeXt ``ResBlock``, ``TimestepBlock``, ``AttnBlock``] at the latent resolution (24 x 24 for 1024 px). The text
tokens (CLIP ``last_hidden_state``, (B, 77, c_cond)) go through ``cond_mapper`` and are the keys/values of every
attention block, together with the feature-map tokens (self-attention concatenation). Output: the A/B head of §3.2,
``eps = (x - A) / (|1 - B| + 1e-5)``, so that a zero-initialised head returns the input. ``StageC(cfg, head="plain")``
is the ablation the paper argues against: the output conv gives the estimate directly (``c_in`` channels, zero at
init), same state-dict keys; the head is not part of ``StageCConfig`` (whose fields are exported to diffusers).

Sizes: ``paper`` is the released v2 prior (c 1536, depth 32, c_cond 1280 for CLIP-bigG, 993,636,896 parameters);
``paper-16`` is the paper's text ("16 ConvNeXt blocks", c 1280, CLIP-H 1024), which is also diffusers' default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .blocks import AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, check_input, expand_r, r_embedding


@dataclass(frozen=True)
class StageCConfig:
    c_in: int = 16       # Semantic Compressor latent channels
    c: int = 1536        # width
    c_cond: int = 1280   # text-token width (CLIP-bigG 1280; CLIP-H 1024)
    c_r: int = 64        # timestep-embedding width
    depth: int = 32      # number of [ResBlock, TimestepBlock, AttnBlock] triplets
    nhead: int = 24
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if min(self.c_in, self.c, self.c_cond, self.depth, self.nhead) < 1 or self.c_r < 4:
            raise ValueError(f"StageCConfig fields must be positive (c_r >= 4): {self}")
        if self.c % self.nhead:
            raise ValueError(f"c={self.c} must be divisible by nhead={self.nhead}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


STAGE_C_SIZES: dict[str, StageCConfig] = {
    "paper": StageCConfig(),  # released v2 prior (warp-ai/wuerstchen-prior): 993,636,896 parameters
    "paper-16": StageCConfig(c=1280, c_cond=1024, depth=16, nhead=16),  # the paper's 16-block text, CLIP-H
    "v1": StageCConfig(c_cond=1024),  # v1 prior (CLIP-H): 993,243,680 parameters
    "tiny": StageCConfig(c=128, c_cond=128, depth=8, nhead=4, dropout=0.0),  # fresh images each step: no dropout
    # the small sizes of the parity tests against diffusers (docs/reference.md#parity-sizes)
    "parity": StageCConfig(c=32, c_cond=32, depth=2, nhead=2),
}


HEADS = ("ab", "plain")


def ab_head(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The A/B head of paper §3.2: ``(x - A) / (|1 - B| + 1e-5)``; A = B = 0 returns the input ``x``."""
    return (x - a) / ((1 - b).abs() + 1e-5)


class StageC(nn.Module):
    """``model(x, r, text_tokens) -> eps``; state-dict keys and shapes are those of ``model_v2_stage_c.pt``.

    ``head``: ``"ab"`` (released, paper §3.2) or ``"plain"`` (the output conv's ``c_in`` channels are the output).
    """

    def __init__(self, config: StageCConfig = StageCConfig(), head: str = "ab") -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.config = cfg = config
        self.head = head
        self.projection = nn.Conv2d(cfg.c_in, cfg.c, kernel_size=1)
        self.cond_mapper = nn.Sequential(nn.Linear(cfg.c_cond, cfg.c), nn.LeakyReLU(0.2), nn.Linear(cfg.c, cfg.c))
        self.blocks = nn.ModuleList()
        for _ in range(cfg.depth):
            self.blocks.append(ResBlock(cfg.c, dropout=cfg.dropout))
            self.blocks.append(TimestepBlock(cfg.c, cfg.c_r))
            self.blocks.append(AttnBlock(cfg.c, cfg.c, cfg.nhead, self_attn=True, dropout=cfg.dropout))
        c_out = cfg.c_in * 2 if head == "ab" else cfg.c_in  # A and B, or the estimate itself
        self.out = nn.Sequential(LayerNorm2d(cfg.c), nn.Conv2d(cfg.c, c_out, kernel_size=1))
        self.apply(self._init_weights)
        self._init_special()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def _init_special(self) -> None:
        # official init: small conditioning projections, zero output conv (the A/B head then returns the input,
        # §3.2; the plain head returns 0), residual branches scaled down by sqrt(1/depth), timestep modulation
        # starting at the identity
        nn.init.normal_(self.projection.weight, std=0.02)
        for m in (self.cond_mapper[0], self.cond_mapper[2]):
            nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.out[1].weight)
        for block in self.blocks:
            if isinstance(block, ResBlock):
                block.channelwise[-1].weight.mul_((1 / self.config.depth) ** 0.5)
            elif isinstance(block, TimestepBlock):
                nn.init.zeros_(block.mapper.weight)

    def forward(self, x: torch.Tensor, r: torch.Tensor | float, text_tokens: torch.Tensor) -> torch.Tensor:
        """x (B, c_in, h, w) noised latents; r (B,) continuous timestep in [0, 1]; text_tokens (B, L, c_cond)."""
        cfg = self.config
        check_input("x", x, 4, cfg.c_in)
        check_input("text_tokens", text_tokens, 3, cfg.c_cond)
        if text_tokens.shape[0] != x.shape[0]:
            raise ValueError(f"text_tokens batch {text_tokens.shape[0]} != x batch {x.shape[0]}")
        r_embed = r_embedding(expand_r(r, x.shape[0], x.device), cfg.c_r).to(x.dtype)
        cond = self.cond_mapper(text_tokens)
        x_in, x = x, self.projection(x)
        for block in self.blocks:
            if isinstance(block, AttnBlock):
                x = block(x, cond)
            elif isinstance(block, TimestepBlock):
                x = block(x, r_embed)
            else:
                x = block(x)
        if self.head == "plain":
            return self.out(x)
        a, b = self.out(x).chunk(2, dim=1)
        return ab_head(x_in, a, b)
