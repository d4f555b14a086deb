"""The Semantic Compressor (paper §3.1, §3.4; official ``EfficientNetEncoder`` in ``modules.py``).

An ImageNet-style backbone (torchvision EfficientNetV2-S ``features``; V2-L for v1) with stride 32 and 1280 output
channels, followed by a 1x1 conv to 16 channels and an (affine) BatchNorm: ``C_sc`` of the paper, 16 x 24 x 24 for a
768 px input. 768 px, not the paper's "786", gives the released 24 x 24 map, so 768 is the default working size
(``preprocess``; docs/reference.md#compressor-input-size). ``v2_scale`` is the released v2 data scaling
``(f + 1) / 42`` that Stage C diffuses, undone with ``x * 42 - 1`` before Stage B
(docs/reference.md#stage-c-latent-scaling).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import check_input

BACKBONES = ("efficientnet_v2_s", "efficientnet_v2_l", "tiny")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_WIDTHS = (32, 48, 64, 96, 128)  # five stride-2 stages: stride 32 like EfficientNet


def tiny_backbone_widths(stages: int) -> tuple[int, ...]:
    """Widths of a ``stages``-stage tiny backbone: doubling from 32, capped at 128 (4 stages: 64 px -> 4 x 4)."""
    return tuple(min(128, 32 * 2 ** i) for i in range(stages))


@dataclass(frozen=True)
class SemanticCompressorConfig:
    backbone: str = "efficientnet_v2_s"
    c_latent: int = 16
    v2_scaling: bool = False  # forward returns (f + 1) / 42 (the official v2 encoder) instead of f
    image_size: int = 768     # working size that ``preprocess`` resizes to; 768 -> 24 x 24 latents
    tiny_widths: tuple[int, ...] = TINY_WIDTHS  # "tiny" backbone only: one stride-2 stage per width

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.c_latent < 1 or self.image_size < 32:
            raise ValueError(f"c_latent must be >= 1 and image_size >= 32: {self}")
        if self.backbone == "tiny" and (not self.tiny_widths or min(self.tiny_widths) < 1):
            raise ValueError(f"tiny_widths must be non-empty positive channel counts: {self}")

    @property
    def backbone_channels(self) -> int:
        return self.tiny_widths[-1] if self.backbone == "tiny" else 1280

    @property
    def stages(self) -> int:
        """Stride-2 stages of the backbone (EfficientNet: 5, stride 32)."""
        return len(self.tiny_widths) if self.backbone == "tiny" else 5

    @property
    def latent_size(self) -> int:
        """Side of the latent map for a square input at ``image_size`` (each stride-2 layer rounds up)."""
        s = self.image_size
        for _ in range(self.stages):
            s = (s + 1) // 2
        return s


SEMANTIC_SIZES: dict[str, SemanticCompressorConfig] = {
    "paper": SemanticCompressorConfig(),  # v2: EfficientNetV2-S, 20,198,000 parameters
    "v1": SemanticCompressorConfig(backbone="efficientnet_v2_l", image_size=384),  # v1: V2-L at 384 px -> 12 x 12
    "tiny": SemanticCompressorConfig(backbone="tiny", image_size=96),  # 128 px images -> 96 px -> 3 x 3
}


def v2_scale(f: torch.Tensor) -> torch.Tensor:
    """Raw compressor output -> the v2 Stage C data space: (f + 1) / 42."""
    return (f + 1) / 42


def v2_unscale(x: torch.Tensor) -> torch.Tensor:
    """Stage C data space -> raw compressor output for Stage B: x * 42 - 1 (diffusers ``latent_mean=42``)."""
    return x * 42 - 1


LATENT_SCALINGS = ("v2", "std", "none")


@dataclass(frozen=True)
class LatentScaling:
    """Stage C's data space: the map from the raw compressor output ``f`` (what Stage B reads) and back.

    "v2": ``(f + 1) / 42`` as the released v2 encoder; "std": unit variance from the measured ``mean``/``std`` (a
    compressor trained here has other statistics); "none": ``f`` itself. Saved in ``pipeline.json``.
    """

    kind: str = "v2"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in LATENT_SCALINGS:
            raise ValueError(f"latent scaling must be one of {LATENT_SCALINGS}, got {self.kind!r}")
        if not self.std > 0:
            raise ValueError(f"latent scaling std must be > 0, got {self.std}")

    def scale(self, f: torch.Tensor) -> torch.Tensor:
        """Raw compressor output -> Stage C's data space."""
        if self.kind == "v2":
            return v2_scale(f)
        if self.kind == "std":
            return (f - self.mean) / self.std
        return f

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        """Stage C's data space -> the raw compressor output that Stage B is conditioned on."""
        if self.kind == "v2":
            return v2_unscale(x)
        if self.kind == "std":
            return x * self.std + self.mean
        return x


def preprocess(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bicubic (antialiased) resize of images in [0, 1] to the compressor's working size (paper §3.1:
    1024 -> 786/768), clamped back to [0, 1] because bicubic overshoots. ``size``: int (square) or (h, w)."""
    check_input("images", images, 4, 3)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size must be a positive int or (h, w), got {size!r}")
    if tuple(images.shape[-2:]) == hw:
        return images
    out = F.interpolate(images.float(), size=hw, mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0, 1).to(images.dtype)


def _tiny_backbone(widths: tuple[int, ...]) -> nn.Sequential:
    stages, c_in = [], 3
    for c in widths:
        stages.append(nn.Sequential(nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.SiLU()))
        c_in = c
    return nn.Sequential(*stages)


def _backbone(name: str, tiny_widths: tuple[int, ...] = TINY_WIDTHS) -> nn.Sequential:
    if name == "tiny":
        return _tiny_backbone(tiny_widths)
    import torchvision  # imported here: it is slow to import and only the EfficientNet backbones need it

    # weights=None: no download; released or trained weights come through wurst_core.weights.load_model
    return getattr(torchvision.models, name)(weights=None).features


class SemanticCompressor(nn.Module):
    """Images in [0, 1] at the working size -> ``C_sc`` (B, 16, h, w). ImageNet normalisation is applied inside
    (non-persistent buffers, so the state dict matches the official ``effnet_state_dict``)."""

    def __init__(self, config: SemanticCompressorConfig = SemanticCompressorConfig()) -> None:
        super().__init__()
        self.config = config
        self.backbone = _backbone(config.backbone, config.tiny_widths)
        self.mapper = nn.Sequential(nn.Conv2d(config.backbone_channels, config.c_latent, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(config.c_latent))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_input("images", images, 4, 3)
        f = self.mapper(self.backbone((images - self.mean) / self.std))
        return v2_scale(f) if self.config.v2_scaling else f

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] at any size -> latents: ``preprocess`` so that the longer side becomes
        ``config.image_size`` (aspect ratio kept), then ``forward``."""
        check_input("images", images, 4, 3)
        h, w = images.shape[-2:]
        scale = self.config.image_size / max(h, w)
        return self(preprocess(images, (max(1, round(h * scale)), max(1, round(w * scale)))))
