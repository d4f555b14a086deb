"""Compositional accuracy against ground truth: a probe trained on real images reads a scene's attributes.

The procedural and emoji datasets place one to three objects in distinct cells of a 3x3 grid on a plain
background, each object inside its cell (data/procedural.py), and every caption states the background and each
object's attributes and cell. So a scene is exactly: a background, and for each of the 9 cells either "empty" or
one object with categorical fields (shape, colour, size; or emoji, size). The probe predicts that per cell, which
makes the comparison with the prompt's attributes exact (a GenEval analogue with a learned reader in place of a
detector, docs/reference.md#compositional-evaluation):

* per image and attribute, binary (GenEval style): ``count`` (number of objects), ``position`` (the set of
  occupied cells), ``background``, and each object field as a multiset (``shape``: the same shapes, in any cells);
* ``all_correct``: the predicted scene equals the prompt's scene: background, and every object with all its
  fields in its cell (attribute binding included);
* ``cell_iou``, with partial credit: the Jaccard index of the occupied cells, predicted vs the prompt's (``position``
  fails a scene with one object misplaced or one extra; this measures how far positions follow, and unlike a
  recall it gives no credit for filling every cell).

The probe's own accuracy on held-out real images is the ceiling that generated images are compared with.

The same network is the offline feature network of FID_tiny / KID_tiny / IS_tiny (image_metrics.py): the 9 cell
embeddings (its penultimate layer, standardised with the real training images' statistics) are the features; the
IS logits are the log-posterior of the joint class
(e.g. shape x colour) of the first object in raster order, derived from the heads (see ``_is_logits``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..data import procedural
from ..data.emoji import EmojiDataset, emoji_name
from ..data.procedural import HPOS, VPOS
from .stats import Estimate, mean_ci

N_CELLS = len(HPOS) * len(VPOS)
IGNORE = -100  # cross-entropy ignore_index: an empty cell has no shape, colour or size


@dataclass(frozen=True)
class ProbeSpec:
    """What the probe reads: the backgrounds, each object field's vocabulary, and the IS class fields."""

    backgrounds: tuple[str, ...]
    object_fields: tuple[tuple[str, tuple[str, ...]], ...]
    is_fields: tuple[str, ...]

    def __post_init__(self) -> None:
        names = [n for n, _ in self.object_fields]
        if not self.backgrounds or not self.object_fields:
            raise ValueError("a probe spec needs backgrounds and at least one object field")
        if not self.is_fields or any(f not in names for f in self.is_fields):
            raise ValueError(f"is_fields {self.is_fields} must be a non-empty subset of the object fields {names}")

    @property
    def fields(self) -> dict[str, tuple[str, ...]]:
        return dict(self.object_fields)

    @property
    def n_is_classes(self) -> int:
        """Joint classes of ``is_fields``, plus one for "no object"."""
        return math.prod(len(self.fields[f]) for f in self.is_fields) + 1

    @classmethod
    def procedural(cls) -> "ProbeSpec":
        return cls(tuple(procedural.BACKGROUNDS), (("shape", procedural.SHAPES), ("color", tuple(procedural.COLORS)),
                    ("size", procedural.SIZES)),
                   ("shape", "color"))

    @classmethod
    def emoji(cls, names: Sequence[str]) -> "ProbeSpec":
        """For the emoji dataset: ``names`` are the emoji names it draws from (``emoji_name`` of its characters)."""
        return cls(tuple(procedural.BACKGROUNDS), (("emoji", tuple(dict.fromkeys(names))), ("size", procedural.SIZES)),
                   ("emoji",))


@dataclass(frozen=True)
class ProbeConfig:
    resolution: int = 48  # images are resized to this (a multiple of 3; the tiny counterpart of 256 px for FID)
    widths: tuple[int, ...] = (16, 32, 48)  # conv widths of the cell trunk, each stage stride 2
    cell_dim: int = 16  # embedding per cell; the 9 embeddings concatenated (144-d) are the FID_tiny/KID_tiny features

    def __post_init__(self) -> None:
        if self.resolution % 3 or self.resolution < 12:
            raise ValueError(f"probe resolution must be a multiple of 3 and >= 12, got {self.resolution}")
        if not self.widths or self.cell_dim < 1:
            raise ValueError("probe needs at least one conv width and cell_dim >= 1")


PROBE_SIZES: dict[str, ProbeConfig] = {
    "smoke": ProbeConfig(resolution=36, widths=(8, 16), cell_dim=12),
    "tiny": ProbeConfig(),
    "base": ProbeConfig(resolution=96, widths=(32, 64, 96, 128), cell_dim=32),
}


def cell_index(obj: Mapping[str, Any]) -> int:
    """Row-major index of an object's grid cell (0 = top left, 8 = bottom right)."""
    try:
        return VPOS.index(obj["vpos"]) * len(HPOS) + HPOS.index(obj["hpos"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"object needs hpos in {HPOS} and vpos in {VPOS}, got {dict(obj)}") from e


class AttributeProbe(nn.Module):
    """Reads a scene cell by cell: one small CNN shared by the 9 grid cells, linear heads per cell.

    Objects stay inside their cell, so a cell's pixels determine its content; sharing the network across cells
    gives 9 training examples per image and keeps training to seconds on a CPU.
    """

    def __init__(self, spec: ProbeSpec, config: ProbeConfig = ProbeConfig()) -> None:
        super().__init__()
        self.spec, self.config = spec, config
        layers: list[nn.Module] = []
        c_in = 3
        for width in config.widths:
            layers += [nn.Conv2d(c_in, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.GELU()]
            c_in = width
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(c_in, config.cell_dim), nn.GELU())
        d = config.cell_dim
        self.heads = nn.ModuleDict({
            "background": nn.Linear(d, len(spec.backgrounds)),  # every cell shows the background
            "occupied": nn.Linear(d, 1),
            **{f"field_{name}": nn.Linear(d, len(vocab)) for name, vocab in spec.object_fields},
        })
        self.num_features = N_CELLS * d  # read by torchmetrics when the probe is used as a custom extractor
        self.register_buffer("feature_mean", torch.zeros(self.num_features))
        self.register_buffer("feature_std", torch.ones(self.num_features))

    def cells(self, images: Tensor) -> Tensor:
        """(B,3,H,W) in [0,1] -> the 9 grid cells at the probe's resolution, (B*9, 3, r/3, r/3), row-major."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B,3,H,W) in [0,1], got shape {tuple(images.shape)}")
        r = self.config.resolution
        x = images.float()
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        c, b = r // 3, x.shape[0]
        return x.reshape(b, 3, 3, c, 3, c).permute(0, 2, 4, 1, 3, 5).reshape(b * N_CELLS, 3, c, c)

    def embed_cells(self, cells: Tensor) -> Tensor:
        """(N,3,c,c) cells in [0,1] -> (N, cell_dim)."""
        return self.trunk(cells * 2 - 1)

    def cell_logits(self, emb: Tensor) -> dict[str, Tensor]:
        """Per-cell head logits from cell embeddings (..., cell_dim)."""
        return {k: h(emb) for k, h in self.heads.items()}

    def cell_embeddings(self, images: Tensor) -> Tensor:
        """(B,3,H,W) in [0,1] -> (B, 9, cell_dim)."""
        return self.embed_cells(self.cells(images)).reshape(images.shape[0], N_CELLS, -1)

    def features(self, images: Tensor) -> Tensor:
        """The penultimate layer (B, 9 * cell_dim), standardised with the training images' per-feature mean and
        std (set by :func:`train_probe`): the FID_tiny / KID_tiny features, in units of the real data's spread."""
        return self._standardise(self.cell_embeddings(images))

    def _standardise(self, emb: Tensor) -> Tensor:
        return (emb.flatten(1) - self.feature_mean) / self.feature_std

    def scene_logits(self, emb: Tensor) -> dict[str, Tensor]:
        """Scene logits from cell embeddings (B,9,d): background (B,K), occupied (B,9), field_<name> (B,9,V),
        is (B,C)."""
        out = self.cell_logits(emb)
        out["background"] = out["background"].mean(1)  # average the 9 cells' votes
        out["occupied"] = out["occupied"].squeeze(-1)
        out["is"] = self._is_logits(out)
        return out

    def _is_logits(self, out: Mapping[str, Tensor]) -> Tensor:
        # The Inception Score needs one class posterior per image. Class = joint value of ``is_fields`` of the
        # first object in raster order, or "no object"; its log-probability follows from the heads, cells
        # independent: P(first object in cell k) = P(k occupied) * prod_{j<k} P(j empty), P(class | k) = prod_f P(f|k).
        log_occ, log_empty = F.logsigmoid(out["occupied"]), F.logsigmoid(-out["occupied"])
        before = torch.cumsum(log_empty, dim=1) - log_empty
        log_class = None  # (B, 9, C), mixed radix in the order of is_fields
        for name in self.spec.is_fields:
            lp = F.log_softmax(out[f"field_{name}"], dim=-1)
            log_class = lp if log_class is None else (log_class.unsqueeze(-1) + lp.unsqueeze(-2)).flatten(-2)
        log_first = torch.logsumexp((log_occ + before).unsqueeze(-1) + log_class, dim=1)
        return torch.cat([log_first, log_empty.sum(1, keepdim=True)], dim=-1)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        emb = self.cell_embeddings(images)
        return {"features": self._standardise(emb), **self.scene_logits(emb)}

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 256) -> list[dict[str, Any]]:
        """Read each image as an attribute dict in the dataset schema (cx/cy are the cell centres)."""
        was_training = self.training
        self.eval()
        scenes = []
        for i in range(0, images.shape[0], batch_size):
            out = self(images[i:i + batch_size])
            bg = out["background"].argmax(-1)
            occupied = out["occupied"] > 0
            fields = {name: out[f"field_{name}"].argmax(-1) for name, _ in self.spec.object_fields}
            for j in range(bg.shape[0]):
                objects = []
                for cell in occupied[j].nonzero().flatten().tolist():
                    row, col = divmod(cell, len(HPOS))
                    obj = {name: self.spec.fields[name][int(fields[name][j, cell])] for name in fields}
                    obj.update(hpos=HPOS[col], vpos=VPOS[row], cx=(col + 0.5) / 3, cy=(row + 0.5) / 3)
                    objects.append(obj)
                scenes.append({"background": self.spec.backgrounds[int(bg[j])], "count": len(objects),
                               "objects": objects})
        self.train(was_training)
        return scenes


def encode_targets(spec: ProbeSpec, attributes: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Attribute dicts -> per-image targets: background (N,), occupied (N,9), field_<name> (N,9) (IGNORE if empty)."""
    n = len(attributes)
    bg = torch.empty(n, dtype=torch.long)
    occupied = torch.zeros(n, N_CELLS)
    fields = {name: torch.full((n, N_CELLS), IGNORE, dtype=torch.long) for name, _ in spec.object_fields}
    for i, attrs in enumerate(attributes):
        bg[i] = _index(spec.backgrounds, attrs["background"], "background")
        for obj in attrs["objects"]:
            cell = cell_index(obj)
            if occupied[i, cell]:
                raise ValueError(f"scene {i} has two objects in cell {obj['vpos']}/{obj['hpos']}")
            occupied[i, cell] = 1
            for name, vocab in spec.object_fields:
                fields[name][i, cell] = _index(vocab, obj.get(name), name)
    return {"background": bg, "occupied": occupied, **{f"field_{k}": v for k, v in fields.items()}}


def _index(vocab: Sequence[str], value: Any, what: str) -> int:
    try:
        return vocab.index(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; the probe knows {list(vocab)}") from None


def cell_loss(probe: AttributeProbe, cells: Tensor, targets: Mapping[str, Tensor]) -> Tensor:
    """Sum of the per-cell losses; ``targets`` are per cell (fields are IGNORE in empty cells)."""
    out = probe.cell_logits(probe.embed_cells(cells))
    loss = F.cross_entropy(out["background"], targets["background"])
    loss = loss + F.binary_cross_entropy_with_logits(out["occupied"].squeeze(-1), targets["occupied"])
    for name, _ in probe.spec.object_fields:
        loss = loss + F.cross_entropy(out[f"field_{name}"], targets[f"field_{name}"], ignore_index=IGNORE)
    return loss


@dataclass(frozen=True)
class ProbeTraining:
    steps: int = 800
    batch_cells: int = 256  # cells per step, half of them occupied (most cells of a scene are empty)
    lr: float = 1e-2  # one-cycle peak
    weight_decay: float = 1e-4
    noise_std: float = 0.03  # Gaussian pixel noise: generated images are never as clean as renders
    seed: int = 0


def train_probe(images: Tensor, attributes: Sequence[Mapping[str, Any]], spec: ProbeSpec,
                config: ProbeConfig = ProbeConfig(), training: ProbeTraining = ProbeTraining(),
                log: Callable[[str], None] | None = None) -> AttributeProbe:
    """Train the probe on real images and their ground truth; returns it in eval mode.

    Training is per cell: each step draws ``batch_cells`` cells, half occupied and half empty, from all cells of
    all images (AdamW, one-cycle learning rate). Deterministic for a seed; fast and near-exact on real renders
    (docs/findings.md#measurement-attribute-probe).
    """
    if images.dim() != 4 or images.shape[0] != len(attributes):
        raise ValueError(f"need (N,3,H,W) images and N attribute dicts, got {tuple(images.shape)} and {len(attributes)}")
    if training.steps < 1 or training.batch_cells < 2:
        raise ValueError(f"need steps >= 1 and batch_cells >= 2, got {training.steps}, {training.batch_cells}")
    torch.manual_seed(training.seed)  # weight init
    gen = torch.Generator().manual_seed(training.seed)
    probe = AttributeProbe(spec, config)
    with torch.no_grad():
        cells = probe.cells(images)
    per_image = encode_targets(spec, attributes)
    targets = {"background": per_image["background"].repeat_interleave(N_CELLS),
               **{k: v.flatten() for k, v in per_image.items() if k != "background"}}
    pools = [p for p in (targets["occupied"].nonzero().flatten(), (targets["occupied"] == 0).nonzero().flatten())
             if len(p)]
    opt = torch.optim.AdamW(probe.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=training.lr, total_steps=training.steps)
    share = training.batch_cells // len(pools)
    probe.train()
    t0, running = time.time(), 0.0
    for step in range(1, training.steps + 1):
        idx = torch.cat([p[torch.randint(0, len(p), (share,), generator=gen)] for p in pools])
        x = cells[idx]
        if training.noise_std > 0:
            x = (x + training.noise_std * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        loss = cell_loss(probe, x, {k: v[idx] for k, v in targets.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if log is not None and (step % 100 == 0 or step == training.steps):
            log(f"probe step {step}/{training.steps}: loss {running / (100 if step % 100 == 0 else step % 100):.4f} "
                f"({time.time() - t0:.1f} s)")
            running = 0.0
    probe.eval()
    with torch.no_grad():  # feature statistics of the real training images (FID_tiny in their units)
        emb = torch.cat([probe.embed_cells(cells[i:i + 9 * 512]) for i in range(0, len(cells), 9 * 512)])
        emb = emb.reshape(images.shape[0], -1)
        probe.feature_mean.copy_(emb.mean(0))
        probe.feature_std.copy_(emb.std(0).clamp_min(1e-6))
    return probe


# ---- scoring ---------------------------------------------------------------------------------------------

def scene_checks(predicted: Mapping[str, Any], truth: Mapping[str, Any], spec: ProbeSpec) -> dict[str, float]:
    """Per-attribute checks of one predicted scene against the prompt's, 1.0 or 0.0 (``cell_iou``: a fraction;
    see module docstring)."""
    names = [n for n, _ in spec.object_fields]
    p_objs, t_objs = list(predicted["objects"]), list(truth["objects"])
    checks = {
        "count": len(p_objs) == len(t_objs),
        "position": sorted(map(cell_index, p_objs)) == sorted(map(cell_index, t_objs)),
        "background": predicted["background"] == truth["background"],
    }
    for name in names:
        checks[name] = sorted(o[name] for o in p_objs) == sorted(o[name] for o in t_objs)

    def scene(objs: list) -> list:
        return sorted((cell_index(o), *(o[n] for n in names)) for o in objs)

    checks["all_correct"] = checks["background"] and scene(p_objs) == scene(t_objs)
    p_cells, t_cells = set(map(cell_index, p_objs)), set(map(cell_index, t_objs))
    checks = {k: float(v) for k, v in checks.items()}
    checks["cell_iou"] = len(p_cells & t_cells) / len(p_cells | t_cells) if p_cells | t_cells else 1.0
    return checks


def attribute_share(checks: Mapping[str, Tensor]) -> Tensor:
    """Per scene, the share of its yes/no attribute checks that hold (count, position, background, each object
    field): a graded adherence measure that moves long before all-correct leaves 0."""
    keys = [k for k in checks if k not in ("all_correct", "cell_iou")]
    return torch.stack([torch.as_tensor(checks[k], dtype=torch.float64) for k in keys]).mean(0)


@dataclass
class CompositionalResult:
    """Per-attribute and all-correct accuracy (%) with bootstrap CIs, and the per-image checks behind them."""

    accuracy: dict[str, Estimate]
    checks: dict[str, Tensor] = field(repr=False)

    def as_dict(self) -> dict[str, float]:
        return {k: v.value for k, v in self.accuracy.items()}


def compositional_accuracy(probe: AttributeProbe, images: Tensor, truths: Sequence[Mapping[str, Any]],
                           n_boot: int = 1000, seed: int = 0) -> CompositionalResult:
    """Read ``images`` with the probe and score them against ``truths`` (the prompts' attribute dicts).

    On real images with their own attributes this is the probe's ceiling; on generated images, the model's
    compositional accuracy. Captions can be turned into truths with ``data.procedural.parse_caption``.
    """
    if images.shape[0] != len(truths) or not truths:
        raise ValueError(f"{images.shape[0]} images but {len(truths)} ground-truth scenes (need as many, >= 1)")
    predicted = probe.predict(images)
    rows = [scene_checks(p, t, probe.spec) for p, t in zip(predicted, truths)]
    checks = {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in rows[0]}
    acc = {k: mean_ci(v, n_boot=n_boot, seed=seed, scale=100.0) for k, v in checks.items()}
    return CompositionalResult(acc, checks)


def chance_truths(truths: Sequence[Mapping[str, Any]], seed: int = 0) -> list[Mapping[str, Any]]:
    """The truths in a random cyclic order (no scene keeps its own): real images scored against them give the
    chance floor of compositional accuracy."""
    n = len(truths)
    if n < 2:
        raise ValueError("need at least two scenes to shuffle")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out: list[Mapping[str, Any]] = [{}] * n
    for i in range(n):
        out[perm[i]] = truths[perm[(i + 1) % n]]
    return out


def probe_spec(dataset: str) -> ProbeSpec:
    """The attribute heads of a generated dataset's probe: shapes and colours, or the emoji of the font."""
    if dataset == "procedural":
        return ProbeSpec.procedural()
    if dataset == "emoji":
        return ProbeSpec.emoji([emoji_name(c) for c in EmojiDataset(size=1).emoji])
    raise ValueError(f"compositional accuracy needs ground truth: dataset must be procedural or emoji, got {dataset!r}")
