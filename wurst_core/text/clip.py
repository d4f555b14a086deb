"""The tiny CLIP: an open_clip config registered at run time (ViT image tower at 64 px), trained contrastively on
the procedural dataset with counterfactual twins and a token-wise (FILIP) term, evaluated by retrieval and twin
accuracy, saved as safetensors + JSON under ``cache_dir()/<profile>/text_encoder`` and reloaded frozen as the
conditioning :class:`~wurst_core.text.encoder.TextEncoder` of Stages B and C (the text encoder is frozen).

Training happens in ``notebooks/01_text_encoder.ipynb`` (or on an explicit :func:`train_and_save_tiny_clip`); a
missing encoder is an error that names that notebook, never a silent 15-minute training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from .. import paths
from ..data import ProceduralDataset, cycle, make_loader
from ..data.procedural import (COUNTERFACTUALS, caption, counterfactual, render, signature,
                              training_counterfactual)
from ..data.transforms import clip_normalize
from ..io import save_model_checkpoint, write_json
from .encoder import CONTEXT_LENGTH, Layer, TextEncoder, tokenize


# --------------------------------------------------------------------------------------------- tiny CLIP
@dataclass(frozen=True)
class TinyClipConfig:
    """A small open_clip CLIP: ViT image tower, causal text transformer over the 49,408-token CLIP BPE."""

    embed_dim: int = 64
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 2
    vision_head_width: int = 32
    text_width: int = 128  # the conditioning width (clip_embd / c_cond) of the tiny Stage B / C
    text_heads: int = 4
    text_layers: int = 2
    context_length: int = CONTEXT_LENGTH  # token positions: the length of the sequence Stages B and C attend to

    def open_clip_config(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim,
                "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers, "width": self.vision_width,
                               "head_width": self.vision_head_width, "patch_size": self.patch_size},
                "text_cfg": {"context_length": self.context_length, "vocab_size": 49408, "width": self.text_width,
                             "heads": self.text_heads, "layers": self.text_layers}}

    @property
    def name(self) -> str:
        """The open_clip architecture name this config is registered under (content-addressed)."""
        digest = hashlib.sha1(json.dumps(self.open_clip_config(), sort_keys=True).encode()).hexdigest()[:8]
        return f"wurst-tiny-clip-{digest}"


# The token table (49,408 x text_width) dominates: 6.3 M of the tiny model's 7.2 M parameters.
TINY_CLIP_SIZES: dict[str, TinyClipConfig] = {
    "smoke": TinyClipConfig(vision_layers=1, text_layers=1),
    # 48 positions: same outputs, less padding for Stages B and C (docs/findings.md#text-encoder-48-token-positions)
    "tiny": TinyClipConfig(context_length=48),
    "paper": TinyClipConfig(embed_dim=256, vision_width=256, vision_layers=6, vision_head_width=64, text_width=256,
                            text_heads=4, text_layers=6),
}


@dataclass(frozen=True)
class ClipTraining:
    """Contrastive training of the tiny CLIP on the procedural dataset (one row per profile)."""

    steps: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 20
    pool: int = 4096      # rendered training images, re-used across epochs (rendering would dominate on CPU)
    eval_size: int = 256  # held-out (split="val") items for retrieval
    # Hard negatives: this fraction of each batch are counterfactual twins of the other items (the same scene with
    # its objects moved to other cells, data.procedural.counterfactual); without them the tiny CLIP ignores where
    # objects are (docs/findings.md#text-encoder-position-twins).
    twins: float = 0.5
    twin_kinds: tuple[str, ...] = ("position",)
    # Weight of a token-wise (FILIP, Yao et al. 2022) contrastive term beside the pooled one: each caption token is
    # matched to its most similar image patch and each patch to its token, so every token state is trained, not
    # only the end token's. 0: plain CLIP.
    filip: float = 0.0
    filip_batch: int = 64  # captions in the token-wise term (half originals, half their twins): its cost is quadratic

    def __post_init__(self) -> None:
        if not 0 <= self.twins <= 0.5:
            raise ValueError(f"twins must be in [0, 0.5] (each twin needs its original in the batch), got {self.twins}")
        if self.filip < 0:
            raise ValueError(f"filip must be >= 0, got {self.filip}")
        if self.twins and not (self.twin_kinds and set(self.twin_kinds) <= set(COUNTERFACTUALS)):
            raise ValueError(f"twin_kinds must be a non-empty subset of {COUNTERFACTUALS}, got {self.twin_kinds}")


# filip on: the layout becomes readable from every token the prior reads (docs/findings.md#text-encoder-token-wise-term)
CLIP_TRAINING: dict[str, ClipTraining] = {
    "smoke": ClipTraining(steps=20, batch_size=32, pool=256, eval_size=64, warmup=5, filip=1.0),
    "tiny": ClipTraining(steps=1000, batch_size=128, pool=8192, eval_size=256, filip=1.0),
    "paper": ClipTraining(steps=20_000, batch_size=512, lr=5e-4, warmup=500, pool=200_000, eval_size=1024, filip=1.0),
}


def register_tiny_clip(cfg: TinyClipConfig) -> str:
    """Register ``cfg`` with open_clip (a JSON in a temp folder + ``open_clip.add_model_config``); returns its name."""
    import open_clip

    name = cfg.name
    if open_clip.get_model_config(name) is None:
        directory = Path(tempfile.gettempdir()) / f"wurst_open_clip_configs_{os.getuid()}"
        path = directory / f"{name}.json"
        write_json(path, cfg.open_clip_config())
        open_clip.add_model_config(path)
    return name


def create_tiny_clip(cfg: TinyClipConfig, seed: int = 0) -> nn.Module:
    """A randomly initialised tiny CLIP (open_clip ``CLIP`` with ``output_dict=True``)."""
    import open_clip

    name = register_tiny_clip(cfg)
    torch.manual_seed(seed)
    if cfg.context_length == CONTEXT_LENGTH:
        return open_clip.create_model(name, pretrained=None, output_dict=True)
    # Start from the first rows of the 77-position init, which then trains exactly as the 77-position one under the
    # causal mask: the tiny CLIP is init-sensitive (docs/findings.md#text-encoder-initialisation)
    full = open_clip.create_model(register_tiny_clip(dataclasses.replace(cfg, context_length=CONTEXT_LENGTH)),
                                  pretrained=None, output_dict=True)
    model = open_clip.create_model(name, pretrained=None, output_dict=True)
    sd = full.state_dict()
    sd["positional_embedding"] = sd["positional_embedding"][:cfg.context_length]
    model.load_state_dict(sd)
    return model


class _Pool(torch.utils.data.Dataset):
    """A rendered, uint8 copy of the first ``n`` items of a dataset (images, captions, attributes if any)."""

    def __init__(self, dataset: torch.utils.data.Dataset, n: int) -> None:
        n = min(n, len(dataset))
        items = [dataset[i] for i in range(n)]
        self.images = torch.stack([(it["image"] * 255).round().to(torch.uint8) for it in items])
        self.captions = [it["caption"] for it in items]
        self.attributes = [it.get("attributes") for it in items]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i].float() / 255, "caption": self.captions[i], "index": i}


def add_twins(batch: dict[str, Any], attributes: Sequence[dict[str, Any]], n: int, rng: random.Random,
              kinds: Sequence[str] = ("position",)) -> dict[str, Any]:
    """``batch`` plus counterfactual twins of its first ``n`` items (``attributes`` are the batch's scenes), each
    with a random kind of change from ``kinds``, rendered at the batch's size: in-batch hard negatives for the
    contrastive loss."""
    twins = [training_counterfactual(a, kinds, rng) for a in attributes[:n]]  # never a test composition
    images = torch.stack([render(t, tuple(batch["image"].shape[-2:])) for t in twins])
    return {"image": torch.cat([batch["image"], images.to(batch["image"])]),
            "caption": list(batch["caption"]) + [caption(t, rng) for t in twins]}


@torch.no_grad()
def twin_accuracy(model: nn.Module, dataset: torch.utils.data.Dataset, n: int = 256, seed: int = 0,
                  batch_size: int = 128) -> dict[str, float]:
    """What the text tower tells apart: for held-out scenes and their counterfactual twins of each kind
    (``data.procedural.counterfactual``), the fraction of captions closer to their own image than to the twin's
    image, both ways (chance 0.5). Needs a dataset with ground-truth ``attributes``."""
    model.eval()
    device = model.logit_scale.device
    size = model.visual.image_size[0]
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    if any(it.get("attributes") is None for it in items):
        raise ValueError("twin_accuracy needs a dataset with ground-truth attributes (procedural)")

    def features(images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        img, txt = [], []
        for s in range(0, len(captions), batch_size):
            img.append(F.normalize(model.encode_image(_image_input(images[s:s + batch_size].to(device), size)), dim=-1))
            ids = tokenize(captions[s:s + batch_size], _context(model)).to(device)
            txt.append(F.normalize(model.encode_text(ids), dim=-1))
        return torch.cat(img), torch.cat(txt)

    image, text = features(torch.stack([it["image"] for it in items]), [it["caption"] for it in items])
    out = {}
    for kind in COUNTERFACTUALS:
        rng = random.Random(f"twins:{seed}:{kind}")
        twins = [counterfactual(it["attributes"], kind, rng) for it in items]
        t_image, t_text = features(torch.stack([render(t, size) for t in twins]), [caption(t, rng) for t in twins])
        own = (text * image).sum(-1), (t_text * t_image).sum(-1)
        cross = (text * t_image).sum(-1), (t_text * image).sum(-1)
        out[kind] = torch.cat([own[0] > cross[0], own[1] > cross[1]]).float().mean().item()
    return out


def _image_input(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return clip_normalize(images)


def _context(model: nn.Module) -> int:
    """Token positions of an open_clip CLIP (77 unless its config says otherwise)."""
    return int(getattr(model, "context_length", CONTEXT_LENGTH))


def _text_features(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``model.encode_text`` (normalised) on the prefix up to the batch's last end token: with the causal mask
    the pooled end-token feature does not depend on later positions, and captions are far shorter than the context.
    Also every position's normalised projected state and which positions hold the caption (its words and end token,
    for :func:`filip_loss`): ``(pooled, tokens, valid)``."""
    n = int(ids.argmax(dim=-1).max()) + 1
    ids = ids[:, :n]
    x = model.token_embedding(ids) + model.positional_embedding[:n]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    eot = ids.argmax(dim=-1)
    pooled = F.normalize(x[torch.arange(ids.shape[0], device=ids.device), eot] @ model.text_projection, dim=-1)
    position = torch.arange(n, device=ids.device)[None, :]
    return pooled, F.normalize(x @ model.text_projection, dim=-1), (position >= 1) & (position <= eot[:, None])


def _image_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pooled image embedding and patch embeddings (B, patches, embed_dim) of the ViT tower, in one pass
    (open_clip's class-token pooling: ``ln_post`` on every position, then the projection)."""
    visual = model.visual
    x = visual.ln_post(visual.transformer(visual._embeds(images)))
    x = x @ visual.proj
    return F.normalize(x[:, 0], dim=-1), F.normalize(x[:, 1:], dim=-1)


def filip_loss(tokens: torch.Tensor, valid: torch.Tensor, patches: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FILIP's token-wise contrastive loss (Yao et al. 2022, eq. 4-5): caption-to-image similarity is the mean over
    the caption's tokens of their best patch, image-to-caption the mean over patches of their best token; InfoNCE
    both ways over the batch. tokens (B, n, d) and patches (B, P, d) normalised, valid (B, n) the caption tokens."""
    sim = torch.einsum("tkd,ipd->tikp", tokens, patches)  # (captions, images, tokens, patches)
    w = valid.to(sim.dtype)[:, None, :]
    t2i = (sim.amax(dim=3) * w).sum(-1) / w.sum(-1)
    i2t = sim.masked_fill(~valid[:, None, :, None], float("-inf")).amax(dim=2).mean(-1)
    target = torch.arange(tokens.shape[0], device=tokens.device)
    return 0.5 * (F.cross_entropy(scale * t2i, target) + F.cross_entropy(scale * i2t.T, target))


def train_tiny_clip(cfg: TinyClipConfig, dataset: torch.utils.data.Dataset, training: ClipTraining,
                    seed: int = 0, progress: bool = True, model: nn.Module | None = None,
                    device: str | torch.device | None = None, threads: int | None = 1) -> tuple[nn.Module, list[float]]:
    """Contrastive (InfoNCE, open_clip ``ClipLoss``) training; returns the model (eval mode) and the loss per step.

    ``device``: default CUDA when available, else CPU. ``threads``: CPU intra-op threads during training
    (``None``: torch's setting). The tiny model's ops are too small to gain from several threads, and on a shared
    CPU oversubscribed threads spin: on the 2-core workbench machine under load a batch-128 step took 7.3 s with
    2 threads and 1.2 s with 1.

    AdamW with linear warmup then cosine decay, no weight decay on gains/biases/logit scale, gradient clip 1.0.
    The 49,408-row token table gets sparse gradients and SparseAdam: a dense update of the whole table would cost
    more than the rest of the step on CPU, and a batch only touches a few dozen rows.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads_before = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        return _train(cfg, dataset, training, seed, progress, model, device)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: TinyClipConfig, dataset: torch.utils.data.Dataset, training: ClipTraining, seed: int,
           progress: bool, model: nn.Module | None, device: torch.device) -> tuple[nn.Module, list[float]]:
    from open_clip.loss import ClipLoss

    model = (model if model is not None else create_tiny_clip(cfg, seed)).to(device)
    model.train()
    pool = _Pool(dataset, training.pool)
    n_twins = int(round(training.batch_size * training.twins))
    if n_twins and any(a is None for a in pool.attributes):
        raise ValueError("twins > 0 needs a dataset with ground-truth attributes (procedural); set twins=0")
    batches = cycle(make_loader(pool, min(training.batch_size - n_twins, len(pool)), seed=seed))
    twin_rng = random.Random(f"clip-twins:{seed}")
    table = model.token_embedding.weight
    model.token_embedding.sparse = True
    dense = [p for p in model.parameters() if p is not table]
    opt = torch.optim.AdamW([{"params": [p for p in dense if p.ndim >= 2], "weight_decay": training.weight_decay},
                             {"params": [p for p in dense if p.ndim < 2], "weight_decay": 0.0}],
                            lr=training.lr, betas=(0.9, 0.98), eps=1e-6)
    opt_table = torch.optim.SparseAdam([table], lr=training.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < training.warmup:
            return (step + 1) / training.warmup
        t = (step - training.warmup) / max(1, training.steps - training.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_at) for o in (opt, opt_table)]
    loss_fn = ClipLoss()
    losses: list[float] = []
    bar = tqdm(range(training.steps), desc="tiny CLIP", disable=not progress, mininterval=2.0)
    for _ in bar:
        batch = next(batches)
        if n_twins:
            batch = add_twins(batch, [pool.attributes[i] for i in batch["index"].tolist()], n_twins, twin_rng,
                              training.twin_kinds)
        image_f, patches = _image_features(model, _image_input(batch["image"].to(device), cfg.image_size))
        ids = tokenize(batch["caption"], _context(model)).to(device)
        text_f, tokens, valid = _text_features(model, ids)
        loss = loss_fn(image_f, text_f, model.logit_scale.exp())
        if training.filip:
            k = min(training.filip_batch // 2, n_twins) if n_twins else min(training.filip_batch, len(ids))
            sub = torch.arange(k, device=device)
            if n_twins:  # originals [0, k) with their twins, which follow the len(ids) - n_twins originals
                sub = torch.cat([sub, sub + len(ids) - n_twins])
            loss = loss + training.filip * filip_loss(tokens[sub], valid[sub], patches[sub], model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        opt_table.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense, 1.0)
        opt.step()
        opt_table.step()
        for s in scheds:
            s.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100 (open_clip training does the same)
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.token_embedding.sparse = False
    return model.eval(), losses


@torch.no_grad()
def encode_pairs(model: nn.Module, dataset: torch.utils.data.Dataset, n: int | None = None,
                 image_size: int | None = None, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Normalised image and text features of the first ``n`` items, and the items (without images)."""
    model.eval()
    device = model.logit_scale.device
    n = min(n or len(dataset), len(dataset))
    size = image_size or model.visual.image_size[0]
    image_f, text_f, items = [], [], []
    for start in range(0, n, batch_size):
        batch = [dataset[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([b["image"] for b in batch]).to(device)
        image_f.append(F.normalize(model.encode_image(_image_input(images, size)), dim=-1).cpu())
        ids = tokenize([b["caption"] for b in batch], _context(model)).to(device)
        text_f.append(F.normalize(model.encode_text(ids), dim=-1).cpu())
        items += [{k: v for k, v in b.items() if k != "image"} for b in batch]
    return torch.cat(image_f), torch.cat(text_f), items


def retrieval_metrics(image_f: torch.Tensor, text_f: torch.Tensor, items: Sequence[dict] | None = None) -> dict[str, float]:
    """Text->image retrieval over N held-out pairs (chance 1/N for top-1).

    ``t2i_top1``/``t2i_top5``: the paired image ranks first / in the top 5; ``i2t_top1`` the other way.
    With ground truth: ``t2i_top1_attributes`` counts the top image as right when its caption-visible attributes
    equal the query's (duplicates are legitimate ties), and ``t2i_background``/``t2i_count`` the top image's
    background / object count.
    """
    n = image_f.shape[0]
    sim = text_f @ image_f.T  # (text, image)
    target = torch.arange(n)
    ranks = sim.argsort(dim=1, descending=True)
    metrics = {"n": float(n), "chance_top1": 1.0 / n, "chance_top5": min(1.0, 5.0 / n),
               "t2i_top1": (ranks[:, 0] == target).float().mean().item(),
               "t2i_top5": (ranks[:, :5] == target[:, None]).any(dim=1).float().mean().item(),
               "i2t_top1": (sim.argmax(dim=0) == target).float().mean().item()}
    if items is not None and all("attributes" in it for it in items):
        attrs = [it["attributes"] for it in items]
        top = ranks[:, 0].tolist()
        metrics["t2i_top1_attributes"] = sum(signature(attrs[j]) == signature(attrs[i]) for i, j in enumerate(top)) / n
        metrics["t2i_background"] = sum(attrs[j]["background"] == attrs[i]["background"] for i, j in enumerate(top)) / n
        metrics["t2i_count"] = sum(attrs[j]["count"] == attrs[i]["count"] for i, j in enumerate(top)) / n
    return metrics


def plot_similarity(sim: torch.Tensor, images: torch.Tensor, captions: Sequence[str], max_chars: int = 60) -> Any:
    """Heatmap of text-image cosine similarities (rows: captions, columns: the images shown above)."""
    import matplotlib.pyplot as plt

    n = sim.shape[0]
    fig = plt.figure(figsize=(3 + 0.55 * n + max_chars * 0.06, 1.2 + 0.5 * n))
    grid = fig.add_gridspec(2, 1, height_ratios=[1, n], hspace=0.02)
    top, ax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    top.imshow(torch.cat(list(images.clamp(0, 1)), dim=2).permute(1, 2, 0).numpy(), extent=(-0.5, n - 0.5, 0, 1),
               aspect="auto")
    top.axis("off")
    im = ax.imshow(sim.numpy(), cmap="viridis", aspect="auto")
    ax.set_yticks(range(n), [c if len(c) <= max_chars else c[: max_chars - 3] + "..." for c in captions], fontsize=7)
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("held-out image")
    for i in range(n):
        ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1))
    fig.colorbar(im, ax=ax, fraction=0.03, label="cosine similarity")
    return fig


# --------------------------------------------------------------------------------------------- save / load
def save_tiny_clip(model: nn.Module, cfg: TinyClipConfig, directory: str | os.PathLike,
                   extra: dict[str, Any] | None = None) -> Path:
    """``model.safetensors`` + ``model.json`` (architecture, open_clip config, ``extra`` e.g. metrics), atomically."""
    config = {"kind": "open_clip", "architecture": cfg.name, "tiny_clip": dataclasses.asdict(cfg),
              "open_clip_config": cfg.open_clip_config(), **(extra or {})}
    return save_model_checkpoint(directory, model.state_dict(), config)


def _read_checkpoint_config(directory: Path) -> tuple[TinyClipConfig, dict[str, Any]]:
    meta_path = directory / "model.json"
    if not meta_path.is_file() or not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"no tiny-CLIP checkpoint (model.safetensors + model.json) in {directory}")
    meta = json.loads(meta_path.read_text())
    return TinyClipConfig(**meta["tiny_clip"]), meta


def load_tiny_clip(directory: str | os.PathLike) -> tuple[nn.Module, TinyClipConfig, dict[str, Any]]:
    """The full tiny CLIP (both towers, eval mode, frozen), its config and the checkpoint's JSON."""
    directory = Path(directory)
    cfg, meta = _read_checkpoint_config(directory)
    model = create_tiny_clip(cfg)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    model.eval().requires_grad_(False)
    return model, cfg, meta


def text_encoder_dir(profile: str) -> Path:
    """Where each profile's trained tiny text encoder lives, shared by all notebooks of that profile."""
    return paths.cache_dir() / profile / "text_encoder"


def load_text_encoder(directory: str | os.PathLike, layer: Layer = "last", hf_padding: bool = True,
                      device: str | torch.device = "cpu") -> TextEncoder:
    """The frozen text tower of a tiny-CLIP checkpoint folder written by :func:`save_tiny_clip`."""
    directory = Path(directory)
    cfg, _ = _read_checkpoint_config(directory)
    return TextEncoder.from_open_clip(register_tiny_clip(cfg), directory / "model.safetensors", layer=layer,
                                      hf_padding=hf_padding, device=device)


class MissingTextEncoder(FileNotFoundError):
    """The profile's tiny text encoder has not been trained yet."""


def load_tiny_text_encoder(profile: str, layer: Layer = "last", hf_padding: bool = True) -> TextEncoder:
    """The frozen text tower of the profile's trained tiny CLIP; a clear error naming notebook 01 if it is missing."""
    directory = text_encoder_dir(profile)
    if not (directory / "model.json").is_file():
        raise MissingTextEncoder(f"no tiny text encoder for profile {profile!r} in {directory}: train it with "
                                 f"notebooks/01_text_encoder.ipynb (`wurst run 01_text_encoder --profile {profile}`)")
    return load_text_encoder(directory, layer=layer, hf_padding=hf_padding)


def train_and_save_tiny_clip(profile: str, seed: int = 0, progress: bool = True,
                             directory: str | os.PathLike | None = None,
                             training: ClipTraining | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train the profile's tiny CLIP on the procedural dataset (``training`` overrides the profile's schedule),
    measure held-out text->image retrieval, save to ``directory`` (default: the profile's shared
    :func:`text_encoder_dir`); returns (model, info) with the losses, retrieval metrics and wall time."""
    if profile not in TINY_CLIP_SIZES:
        raise ValueError(f"no tiny CLIP for profile {profile!r}; expected one of {sorted(TINY_CLIP_SIZES)}")
    cfg, training = TINY_CLIP_SIZES[profile], training or CLIP_TRAINING[profile]
    train = ProceduralDataset(training.pool, cfg.image_size, seed=seed, split="train")
    held_out = ProceduralDataset(training.eval_size, cfg.image_size, seed=seed, split="val")
    t0 = time.time()
    model, losses = train_tiny_clip(cfg, train, training, seed=seed, progress=progress)
    wall = time.time() - t0
    metrics = retrieval_metrics(*encode_pairs(model, held_out))
    info = {"profile": profile, "seed": seed, "training": dataclasses.asdict(training), "train_seconds": wall,
            "final_loss": losses[-1], "retrieval": metrics,
            "twin_accuracy": twin_accuracy(model, held_out, training.eval_size, seed=seed)}
    save_tiny_clip(model, cfg, directory or text_encoder_dir(profile), extra=info)
    return model, {**info, "losses": losses}
