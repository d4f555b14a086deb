"""Notebook 11 and ``wurst study create``: the human preference study of the paper's §4.2 (Figure 5).

``create_study`` renders every system's image once for held-out procedural prompts and writes the study
(``wurst_core.human.build``): the systems are

* ``wuerstchen``: the latest ``05_stage_c`` pipeline of the profile, else random weights (said so);
* ``baseline``: the first seed of the latest ``08_baseline`` run, left out (said so) when there is none;
* ``truth``: the ground-truth renders of the prompts; ``counterfactual``: renders of the prompt's scene with one
  attribute changed (``data.procedural.counterfactual``: position, shape, size or colour, in turn); ``shuffled``: the
  renders of other prompts (real-image quality, chance adherence);
* ``folder:PATH``: an image folder, one image per prompt in name order; ``pipeline:PATH``: a pipeline folder
  (``Pipeline.from_pretrained``).

Prompt sets, as the paper's two (Parti prompts and COCO): ``novel`` (held-out compositions never rendered for
training, the test split's even items) and ``seen`` (held-out scenes drawn as training scenes are, its odd items).
Attention checks put the ground truth against uniform noise.

The automated judges score every image when the study is made: the judge CLIP (``studies.evaluation.judge_for``, the
PickScore procedure) and the exact compositional judge. The latter needs each image's scene: it is exact for the
renders (their scenes are known), and images sampled from a model have no such judge here (a trained probe would
read them; ``07_evaluation`` trains one), which the study's notes say.

``run_preference`` (the notebook): with ``db`` it analyses an existing study; without, it creates one in the run
folder and lets simulated raters (``human.simulate``) fill it, so that Run All works without people. Every output
of a simulated study says so.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .. import params
from ..data import procedural
from ..data.stream import load_images
from ..data.transforms import to_tensor
from ..evaluation import generators as gens
from ..evaluation.oracle import attribute_scores
from ..evaluation.preference import pick_scores
from ..evaluation.probe import ProbeSpec, scene_checks
from ..human.analysis import Analysis, AnalysisSpec, analyse, load, truth_gap
from ..human.build import Prompt, SystemImages, build_study, folder_images
from ..human.design import DesignSpec, system_pairs
from ..human.figures import write_report
from ..human.simulate import RaterModel, parse_strengths, simulate_service
from ..human.store import Store
from ..params import param
from ..pipeline import Pipeline
from ..runs import Run
from .baseline import latest_baseline_run, load_trained_baseline
from .evaluation import EvaluationParams, judge_for
from .figures import image_grid, save_figure
from .sampling import SamplingParams, load_sampling_pipeline

PROMPT_SETS = ("novel", "seen")
KINDS = ("wuerstchen", "baseline", "truth", "counterfactual", "shuffled")
TRAINED = "truth,wuerstchen,baseline,counterfactual"
NAMES = {"wuerstchen": "Würstchen", "baseline": "Baseline LDM", "truth": "ground truth",
         "counterfactual": "one attribute changed", "shuffled": "other prompt's render"}


@dataclass(frozen=True)
class PreferenceParams:
    """Parameters of ``notebooks/11_preference.ipynb`` (and of ``wurst study create``); 0 / "" take the profile's."""

    profile: str = params.choice("tiny", *params.PROFILES)
    db: str = ""                    # study database to analyse ("": create one in the run folder and simulate raters)
    systems: str = ""               # kinds, folder:PATH or pipeline:PATH ("": the profile's, see profile_defaults)
    prompt_sets: str = param("novel,seen", item_choices=PROMPT_SETS)
    n_prompts: int = param(0, ge=1, le=5000)          # held-out prompts per prompt set
    pairs_per_prompt: int = param(0, ge=1, le=100)    # system pairs shown per prompt (at most all pairs)
    attention_share: float = param(0.1, ge=0, le=1)   # attention checks, as a share of the pair items
    repeat_share: float = param(0.1, ge=0, le=1)      # repeated pairs, as a share of the pair items
    resolution: int = param(64, ge=16, le=1024)       # the images' size in the study (px)
    prior_steps: int = param(0, ge=1, le=1000)        # Würstchen's Stage C steps
    decoder_steps: int = param(0, ge=1, le=1000)      # Würstchen's Stage B steps
    judge_steps: int = param(0, ge=1)                 # training steps of the tiny judge CLIP (as 07's)
    raters: int = param(0, ge=1, le=100000)           # simulated raters
    votes: int = param(0, ge=1, le=100000)            # mean comparisons per simulated rater
    votes_spread: float = param(0.8, ge=0, le=3)      # log-SD of comparisons per rater (0: all make `votes`)
    strengths: str = ""             # simulated Bradley–Terry strengths name:value,... ("": 0.5 apart in order)
    position_bias: float = param(0.3, ge=-5, le=5)    # simulated raters' mean extra log-strength of the left image
    tie: float = param(0.3, ge=0, le=10)              # simulated raters' median Davidson tie propensity
    heterogeneity: float = param(0.2, ge=0, le=5)     # SD of a simulated rater's own view of each system
    careless: float = param(0.05, ge=0, le=1)         # share of simulated raters who answer at random
    lapse: float = param(0.03, ge=0, le=1)            # an attentive simulated rater's chance of a random answer
    reference: str = ""             # Figure 5's system against the others ("": Würstchen, else the first)
    n_boot: int = param(0, ge=10, le=100000)          # rater-bootstrap resamples
    max_attention_fail: float = param(0.34, ge=0, le=1)  # raters failing more of their attention checks are excluded
    seed: int = param(0, ge=0)

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        # smoke: renders only (seconds); tiny and paper: the trained models (random weights where none is trained)
        steps = dict(pairs_per_prompt=3, prior_steps=60, decoder_steps=12)
        return {"smoke": dict(systems="truth,counterfactual,shuffled", n_prompts=4, pairs_per_prompt=3, prior_steps=2,
                              decoder_steps=2, judge_steps=10, raters=12, votes=16, n_boot=50),
                "tiny": dict(systems=TRAINED, n_prompts=24, judge_steps=300, raters=90, votes=40, n_boot=1000, **steps),
                "paper": dict(systems=TRAINED, n_prompts=200, judge_steps=20000, raters=90, votes=62, n_boot=1000,
                              **steps)}[profile]

    def check(self) -> None:
        system_specs(self.systems)

    def model(self, systems: list[str]) -> RaterModel:
        return RaterModel(parse_strengths(self.strengths, systems), position_bias=self.position_bias, tie=self.tie,
                          heterogeneity=self.heterogeneity, careless=self.careless, lapse=self.lapse)


def system_specs(text: str) -> list[tuple[str, str]]:
    """``(kind, argument)`` for each listed system: a kind of :data:`KINDS`, ``folder:PATH`` or ``pipeline:PATH``
    (``=`` works as well as ``:``)."""
    out = []
    for part in params.listed(text):
        kind, sep, arg = part.replace("=", ":", 1).partition(":")
        kind = kind.strip()
        if (kind in KINDS and not sep) or (kind in ("folder", "pipeline") and sep and arg.strip()):
            out.append((kind, arg.strip()))
        else:
            raise ValueError(f"parameter 'systems': {part!r} is not one of {list(KINDS)}, folder:PATH or "
                             "pipeline:PATH")
    if len(out) < 2:
        raise ValueError(f"parameter 'systems' must list at least two systems, got {text!r}")
    return out


# --------------------------------------------------------------------------------------------- the images

@dataclass
class Held:
    prompts: list[Prompt]
    truth: Tensor            # (P, 3, R, R) ground-truth renders
    scenes: list[dict[str, Any]]


def held_out_prompts(sets: list[str], n: int, resolution: int, seed: int) -> Held:
    """``n`` prompts per set from the procedural test split: ``novel`` its even items, ``seen`` its odd items."""
    test = load_images("procedural", 2 * n, resolution, seed, "test", progress=False)
    prompts, images, scenes = [], [], []
    for name in sets:
        for i in range(0 if name == "novel" else 1, 2 * n, 2):
            prompts.append(Prompt(test["caption"][i], name, test["attributes"][i]))
            images.append(test["image"][i])
            scenes.append(test["attributes"][i])
    return Held(prompts, torch.stack(images), scenes)


def counterfactual_scenes(scenes: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Each scene with one attribute changed, the kinds taken in turn (position, shape, size, colour)."""
    rng = random.Random(f"counterfactual:{seed}")
    kinds = procedural.COUNTERFACTUALS
    return [procedural.counterfactual(s, kinds[i % len(kinds)], rng) for i, s in enumerate(scenes)]


def exact_scores(rendered: list[dict[str, Any]], truths: list[dict[str, Any]]) -> list[float]:
    """The exact compositional judge on renders of known scenes: attribute checks passed against the prompt's."""
    spec = ProbeSpec.procedural()
    return attribute_scores([scene_checks(r, t, spec) for r, t in zip(rendered, truths)]).tolist()


def derangement(n: int, seed: int) -> list[int]:
    """Position ``i`` takes the item of another position (one random cycle through all ``n``)."""
    if n < 2:
        raise ValueError(f"the shuffled system needs at least two prompts, got {n}")
    order = list(range(n))
    random.Random(f"shuffled:{seed}").shuffle(order)
    out = [0] * n
    for k in range(n):
        out[order[k]] = order[(k + 1) % n]
    return out


@dataclass
class Rendered:
    name: str
    images: Tensor
    description: str
    attribute_scores: list[float] | None = None
    notes: list[str] = field(default_factory=list)


def _sampled(name: str, generator: gens.Generator, prompts: list[str], resolution: int, description: str,
             note: str) -> Rendered:
    images = gens.generate(generator, prompts, batch_size=16, size=resolution)
    return Rendered(name, images, description, None, [note])


def render_system(kind: str, arg: str, p: PreferenceParams, held: Held,
                  log: Callable[[str], None]) -> Rendered | None:
    """One system's images for the study's prompts (None: not available, with a note in the log)."""
    texts = [q.text for q in held.prompts]
    no_probe = "no exact compositional judge for sampled images (no trained probe read here)"
    if kind == "truth":
        return Rendered(NAMES[kind], held.truth, "ground-truth renders of the prompts", exact_scores(held.scenes,
                                                                                                     held.scenes))
    if kind == "counterfactual":
        scenes = counterfactual_scenes(held.scenes, p.seed)
        images = torch.stack([procedural.render(s, p.resolution) for s in scenes])
        return Rendered(NAMES[kind], images, "renders with one attribute changed (position, shape, size, colour)",
                        exact_scores(scenes, held.scenes))
    if kind == "shuffled":
        index = derangement(len(texts), p.seed)
        return Rendered(NAMES[kind], held.truth[index], "renders of other prompts (chance adherence)",
                        exact_scores([held.scenes[i] for i in index], held.scenes))
    if kind == "wuerstchen":
        pipe, info = load_sampling_pipeline(SamplingParams(profile=p.profile, seed=p.seed))
        size = int(info["size"])  # the pipeline's own size (random weights: 128 px), resized to the study's
        note = f"Würstchen: {info['weights']}"
        log(note)
        g = gens.pipeline_generator(pipe, size, p.prior_steps, p.decoder_steps, seed=p.seed, per_prompt=True)
        return _sampled(NAMES[kind], g, texts, p.resolution, str(info["weights"]), f"{note}; {no_probe}")
    if kind == "baseline":
        run = latest_baseline_run(p.profile)
        if run is None:
            log(f"Baseline LDM: no 08_baseline run on profile {p.profile!r}; left out of the study")
            return None
        baseline = load_trained_baseline(run)
        seed = min(baseline.unets)
        g = gens.per_prompt_generator(functools.partial(baseline.sample, seed), p.seed)
        note = f"Baseline LDM: 08_baseline/{run.run_id}, training seed {seed}"
        log(note)
        return _sampled(NAMES[kind], g, texts, p.resolution, note, f"{note}; {no_probe}")
    if kind == "folder":
        images = torch.stack([to_tensor(im) for im in folder_images(arg, len(texts))])
        images = torch.nn.functional.interpolate(images, size=(p.resolution, p.resolution), mode="bicubic",
                                                 antialias=True, align_corners=False).clamp(0, 1)
        return Rendered(f"folder {Path(arg).name}", images, f"image folder {arg}", None, [f"folder {arg}: {no_probe}"])
    pipe = Pipeline.from_pretrained(arg)  # kind == "pipeline"
    g = gens.pipeline_generator(pipe, p.resolution, p.prior_steps, p.decoder_steps, seed=p.seed, per_prompt=True)
    return _sampled(f"pipeline {Path(arg).name}", g, texts, p.resolution, f"pipeline folder {arg}",
                    f"pipeline {arg}: {no_probe}")


def create_study(p: PreferenceParams, db: str | Path, log: Callable[[str], None] = print) -> Store:
    """Render every system once, score the images with both judges, and write the study to ``db``."""
    sets = params.listed(p.prompt_sets)
    held = held_out_prompts(sets, p.n_prompts, p.resolution, p.seed)
    rendered = [r for kind, arg in system_specs(p.systems) if (r := render_system(kind, arg, p, held, log))]
    names = [r.name for r in rendered]
    if len(set(names)) != len(names):
        raise ValueError(f"two systems share a name: {names}")
    if len(rendered) < 2:
        raise ValueError(f"only {names} could be rendered; a study needs two systems")
    judge, judge_name = judge_for(EvaluationParams(profile=p.profile, judge_steps=p.judge_steps, seed=p.seed), log)
    texts = [q.text for q in held.prompts]
    scores = pick_scores(judge, texts, {r.name: r.images for r in rendered})
    pairs = min(p.pairs_per_prompt, len(system_pairs(names)))
    notes = [n for r in rendered for n in r.notes]
    if pairs < p.pairs_per_prompt:
        notes.append(f"pairs_per_prompt {p.pairs_per_prompt} cut to the {pairs} pairs of {len(names)} systems")
    noise = gens.noise_generator(p.resolution, p.seed)(texts)
    systems = [SystemImages(r.name, r.images, r.description, scores[r.name].tolist(), r.attribute_scores)
               for r in rendered]
    attention = (SystemImages("truth", held.truth, "ground-truth renders"),
                 SystemImages("noise", noise, "uniform noise"))
    info = {"profile": p.profile, "resolution": p.resolution, "prompt_sets": sets, "notes": notes,
            "judges": {"judge_score": f"{judge_name}: PickScore procedure (logit_scale x cosine)",
                       "attribute_score": "attribute checks passed, exact for renders of known scenes "
                                          "(ground truth, one attribute changed); none for sampled images"}}
    for note in notes:
        log(note)
    return build_study(db, held.prompts, systems, DesignSpec(pairs, p.attention_share, p.repeat_share, p.seed),
                       attention, info)


# -------------------------------------------------------------------------------------------- the notebook

@dataclass
class PreferenceResult:
    db: Path
    analysis: Analysis
    simulation: dict[str, Any] | None
    figures: dict[str, Path]
    recovered: dict[str, Any]

    def metrics(self) -> dict[str, Any]:
        where = "the run folder's study.sqlite" if self.simulation is not None else str(self.db)
        return {**self.analysis.metrics(), "recovered_gap": self.recovered, "db": where,
                "simulated_judgments": (self.simulation or {}).get("judgments")}


def reference_for(p: PreferenceParams, systems: list[str]) -> str:
    if p.reference:
        return p.reference
    return NAMES["wuerstchen"] if NAMES["wuerstchen"] in systems else systems[0]


def recovered_gap(analysis: Analysis) -> dict[str, Any]:
    """The strongest against the weakest system: the estimated Bradley–Terry gap, its interval and (simulated) the
    truth it should recover."""
    bt = analysis.bt
    top, bottom = bt.systems[int(np.argmax(bt.theta))], bt.systems[int(np.argmin(bt.theta))]
    gap, low, high = bt.gap(top, bottom)
    truth = truth_gap(analysis, top, bottom)
    return {"pair": f"{top} - {bottom}", "estimate": gap, "low": low, "high": high, "truth": truth,
            "covered": None if truth is None else bool(low <= truth <= high)}


def systems_figure(store: Store, n: int = 6):
    """What the raters compare: each system's images for the first ``n`` prompts of each set."""
    images, prompts = store.table("images"), store.table("prompts")
    shown = prompts.groupby("prompt_set").head(max(1, n // max(1, prompts["prompt_set"].nunique())))
    systems = store.table("systems").sort_values("position")
    rows, titles = [], []
    for system in systems[systems["role"] == "compared"]["name"]:
        digests = images[images["system"] == system].set_index("prompt_id").loc[shown["prompt_id"], "digest"]
        rows.append(torch.stack([to_tensor(_open(store, d)) for d in digests]))
        titles.append(system)
    return image_grid(rows, titles, [f"[{s}] {t}" for s, t in zip(shown["prompt_set"], shown["text"])])


def _open(store: Store, digest: str) -> Image.Image:
    with Image.open(store.images_dir / digest[:2] / f"{digest}.png") as im:
        return im.convert("RGB")


def run_preference(p: PreferenceParams, run: Run, progress: bool = False) -> PreferenceResult:
    """The notebook's study: an existing ``db`` analysed, or a new study created and simulated in the run folder."""
    def log(message: str) -> None:
        if progress:
            print(message, flush=True)
        run.logger.info(message)

    simulation = None
    if p.db:
        store = Store(p.db)
    else:
        store = create_study(p, run.dir / "study.sqlite", log)
        systems = store.meta()["systems"]
        simulation = simulate_service(store, p.model(systems), p.raters, p.votes, p.votes_spread, p.seed)
        log(f"simulated {simulation['judgments']} judgments of {p.raters} raters")
    data = load(store)
    analysis = analyse(data, AnalysisSpec(reference_for(p, data.systems), p.n_boot, p.max_attention_fail,
                                          seed=p.seed))
    written = write_report(analysis, run.dir)
    figures = {k: v for k, v in written.items() if k in ("figure5", "bradley_terry", "data_quality",
                                                         "judge_agreement")}
    figures["systems"] = save_figure(systems_figure(store), run.figure("systems"))
    store.export_csv(run.dir / "csv")
    return PreferenceResult(store.path, analysis, simulation, figures, recovered_gap(analysis))


__all__ = ["PreferenceParams", "PreferenceResult", "create_study", "run_preference", "system_specs"]
