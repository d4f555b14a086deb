"""Notebook 12: fine-tune a trained Stage C on your own images, with LoRA (``peft``) or fully, and measure what it
learned and what it forgot.

The data: the user's folder of images with ``.txt`` captions, a CSV/JSONL manifest or WebDataset shards
(``dataset="folder"``, ``data_dir``; ``data.folder.FolderDataset``), or the default ``"concept"``: scenes of the
procedural shapes in a colour the tiny model has never seen, named by a word its text encoder never trained on
(:data:`CONCEPT`, "cyan"), written into the run's ``data/concept`` folder and read back through the same
``FolderDataset`` a user's folder goes through. Before and after are measured on held-out prompts of the new data
and of the original procedural data: images (grids), a colour reader (:func:`color_accuracy`, the judge of the
concept: does the object in the prompted cell come out in the prompted colour?) and Stage C's held-out denoising
loss at fixed noise (any dataset). Beside them, per method: trainable parameters, seconds per step, and the peak
memory of a training step (on CPU the anonymous RSS above what the process held before; ``max_memory_allocated``
on GPU), measured in a separate process (:func:`wurst_core.training.finetune.measure_step`).

Everything trains through ``training.fit_processes`` (forked CPU workers here; under ``torchrun`` it is ``fit``
with DDP), so checkpoints are atomic and a killed fine-tune resumes exactly (``resume=True``). Memory options for
the ``paper`` size: ``gradient_checkpointing`` (each Stage C block recomputed in the backward pass) and
``precision="bf16"`` (autocast; ``"auto"`` is bf16 on GPU).

Cost on the ``tiny`` profile, estimated (the tiny upstream runs were not at hand): on this 2-core machine, under a
load of 5-7, tiny-size networks with random weights took 1.2-1.5 s for a full fine-tuning step of batch 32 in one
process, a LoRA step 0.68 times that, and 0.6 step-times per sampled image (30 + 12 steps, guidance 2 / 2).
Scaled by the committed ``05_stage_c`` run (the same task, 4,300 steps in 464 s with two workers: 0.108 s a step):
full fine-tuning 800 steps ~1.4 min, LoRA ~1 min, the images of 2 x 64 held-out prompts for three models ~1 min,
loading, data, measurements and figures ~0.5 min: about 4 minutes (``13_previewer`` adds about 1.6, ``14_explorer``
0.3).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.utils.data import Dataset

from .. import params
from ..data import MAX_PIXELS, make_dataset, write_folder
from ..data.procedural import (BACKGROUNDS, COLORS, HPOS, SHAPES, SIZE_FRACTION, VPOS, _draw_shape, _hw, caption,
                               item_rng, sample_layout)
from ..data.stream import Stream
from ..data.transforms import to_tensor
from ..diffusion import CosineSchedule, Diffusion
from ..params import param
from ..pipeline import Pipeline
from ..runs import Run
from ..text import load_tiny_text_encoder
from ..training import StageCTask, TextCache, TrainConfig, fit_processes, load_training_state
from ..training.finetune import checkpoint_blocks, measure_step
from ..training.lora import LORA_TARGETS, LoraSpec, inject_lora, parameter_counts, save_adapter
from ..weights import save_model
from .figures import image_grid, save_figure
from .phases import _ema_into, checkpoint_dir, upstream

CONCEPT = "cyan"
CONCEPT_RGB = (30, 190, 200)  # hue 183 degrees: 50 from green, 40 from blue, far from every trained colour
PALETTE: dict[str, tuple[int, int, int]] = {**COLORS, CONCEPT: CONCEPT_RGB}
METHODS = ("lora", "full")
TABLE = ("trainable_parameters", "trainable_share", "seconds_per_step", "measured_seconds_per_step", "peak_memory_mb",
         "concept_accuracy", "original_color_accuracy", "heldout_loss_new", "heldout_loss_original")


@dataclass(frozen=True)
class FinetuneParams:
    """Parameters of ``notebooks/12_finetune.ipynb``; 0 / "" / -1 take the profile's value."""

    profile: str = params.choice("tiny", *params.PROFILES)
    weights_dir: str = ""   # Pipeline.from_pretrained folder to fine-tune ("": the latest 05_stage_c run)
    dataset: str = params.choice("concept", "concept", "folder", "emoji", "procedural")
    data_dir: str = ""      # dataset="folder": images + .txt captions, a metadata.csv/.jsonl, or .tar shards
    max_pixels: int = param(MAX_PIXELS, ge=1)   # folder images above this many pixels are skipped (bombs)
    resolution: int = param(0, ge=8, le=4096)   # training and sampling image size in px
    n_train: int = param(0, ge=1)               # concept: images written to data/concept; folder: at most this many
    n_regular: int = param(-1, ge=0, unset=-1)  # original procedural images mixed in against forgetting (0: none)
    n_val: int = param(0, ge=1)                 # held-out prompts of the new and of the original data
    method: str = params.choice("lora", *METHODS)
    compare: bool = True                        # also fine-tune with the other method (the LoRA / full table)
    lora_rank: int = param(0, ge=1, le=4096)
    lora_alpha: float = param(0.0, gt=0)        # the update is scaled by alpha / rank
    lora_dropout: float = param(0.0, ge=0, lt=1)
    lora_targets: str = param("kv_mapper,out_proj", item_choices=tuple(LORA_TARGETS))
    steps: int = param(0, ge=1)
    batch_size: int = param(0, ge=1)
    lr: float = param(0.0, gt=0, le=1)          # LoRA learning rate
    full_lr: float = param(0.0, gt=0, le=1)     # full fine-tuning learning rate
    warmup_steps: int = param(0, ge=0)
    lr_schedule: str = params.choice("", "constant", "cosine")
    ema_beta: float = param(0.0, ge=0, lt=1)
    grad_accum: int = param(1, ge=1)
    workers: int = param(0, ge=1, le=64)        # CPU training processes (gloo DDP); under torchrun: 1
    gradient_checkpointing: bool = False        # recompute each Stage C block in the backward pass (memory)
    precision: str = params.choice("auto", "auto", "fp32", "bf16")  # auto: bf16 autocast on GPU, fp32 on CPU
    seed: int = param(0, ge=0)
    resume: bool = False
    diverge_factor: float = param(100.0, gt=1)
    guidance: float | None = param(None, ge=0)  # Stage C guidance of the evaluation images (None: the pipeline's)
    sample_steps: int = param(0, ge=1, le=1000)  # Stage C steps of the evaluation images
    measure_steps: int = param(0, ge=1)         # steps timed per method in a separate process (s/step, memory)

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        return {"smoke": dict(resolution=64, n_train=16, n_regular=0, n_val=4, lora_rank=2, lora_alpha=2.0, steps=3,
                              batch_size=4, lr=1e-3, full_lr=1e-4, warmup_steps=1, lr_schedule="constant",
                              ema_beta=0.9, workers=1, sample_steps=2, measure_steps=2),
                # full fine-tuning at a quarter of Stage C's own peak rate (2e-3), LoRA's rank-8 update at 6x that
                "tiny": dict(resolution=64, n_train=512, n_regular=0, n_val=64, lora_rank=8, lora_alpha=8.0,
                             steps=800, batch_size=32, lr=3e-3, full_lr=5e-4, warmup_steps=50, lr_schedule="cosine",
                             ema_beta=0.99, workers=2, sample_steps=30, measure_steps=8),
                "paper": dict(resolution=1024, n_train=100_000, n_regular=0, n_val=64, lora_rank=16,
                              lora_alpha=16.0, steps=5000, batch_size=64, lr=1e-4, full_lr=1e-5, warmup_steps=100,
                              lr_schedule="constant", ema_beta=0.999, workers=1, sample_steps=60,
                              measure_steps=10)}[profile]

    def check(self) -> None:
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError("parameter 'data_dir' is required with dataset='folder' (your images + captions)")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"parameter 'batch_size' ({self.batch_size}) must be divisible by 'grad_accum' "
                             f"({self.grad_accum})")
        self.lora_spec()  # LoRA settings that do not go together fail here

    def lora_spec(self) -> LoraSpec:
        return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(params.listed(self.lora_targets)))

    def methods(self) -> tuple[str, ...]:
        return (self.method, *[m for m in METHODS if m != self.method]) if self.compare else (self.method,)

    def train_config(self, method: str, steps: int | None = None) -> TrainConfig:
        small = self.profile != "paper"
        steps = steps or self.steps
        return TrainConfig(steps=steps, batch_size=self.batch_size, lr=self.lr if method == "lora" else self.full_lr,
                           warmup_steps=self.warmup_steps, lr_schedule=self.lr_schedule,
                           grad_accum=self.grad_accum, ema_beta=self.ema_beta, ema_every=1 if small else 10,
                           ema_start=steps // 10 if small else 100, ckpt_every=max(1, steps // 4) if small else 500,
                           log_every=max(1, steps // 50), seed=self.seed, precision=self.precision,
                           diverge_factor=self.diverge_factor)


# ---------------------------------------------------------------------------------------------- the concept data
def render_scene(attributes: dict[str, Any], resolution: int | tuple[int, int] = 64,
                 palette: dict[str, tuple[int, int, int]] = PALETTE, supersample: int = 4) -> Tensor:
    """A procedural scene whose colours come from ``palette`` (the procedural one plus the concept's)."""
    h, w = _hw(resolution)
    canvas = Image.new("RGB", (w * supersample, h * supersample), BACKGROUNDS[attributes["background"]])
    draw, side = ImageDraw.Draw(canvas), min(w, h) * supersample
    for o in attributes["objects"]:
        _draw_shape(draw, o["shape"], palette[o["color"]], o["cx"] * w * supersample, o["cy"] * h * supersample,
                    SIZE_FRACTION[o["size"]] * side)
    return to_tensor(canvas.resize((w, h), Image.BOX) if supersample > 1 else canvas)


class ConceptDataset(Dataset):
    """One or two procedural shapes, the first always in :data:`CONCEPT`, the other in a trained colour; captions
    from the procedural templates ("a large cyan circle on the left ..."). Item ``i`` of ``(seed, split)`` is fixed."""

    def __init__(self, size: int, resolution: int = 64, seed: int = 0, split: str = "train") -> None:
        self.size, self.resolution, self.seed, self.split = size, resolution, seed, split

    def __len__(self) -> int:
        return self.size

    def _draw(self, index: int) -> tuple[Any, dict[str, Any]]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        rng = item_rng("concept", self.seed, self.split, index)
        cells = sample_layout(rng, rng.randint(1, 2))
        objects = [{"shape": rng.choice(SHAPES), "color": CONCEPT if i == 0 else rng.choice(list(COLORS)), **cell}
                   for i, cell in enumerate(cells)]
        return rng, {"background": rng.choice(list(BACKGROUNDS)), "count": len(objects), "objects": objects}

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng, attrs = self._draw(int(index))
        return {"image": render_scene(attrs, self.resolution), "caption": caption(attrs, rng), "attributes": attrs,
                "index": int(index)}


def write_concept_folder(directory: Path, n: int, resolution: int, seed: int) -> Path:
    """``n`` concept scenes as ``<key>.png`` + ``<key>.txt``: the layout of a user's folder."""
    ds = ConceptDataset(n, resolution, seed, "train")
    return write_folder(directory, ((f"concept{i:05d}", ds[i]["image"], ds[i]["caption"]) for i in range(n)))


class Mixed:
    """The fine-tuning stream: the new data's items first, then ``regular`` original ones (index order kept)."""

    def __init__(self, new: Stream, regular: Stream | None = None) -> None:
        self.new, self.regular = new, regular

    def __len__(self) -> int:
        return len(self.new) + (len(self.regular) if self.regular is not None else 0)

    def __call__(self, idx: list[int]) -> dict[str, Any]:
        n = len(self.new)
        items = [self.new.dataset[i] if i < n else self.regular.dataset[i - n] for i in idx]
        return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}


# ---------------------------------------------------------------------------------------------- the judge
def read_colors(images: Tensor, attributes: Sequence[dict[str, Any]],
                palette: dict[str, tuple[int, int, int]] = PALETTE, threshold: float = 0.25,
                min_fraction: float = 0.04) -> list[list[str | None]]:
    """Per image and object of its prompt, the colour found in the object's grid cell: the median of the cell's
    pixels that differ from the image's median (its background) by more than ``threshold`` (RGB distance in [0, 1]
    units), nearest in ``palette``; None when under ``min_fraction`` of the cell differs (nothing drawn there)."""
    names = list(palette)
    ref = torch.tensor([palette[n] for n in names], dtype=torch.float32) / 255
    out = []
    for img, attrs in zip(images.float().clamp(0, 1), attributes):
        h, w = img.shape[-2:]
        bg = img.flatten(1).median(1).values
        found: list[str | None] = []
        for o in attrs["objects"]:
            row, col = VPOS.index(o["vpos"]), HPOS.index(o["hpos"])
            cell = img[:, row * h // 3:(row + 1) * h // 3, col * w // 3:(col + 1) * w // 3].flatten(1).T
            far = cell[(cell - bg).norm(dim=1) > threshold]
            if far.shape[0] < max(1, min_fraction * cell.shape[0]):
                found.append(None)
                continue
            found.append(names[int((ref - far.median(0).values).norm(dim=1).argmin())])
        out.append(found)
    return out


def color_accuracy(images: Tensor, attributes: Sequence[dict[str, Any]], only: str | None = None) -> float:
    """The share of prompted objects (those in colour ``only``, if given) read back in their prompted colour."""
    hits = [c == o["color"] for found, attrs in zip(read_colors(images, attributes), attributes)
            for c, o in zip(found, attrs["objects"]) if only is None or o["color"] == only]
    return sum(hits) / len(hits) if hits else float("nan")


# ---------------------------------------------------------------------------------------------- the upstream model
@dataclass
class Trained:
    """A trained pipeline to fine-tune, where it came from and how its Stage C was trained."""

    pipe: Pipeline
    source: str
    objective: dict[str, Any]  # loss_weight, t_sampler, p_drop_text of the Stage C training


def trained_pipeline(profile: str, weights_dir: str = "", device: str | None = None) -> Trained:
    """``weights_dir`` (``Pipeline.from_pretrained``), else the latest ``05_stage_c`` run of ``profile``; a clear
    error naming the notebook to run when there is none."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    released = {"loss_weight": "p2", "t_sampler": "stretched", "p_drop_text": 0.05}
    if weights_dir:
        return Trained(Pipeline.from_pretrained(weights_dir, device=device), str(weights_dir), released)
    run = upstream("c", profile)  # FileNotFoundError: "... run notebooks/05_stage_c.ipynb first"
    folder = run.checkpoints / "pipeline"
    if not (folder / "pipeline.json").is_file():
        raise FileNotFoundError(f"{run.dir} has no saved pipeline: run notebooks/05_stage_c.ipynb again "
                                f"(`wurst run 05_stage_c --profile {profile}`)")
    texts: dict[str, Any] = {}
    if not (folder / "text_encoder").is_dir():
        layers = json.loads((folder / "pipeline.json").read_text()).get("text_layers", {})
        shared = load_tiny_text_encoder(profile)
        texts = {f"{s}_text_encoder": shared.with_layer(layers.get(s, "last")) for s in ("prior", "decoder")}
    config = json.loads((run.dir / "config.json").read_text())
    objective = {k: config.get(k, v) for k, v in released.items()}
    return Trained(Pipeline.from_pretrained(folder, device=device, **texts), f"05_stage_c/{profile}/{run.run_id}",
                   objective)


def make_task(stage_c: nn.Module, trained: Trained) -> StageCTask:
    """Stage C's training objective around ``stage_c``, with the pipeline's compressor, text encoder and scaling."""
    pipe, obj = trained.pipe, trained.objective
    diffusion = Diffusion(schedule=CosineSchedule(shift=pipe.stage_c_schedule.shift), weight=obj["loss_weight"],
                          t_sampler=obj["t_sampler"])
    s = pipe.latent_scaling
    return StageCTask(stage_c, pipe.semantic_compressor, TextCache(pipe.prior_text_encoder), diffusion,
                      sc_size=pipe.compressor_size, p_drop_text=obj["p_drop_text"], latent_scaling=s.kind,
                      latent_mean=s.mean, latent_std=s.std)


def prepare(base: nn.Module, method: str, p: FinetuneParams) -> nn.Module:
    """A copy of ``base`` to fine-tune: LoRA adapters injected (only they train; their random init a function of
    ``p.seed``), or every weight trainable."""
    stage_c = copy.deepcopy(base).train()
    if method == "lora":
        torch.manual_seed(p.seed)
        inject_lora(stage_c, p.lora_spec())
    else:
        stage_c.requires_grad_(True)
    return checkpoint_blocks(stage_c) if p.gradient_checkpointing else stage_c


@torch.no_grad()
def heldout_loss(task: StageCTask, images: Tensor, captions: list[str], seed: int = 0,
                 ts: Sequence[float] = (0.25, 0.5, 0.75), batch: int = 64) -> float:
    """Stage C's diffusion loss on held-out images with their captions at fixed noise levels and fixed noise."""
    task.eval()
    total, n = 0.0, 0
    device = next(task.stage_c.parameters()).device
    for i in range(0, images.shape[0], batch):
        x0 = task.encode(images[i:i + batch].to(device))
        tokens = task.text(captions[i:i + batch]).to(x0)
        g = torch.Generator().manual_seed(seed + i)
        noise = torch.randn(x0.shape, generator=g).to(x0)
        for t in ts:
            tt = torch.full((x0.shape[0],), float(t), device=device)
            total += float(task.diffusion.loss(task.stage_c, x0, tokens, t=tt, noise=noise).sum())
            n += x0.shape[0]
    return total / n


def generate(pipe: Pipeline, prompts: list[str], p: FinetuneParams, batch: int = 64) -> Tensor:
    """One image per prompt, image ``i`` from its own generator (seed + i): the same noise for every model."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(p.seed + j) for j in range(i, min(i + batch, len(prompts)))]
        out.append(pipe(prompts[i:i + batch], height=p.resolution, width=p.resolution, prior_steps=p.sample_steps,
                        decoder_steps=2 if p.profile == "smoke" else 12, prior_guidance=p.guidance,
                        generator=gens).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- the study
@dataclass
class FinetuneResult:
    metrics: dict[str, Any]
    table: pd.DataFrame
    history: dict[str, pd.DataFrame]
    figures: dict[str, Path]
    adapter: Path | None


def _data(p: FinetuneParams, run: Run) -> tuple[Mixed, dict[str, Any]]:
    """The fine-tuning stream and the held-out set of the new data."""
    kind, root = p.dataset, p.data_dir
    if kind == "concept":
        kind, root = "folder", str(write_concept_folder(run.dir / "data" / "concept", p.n_train, p.resolution, p.seed))
    new = Stream(kind, p.n_train, p.resolution, p.seed, "train", root, p.max_pixels)
    regular = Stream("procedural", p.n_regular, p.resolution, p.seed, "train") if p.n_regular else None
    if p.dataset == "concept":
        ds: Any = ConceptDataset(p.n_val, p.resolution, p.seed, "val")
    elif p.dataset == "folder":
        try:
            ds = make_dataset("folder", root=root, resolution=p.resolution, seed=p.seed, split="val",
                              max_pixels=p.max_pixels)
        except ValueError:  # too few images for a held-out split: the training images stand in
            ds = new.dataset
    else:
        ds = make_dataset(kind, size=p.n_val, resolution=p.resolution, seed=p.seed, split="val")
    items = [ds[i] for i in range(min(p.n_val, len(ds)))]
    held = {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
            "attributes": [it.get("attributes") for it in items]}
    return Mixed(new, regular), held


def _train(task: StageCTask, p: FinetuneParams, method: str, run: Run, data: Mixed,
           progress: bool) -> tuple[pd.DataFrame, float]:
    ckpt = checkpoint_dir(run, f"train_{method}")
    state = ckpt / "train_state.pt"
    begin = load_training_state(state)["step"] if p.resume and state.exists() else 0
    if p.resume:
        run.logger.info("fine-tune %s: resuming %s from step %d of %d", method, run.dir, begin, p.steps)
    t0 = time.time()
    history = fit_processes(task, p.train_config(method), data, len(data), ckpt, workers=p.workers,
                            resume=p.resume, progress=progress, on_log=lambda step, rec: run.logger.info(
                                "%s step %d loss=%.4g", method, step, rec.get("loss", float("nan"))))
    seconds_per_step = (time.time() - t0) / max(1, p.steps - begin)
    _ema_into(task, ckpt)
    task.eval()
    return history, seconds_per_step


def _evaluate(pipe: Pipeline, task: StageCTask, held: dict[str, Any], original: dict[str, Any],
              p: FinetuneParams) -> tuple[dict[str, float], dict[str, Tensor]]:
    images = {"new": generate(pipe, held["caption"], p), "original": generate(pipe, original["caption"], p)}
    scores = {"heldout_loss_new": heldout_loss(task, held["image"], held["caption"], p.seed),
              "heldout_loss_original": heldout_loss(task, original["image"], original["caption"], p.seed),
              "original_color_accuracy": color_accuracy(images["original"], original["attributes"])}
    if p.dataset == "concept":
        scores["concept_accuracy"] = color_accuracy(images["new"], held["attributes"], only=CONCEPT)
    return scores, images


def finetune(p: FinetuneParams, run: Run, progress: bool = True) -> FinetuneResult:
    """Fine-tune the trained Stage C of ``p.profile`` (or ``weights_dir``) with each of ``p.methods()``; images,
    judge and losses before and after; the LoRA adapter in ``checkpoints/adapter``, the fully fine-tuned Stage C in
    ``checkpoints/stage_c_full``."""
    t_start = time.time()
    trained = trained_pipeline(p.profile, p.weights_dir)
    pipe, base = trained.pipe, trained.pipe.stage_c
    data, held = _data(p, run)
    ds = make_dataset("procedural", size=p.n_val, resolution=p.resolution, seed=p.seed, split="val")
    items = [ds[i] for i in range(p.n_val)]
    original = {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
                "attributes": [it["attributes"] for it in items]}
    stage_c_params = parameter_counts(base)["total"]
    rows = {"before": _evaluate(pipe, make_task(base, trained), held, original, p)}
    metrics: dict[str, Any] = {"weights": trained.source, "dataset": p.dataset, "train_items": len(data),
                               "before": dict(rows["before"][0]), "stage_c_parameters": stage_c_params}
    history, adapter = {}, None
    for method in p.methods():
        stage_c = prepare(base, method, p)
        task = make_task(stage_c, trained)
        counts = parameter_counts(stage_c)
        measured = measure_step(task, p.train_config(method, steps=p.measure_steps), data, len(data))
        history[method], seconds = _train(task, p, method, run, data, progress)
        if method == "lora":
            adapter = save_adapter(stage_c, p.lora_spec(), checkpoint_dir(run, "adapter"),
                                   {"weights": trained.source, "dataset": p.dataset, "steps": p.steps})
            tuned = copy.copy(pipe)
            tuned.stage_c = copy.deepcopy(base)
            tuned.load_adapter(adapter, scale=1.0)  # through the Pipeline, as a user loads it
        else:
            save_model(stage_c, checkpoint_dir(run, "stage_c_full"))
            tuned = copy.copy(pipe)
            tuned.stage_c = stage_c.eval()
        scores, images = _evaluate(tuned, task, held, original, p)
        rows[method] = (scores, images)
        metrics[method] = {**scores, **measured, "trainable_parameters": counts["trainable"],
                           "trainable_share": counts["trainable"] / stage_c_params, "seconds_per_step": seconds,
                           "final_loss": float(history[method]["loss"].iloc[-5:].mean())}
    metrics["wall_seconds"] = time.time() - t_start
    table = pd.DataFrame([{"model": name, **metrics[name]} for name in rows])
    table = table[["model", *[c for c in TABLE if c in table]]]
    figs = _figures(rows, held, original, history, p, run)
    return FinetuneResult(metrics, table, history, figs, adapter)


def _figures(rows: dict[str, Any], held: dict[str, Any], original: dict[str, Any], history: dict[str, pd.DataFrame],
             p: FinetuneParams, run: Run) -> dict[str, Path]:
    cols = min(8, p.n_val)
    titles = {"before": "before", "lora": "LoRA", "full": "full fine-tune"}
    figs = {}
    for key, real, name in (("new", held, "new_prompts"), ("original", original, "original_prompts")):
        grid = [real["image"][:cols]] + [imgs[key][:cols] for _, imgs in rows.values()]
        names = ["held-out real"] + [titles[m] for m in rows]
        figs[name] = save_figure(image_grid(grid, names, real["caption"][:cols]), run.figure(name))
    fig, ax = plt.subplots(figsize=(5, 3))
    for method, h in history.items():
        ax.plot(h["step"], h["loss"], label=titles[method])
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="Fine-tuning loss")
    ax.legend()
    fig.tight_layout()
    figs["loss"] = save_figure(fig, run.figure("loss"))
    return figs
