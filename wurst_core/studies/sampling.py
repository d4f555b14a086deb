"""Notebook 06: the three-stage pipeline sampled: grids, guidance and step sweeps, reconstruction, resampling."""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor

from .. import params
from ..data import make_dataset
from ..evaluation.pixels import psnr
from ..models import build_model, get_config
from ..pipeline import Pipeline
from ..runs import latest_run
from ..text import TINY_CLIP_SIZES, TextEncoder, create_tiny_clip, load_tiny_text_encoder


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Parameters of ``notebooks/06_sampling.ipynb``; 0 / "" take the profile's value."""

    profile: str = params.choice("tiny", *params.PROFILES)
    weights_dir: str = ""          # Pipeline.from_pretrained folder ("": latest 05_stage_c run, else random weights)
    size: int = params.param(0, ge=0, le=4096)  # image side in px, square (0: the training resolution)
    prior_steps: int = params.param(0, ge=1, le=1000)    # tau_C (paper: 60)
    decoder_steps: int = params.param(0, ge=1, le=1000)  # tau_B (paper: 12)
    prior_guidance: float | None = params.param(None, ge=0)    # Stage C guidance (None: the pipeline's own)
    decoder_guidance: float | None = params.param(None, ge=0)  # Stage B guidance (None: the pipeline's own)
    n_prompts: int = params.param(0, ge=1, le=64)
    n_seeds: int = params.param(0, ge=1, le=64)
    guidances: str = params.param("", items=params.Domain(0, None))  # Stage C guidance scales of the sweep
    step_counts: str = params.param("", items=params.Domain(1, 1000))  # Stage C step counts of the sweep
    n_reconstruct: int = params.param(0, ge=1, le=64)  # held-out images through the reconstruction path
    strengths: str = params.param("", items=params.Domain(0, 1, lo_open=True))  # Pipeline.resample strengths
    seed: int = params.param(0, ge=0)

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        return {"smoke": dict(prior_steps=2, decoder_steps=2, n_prompts=2, n_seeds=2, guidances="1,4",
                              step_counts="1,2", n_reconstruct=2, strengths="0.5,1"),
                "tiny": dict(prior_steps=60, decoder_steps=12, n_prompts=6, n_seeds=4, guidances="1,2,4,8",
                             step_counts="2,5,10,20,30,60", n_reconstruct=6,
                             strengths="0.2,0.4,0.6,0.8,1"),
                "paper": dict(prior_steps=60, decoder_steps=12, n_prompts=4, n_seeds=2, guidances="1,2,4,8",
                              step_counts="10,20,30,60", n_reconstruct=4,
                              strengths="0.2,0.4,0.6,0.8,1")}[profile]

    def numbers(self, field: str) -> list[float]:
        """A comma-separated parameter (``guidances``, ``step_counts``) as numbers."""
        text = getattr(self, field)
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError as e:
            raise ValueError(f"{field} must be comma-separated numbers, got {text!r}") from e
        if not values:
            raise ValueError(f"{field} is empty")
        return values


def random_pipeline(profile: str = "tiny", seed: int = 0) -> Pipeline:
    """Untrained networks (size "tiny"; "parity" for smoke) and a random tiny CLIP: the sampling machinery without a
    model. The released inits zero the output heads, GRN and timestep mappers (docs/reference.md#initialisation);
    those tensors get N(0, 0.02²) so that text, guidance and the compressor map change the images (the A/B head stays
    near B = 0)."""
    clip_cfg = TINY_CLIP_SIZES["smoke" if profile == "smoke" else "tiny"]
    text = TextEncoder.from_clip(create_tiny_clip(clip_cfg, seed), clip_cfg.name)
    size = "parity" if profile == "smoke" else "tiny"
    torch.manual_seed(seed)
    nets = [build_model("c", dataclasses.replace(get_config("c", size), c_cond=text.width)),
            build_model("b", dataclasses.replace(get_config("b", size), clip_embd=text.width)),
            build_model("a", size), build_model("semantic", "tiny")]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in nets:
            for prm in net.parameters():
                if prm.numel() and prm.abs().max() == 0:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
    return Pipeline(*nets[:3], text, text, semantic_compressor=nets[3])


def load_sampling_pipeline(p: SamplingParams) -> tuple[Pipeline, dict[str, Any]]:
    """The pipeline the sampling notebook studies and a description: ``weights_dir`` if set, else the latest
    ``05_stage_c`` run of the profile (its ``checkpoints/pipeline`` and the profile's tiny text encoder), else
    random weights (``random_pipeline``; not on the paper profile)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if p.weights_dir:
        pipe = Pipeline.from_pretrained(p.weights_dir, device=device)
        return pipe, {"weights": str(p.weights_dir), "trained": True, "size": p.size or 1024}
    run = latest_run("05_stage_c", p.profile)
    folder = run.checkpoints / "pipeline" if run is not None else None
    if folder is not None and (folder / "pipeline.json").is_file():
        texts: dict[str, Any] = {}
        if not (folder / "text_encoder").is_dir():
            layers = json.loads((folder / "pipeline.json").read_text()).get("text_layers", {})
            shared = load_tiny_text_encoder(p.profile)
            texts = {f"{stage}_text_encoder": shared.with_layer(layers.get(stage, "last"))
                     for stage in ("prior", "decoder")}
        pipe = Pipeline.from_pretrained(folder, device=device, **texts)
        resolution = json.loads((run.dir / "config.json").read_text()).get("resolution", 64)
        return pipe, {"weights": f"trained: 05_stage_c/{p.profile}/{run.run_id}", "trained": True,
                      "size": p.size or int(resolution)}
    if p.profile == "paper":
        raise FileNotFoundError("the paper profile samples trained weights: set weights_dir to a folder of released "
                                "or trained checkpoints (see Pipeline.from_pretrained)")
    pipe = random_pipeline(p.profile, p.seed).to(device)
    return pipe, {"weights": "random (untrained: shows the sampling machinery, not a model)", "trained": False,
                  "size": p.size or 128}


def held_out(n: int, size: int, seed: int = 0) -> tuple[Tensor, list[str]]:
    """``n`` held-out (split "val") procedural images at ``size`` px and their captions."""
    ds = make_dataset("procedural", size=n, resolution=size, seed=seed, split="val")
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


def _timed_call(pipe: Pipeline, prompts: list[str], **kw: Any) -> tuple[Tensor, Tensor, float]:
    """Images, the final Stage C sample (its data space) and seconds per image."""
    last: dict[str, Tensor] = {}
    t0 = time.perf_counter()
    images = pipe(prompts, callback=lambda stage, i, t, x: last.__setitem__(stage, x), **kw)
    return images, last["c"], (time.perf_counter() - t0) / images.shape[0]


def sample_grid(pipe: Pipeline, prompts: list[str], n_seeds: int, seed: int = 0,
                **kw: Any) -> tuple[list[Tensor], float]:
    """``n_seeds`` images per prompt in one batch -> (one row of images per seed, seconds per image)."""
    images, _, sec = _timed_call(pipe, prompts, num_images_per_prompt=n_seeds,
                                 generator=torch.Generator().manual_seed(seed), **kw)
    return [images[s::n_seeds] for s in range(n_seeds)], sec


def guidance_sweep(pipe: Pipeline, prompts: list[str], guidances: Sequence[float], seed: int = 0,
                   **kw: Any) -> tuple[list[Tensor], Any]:
    """One image per prompt for each Stage C guidance scale, all from the same seed (so only w changes).
    Table: seconds per image, std of the Stage C sample (CFG pushes it out), per-image pixel std, and mean
    |image - image at the first w|."""
    rows, table = [], []
    for w in guidances:
        images, c, sec = _timed_call(pipe, prompts, prior_guidance=w, generator=torch.Generator().manual_seed(seed),
                                     **kw)
        rows.append(images)
        table.append({"prior_guidance": w, "seconds_per_image": sec, "stage_c_std": c.std().item(),
                      "pixel_std": images.flatten(1).std(1).mean().item(),
                      "l1_to_first": (images - rows[0]).abs().mean().item()})
    return rows, pd.DataFrame(table)


def steps_sweep(pipe: Pipeline, prompts: list[str], step_counts: Sequence[float], seed: int = 0,
                samplers: Sequence[str] = ("ddpm", "ddim"), **kw: Any) -> tuple[dict[str, list[Tensor]], Any]:
    """Images for each Stage C step count and sampler (same seed). ``l1_to_most_steps``: mean |image - image with
    the most steps| of the same sampler: DDIM (deterministic) converges as the steps grow; ancestral DDPM draws
    different noise for every step count, so it converges only in distribution."""
    counts = [int(n) for n in step_counts]
    images: dict[str, list[Tensor]] = {}
    table = []
    for sampler in samplers:
        images[sampler] = []
        for n in counts:
            out, c, sec = _timed_call(pipe, prompts, prior_steps=n, sampler=sampler,
                                      generator=torch.Generator().manual_seed(seed), **kw)
            images[sampler].append(out)
            table.append({"sampler": sampler, "prior_steps": n, "seconds_per_image": sec,
                          "stage_c_std": c.std().item()})
        ref = images[sampler][counts.index(max(counts))]
        for row, out in zip(table[-len(counts):], images[sampler]):
            row["l1_to_most_steps"] = (out - ref).abs().mean().item()
    return images, pd.DataFrame(table)


def reconstruction_study(pipe: Pipeline, images: Tensor, captions: list[str], decoder_steps: int = 12,
                         seed: int = 0) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The paper's reconstruction path (§3.1): image -> Semantic Compressor (42x) -> Stage B -> Stage A, with the
    caption and with the empty prompt, against Stage A alone (4x, the upper bound). PSNR in dB."""
    with torch.no_grad():
        stage_a_only = pipe.decode(pipe.stage_a.encode(images.to(pipe.device)))
    out = {"Stage A only": stage_a_only,
           "captioned": pipe.reconstruct(images, captions, decoder_steps=decoder_steps,
                                         generator=torch.Generator().manual_seed(seed)),
           "empty prompt": pipe.reconstruct(images, decoder_steps=decoder_steps,
                                            generator=torch.Generator().manual_seed(seed))}
    images = images.to(pipe.device)
    return out, {f"psnr_{k.replace(' ', '_').lower()}": psnr(v, images).mean().item() for k, v in out.items()}


def resample_study(pipe: Pipeline, images: Tensor, captions: list[str], strengths: Sequence[float],
                   seed: int = 0, **kw: Any) -> tuple[list[Tensor], Any]:
    """Held-out images resampled with their own captions (``Pipeline.resample``) at each strength, same seed: where
    the image's layout stops surviving is where the prior decides it. Table: PSNR to the original and mean
    |Stage C sample - the image's scaled compressor map|."""
    with torch.no_grad():
        target = pipe.scale_stage_c(pipe.compressor_embeds(images)[0])
    rows, table = [], []
    for strength in strengths:
        last: dict[str, Tensor] = {}
        out = pipe.resample(images, captions, strength=float(strength), generator=torch.Generator().manual_seed(seed),
                            callback=lambda stage, i, t, x: last.__setitem__(stage, x), **kw)
        rows.append(out)
        table.append({"strength": float(strength), "psnr": psnr(out, images.to(out.device)).mean().item(),
                      "stage_c_l1_to_image_map": (last["c"] - target).abs().mean().item()})
    return rows, pd.DataFrame(table)
