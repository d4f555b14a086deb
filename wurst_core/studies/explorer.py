"""Notebook 14: an interactive explorer of a trained pipeline in JupyterLab (ipywidgets).

Prompt, negative prompt, seed, a batch of seeds, steps and guidance per stage, the LoRA adapter's scale, and a
Generate button; while Stage C samples, the Previewer's images of its current prediction replace each other
(``Pipeline(preview=...)``), then the final images appear as a grid, one per seed (seed, seed + 1, ...; each image
from its own generator, so a seed gives the same image alone or in a batch). It runs on the latest trained pipeline
of the profile (``05_stage_c``) or a ``weights_dir``, with the latest ``12_finetune`` adapter and ``13_previewer``
Previewer when they exist. Every widget callback is a plain method: :meth:`Explorer.generate` is what the button
calls, so papermill and nbval run one generation without a browser, and the tests drive the widget from Python.
"""
from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import params
from ..data.transforms import to_pil
from ..models.previewer import load_previewer
from ..params import param
from ..pipeline import Pipeline
from ..runs import latest_run
from ..training.lora import read_adapter
from .figures import image_grid, save_figure
from .finetune import trained_pipeline


@dataclass(frozen=True)
class ExplorerParams:
    """Parameters of ``notebooks/14_explorer.ipynb`` (the widget's starting values); 0 takes the profile's value."""

    profile: str = params.choice("tiny", *params.PROFILES)
    weights_dir: str = ""     # Pipeline.from_pretrained folder ("": the latest 05_stage_c run of the profile)
    adapter: str = "latest"   # LoRA adapter folder, "latest" (the latest 12_finetune run's, if any) or "none"
    adapter_scale: float = param(1.0, ge=0, le=4)  # the adapter's weight (0: the base Stage C)
    previewer: str = "latest"  # Previewer folder, "latest" (the latest 13_previewer run's, if any) or "none"
    prompt: str = "a large cyan circle in the center on a black background"
    negative_prompt: str = ""
    seed: int = param(0, ge=0)
    n_seeds: int = param(0, ge=1, le=16)        # images in the batch, seeds seed .. seed + n_seeds - 1
    prior_steps: int = param(0, ge=1, le=1000)
    prior_guidance: float | None = param(None, ge=0)    # None: the pipeline's own
    decoder_steps: int = param(0, ge=1, le=1000)
    decoder_guidance: float | None = param(None, ge=0)  # None: the pipeline's own
    preview_every: int = param(0, ge=1, le=1000)  # a preview every this many Stage C steps
    size: int = param(0, ge=8, le=4096)           # image side in px (0: the profile's, tiny 64)
    generate: bool = True                         # run one generation when the notebook runs (papermill, nbval)

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        return {"smoke": dict(n_seeds=2, prior_steps=2, decoder_steps=2, preview_every=1, size=64),
                "tiny": dict(n_seeds=4, prior_steps=30, decoder_steps=12, preview_every=3, size=64),
                "paper": dict(n_seeds=4, prior_steps=60, decoder_steps=12, preview_every=5, size=1024)}[profile]


def grid_png(images: Tensor, tile: int = 128) -> bytes:
    """Images (N, 3, h, w) in [0, 1] side by side, each scaled (nearest) to ``tile`` px high, as PNG bytes."""
    h, w = images.shape[-2:]
    big = F.interpolate(images.float().clamp(0, 1), size=(tile, max(1, round(w * tile / h))), mode="nearest")
    buf = io.BytesIO()
    to_pil(torch.cat(list(big), dim=-1)).save(buf, format="PNG")
    return buf.getvalue()


def _find(kind: str, value: str, notebook: str, sub: str, profile: str) -> Path | None:
    if value == "none":
        return None
    if value != "latest":
        return Path(value)
    run = latest_run(notebook, profile)
    folder = run.checkpoints / sub if run is not None else None
    if folder is None or not folder.is_dir():
        print(f"no {kind} yet: run notebooks/{notebook}.ipynb to have one here", flush=True)
        return None
    return folder


def load_explorer_pipeline(p: ExplorerParams) -> tuple[Pipeline, dict[str, Any]]:
    """The pipeline to explore, with the adapter and the Previewer that ``p`` names, and what was loaded."""
    trained = trained_pipeline(p.profile, p.weights_dir)
    pipe, info = trained.pipe, {"weights": trained.source, "adapter": None, "previewer": None}
    adapter = _find("LoRA adapter", p.adapter, "12_finetune", "adapter", p.profile)
    if adapter is not None:
        try:
            pipe.load_adapter(adapter, scale=p.adapter_scale)
        except ValueError as e:
            if p.adapter != "latest":
                raise
            print(f"the latest adapter does not fit this Stage C, left out: {e}", flush=True)
        else:
            info["adapter"] = str(adapter)
            trained_on = read_adapter(adapter)[2].get("metadata", {}).get("weights")
            if trained_on and trained_on != trained.source:
                warnings.warn(f"the adapter was trained on {trained_on}, not on {trained.source}", stacklevel=2)
    folder = _find("Previewer", p.previewer, "13_previewer", "previewer", p.profile)
    if folder is not None:
        pipe.previewer = load_previewer(folder, pipe.device)
        info["previewer"] = str(folder)
    return pipe, info


class Explorer:
    """The widget (``.widget``) over ``pipe``; :meth:`generate` runs one generation with the widgets' values."""

    def __init__(self, pipe: Pipeline, p: ExplorerParams, info: dict[str, Any] | None = None) -> None:
        import ipywidgets as widgets  # the notebooks extra; the registry imports this module for its schema alone

        self.pipe, self.size, self.info = pipe, p.size, info or {}
        has_adapter = bool(self.info.get("adapter"))
        style, wide = {"description_width": "110px"}, widgets.Layout(width="420px")
        self.prompt = widgets.Textarea(value=p.prompt, description="prompt", style=style, layout=wide)
        self.negative = widgets.Text(value=p.negative_prompt, description="negative", style=style, layout=wide)
        self.seed = widgets.IntText(value=p.seed, description="seed", style=style)
        self.n_seeds = widgets.IntSlider(value=p.n_seeds, min=1, max=16, description="seeds (batch)", style=style)
        self.prior_steps = widgets.IntSlider(value=p.prior_steps, min=1, max=max(200, p.prior_steps),
                                             description="Stage C steps", style=style)
        self.prior_guidance = widgets.FloatSlider(
            value=pipe.prior_guidance if p.prior_guidance is None else p.prior_guidance, min=0, max=12, step=0.5,
            description="Stage C guidance", style=style)
        self.decoder_steps = widgets.IntSlider(value=p.decoder_steps, min=1, max=max(50, p.decoder_steps),
                                               description="Stage B steps", style=style)
        self.decoder_guidance = widgets.FloatSlider(
            value=pipe.decoder_guidance if p.decoder_guidance is None else p.decoder_guidance, min=0, max=12,
            step=0.5, description="Stage B guidance", style=style)
        self.adapter_scale = widgets.FloatSlider(value=p.adapter_scale if has_adapter else 0.0, min=0, max=2,
                                                 step=0.1, description="LoRA scale", style=style,
                                                 disabled=not has_adapter)
        self.preview_every = widgets.IntSlider(value=p.preview_every, min=1, max=max(20, p.preview_every),
                                               description="preview every", style=style,
                                               disabled=self.pipe.previewer is None)
        self.button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.button.on_click(self.generate)
        self.preview = widgets.Image(format="png")
        self.final = widgets.Image(format="png")
        self.status = widgets.HTML(value=self._loaded())
        controls = widgets.VBox([self.prompt, self.negative, self.seed, self.n_seeds, self.prior_steps,
                                 self.prior_guidance, self.decoder_steps, self.decoder_guidance, self.adapter_scale,
                                 self.preview_every, self.button])
        shown = widgets.VBox([widgets.HTML("<b>Stage C, through the Previewer</b>"), self.preview,
                              widgets.HTML("<b>final images</b>"), self.final, self.status])
        self.widget = widgets.HBox([controls, shown])
        self.previews: list[tuple[int, Tensor]] = []
        self.images: Tensor | None = None
        self.seconds = 0.0

    def _loaded(self) -> str:
        parts = [f"weights: {self.info.get('weights', '?')}", f"adapter: {self.info.get('adapter') or 'none'}",
                 f"previewer: {self.info.get('previewer') or 'none'}"]
        return "<small>" + "<br>".join(parts) + "</small>"

    def _show_preview(self, step: int, images: Tensor) -> None:
        self.previews.append((step, images.cpu()))
        self.preview.value = grid_png(images.cpu())
        self.status.value = f"Stage C step {step + 1} / {self.prior_steps.value}"

    def generate(self, _button: Any = None) -> Tensor:
        """One generation with the widgets' current values (what the Generate button runs); returns the images."""
        self.button.disabled, self.previews = True, []
        t0 = time.perf_counter()
        try:
            if self.info.get("adapter"):
                self.pipe.set_adapter_scale(self.adapter_scale.value)
            n = self.n_seeds.value
            gens = [torch.Generator().manual_seed(self.seed.value + i) for i in range(n)]
            preview = self._show_preview if self.pipe.previewer is not None else None
            self.images = self.pipe(self.prompt.value, self.negative.value or None, height=self.size,
                                    width=self.size, prior_steps=self.prior_steps.value,
                                    prior_guidance=self.prior_guidance.value, decoder_steps=self.decoder_steps.value,
                                    decoder_guidance=self.decoder_guidance.value, num_images_per_prompt=n,
                                    generator=gens, preview=preview, preview_every=self.preview_every.value).cpu()
        except Exception as e:  # shown in the widget, as a user would see it; raised for a caller from Python
            self.status.value = f"<span style='color:#b00'>error: {type(e).__name__}: {e}</span>"
            raise
        finally:
            self.button.disabled = False
        self.seconds = time.perf_counter() - t0
        self.final.value = grid_png(self.images)
        self.status.value = (f"{n} image(s), seeds {self.seed.value}-{self.seed.value + n - 1}, "
                             f"{self.seconds:.1f} s<br>{self._loaded()}")
        return self.images


def explorer_metrics(explorer: Explorer) -> dict[str, Any]:
    """What one generation did: seconds, images, previews shown, and what was loaded."""
    return {"seconds": explorer.seconds, "images": 0 if explorer.images is None else int(explorer.images.shape[0]),
            "previews": len(explorer.previews), **{k: v or "none" for k, v in explorer.info.items()},
            "settings": {"prompt": explorer.prompt.value, "seed": explorer.seed.value,
                         "prior_steps": explorer.prior_steps.value, "decoder_steps": explorer.decoder_steps.value}}


def generation_figure(explorer: Explorer, path: Path) -> Path:
    """The last generation as a figure: a row per preview (Stage C through the Previewer), then the final images."""
    if explorer.images is None:
        raise ValueError("nothing generated yet: call explorer.generate()")
    side = explorer.images.shape[-2:]
    rows = [F.interpolate(images, size=side, mode="nearest") for _, images in explorer.previews] + [explorer.images]
    titles = [f"preview, step {i + 1}" for i, _ in explorer.previews] + ["final"]
    seeds = [f"seed {explorer.seed.value + i}" for i in range(explorer.images.shape[0])]
    return save_figure(image_grid(rows, titles, seeds), path)
