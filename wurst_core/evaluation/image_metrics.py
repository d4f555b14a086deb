"""FID, KID and Inception Score (paper §4: FID at 256 px, IS at 299 px, COCO-30K) with bootstrap CIs.

The metrics are torchmetrics' (``FrechetInceptionDistance``, ``KernelInceptionDistance``, ``InceptionScore``),
fed with features computed once per image set, so that bootstrap resamples reuse them. Two feature networks:

* offline, :class:`ProbeExtractor`: the attribute probe trained on the dataset's real images (probe.py). Its
  penultimate features give **FID_tiny / KID_tiny**, its class posterior **IS_tiny**. These numbers measure
  distance in the probe's feature space and are never comparable with published Inception FIDs.
* :class:`InceptionExtractor`: the standard torch-fidelity InceptionV3 ("inception-v3-compat") when the user has
  its weights file (``weights-inception-2015-12-05-6726825d.pth``; nothing is downloaded). Images are resized as
  the paper does: to 256 px for the 2048-d pool features (FID, KID), to 299 px for the logits (IS).

FID is biased upwards when a set is not much larger than the feature dimension (144 for the tiny probe, 2048 for
Inception): compare FIDs only at equal set sizes; KID is unbiased and the better small-sample number
(Bińkowski et al. 2018).

torchmetrics behaviours handled here (docs/reference.md#evaluation-metrics): with a custom module,
``InceptionScore`` still multiplies by 255 when ``normalize=True`` (we pass features with ``normalize=False``); KID
and IS draw ``torch.randperm`` in ``compute()`` (seeded inside ``fork_rng``, so the caller's RNG is untouched); KID's
``subset_size`` must not exceed either set (clamped here).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .probe import AttributeProbe
from .stats import Estimate, bootstrap

FID_SIZE = 256  # paper §4: "all images were downsampled to 256 x 256 pixels" for FID
IS_SIZE = 299  # Table 2: IS @ 299^2


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torchmetrics' memory warning (KID and IS keep all features; ours are small and in memory already)
    and the std-of-one-split warning of IS with ``splits=1``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*will save all extracted features in buffer.*")
        warnings.filterwarnings("ignore", message=r".*degrees of freedom is <= 0.*")
        yield


class FeatureExtractor(Protocol):
    """images (B,3,H,W) in [0,1] -> (features (B,d), logits (B,C)); ``label`` suffixes the metric names."""

    label: str

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass
class FeatureSet:
    """The features and class logits of one image set under one extractor."""

    features: Tensor
    logits: Tensor
    label: str

    def __len__(self) -> int:
        return self.features.shape[0]


class ProbeExtractor:
    """The offline feature network: the attribute probe's penultimate features and IS logits ("_tiny")."""

    label = "_tiny"

    def __init__(self, probe: AttributeProbe) -> None:
        self.probe = probe.eval()

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.probe(images)  # resizes to the probe's resolution: the tiny counterpart of 256 px
        return out["features"], out["is"]


def to_uint8(images: Tensor, size: int) -> Tensor:
    """Resize (bicubic, antialiased) and quantise like torchmetrics ``normalize=True``: ``(x * 255).byte()``."""
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 255).byte()


class InceptionExtractor:
    """torchmetrics' InceptionV3 from a local weights file (torch-fidelity format): pool features and logits."""

    label = ""

    def __init__(self, weights_path: str | PathLike, device: str | torch.device = "cpu",
                 fid_size: int = FID_SIZE, is_size: int = IS_SIZE) -> None:
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found at {path}; the workbench never downloads them "
                                    "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
        # One network per output: torchmetrics' forward returns the first requested feature only.
        self.pool = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(path)).to(device)
        self.head = NoTrainInceptionV3("inception-v3-compat", ["logits_unbiased"], str(path)).to(device)
        self.device, self.fid_size, self.is_size = torch.device(device), fid_size, is_size

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.pool(to_uint8(images, self.fid_size).to(self.device))
        logits = self.head(to_uint8(images, self.is_size).to(self.device))
        return feats.float().cpu(), logits.float().cpu()


def extract(extractor: FeatureExtractor, images: Tensor, batch_size: int = 64) -> FeatureSet:
    """Run ``extractor`` over ``images`` (B,3,H,W) in [0,1] in batches."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ValueError(f"expected images (B,3,H,W) in [0,1] with B >= 1, got shape {tuple(images.shape)}")
    feats, logits = zip(*(extractor(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)))
    return FeatureSet(torch.cat(feats).float(), torch.cat(logits).float(), extractor.label)


class _Precomputed(nn.Module):
    """Identity "feature extractor": torchmetrics receives features computed once (needed for the bootstrap)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def _check_pair(real: FeatureSet, fake: FeatureSet) -> None:
    if real.label != fake.label or real.features.shape[1] != fake.features.shape[1]:
        raise ValueError(f"real and fake features come from different extractors ({real.label!r}, {fake.label!r})")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID/KID need at least 2 images per set, got {len(real)} real and {len(fake)} fake")


def fid(real: FeatureSet, fake: FeatureSet, n_boot: int = 100, seed: int = 0) -> Estimate:
    """Fréchet distance between the Gaussians of the two feature sets (torchmetrics), bootstrap CI over images."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_pair(real, fake)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.features.shape[1]))

    def stat(i: Tensor, j: Tensor) -> float:
        metric.reset()
        metric.update(real.features[i], real=True)
        metric.update(fake.features[j], real=False)
        return float(metric.compute())

    return bootstrap(stat, len(real), len(fake), n_boot=n_boot, seed=seed, bias_correct=True)


def kid(real: FeatureSet, fake: FeatureSet, subsets: int = 10, subset_size: int = 1000, n_boot: int = 100,
        seed: int = 0) -> Estimate:
    """Kernel Inception Distance (cubic polynomial MMD, mean over ``subsets``; torchmetrics), bootstrap CI."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_pair(real, fake)
    size = min(subset_size, len(real), len(fake))
    with _quiet():
        metric = KernelInceptionDistance(feature=_Precomputed(real.features.shape[1]), subsets=subsets,
                                         subset_size=size)

    def stat(i: Tensor, j: Tensor) -> float:
        metric.reset()
        metric.update(real.features[i], real=True)
        metric.update(fake.features[j], real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return float(metric.compute()[0])

    return bootstrap(stat, len(real), len(fake), n_boot=n_boot, seed=seed, bias_correct=True)


def inception_score(images: FeatureSet, splits: int = 10, n_boot: int = 100, seed: int = 0) -> Estimate:
    """Inception Score exp(E KL(p(y|x) || p(y))) from the set's logits (torchmetrics, mean over ``splits``)."""
    from torchmetrics.image.inception import InceptionScore

    if len(images) < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} images, got {len(images)}")
    with _quiet():
        metric = InceptionScore(feature=_Precomputed(images.logits.shape[1]), splits=splits, normalize=False)

    def stat(i: Tensor) -> float:
        metric.reset()
        metric.update(images.logits[i])
        with torch.random.fork_rng(devices=[]), _quiet():
            torch.manual_seed(seed)
            return float(metric.compute()[0])

    return bootstrap(stat, len(images), n_boot=n_boot, seed=seed, bias_correct=True)


def image_quality(real: FeatureSet, fake: FeatureSet, splits: int = 10, kid_subsets: int = 10,
                  n_boot: int = 100, seed: int = 0) -> dict[str, Estimate]:
    """FID, KID and IS of ``fake`` against ``real``, named by extractor: ``FID_tiny`` or ``FID`` (Inception)."""
    s = real.label
    return {f"FID{s}": fid(real, fake, n_boot, seed), f"KID{s}": kid(real, fake, kid_subsets, n_boot=n_boot, seed=seed),
            f"IS{s}": inception_score(fake, min(splits, len(fake)), n_boot, seed)}


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    """KID's cubic polynomial kernel (x . y / d + 1)^3, in float64 so that the sums of 256 x 256 terms stay exact."""
    return (x.double() @ y.double().T / x.shape[1] + 1) ** 3


def _mmd2(kxx: Tensor, kyy: Tensor, kxy: Tensor, ix: Tensor, iy: Tensor) -> float:
    """Unbiased squared MMD of the samples ``ix`` of x and ``iy`` of y from precomputed kernel matrices."""
    a, b = kxx[ix][:, ix], kyy[iy][:, iy]
    n, m = len(ix), len(iy)
    return float((a.sum() - a.diagonal().sum()) / (n * (n - 1)) + (b.sum() - b.diagonal().sum()) / (m * (m - 1))
                 - 2 * kxy[ix][:, iy].mean())


def paired_kid_difference(real: FeatureSet, model: FeatureSet | Sequence[FeatureSet], others: list[FeatureSet],
                          n_boot: int = 1000, seed: int = 0) -> tuple[list[Estimate], Estimate | None]:
    """KID of each of ``others`` minus KID of ``model`` (positive: ``model`` is closer to the real images), its
    images paired with ``model``'s by prompt (row i of every set answers prompt i). ``model`` may be one set per
    ``others`` (e.g. Würstchen's training seeds against the baseline's, paired in order).

    The estimator is the full-set unbiased MMD² with KID's cubic kernel (torchmetrics averages it over subsets
    instead). Each bootstrap resample draws the real images and the prompts, the same prompts for both arms; the
    pooled estimate (two or more ``others``, e.g. training seeds) also draws the seeds, so its interval carries the
    seed-to-seed spread.
    """
    models = list(model) if isinstance(model, Sequence) else [model] * len(others)
    if len(models) != len(others):
        raise ValueError(f"need one model set per other set (or one), got {len(models)} and {len(others)}")
    for m, other in zip(models, others):
        _check_pair(m, other)
        if len(other) != len(m):
            raise ValueError(f"paired sets need one image per prompt each, got {len(m)} and {len(other)}")
    r = real.features
    krr = _poly_kernel(r, r)
    kernels = [(_poly_kernel(m.features, m.features), _poly_kernel(r, m.features),
                _poly_kernel(o.features, o.features), _poly_kernel(r, o.features)) for m, o in zip(models, others)]

    def diff(s: int, ir: Tensor, ip: Tensor) -> float:
        kmm, krm, kbb, krb = kernels[s]
        return _mmd2(krr, kbb, krb, ir, ip) - _mmd2(krr, kmm, krm, ir, ip)

    n = len(models[0])
    per_seed = [bootstrap(lambda ir, ip, s=s: diff(s, ir, ip), len(r), n, n_boot=n_boot, seed=seed)
                for s in range(len(others))]
    if len(others) < 2:
        return per_seed, None
    pooled = bootstrap(lambda iseed, ir, ip: sum(diff(int(s), ir, ip) for s in iseed) / len(iseed),
                       len(others), len(r), n, n_boot=n_boot, seed=seed)
    return per_seed, pooled
