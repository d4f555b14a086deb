"""Stage A: the f4 VQGAN (paper §3.1; official ``vqgan.py`` ``VQModel``, diffusers ``PaellaVQModel``).

Paper symbols: ``f_Θ`` = ``encode``, ``f_Θ^{-1}`` = ``decode``; ``X_q`` = ``encode(images, quantize=True)``.
Images (B, 3, H, W) in [0, 1] (no mean/std normalisation) map to latents (B, 4, H/4, W/4). Stage B works in the
*unquantised* latent space (§3.1: "the quantization is dropped"), divided by ``scale_factor`` = 0.3764 so that the
latents have roughly unit variance; ``decode`` multiplies it back and never quantises, like the released v2
decode path (docs/reference.md#stage-a-vqgan). The codebook (8,192 entries) is only used to train Stage A and for
``encode(..., quantize=True)`` / ``decode_indices``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import check_input


@dataclass(frozen=True)
class StageAConfig:
    levels: int = 2              # resolution levels; spatial compression f = 2**levels (PixelUnshuffle(2) + levels-1 convs)
    bottleneck_blocks: int = 12  # decoder blocks at the deepest level
    c_hidden: int = 384          # width of the deepest level; level i has c_hidden / 2**(levels-1-i)
    c_latent: int = 4
    codebook_size: int = 8192
    scale_factor: float = 0.3764  # released v2; a new one calibrates its own (docs/reference.md#stage-a-scale-factor)

    def __post_init__(self) -> None:
        if self.levels < 1 or self.bottleneck_blocks < 1 or self.c_latent < 1 or self.codebook_size < 1:
            raise ValueError(f"StageAConfig fields must be positive: {self}")
        if self.c_hidden % 2 ** (self.levels - 1):
            raise ValueError(f"c_hidden={self.c_hidden} must be divisible by 2**(levels-1)={2 ** (self.levels - 1)}")
        if self.scale_factor <= 0:
            raise ValueError(f"scale_factor must be > 0, got {self.scale_factor}")

    @property
    def downscale(self) -> int:
        return 2 ** self.levels


STAGE_A_SIZES: dict[str, StageAConfig] = {
    "paper": StageAConfig(),  # released v2 VQGAN: 18,406,894 parameters
    "tiny": StageAConfig(c_hidden=64, bottleneck_blocks=4, codebook_size=1024),
    # the small sizes of the parity tests against diffusers (docs/reference.md#parity-sizes)
    "parity": StageAConfig(c_hidden=32, bottleneck_blocks=1, codebook_size=16),
}


class MixingResBlock(nn.Module):
    """Stage A's residual block (not the ConvNeXt/GRN block): depthwise and channel mixing, each modulated by
    learned scalars ``gammas`` (all 0 at init, so every block starts as the identity)."""

    def __init__(self, c: int, c_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        h = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]
        h = self.norm2(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


class VectorQuantizer(nn.Module):
    """Nearest-neighbour (L2) codebook lookup with a straight-through gradient (torchtools ``VectorQuantize``)."""

    def __init__(self, c_latent: int, codebook_size: int) -> None:
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, c_latent)
        nn.init.uniform_(self.codebook.weight, -1 / codebook_size, 1 / codebook_size)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, C, H, W) -> (z_q with straight-through gradient, indices (B, H, W), vq loss)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        w = self.codebook.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ w.t() + w.pow(2).sum(1)[None, :]
        indices = dist.argmin(dim=1)
        z_q = self.codebook(indices).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        # official loss: codebook term + 0.25 * commitment term
        loss = F.mse_loss(z_q, z.detach()) + 0.25 * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()
        return z_q, indices.view(z.shape[0], z.shape[2], z.shape[3]), loss


class StageA(nn.Module):
    """The f4 VQGAN. State-dict keys and shapes are those of the official ``vqgan_f4_v1_500k.pt``."""

    def __init__(self, config: StageAConfig = StageAConfig()) -> None:
        super().__init__()
        self.config = cfg = config
        c_levels = [cfg.c_hidden // 2 ** i for i in reversed(range(cfg.levels))]  # e.g. [192, 384]
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        down: list[nn.Module] = []
        for i, c in enumerate(c_levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c, kernel_size=4, stride=2, padding=1))
            down.append(MixingResBlock(c, c * 4))
        # project to the latent channels and normalise them (affine BN with running statistics)
        down.append(nn.Sequential(nn.Conv2d(c_levels[-1], cfg.c_latent, kernel_size=1, bias=False),
                                  nn.BatchNorm2d(cfg.c_latent)))
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantizer(cfg.c_latent, cfg.codebook_size)
        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(cfg.c_latent, c_levels[-1], kernel_size=1))]
        for i, c in enumerate(reversed(c_levels)):
            up.extend(MixingResBlock(c, c * 4) for _ in range(cfg.bottleneck_blocks if i == 0 else 1))
            if i < cfg.levels - 1:
                up.append(nn.ConvTranspose2d(c, c // 2, kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))

    def _check_images(self, images: torch.Tensor) -> None:
        check_input("images", images, 4, 3)
        f = self.config.downscale
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(images.shape[-2:])}")

    def encode_unscaled(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the encoder's output before quantisation and scaling (what the codebook and ``scale_factor``
        are fitted to)."""
        self._check_images(images)
        return self.down_blocks(self.in_block(images))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Snap *unscaled* encoder outputs z to the codebook: (z_q straight-through, indices, vq loss)."""
        check_input("z", z, 4, self.config.c_latent)
        return self.vquantizer(z)

    def encode(self, images: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Images in [0, 1] -> latents / scale_factor, (B, c_latent, H/4, W/4); quantised when asked."""
        z = self.encode_unscaled(images)
        if quantize:
            z = self.vquantizer(z)[0]
        return z / self.config.scale_factor

    def encode_full(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Official ``encode``: (quantised / scale, unquantised / scale, indices, vq loss)."""
        z = self.encode_unscaled(images)
        z_q, indices, loss = self.vquantizer(z)
        s = self.config.scale_factor
        return z_q / s, z / s, indices, loss

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (as returned by ``encode``) -> images; multiplies by scale_factor, no quantisation, no clamp."""
        check_input("latents", latents, 4, self.config.c_latent)
        return self.out_block(self.up_blocks(latents * self.config.scale_factor))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices (B, h, w) -> images (the codebook vectors are unscaled, as in the official code)."""
        if indices.ndim != 3 or indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be an integer tensor of shape (B, h, w), got {indices.dtype} {tuple(indices.shape)}")
        z_q = self.vquantizer.codebook(indices).permute(0, 3, 1, 2)
        return self.decode_unscaled(z_q)

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (the codebook's space) -> images."""
        return self.out_block(self.up_blocks(z))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction from the quantised latents, vq loss, indices)."""
        z_q, indices, loss = self.vquantizer(self.encode_unscaled(images))
        return self.decode_unscaled(z_q), loss, indices
