"""The three training objectives (paper Fig. 3), and the single-stage Baseline LDM's (paper §4), as modules for
:func:`wurst_core.training.fit`.

Each task owns the networks of its stage (frozen ones with ``requires_grad=False``) and maps
``(batch, per-sample generators) -> (loss, logs)``. All randomness comes from the per-sample generators, so a batch
split across processes or resumed after a kill draws exactly the same numbers.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..diffusion import Diffusion
from ..models.semantic import LatentScaling, SemanticCompressor, preprocess


def _draw(gens: Sequence[torch.Generator], fn: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
    return torch.stack([fn(g) for g in gens])


def freeze(module: nn.Module) -> nn.Module:
    module.eval().requires_grad_(False)
    return module


class TextCache(nn.Module):
    """Frozen text encoder with a per-caption cache: the tiny datasets repeat captions, and the encoder never trains
    in Stages B/C (paper §4: frozen CLIP)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = freeze(encoder)
        self._cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> "TextCache":
        super().train(mode)
        self.encoder.eval()  # always frozen
        return self

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self._cache})
        if missing:
            tokens = self.encoder(list(missing)).tokens.float()
            self._cache.update({c: t for c, t in zip(missing, tokens)})
        return torch.stack([self._cache[c] for c in captions])


def drop_captions(captions: Sequence[str], gens: Sequence[torch.Generator], p: float) -> list[str]:
    """Replace a caption by the null caption "" with probability p (paper §3.2: 5 % for classifier-free guidance)."""
    u = _draw(gens, lambda g: torch.rand((), generator=g))
    return ["" if float(ui) < p else c for c, ui in zip(captions, u)]


def random_crops(x: torch.Tensor, size: int, gens: Sequence[torch.Generator], multiple: int = 4) -> torch.Tensor:
    """One random ``size`` x ``size`` crop per image, offsets on a ``multiple`` grid (Stage A's f4 latent cells)."""
    h, w = x.shape[-2:]
    offsets = _draw(gens, lambda g: torch.stack([torch.randint(0, (h - size) // multiple + 1, (), generator=g),
                                                 torch.randint(0, (w - size) // multiple + 1, (), generator=g)]))
    return torch.stack([img[:, oy * multiple:oy * multiple + size, ox * multiple:ox * multiple + size]
                        for img, (oy, ox) in zip(x, offsets.tolist())])


def loss_by_noise_level(diffusion: Diffusion, per_sample: torch.Tensor, t: torch.Tensor,
                        bins: int) -> dict[str, float]:
    """Per-row losses summed by noise level, for the training log: ``t`` cut into ``bins`` equal bins of [0, 1];
    per bin ``k`` the rows ``tbin<k>_n``, the summed weighted loss ``tbin<k>_loss`` and the summed eps-equivalent
    MSE ``tbin<k>_eps`` (the loss without its weight, as an error in the noise: the same units for every target
    and weight). Sums, not means: averaging the log over micro-batches and processes keeps their ratios exact."""
    with torch.no_grad():
        ab = diffusion.schedule.alpha_bar(t).to(per_sample)
        # one estimate under three targets: v-MSE = eps-MSE / ab, x0-MSE = eps-MSE (1 - ab) / ab
        to_eps = {"eps": torch.ones_like(ab), "v": ab, "x0": ab / (1 - ab)}[diffusion.target]
        eps_mse = per_sample / diffusion.loss_weight(t).to(per_sample) * to_eps
        k = (t.to(per_sample.device) * bins).long().clamp(0, bins - 1)
        logs = {}
        for b in range(bins):
            rows = k == b
            logs.update({f"tbin{b}_n": float(rows.sum()), f"tbin{b}_loss": float(per_sample[rows].sum()),
                         f"tbin{b}_eps": float(eps_mse[rows].sum())})
    return logs


def _text_diffusion_loss(diffusion: Diffusion, net: nn.Module, text: nn.Module, x0: torch.Tensor,
                         captions: Sequence[str], gens: Sequence[torch.Generator],
                         p_drop_text: float, t_bins: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """The text-conditional diffusion loss of Stage C and the baseline: per row, caption dropout, then t, then
    noise from the row's own generator, so that the draws are a function of (seed, step, row). ``t_bins`` > 0 adds
    :func:`loss_by_noise_level` to the log."""
    tokens = text(drop_captions(captions, gens, p_drop_text)).to(x0)
    t = _draw(gens, lambda g: diffusion.sample_t(1, g)[0]).to(x0.device)
    noise = _draw(gens, lambda g: torch.randn(x0.shape[1:], generator=g)).to(x0)
    per_sample = diffusion.loss(net, x0, tokens, t=t, noise=noise)
    loss = per_sample.mean()
    logs = {"loss": loss.item()}
    if t_bins:
        logs.update(loss_by_noise_level(diffusion, per_sample.detach(), t, t_bins))
    return loss, logs


class StageATask(nn.Module):
    """VQGAN training (Esser et al.; our own: the official repositories ship none).

    loss = MSE + ``l1_weight``·L1 (reconstruction from the quantised latents) + codebook loss + 0.25·commitment.
    Dead codes (unused for ``reset_every`` steps) are re-initialised to encoder outputs of the current batch, until
    step ``reset_until`` (late resets would perturb the converged decoder). ``crop``: train on random square crops of
    this side (the network is fully convolutional, so it applies unchanged to whole images; the official VQGAN
    recipes train on crops too).
    """

    def __init__(self, stage_a: nn.Module, l1_weight: float = 0.0, reset_every: int = 200, reset_until: int | None = None,
                 crop: int = 0):
        super().__init__()
        self.stage_a = stage_a
        self.crop = crop
        self.l1_weight = l1_weight
        self.reset_every = reset_every
        self.reset_until = reset_until
        k = stage_a.config.codebook_size
        self.register_buffer("usage", torch.zeros(k))       # uses since the last reset check
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, batch: dict[str, Any], gens: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["image"]
        if self.crop and self.crop < min(x.shape[-2:]):
            x = random_crops(x, self.crop, gens)
        z = self.stage_a.encode_unscaled(x)
        z_q, indices, vq_loss = self.stage_a.quantize(z)
        recon = self.stage_a.decode_unscaled(z_q)
        mse = F.mse_loss(recon, x)
        loss = mse + vq_loss + (self.l1_weight * F.l1_loss(recon, x) if self.l1_weight else 0.0)
        counts = torch.bincount(indices.flatten(), minlength=self.usage.numel()).float()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
        if self.training:
            self._maybe_reset_codes(z.detach(), counts, gens)
        psnr = -10 * torch.log10(F.mse_loss(recon.detach().clamp(0, 1), x))
        return loss, {"loss": loss.item(), "mse": mse.item(), "vq": vq_loss.item(), "psnr": psnr.item(),
                      "perplexity": perplexity.item()}

    @torch.no_grad()
    def _maybe_reset_codes(self, z: torch.Tensor, counts: torch.Tensor, gens: Sequence[torch.Generator]) -> None:
        first = int(self.calls) == 0
        if dist.is_available() and dist.is_initialized():
            counts = counts.clone()
            dist.all_reduce(counts)  # the global batch's usage: every rank finds the same dead codes
        self.usage += counts
        self.calls += 1
        late = self.reset_until is not None and int(self.calls) > self.reset_until
        if not first and (self.reset_every <= 0 or late or int(self.calls) % self.reset_every):
            return
        # data-dependent init at the first step: the encoder's BN outputs have unit variance while the codebook starts
        # near zero, which otherwise collapses usage onto a handful of codes
        dead = torch.arange(self.usage.numel()) if first else (self.usage == 0).nonzero().flatten()
        if dead.numel():
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=gens[0])
            self.stage_a.vquantizer.codebook.weight.data[dead] = flat[pick]
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(self.stage_a.vquantizer.codebook.weight.data, 0)
        self.usage.zero_()


class StageBTask(nn.Module):
    """Stage B: diffusion in Stage A's unquantised latent space, conditioned on text and on the Semantic Compressor,
    which trains jointly (paper §3.1). The compressor's embeddings are dropped (zeros) for ``p_drop_sc`` of the samples
    and otherwise noised for ``p_noise_sc`` of them with t ~ U(0, ``noise_sc_max_t``), as released
    (docs/reference.md#conditioning-dropout), so that Stage B tolerates Stage C's imperfect samples; captions are
    dropped for ``p_drop_text``."""

    def __init__(self, stage_b: nn.Module, stage_a: nn.Module, compressor: SemanticCompressor, text: TextCache,
                 diffusion: Diffusion = Diffusion(), sc_size: int | None = None, p_drop_sc: float = 0.05,
                 p_noise_sc: float = 0.3, noise_sc_max_t: float = 0.5, p_drop_text: float = 0.05):
        super().__init__()
        self.stage_b, self.stage_a, self.compressor, self.text = stage_b, freeze(stage_a), compressor, text
        self.diffusion = diffusion
        self.sc_size = sc_size or compressor.config.image_size
        self.p_drop_sc, self.p_noise_sc, self.noise_sc_max_t, self.p_drop_text = p_drop_sc, p_noise_sc, noise_sc_max_t, p_drop_text

    def train(self, mode: bool = True) -> "StageBTask":
        super().train(mode)
        self.stage_a.eval()
        return self

    def condition(self, images: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        sc = self.compressor(preprocess(images, self.sc_size))
        u = _draw(gens, lambda g: torch.rand(2, generator=g)).to(sc.device)
        t = _draw(gens, lambda g: torch.rand((), generator=g) * self.noise_sc_max_t).to(sc.device)
        noise = _draw(gens, lambda g: torch.randn(sc.shape[1:], generator=g)).to(sc)
        noised = self.diffusion.diffuse(sc, t, noise)
        noisy = (u[:, 1] < self.p_noise_sc).view(-1, 1, 1, 1)
        keep = (u[:, 0] >= self.p_drop_sc).view(-1, 1, 1, 1)
        return torch.where(noisy, noised, sc) * keep

    def forward(self, batch: dict[str, Any], gens: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["image"]
        with torch.no_grad():
            latents = self.stage_a.encode(x)
        sc = self.condition(x, gens)
        tokens = self.text(drop_captions(batch["caption"], gens, self.p_drop_text)).to(x)
        t = _draw(gens, lambda g: self.diffusion.sample_t(1, g)[0]).to(x.device)
        noise = _draw(gens, lambda g: torch.randn(latents.shape[1:], generator=g)).to(latents)
        loss = self.diffusion.loss(self.stage_b, latents, sc, tokens, t=t, noise=noise).mean()
        return loss, {"loss": loss.item()}


class StageCTask(nn.Module):
    """Stage C: text-conditional diffusion on the frozen compressor's latents (paper §3.2), A/B head inside the
    model, p2 weighting and 5 % caption dropout. ``latent_scaling``: "v2" = (f+1)/42 as the released v2 encoder,
    "std" = (f - mean)/std with statistics of the training data (unit variance), "none" = f. ``t_bins`` > 0 logs the
    loss by noise level (:func:`loss_by_noise_level`; the objective ablation, notebook 09)."""

    def __init__(self, stage_c: nn.Module, compressor: SemanticCompressor, text: TextCache,
                 diffusion: Diffusion = Diffusion(), sc_size: int | None = None, p_drop_text: float = 0.05,
                 latent_scaling: str = "v2", latent_mean: float = 0.0, latent_std: float = 1.0, t_bins: int = 0):
        super().__init__()
        self.t_bins = t_bins
        self.stage_c, self.compressor, self.text = stage_c, freeze(compressor), text
        self.diffusion = diffusion
        self.sc_size = sc_size or compressor.config.image_size
        self.p_drop_text = p_drop_text
        self.scaling = LatentScaling(latent_scaling, latent_mean, latent_std)

    def train(self, mode: bool = True) -> "StageCTask":
        super().train(mode)
        self.compressor.eval()
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> Stage C's data space."""
        return self.scale(self.compressor(preprocess(images, self.sc_size)))

    def scale(self, f: torch.Tensor) -> torch.Tensor:
        return self.scaling.scale(f)

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        """Stage C samples -> the raw compressor output that Stage B consumes."""
        return self.scaling.unscale(x)

    def forward(self, batch: dict[str, Any], gens: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict[str, float]]:
        return _text_diffusion_loss(self.diffusion, self.stage_c, self.text, self.encode(batch["image"]),
                                    batch["caption"], gens, self.p_drop_text, self.t_bins)


class BaselineTask(nn.Module):
    """The Baseline LDM (paper §4, "Baselines"): one text-conditional U-Net trained directly on the first stage's
    latents, with Stage C's objective (``Diffusion``, 5 % caption dropout) and the same per-sample draws (caption
    dropout, then t, then noise), so that its random numbers are a function of (seed, step, row).

    The first stage is the frozen Stage A (``stage_a.encode``: unscaled VQGAN latents / scale_factor, unit variance,
    f4): the paper's baseline uses SD 2.1's f8 autoencoder, but Stage A is the only first stage trained here, and an
    f8 one would need its own training (and its own scale factor) before the baseline could start.
    """

    def __init__(self, unet: nn.Module, stage_a: nn.Module, text: TextCache, diffusion: Diffusion = Diffusion(),
                 p_drop_text: float = 0.05):
        super().__init__()
        self.unet, self.stage_a, self.text = unet, freeze(stage_a), text
        self.diffusion = diffusion
        self.p_drop_text = p_drop_text

    def train(self, mode: bool = True) -> "BaselineTask":
        super().train(mode)
        self.stage_a.eval()  # Stage A's BatchNorm keeps its running statistics
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the U-Net's data space (Stage A's scaled, unquantised latents)."""
        return self.stage_a.encode(images)

    def forward(self, batch: dict[str, Any], gens: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict[str, float]]:
        return _text_diffusion_loss(self.diffusion, self.unet, self.text, self.encode(batch["image"]),
                                    batch["caption"], gens, self.p_drop_text)
