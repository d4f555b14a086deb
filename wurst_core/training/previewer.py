"""The Previewer's objective, as a task for :func:`wurst_core.training.fit`: decode the frozen Semantic Compressor's
latents of a batch of images back to those images, downsampled to the Previewer's output size (``area``
averaging), by mean squared error. Nothing is drawn at random: a batch's loss depends on its images alone."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.semantic import SemanticCompressor, preprocess
from .tasks import freeze


class PreviewerTask(nn.Module):
    def __init__(self, previewer: nn.Module, compressor: SemanticCompressor, sc_size: int | None = None):
        super().__init__()
        self.previewer, self.compressor = previewer, freeze(compressor)
        self.sc_size = sc_size or compressor.config.image_size

    def train(self, mode: bool = True) -> "PreviewerTask":
        super().train(mode)
        self.compressor.eval()
        return self

    @torch.no_grad()
    def latents(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> the raw compressor output (Stage B's conditioning space; v2 scaling undone)."""
        f = self.compressor(preprocess(images, self.sc_size))
        return f * 42 - 1 if self.compressor.config.v2_scaling else f

    def target(self, images: Tensor, latents: Tensor) -> Tensor:
        """The images at the Previewer's output size."""
        up = self.previewer.config.upscale
        return F.interpolate(images, size=(latents.shape[-2] * up, latents.shape[-1] * up), mode="area")

    def forward(self, batch: dict[str, Any], gens: Sequence[torch.Generator]) -> tuple[Tensor, dict[str, float]]:
        images = batch["image"]
        f = self.latents(images)
        pred, target = self.previewer(f), self.target(images, f)
        loss = F.mse_loss(pred, target)
        psnr = -10 * torch.log10(F.mse_loss(pred.detach().clamp(0, 1), target))
        return loss, {"loss": loss.item(), "psnr": psnr.item()}
