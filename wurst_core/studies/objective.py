"""Notebook 09: the training objective of Stage C, ablated (paper §3.2; issue 20). Does the A/B head make training
more stable, and does p2 loss weighting help?

Four arms of Stage C train from scratch for the same steps with the same seed. Every random draw of a step is a
function of (seed, step, row) (``training.sample_generators``), so all arms see the same batches, captions dropped,
noise levels and noises. Otherwise they share the objective that ``05_stage_c`` trains with on the profile
(``StageCParams``' profile values: schedule and logSNR shift, t sampler, latent scaling, text layer, caption
dropout; no 05 run is read) and the optimiser (``PhaseParams.train_config``, here with learning rate and steps of
this notebook):

- ``ab_p2``: the A/B head (``StageC(head="ab")``), eps target, p2 weighting: the released objective;
- ``eps_p2``: a plain head (``StageC(head="plain")``) trained on eps, p2;
- ``v_p2``: a plain head trained on v (``diffusion.training_target(..., "v")``), p2, sampled through
  ``output_to_eps`` (:class:`EpsOutput`);
- ``ab_constant``: the A/B head with constant weighting.

Every arm starts from the same weights: the heads differ only in the zero-initialised output conv, and the other
tensors are copied from one A/B network built with the seed (:func:`initial_weights`).

What "stabilises" means here, measured on every arm:

- the loss by noise level: training t cut into ``T_BINS`` equal bins, per bin the eps-equivalent MSE (the loss
  without its weight, as an error in the noise: the same units for every target and weight;
  ``training.tasks.loss_by_noise_level``) in ``WINDOWS`` equal windows of training;
- the gradient norm of every step before clipping, and its spikes. Rule: step ``s`` is a spike when its norm
  exceeds ``SPIKE_FACTOR`` (3) times the median of the finite norms of the ``SPIKE_WINDOW`` (50) steps before it, or
  is not finite; the first ``SPIKE_MIN_HISTORY`` (10) steps of a run are not judged (no median yet);
- a stress run per head (``ab_p2``, ``eps_p2``, ``v_p2``): ``stress_steps`` steps at ``stress_lr_factor`` times the
  learning rate, without gradient clipping, a tenth of them warm-up, then constant. It diverges when the loss is
  not finite or the divergence guard trips (``diverge_factor``); its final loss and largest gradient norm are kept.

Quality and adherence as notebook 07 measures them (``studies.evaluation``): each arm, with the profile's trained
Stage B and Stage A, draws one image per held-out prompt (split "test"), prompt ``i`` from the seed ``(seed, i)`` in
every arm (the same initial noise); compositional accuracy by the attribute probe and KID_tiny against ``n_val``
real images of split "val". Arms are compared with ``ab_p2`` prompt by prompt (paired bootstrap, at least 1000
resamples).

The two claims and their rules (:func:`objective_claims`) are fixed here, before any result. The stability claim
reads the unstable steps of each head: its main run's steps and then its stress run's, each judged by the spike
rule, and every step of a stress run that diverged before reaching it counts as unstable. Measured: the share of
unstable steps (points) of the more stable plain head (eps or v) minus that of the A/B head, so that positive means
the A/B head is the more stable; its interval resamples blocks of ``BLOCK`` consecutive steps (neighbouring steps
are not independent), the same blocks for all heads, the better plain head chosen again in every resample. The p2
claim reads each prompt's attribute share (the share of its stated attributes the probe reads right), A/B with p2
minus A/B with constant weighting, paired by prompt; it is judged only where both arms read above chance
(:data:`ABOVE_CHANCE`). Its first run measured all-correct accuracy, at 0 % in every arm after 600 steps: a floor.

Budget (tiny, 2 worker processes) on a quiet machine, where 05's network and batch step in 0.108 s: 4 arms x 600
steps (~4.8 min), 3 stress runs x 150 steps (~1 min), 4 x 128 prompts (~1.3 min), probe and figures (~1.5 min).
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .. import params
from ..data.stream import Stream, load_images
from ..diffusion import CosineSchedule
from ..diffusion.samplers import eps_denoiser
from ..evaluation import generators as gens
from ..evaluation.claims import Claim, claims_table
from ..evaluation.image_metrics import ProbeExtractor, extract, kid, paired_kid_difference
from ..evaluation.probe import (PROBE_SIZES, ProbeTraining, attribute_share, chance_truths, compositional_accuracy,
                                probe_spec, train_probe)
from ..evaluation.stats import Estimate, bootstrap, mean_ci, paired_difference
from ..models.semantic import preprocess
from ..models.stage_c import STAGE_C_SIZES, StageC, StageCConfig
from ..params import param
from ..pipeline import Pipeline
from ..runs import Run
from ..training import StageCTask, TextCache, TrainConfig, TrainingDiverged, fit_processes, freeze, load_training_state
from ..weights import load_model, sampling_of
from .claims import LATER, MIN_BOOT, claims_records
from .figures import image_grid, save_figure
from .phases import (_COMMON, PhaseParams, _batched, _ema_into, _seed_all, checkpoint_dir, load_stage, run_log,
                     text_encoder, upstream)
from .stage_c import StageCParams


@dataclass(frozen=True)
class Arm:
    label: str
    head: str     # StageC head: "ab" | "plain"
    target: str   # training target: "eps" | "v"
    weight: str   # loss weight: "p2" | "constant"


ARMS: dict[str, Arm] = {
    "ab_p2": Arm("A/B, p2", "ab", "eps", "p2"),
    "eps_p2": Arm("eps, p2", "plain", "eps", "p2"),
    "v_p2": Arm("v, p2", "plain", "v", "p2"),
    "ab_constant": Arm("A/B, constant", "ab", "eps", "constant"),
}
REFERENCE = "ab_p2"                       # the released objective: every paired difference is against it
HEADS = ("ab_p2", "eps_p2", "v_p2")       # the stress runs and the stability claim
PLAIN = ("eps_p2", "v_p2")
T_BINS = 5                                # noise-level bins of [0, 1]
WINDOWS = 4                               # windows of training in the noise-level table
SPIKE_FACTOR, SPIKE_WINDOW, SPIKE_MIN_HISTORY = 3.0, 50, 10  # the spike rule (module docstring)
BLOCK = 25                                # steps per resampled block of the stability interval
LOG_COLUMNS = ["step", "lr", "grad_norm", "loss",
               *(f"tbin{b}_{k}" for b in range(T_BINS) for k in ("n", "loss", "eps"))]  # a run's log, even empty

_STATED = {c.name: c for c in LATER}
STABILITY = dataclasses.replace(
    _STATED["The A/B objective stabilises training"], direction="higher", reference=0.0, margin=0.0,
    measure="unstable steps (gradient-norm spikes above 3x the median of the 50 steps before, and stress-run steps "
            "never reached because the run diverged), % of judged steps over each head's main run and its stress "
            "run without clipping at a higher learning rate: the more stable plain head (eps or v) minus the A/B "
            "head, in points, equal steps, seed and data; block bootstrap over steps (25-step blocks)")
ABOVE_CHANCE = 5.0  # points above chance (images read against other prompts' truths) both arms must reach
P2_WEIGHTING = dataclasses.replace(
    _STATED["p2 loss weighting helps"], direction="higher", reference=0.0, margin=0.0,
    measure="attribute share (probe: of each prompt's count, position, background, shapes, colours and sizes, the "
            "share read right) of Stage C with the A/B head and p2 weighting minus with constant weighting, in "
            "points, paired on the held-out prompts with the same initial noise, equal steps",
    precondition=f"both arms' attribute share beats their chance share (their images read against other prompts' "
                 f"truths) by at least {ABOVE_CHANCE:g} points")


def objective_claims() -> list[Claim]:
    """The two claims this notebook measures, with their rules as stated before any result."""
    return [STABILITY, P2_WEIGHTING]


@dataclass(frozen=True)
class ObjectiveParams(PhaseParams):
    size: str = params.choice("", *STAGE_C_SIZES)
    stress_steps: int = param(0, ge=1)             # steps of each stress run (no clipping, higher learning rate)
    stress_lr_factor: float = param(10.0, ge=1, le=1000)  # the stress runs' learning rate over the main runs'
    n_prompts: int = param(0, ge=2)                # held-out prompts, one image per prompt and arm
    prior_steps: int = param(0, ge=1, le=1000)     # Stage C sampling steps
    decoder_steps: int = param(0, ge=1, le=1000)   # Stage B sampling steps
    guidance: float | None = param(None, ge=0)     # Stage C classifier-free guidance (on above 1)
    probe_size: str = params.choice("", *PROBE_SIZES)
    probe_images: int = param(0, ge=1)             # real training images of the probe
    probe_steps: int = param(0, ge=1)              # probe optimiser steps
    n_boot: int = param(0, ge=1)                   # resamples of each arm's own intervals (paired: at least 1000)

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        # lr and warm-up as 05_stage_c; 600 steps per arm fit the tiny budget (module docstring)
        own = {"smoke": dict(steps=3, lr=1e-3, stress_steps=12, n_prompts=8, prior_steps=2, decoder_steps=2,
                             guidance=2.0, probe_size="smoke", probe_images=200, probe_steps=20, n_boot=20),
               "tiny": dict(steps=600, lr=1e-3, warmup_steps=100, stress_steps=150, n_prompts=128, prior_steps=30,
                            decoder_steps=12, guidance=2.0, probe_size="tiny", probe_images=4000, probe_steps=800,
                            n_boot=200),
               "paper": dict(stress_steps=1000, n_prompts=2000, prior_steps=60, decoder_steps=12, guidance=4.0,
                             probe_size="base", probe_images=20000, probe_steps=3000, n_boot=1000)}[profile]
        return {**_COMMON[profile], **own}

    def check(self) -> None:
        super().check()
        if self.dataset not in ("procedural", "emoji"):
            raise ValueError(f"parameter 'dataset' must be procedural or emoji (compositional accuracy needs the "
                             f"prompts' ground truth), got {self.dataset!r}")


# ------------------------------------------------------------------------------------------- the spike rule

def grad_spikes(norms: Any, factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW,
                min_history: int = SPIKE_MIN_HISTORY) -> np.ndarray:
    """Per step, whether its gradient norm is a spike (the rule of the module docstring); the first
    ``min_history`` steps, and any step with fewer finite norms before it, are never spikes (not judged)."""
    g = np.asarray(norms, dtype=np.float64)
    out = np.zeros(len(g), dtype=bool)
    for s in range(min_history, len(g)):
        past = g[max(0, s - window):s]
        past = past[np.isfinite(past)]
        if len(past) >= min_history:
            out[s] = not np.isfinite(g[s]) or g[s] > factor * np.median(past)
    return out


def unstable_steps(norms: Any, planned: int | None = None) -> np.ndarray:
    """1.0 for an unstable step, 0.0 for a stable one, over the judged positions ``SPIKE_MIN_HISTORY`` ..
    ``planned - 1`` of a run: spikes where the run logged the step, and every step it never reached (it diverged)."""
    g = np.asarray(norms, dtype=np.float64)
    planned = len(g) if planned is None else planned
    if planned < len(g):
        raise ValueError(f"{len(g)} logged steps exceed the {planned} planned")
    spikes = np.concatenate([grad_spikes(g), np.ones(planned - len(g), dtype=bool)])
    return spikes[SPIKE_MIN_HISTORY:].astype(np.float64)


def stability_difference(unstable: Mapping[str, np.ndarray], n_boot: int = MIN_BOOT, seed: int = 0,
                         block: int = BLOCK) -> Estimate | None:
    """The stability claim's measurement: % unstable steps of the more stable plain head minus the A/B head's, with
    a block-bootstrap interval (the same blocks for every head); None when no step was judged."""
    a = torch.as_tensor(unstable[REFERENCE], dtype=torch.float64)
    plains = torch.stack([torch.as_tensor(unstable[k], dtype=torch.float64) for k in PLAIN])
    if a.numel() == 0:
        return None
    if plains.shape[1] != a.numel():
        raise ValueError(f"the heads' step series differ in length: {a.numel()} and {plains.shape[1]}")
    blocks = [torch.arange(i, min(i + block, a.numel())) for i in range(0, a.numel(), block)]

    def stat(chosen: Tensor) -> float:
        idx = torch.cat([blocks[i] for i in chosen.tolist()])
        return 100 * (plains[:, idx].mean(1).min() - a[idx].mean()).item()

    return dataclasses.replace(bootstrap(stat, len(blocks), n_boot=max(n_boot, MIN_BOOT), seed=seed), n=a.numel())


def measured_objective_claims(unstable: Mapping[str, np.ndarray] | None, shares: Mapping[str, Tensor] | None,
                              chance: Mapping[str, Tensor] | None = None, n_boot: int = MIN_BOOT, seed: int = 0,
                              detail: str = "") -> list[Claim]:
    """Both claims with their measurements: ``unstable`` per head (:func:`unstable_steps` of the main run, then of
    the stress run); ``shares`` per arm, each prompt's attribute share (0-1), with ``chance``, the same images'
    shares against other prompts' truths (the precondition). A missing input leaves its claim unmeasured."""
    note = f"; {detail}" if detail else ""
    stability = stability_difference(unstable, n_boot, seed) if unstable is not None else None
    p2 = dataclasses.replace(P2_WEIGHTING, measure=P2_WEIGHTING.measure + note)
    if shares is not None:
        if chance is None:
            raise ValueError("the p2 claim's precondition needs each arm's chance shares")
        arms = (REFERENCE, "ab_constant")
        above = {k: 100 * (shares[k].double().mean() - chance[k].double().mean()).item() for k in arms}
        met = all(v >= ABOVE_CHANCE for v in above.values())
        p2 = dataclasses.replace(p2, measured=paired_difference(100 * shares[REFERENCE], 100 * shares["ab_constant"],
                                                                n_boot=max(n_boot, MIN_BOOT), seed=seed),
                                 precondition_met=met,
                                 measure=p2.measure + "; above chance: " + ", ".join(
                                     f"{ARMS[k].label} {v:+.1f} points" for k, v in above.items()))
    return [dataclasses.replace(STABILITY, measured=stability, measure=STABILITY.measure + (
                note if stability is not None else "; not measured: no step was judged (runs shorter than "
                f"{SPIKE_MIN_HISTORY + 1} steps)")), p2]


# ------------------------------------------------------------------------------------------- the arms

def initial_weights(cfg: StageCConfig, seed: int) -> dict[str, Tensor]:
    """The starting weights of every arm: an A/B Stage C built with ``seed``."""
    _seed_all(seed)
    return StageC(cfg, head="ab").state_dict()


def build_stage_c(cfg: StageCConfig, head: str, init: Mapping[str, Tensor]) -> StageC:
    """A Stage C with ``head`` starting from ``init``: every tensor of the same shape copied (all but the output
    conv, which starts at zero in both heads)."""
    net = StageC(cfg, head=head)
    own = net.state_dict()
    net.load_state_dict({k: init[k] if k in init and init[k].shape == v.shape else v for k, v in own.items()})
    return net


class EpsOutput(nn.Module):
    """A Stage C trained on ``target`` as the eps network the pipeline samples (``samplers.eps_denoiser``)."""

    def __init__(self, stage_c: nn.Module, target: str, schedule: CosineSchedule):
        super().__init__()
        self.stage_c, self.config = stage_c, stage_c.config
        self._eps = eps_denoiser(stage_c, target, schedule)

    def forward(self, x: Tensor, r: Tensor, text_tokens: Tensor) -> Tensor:
        return self._eps(x, r, text_tokens=text_tokens)


def _fit_logged(task: nn.Module, cfg: TrainConfig, data: Stream, ckpt: Path, workers: int, resume: bool,
                progress: bool) -> tuple[pd.DataFrame, str | None]:
    """Train, logging every step; on divergence the steps logged until then and why it stopped."""
    records: list[dict[str, float]] = []
    try:
        return fit_processes(task, cfg, data, len(data), ckpt, workers=workers, resume=resume, progress=progress,
                             on_log=lambda step, rec: records.append(dict(rec))), None
    except TrainingDiverged as e:
        state = ckpt / "train_state.pt"
        first = records[0]["step"] if records else math.inf
        earlier = [r for r in load_training_state(state)["history"] if r["step"] < first] if state.exists() else []
        return pd.DataFrame(earlier + records, columns=None if earlier or records else LOG_COLUMNS), str(e)


@dataclass
class ObjectiveResult:
    histories: dict[str, pd.DataFrame]   # arm -> per-step training log
    stress: dict[str, pd.DataFrame]      # head -> per-step log of its stress run
    tables: dict[str, pd.DataFrame]
    metrics: dict[str, Any]
    claims: list[Claim]
    prompts: list[str]
    images: dict[str, Tensor]            # "real" and each arm -> (P, 3, R, R)
    figures: dict[str, Path]


def run_objective_study(p: ObjectiveParams, run: Run, progress: bool = True) -> ObjectiveResult:
    """Train the four arms and the three stress runs, sample and score every arm, measure both claims."""
    t0, log = time.time(), run_log(progress, run)
    if p.size == "paper":
        raise RuntimeError("the objective ablation trains four paper-size Stage Cs from scratch: that needs a GPU "
                           "cluster, not the CPU worker processes of this study; run the smoke or tiny profile")
    sc = params.build(StageCParams, {"profile": p.profile})  # Stage C's objective as 05 trains it on this profile
    b_run = upstream("b", p.profile)
    compressor = freeze(load_model(b_run.checkpoints / "semantic"))
    text = TextCache(text_encoder(p.profile, sc.text_layer))
    sc_size = compressor.config.image_size
    train = Stream(p.dataset, p.n_train, p.resolution, p.seed, "train", p.data_dir, p.max_pixels)
    f = _batched(lambda x: compressor(preprocess(x, sc_size)), train.head(512))  # "std" scaling, as 05
    mean, std = f.mean().item(), f.std().item()
    cfg = dataclasses.replace(STAGE_C_SIZES[p.size], c_cond=text.encoder.width, c_in=compressor.config.c_latent)
    init = initial_weights(cfg, p.seed)
    main_cfg = dataclasses.replace(p.train_config(), log_every=1)  # every step's gradient norm

    def task_for(arm: Arm) -> StageCTask:
        diffusion = dataclasses.replace(sc.diffusion(), weight=arm.weight, target=arm.target)
        return StageCTask(build_stage_c(cfg, arm.head, init), compressor, text, diffusion, sc_size=sc_size,
                          p_drop_text=sc.p_drop_text, latent_scaling=sc.latent_scaling, latent_mean=mean,
                          latent_std=std, t_bins=T_BINS)

    histories, tasks, seconds, diverged = {}, {}, {}, {}
    for name, arm in ARMS.items():
        log(f"arm {arm.label}: {p.steps} steps")
        task, ckpt, t1 = task_for(arm), checkpoint_dir(run, f"train_{name}"), time.time()
        histories[name], diverged[name] = _fit_logged(task, main_cfg, train, ckpt, p.workers, p.resume, progress)
        seconds[name] = time.time() - t1
        if (ckpt / "train_state.pt").exists():
            _ema_into(task, ckpt)  # the EMA weights of the run (of its last good checkpoint if it diverged)
        else:
            task.stage_c.load_state_dict(build_stage_c(cfg, arm.head, init).state_dict())
        tasks[name] = task.eval()
        if diverged[name]:
            log(f"arm {arm.label} diverged: {diverged[name]}")
    stress_cfg = dataclasses.replace(main_cfg, steps=p.stress_steps, lr=p.lr * p.stress_lr_factor,
                                     warmup_steps=p.stress_steps // 10, lr_schedule="constant", grad_clip=math.inf,
                                     ckpt_every=p.stress_steps)
    stress, stress_why = {}, {}
    for name in HEADS:
        log(f"stress run {ARMS[name].label}: {p.stress_steps} steps at lr {stress_cfg.lr:g}, no clipping")
        with tempfile.TemporaryDirectory() as tmp:  # nothing of a stress run is kept but its log
            stress[name], stress_why[name] = _fit_logged(task_for(ARMS[name]), stress_cfg, train, Path(tmp),
                                                         p.workers, False, progress)
        log(f"stress run {ARMS[name].label}: {'diverged: ' + stress_why[name] if stress_why[name] else 'finished'}")
    unstable = {k: np.concatenate([unstable_steps(histories[k]["grad_norm"], p.steps),
                                   unstable_steps(stress[k]["grad_norm"], p.stress_steps)])
                for k in HEADS}
    train_seconds = time.time() - t0

    # quality and adherence on held-out prompts, the same initial noise for every arm
    test = load_images(p.dataset, p.n_prompts, p.resolution, p.seed, "test", progress=False)
    prompts, truths = list(test["caption"]), test["attributes"]
    reference = load_images(p.dataset, p.n_val, p.resolution, p.seed, "val", progress=False)["image"]  # for KID
    probe_cfg = PROBE_SIZES[p.probe_size]
    probe_train = load_images(p.dataset, p.probe_images, probe_cfg.resolution, p.seed, "train", progress=False)
    probe = train_probe(probe_train["image"], probe_train["attributes"], probe_spec(p.dataset), probe_cfg,
                        ProbeTraining(steps=p.probe_steps, seed=p.seed), log=log)
    stage_b, stage_a = load_stage("b", p.profile), load_stage("a", p.profile)
    decoder_guidance = sampling_of(b_run.checkpoints / "stage_b").get("guidance", 0.0)
    images = {"real": test["image"]}
    for name, task in tasks.items():
        pipe = Pipeline.from_networks(
            stage_c=EpsOutput(task.stage_c, task.diffusion.target, task.diffusion.schedule), stage_b=stage_b,
            stage_a=stage_a, text=text.encoder, compressor=compressor, resolution=p.resolution, scaling=task.scaling,
            shift=sc.noise_shift, prior_guidance=p.guidance or 0.0, decoder_guidance=decoder_guidance,
            decoder_text=text.encoder.with_layer("last"))  # Stage B trained on the last layer
        sampler = gens.pipeline_generator(pipe, p.resolution, p.prior_steps, p.decoder_steps, seed=p.seed,
                                          per_prompt=True)
        t1 = time.time()
        images[name] = gens.generate(sampler, prompts, batch_size=16, size=p.resolution)
        log(f"sampled {len(prompts)} prompts with {ARMS[name].label} in {time.time() - t1:.1f} s")
    extractor = ProbeExtractor(probe)
    real = extract(extractor, reference)
    features, quality, checks, chance = {}, {}, {}, {}
    shuffled = chance_truths(truths, p.seed)
    for name, imgs in images.items():
        composition = compositional_accuracy(probe, imgs, truths, p.n_boot, p.seed)
        checks[name] = {**composition.checks, "attributes": attribute_share(composition.checks)}
        chance[name] = attribute_share(compositional_accuracy(probe, imgs, shuffled, p.n_boot, p.seed).checks)
        features[name] = extract(extractor, imgs)
        quality[name] = {**composition.accuracy,
                         "attributes": mean_ci(checks[name]["attributes"], n_boot=p.n_boot, seed=p.seed, scale=100.0),
                         "attributes_chance": mean_ci(chance[name], n_boot=p.n_boot, seed=p.seed, scale=100.0),
                         "KID_tiny": kid(real, features[name], n_boot=p.n_boot, seed=p.seed)}
    paired = paired_table(checks, features, real, p.n_boot, p.seed)
    claims = measured_objective_claims(unstable, {k: v["attributes"] for k, v in checks.items()}, chance, p.n_boot,
                                       p.seed, f"{p.steps} steps per arm, {p.stress_steps} per stress run, "
                                               f"{len(prompts)} prompts, seed {p.seed}")
    tables = {"training": training_table(histories, seconds, diverged),
              "noise_levels": noise_level_table(histories),
              "stress": stress_table(stress, stress_why, p.stress_steps),
              "quality": pd.DataFrame({_label(k): {m: str(e) for m, e in q.items()} for k, q in quality.items()}).T,
              "paired": paired[0], "claims": claims_table(claims)}
    metrics = {"claims": claims_records(claims), "steps": p.steps, "stress_steps": p.stress_steps,
               "stress_lr": stress_cfg.lr, "arms": {k: dataclasses.asdict(a) for k, a in ARMS.items()},
               "training": _records(tables["training"]), "stress": _records(tables["stress"]),
               "quality": {k: {m: e.value for m, e in q.items()} | {f"{m}_ci": [e.low, e.high] for m, e in q.items()}
                           for k, q in quality.items()},
               "paired": paired[1], "unstable_share": {k: _finite(100 * float(v.mean())) if len(v) else None
                                                       for k, v in unstable.items()},
               "spike_rule": {"factor": SPIKE_FACTOR, "window": SPIKE_WINDOW, "min_history": SPIKE_MIN_HISTORY,
                              "block": BLOCK},
               "stage_c_objective": {k: getattr(sc, k) for k in ("noise_shift", "t_sampler", "latent_scaling",
                                                                 "text_layer", "p_drop_text")},
               "train_seconds": seconds, "wall_seconds": time.time() - t0, "training_wall_seconds": train_seconds,
               "upstream": {"stage_b": f"04_stage_b/{b_run.run_id}"}, "n_prompts": len(prompts)}
    figures = {"noise_levels": save_figure(noise_level_figure(tables["noise_levels"]), run.figure("noise_levels")),
               "grad_norms": save_figure(grad_norm_figure(histories), run.figure("grad_norms")),
               "stress": save_figure(stress_figure(stress, p.stress_steps), run.figure("stress")),
               "samples": save_figure(image_grid([images[k][:8] for k in images], [_label(k) for k in images],
                                                 prompts[:8]), run.figure("samples"))}
    return ObjectiveResult(histories, stress, tables, metrics, claims, prompts, images, figures)


# ------------------------------------------------------------------------------------------- tables and figures

def _label(name: str) -> str:
    return ARMS[name].label if name in ARMS else "real (ground truth)"


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # metrics.json holds null, never NaN


def _records(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    return {str(i): {k: (_finite(v) if isinstance(v, float) else v) for k, v in row.items()}
            for i, row in df.iterrows()}


def _eps_mse(h: pd.DataFrame) -> pd.Series:
    """Per step, the eps-equivalent MSE over all rows of the batch."""
    return sum(h[f"tbin{b}_eps"] for b in range(T_BINS)) / sum(h[f"tbin{b}_n"] for b in range(T_BINS))


def training_table(histories: Mapping[str, pd.DataFrame], seconds: Mapping[str, float],
                   diverged: Mapping[str, str | None]) -> pd.DataFrame:
    rows = {}
    for name, h in histories.items():
        if not len(h):  # diverged at its first step
            rows[_label(name)] = {"arm": name, "steps": 0, "train seconds": seconds[name], "diverged": True}
            continue
        g, spikes = h["grad_norm"].to_numpy(), grad_spikes(h["grad_norm"])
        tail = h.iloc[-max(1, len(h) // 10):]  # the last tenth of training
        judged = max(0, len(h) - SPIKE_MIN_HISTORY)
        rows[_label(name)] = {"arm": name, "steps": len(h), "final loss (own units)": float(tail["loss"].mean()),
                              "final eps-MSE": float(_eps_mse(tail).mean()), "grad norm median": float(np.median(g)),
                              "grad norm max": float(g.max()), "spikes": int(spikes.sum()), "judged steps": judged,
                              "spike rate (%)": 100 * spikes.sum() / judged if judged else math.nan,
                              "train seconds": seconds[name], "diverged": bool(diverged[name])}
    return pd.DataFrame(rows).T


def _windows(steps: int) -> list[tuple[int, int]]:
    n = min(WINDOWS, steps)
    if n < 1:
        return []
    edges = [round(i * steps / n) for i in range(n + 1)]
    return [(edges[i] + 1, edges[i + 1]) for i in range(n)]


def noise_level_table(histories: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per arm, window of training and noise-level bin: the eps-equivalent MSE and the weighted loss (own units)."""
    rows = []
    for name, h in histories.items():
        for lo, hi in _windows(int(h["step"].max()) if len(h) else 0):
            w = h[(h["step"] >= lo) & (h["step"] <= hi)]
            for b in range(T_BINS):
                n = w[f"tbin{b}_n"].sum()
                rows.append({"arm": _label(name), "steps": f"{lo}-{hi}", "step": hi, "t_bin": b,
                             "t": f"[{b / T_BINS:.1f}, {(b + 1) / T_BINS:.1f})",
                             "eps_mse": w[f"tbin{b}_eps"].sum() / n if n else math.nan,
                             "loss": w[f"tbin{b}_loss"].sum() / n if n else math.nan})
    return pd.DataFrame(rows)


def stress_table(stress: Mapping[str, pd.DataFrame], why: Mapping[str, str | None], planned: int) -> pd.DataFrame:
    rows = {}
    for name, h in stress.items():
        g = h["grad_norm"].to_numpy() if len(h) else np.array([math.nan])
        tail = h.iloc[-max(1, len(h) // 10):]
        rows[_label(name)] = {"arm": name, "diverged": bool(why[name]), "steps reached": len(h), "planned": planned,
                              "final loss (own units)": float(tail["loss"].mean()) if len(h) else math.nan,
                              "final eps-MSE": float(_eps_mse(tail).mean()) if len(h) else math.nan,
                              "grad norm max": float(np.nanmax(g)) if np.isfinite(g).any() else math.nan,
                              "spikes": int(grad_spikes(g).sum()), "why it stopped": why[name] or ""}
    return pd.DataFrame(rows).T


def paired_table(checks: Mapping[str, Mapping[str, Tensor]], features: Mapping[str, Any], real: Any, n_boot: int,
                 seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Each arm against ``ab_p2`` on the same prompts: all-correct and cell IoU (points, ``ab_p2`` minus the arm)
    and KID_tiny (the arm's minus ``ab_p2``'s): positive favours ``ab_p2`` everywhere."""
    others = [k for k in ARMS if k != REFERENCE]
    n = max(n_boot, MIN_BOOT)
    kid_diffs, _ = paired_kid_difference(real, features[REFERENCE], [features[k] for k in others], n_boot=n,
                                         seed=seed)
    est = {k: {f"{m}_diff": paired_difference(100 * checks[REFERENCE][m], 100 * checks[k][m], n_boot=n, seed=seed)
               for m in ("attributes", "all_correct", "cell_iou")} | {"kid_diff": d} for k, d in zip(others, kid_diffs)}
    columns = {"attributes_diff": "Δ attribute share (points)", "all_correct_diff": "Δ all_correct (points)",
               "cell_iou_diff": "Δ cell_iou (points)",
               "kid_diff": "KID_tiny: arm minus A/B p2"}
    table = pd.DataFrame({f"A/B, p2 against {_label(k)}": {columns[m]: str(e) for m, e in q.items()}
                          for k, q in est.items()}).T
    numbers = {k: {m: e.value for m, e in q.items()} | {f"{m}_ci": [e.low, e.high] for m, e in q.items()}
               for k, q in est.items()}
    return table, numbers


def noise_level_figure(table: pd.DataFrame):
    arms = list(dict.fromkeys(table["arm"]))
    fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3), sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        d = table[table["arm"] == arm]
        windows = list(dict.fromkeys(d["steps"]))
        for i, w in enumerate(windows):
            e = d[d["steps"] == w]
            ax.plot(e["t_bin"], e["eps_mse"], marker="o", color=plt.cm.viridis(i / max(1, len(windows) - 1)),
                    label=f"steps {w}")
        ax.set(title=arm, xlabel="noise level t", yscale="log")
        ax.set_xticks(range(T_BINS), [f"{(b + 0.5) / T_BINS:.1f}" for b in range(T_BINS)])
    axes[0][0].set_ylabel("eps-equivalent MSE")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def grad_norm_figure(histories: Mapping[str, pd.DataFrame]):
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, h in histories.items():
        line, = ax.plot(h["step"], h["grad_norm"], lw=0.7, label=_label(name))
        spikes = grad_spikes(h["grad_norm"])
        ax.plot(h["step"][spikes], h["grad_norm"][spikes], "x", color=line.get_color(), ms=5)
    ax.set(xlabel="step", ylabel="gradient norm before clipping", yscale="log",
           title=f"Gradient norm per step (x: above {SPIKE_FACTOR:g}x the running median)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def stress_figure(stress: Mapping[str, pd.DataFrame], planned: int):
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for name, h in stress.items():
        if not len(h):
            continue
        line, = axes[0].plot(h["step"], _eps_mse(h), lw=0.8, label=_label(name))
        axes[1].plot(h["step"], h["grad_norm"], lw=0.8, color=line.get_color())
        if len(h) < planned:  # diverged: the last step it reached
            axes[0].plot(h["step"].iloc[-1], _eps_mse(h).iloc[-1], "X", color=line.get_color(), ms=9)
    axes[0].set(xlabel="step", ylabel="eps-equivalent MSE", yscale="log", title="Stress runs: loss (X: diverged)")
    axes[1].set(xlabel="step", ylabel="gradient norm (no clipping)", yscale="log", title="Stress runs: gradient norm")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_outputs(result: ObjectiveResult, run: Run) -> dict[str, Path]:
    """Tables (markdown + CSV) and metrics (the claims under ``"claims"``, for notebook 07) into the run folder."""
    written = {name: run.save_table(name, df, index=name not in ("noise_levels", "claims"))
               for name, df in result.tables.items()}
    run.save_metrics(result.metrics)
    return written
