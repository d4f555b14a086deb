"""Image transforms: PIL <-> tensor, resize + crop, and the normalisation constants the networks expect.

The released Würstchen training (docs/reference.md#training-recipe) does ``ToTensor -> Resize(s) ->
RandomCrop(s)``: shorter side to ``s``, then a random square crop, no aspect-ratio bucketing. Evaluation uses a
centre crop. Dataset images are float tensors in [0, 1]; each network applies its own normalisation
(the Semantic Compressor the ImageNet statistics, paper §3.1; CLIP towers the OpenAI CLIP statistics).
"""
from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch
from PIL import Image

# torchvision's ImageNet statistics: EfficientNetV2 (the Semantic Compressor backbone) was pre-trained with them.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# OpenAI CLIP statistics (open_clip's OPENAI_DATASET_MEAN/STD); used for the tiny CLIP's image tower.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

Crop = Literal["center", "random", "none"]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor (3, H, W) in [0, 1] (RGBA and greyscale are converted to RGB)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def to_pil(image: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [0, 1] -> PIL RGB image (values are clamped)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Scale so that the shorter side is ``size`` (bicubic, antialiased by PIL)."""
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return image if new == (w, h) else image.resize(new, Image.BICUBIC)


def crop_square(image: Image.Image, size: int, mode: Crop = "center", rng: random.Random | None = None) -> Image.Image:
    """Crop a ``size`` x ``size`` square: centred, or at a position drawn from ``rng``."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"image {w}x{h} is smaller than the crop {size}")
    if mode == "center":
        left, top = (w - size) // 2, (h - size) // 2
    elif mode == "random":
        rng = rng or random.Random()
        left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    else:
        raise ValueError(f"crop mode must be 'center' or 'random', got {mode!r}")
    return image.crop((left, top, left + size, top + size))


def resize_crop(image: Image.Image, size: int, crop: Crop = "center", rng: random.Random | None = None) -> torch.Tensor:
    """The paper's data transform: shorter side to ``size``, square crop, tensor in [0, 1].

    ``crop="none"`` resizes to exactly ``size`` x ``size`` without keeping the aspect ratio.
    """
    if crop == "none":
        return to_tensor(image.convert("RGB").resize((size, size), Image.BICUBIC))
    return to_tensor(crop_square(resize_shorter(image.convert("RGB"), size), size, crop, rng))


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std over the channel axis of (3,H,W) or (B,3,H,W) images."""
    shape = (3, 1, 1) if images.ndim == 3 else (1, 3, 1, 1)
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images - m) / s


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """The Semantic Compressor's input normalisation (paper §3.1, EfficientNetV2 pre-trained on ImageNet)."""
    return normalize(images, IMAGENET_MEAN, IMAGENET_STD)


def imagenet_denormalize(images: torch.Tensor) -> torch.Tensor:
    shape = (3, 1, 1) if images.ndim == 3 else (1, 3, 1, 1)
    m = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(shape)
    s = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(shape)
    return images * s + m


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """The CLIP image towers' input normalisation."""
    return normalize(images, CLIP_MEAN, CLIP_STD)
