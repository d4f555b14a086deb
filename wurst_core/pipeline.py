"""The text-to-image pipeline: text -> Stage C -> Stage B -> Stage A (paper §3.3, Figure 2).

1. Stage C samples the Semantic Compressor latent (B, 16, ceil(H/42.67), ceil(W/42.67)) from noise with DDPM,
   tau_C = 60 steps and classifier-free guidance w = 4 (paper §4; the released 29-step schedule is available:
   docs/reference.md#released-sampling-settings). With the v2 data scaling Stage C works on ``(f + 1)/42`` and its
   output is mapped back with ``x*42 - 1`` (docs/reference.md#stage-c-latent-scaling).
2. Stage B samples the Stage A latent (B, 4, int(h*10.67), int(w*10.67)) conditioned on that map and on text,
   tau_B = 12 steps. The paper (§4) uses w = 4 for Stage B; the released pipeline uses 0 (no guidance). Both work:
   ``decoder_guidance=4.0`` or ``0.0`` (the default, as released; a saved pipeline carries its own default, the
   tiny workbench networks 2). The unconditional branch gets a zero map.
3. Stage A decodes ``latents * 0.3764`` without quantisation; images are clamped to [0, 1].

Random numbers are drawn in diffusers' order (Stage C start noise, one z per Stage C step, Stage B start noise,
one z per Stage B step) from the one ``generator``, so the same seed gives diffusers' image
(docs/reference.md#random-number-order). Unlike diffusers' combined pipeline, batches of different prompts work.
The output side is ``4*int(ceil(H/42.67)*10.67)`` (1024 -> 1024, 1536 -> 1536, 512 -> 512, 128 -> 128).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .adapters import PreviewCallback, preview_hooks
from .diffusion import CosineSchedule, diffuse
from .diffusion.samplers import RNG, make_timesteps, randn, sample
from .folders import SUBFOLDERS, load_text_encoders, locate_networks
from .io import atomic_write, write_json
from .models.previewer import load_previewer, save_previewer
from .models.semantic import LATENT_SCALINGS, LatentScaling, preprocess
from .sizes import (LATENT_DIM_SCALE, RESOLUTION_MULTIPLE, check_memory, check_sampling_args, estimate_memory,
                    plan_sizes, stage_b_size, stage_c_size)
from .training import lora
from .weights import FLOAT16_REFUSED, CheckpointError, check_dtype, load_model, save_model

STAGE_C_SCALINGS = LATENT_SCALINGS

Prompts = str | Sequence[str] | None
StageCallback = Callable[[str, int, Tensor, Tensor], Any]  # (stage "c" | "b", step, t, latents)


def _prompt_list(prompts: Prompts, name: str) -> list[str] | None:
    if prompts is None:
        return None
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a string or a non-empty list of strings, got {prompts!r}")
    return prompts


def _config_int(model: nn.Module, field: str) -> int:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, field):
        raise TypeError(f"{type(model).__name__} has no .config.{field}; pass a wurst_core model (load_model)")
    return int(getattr(cfg, field))


class Pipeline:
    """Würstchen v2 text-to-image sampling over the networks ``wurst_core.load_model`` returns.

    Text encoders are callables ``encoder(prompts) -> obj with .tokens (B, 77, width)`` (``wurst_core.text``);
    they are optional when embeddings are passed instead of prompts. ``semantic_compressor`` is only needed for
    ``reconstruct`` and ``variations``. ``stage_c_scaling``: the data space Stage C was trained on, undone before
    Stage B: "v2" = ``(f + 1)/42`` (the released prior; samples map back with ``x*42 - 1``), "std" =
    ``(f - stage_c_mean)/stage_c_std``, "none" = the raw compressor output (``wurst_core.training.StageCTask``).
    ``stage_c_shift``: the logSNR shift of Stage C's training t (1 = the released prior); Stage C then samples on the
    shifted schedule (uniform steps in shifted time, as StableCascade's GDF samples with its training schedule).
    ``prior_guidance`` / ``decoder_guidance``: the Stage C / Stage B guidance a call uses unless it passes its own
    (released: 4 and 0; the tiny workbench networks: 2 and 2, see ``studies.stage_b`` / ``studies.stage_c``).
    ``resolution_multiple`` / ``latent_dim_scale``: image pixels per Stage C latent pixel and Stage B per Stage C
    latent pixel (released: 42.67 and 10.67; networks trained here at other compression ratios set their own).
    ``compressor_size``: the compressor's input size (longer side) in ``reconstruct``/``variations``, as Stage B
    was trained (1024 -> 768, docs/reference.md#compressor-input-size); None: the compressor's own ``encode`` rule
    (``config.image_size``).
    ``autocast`` (default: on for CUDA and for bfloat16 networks): run the networks in bf16 autocast; the sampler
    stays in float32. Networks in float16 are refused (``weights.FLOAT16_REFUSED``): use bfloat16 or float32.
    ``previewer``: a ``models.previewer.Previewer`` for the previews of ``__call__(preview=...)``; saved in
    ``previewer/``. ``load_adapter``: a LoRA adapter for Stage C (``training.lora``), at a scale, merged or not.
    """

    def __init__(self, stage_c: nn.Module, stage_b: nn.Module, stage_a: nn.Module,
                 prior_text_encoder: Callable[[list[str]], Any] | None = None,
                 decoder_text_encoder: Callable[[list[str]], Any] | None = None, *,
                 semantic_compressor: nn.Module | None = None, stage_c_scaling: str = "v2",
                 stage_c_mean: float = 0.0, stage_c_std: float = 1.0, stage_c_shift: float = 1.0,
                 prior_guidance: float = 4.0, decoder_guidance: float = 0.0, resolution_multiple: float = RESOLUTION_MULTIPLE, latent_dim_scale: float = LATENT_DIM_SCALE,
                 compressor_size: int | None = None, autocast: bool | None = None,
                 previewer: nn.Module | None = None) -> None:
        if resolution_multiple <= 0 or latent_dim_scale <= 0 or stage_c_std <= 0 or stage_c_shift <= 0:
            raise ValueError("resolution_multiple, latent_dim_scale, stage_c_std and stage_c_shift must be > 0")
        self.stage_c, self.stage_b, self.stage_a = stage_c, stage_b, stage_a
        self.prior_text_encoder, self.decoder_text_encoder = prior_text_encoder, decoder_text_encoder
        self.semantic_compressor = semantic_compressor
        self.latent_scaling = LatentScaling(stage_c_scaling, stage_c_mean, stage_c_std)
        self.stage_c_schedule = CosineSchedule(shift=stage_c_shift)  # Stage C samples on the schedule it trained on
        self.prior_guidance, self.decoder_guidance = prior_guidance, decoder_guidance
        self.resolution_multiple, self.latent_dim_scale = resolution_multiple, latent_dim_scale
        self.compressor_size = compressor_size
        self.autocast, self.previewer = autocast, previewer
        self._check_dtypes()
        for m in self._modules():
            m.eval()

    @classmethod
    def from_networks(cls, *, stage_c: nn.Module | None, stage_b: nn.Module, stage_a: nn.Module, text: nn.Module,
                      compressor: nn.Module, resolution: int, scaling: LatentScaling = LatentScaling(),
                      shift: float = 1.0, prior_guidance: float = 4.0, decoder_guidance: float = 0.0,
                      decoder_text: nn.Module | None = None) -> "Pipeline":
        """A pipeline over networks trained here, whose compression ratios follow from the networks themselves (e.g.
        64 px images, 4 x 4 compressor latents, 16 x 16 Stage A latents) instead of the released 42.67 / 10.67.
        ``text`` serves Stage C, and Stage B too unless ``decoder_text`` is given."""
        sc_size = compressor.config.image_size
        c_side = compressor(torch.zeros(1, 3, sc_size, sc_size)).shape[-1]
        b_side = resolution // stage_a.config.downscale
        return cls(stage_c, stage_b, stage_a, text, decoder_text or text, semantic_compressor=compressor,
                   stage_c_scaling=scaling.kind, stage_c_mean=scaling.mean, stage_c_std=scaling.std,
                   stage_c_shift=shift, prior_guidance=prior_guidance, decoder_guidance=decoder_guidance,
                   resolution_multiple=resolution / c_side, latent_dim_scale=b_side / c_side, compressor_size=sc_size)

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, prior_text_encoder: Any = None,
                        decoder_text_encoder: Any = None, **settings: Any) -> "Pipeline":
        """Load every network of a folder with ``wurst_core.load_model``. Layouts:

        - ours (``Pipeline.save``): ``stage_c/ stage_b/ stage_a/ [semantic/]`` (model.json + model.safetensors)
          and ``pipeline.json`` (the Stage C scaling);
        - diffusers: a combined pipeline (``prior_prior/ decoder/ vqgan/`` + ``prior_text_encoder/ prior_tokenizer/
          text_encoder/ tokenizer/``) or ``prior/`` + ``decoder/`` + ``vqgan/``;
        - the released ``.pt`` files side by side: ``model_v2_stage_c*.pt`` (the ``finetune_interpolation`` one, the
          recommended prior, when both are there), ``model_v2_stage_b.pt`` (with the Semantic Compressor),
          ``vqgan_f4_v1_500k.pt``.

        Text encoders come from ``[prior_]text_encoder/`` (transformers CLIP + tokenizer, or a ``wurst_core.text``
        open_clip checkpoint; ours: ``text_encoder/`` serves both stages) unless passed; without them, pass text
        embeddings to the pipeline. ``settings`` override ``pipeline.json`` (``stage_c_scaling``, ``autocast`` ...).
        """
        dtype = check_dtype(dtype)
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder of Würstchen checkpoints")
        found = locate_networks(root)
        missing = [s for s in ("c", "b", "a") if s not in found]
        if missing:
            raise FileNotFoundError(f"{root}: no checkpoint for stage(s) {missing}; expected subfolders "
                                    f"{[SUBFOLDERS[s][0] for s in missing]}, a diffusers pipeline, or the released "
                                    f".pt files (model_v2_stage_c*.pt, model_v2_stage_b.pt, vqgan_f4_v1_500k.pt)")
        nets = {s: load_model(p, s, device=device, dtype=dtype) for s, p in found.items() if s != "semantic"}
        semantic = None
        if "semantic" in found:
            try:
                semantic = load_model(found["semantic"], "semantic", device=device, dtype=dtype)
            except CheckpointError:
                if found["semantic"].is_dir():
                    raise
                # a Stage B .pt without 'effnet_state_dict': the compressor is optional (reconstruct, variations)
        config = json.loads((root / "pipeline.json").read_text()) if (root / "pipeline.json").is_file() else {}
        texts = load_text_encoders(root, device, config.pop("text_layers", {}))
        if (root / "previewer" / "model.json").is_file():
            settings.setdefault("previewer", load_previewer(root / "previewer", device))
        return cls(nets["c"], nets["b"], nets["a"], prior_text_encoder or texts.get("prior"),
                   decoder_text_encoder or texts.get("decoder"), semantic_compressor=semantic,
                   **{**config, **settings})

    def save(self, directory: str | os.PathLike, text_encoder_dir: str | os.PathLike | None = None) -> Path:
        """Write the networks in our format (``stage_c/ stage_b/ stage_a/ [semantic/]``) and ``pipeline.json``
        (Stage C scaling, latent-size ratios); ``from_pretrained`` reads it back. Text encoders live elsewhere
        (``wurst_core.text``): ``text_encoder_dir``, a ``wurst_core.text`` checkpoint folder, is copied to
        ``text_encoder/`` so that the folder is self-contained (``wurst generate --weights``)."""
        directory = Path(directory)
        parts = {"c": self.stage_c, "b": self.stage_b, "a": self.stage_a, "semantic": self.semantic_compressor}
        for stage, model in parts.items():
            if model is not None:
                save_model(model, directory / SUBFOLDERS[stage][0])
        if self.previewer is not None:
            save_previewer(self.previewer, directory / "previewer")
        if text_encoder_dir is not None:
            source = Path(text_encoder_dir)
            for name in ("model.safetensors", "model.json"):
                if not (source / name).is_file():
                    raise FileNotFoundError(f"{source} is not a wurst_core.text checkpoint folder (no {name})")
            for name in ("model.safetensors", "model.json"):  # the JSON last: it marks a complete folder
                atomic_write(directory / "text_encoder" / name,
                             lambda tmp, src=source / name: shutil.copyfile(src, tmp))
        # which hidden states each stage reads (text.TextEncoder.layer): one text_encoder/ can serve both stages
        layers = {stage: enc.layer for stage, enc in (("prior", self.prior_text_encoder),
                                                      ("decoder", self.decoder_text_encoder))
                  if isinstance(getattr(enc, "layer", None), str)}
        write_json(directory / "pipeline.json", {
            "text_layers": layers, "stage_c_scaling": self.latent_scaling.kind,
            "stage_c_mean": self.latent_scaling.mean, "stage_c_std": self.latent_scaling.std,
            "stage_c_shift": self.stage_c_schedule.shift,
            "prior_guidance": self.prior_guidance, "decoder_guidance": self.decoder_guidance,
            "resolution_multiple": self.resolution_multiple, "latent_dim_scale": self.latent_dim_scale,
            "compressor_size": self.compressor_size})
        return directory

    # ---------------------------------------------------------------- plumbing
    def _modules(self) -> list[nn.Module]:
        parts = [self.stage_c, self.stage_b, self.stage_a, self.semantic_compressor,
                 self.prior_text_encoder, self.decoder_text_encoder, self.previewer]
        return [m for m in parts if isinstance(m, nn.Module)]

    @property
    def device(self) -> torch.device:
        # stage_c may be None in a reconstruction-only pipeline (Stage B training reports)
        p = next((q for m in self._modules() for q in m.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: torch.device | str | torch.dtype | None = None,
           dtype: torch.dtype | str | None = None) -> "Pipeline":
        """Move every module to ``device``; ``dtype`` (bfloat16 or float32; also ``pipe.to(torch.bfloat16)``) casts
        the networks, not the text encoders. float16 is refused (NaNs, black images)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        dtype = check_dtype(dtype)
        for m in self._modules() if device is not None else []:
            m.to(device)
        for m in self._networks() if dtype is not None else []:
            m.to(dtype=dtype)
        return self

    def _networks(self) -> list[nn.Module]:
        parts = [self.stage_c, self.stage_b, self.stage_a, self.semantic_compressor]
        return [m for m in parts if isinstance(m, nn.Module)]

    def _network_dtypes(self) -> set[torch.dtype]:
        return {q.dtype for m in self._networks() for q in m.parameters() if q.is_floating_point()}

    def _check_dtypes(self) -> None:
        if torch.float16 in self._network_dtypes():
            raise ValueError(f"this pipeline's networks are float16: {FLOAT16_REFUSED}")

    def load_adapter(self, directory: str | os.PathLike, scale: float = 1.0, merge: bool = False) -> "Pipeline":
        """Inject the LoRA adapter of ``directory`` (``training.lora.save_adapter``; notebook 12) into Stage C at
        ``scale``; ``merge=True`` folds it into the weights (the same outputs at the base network's cost)."""
        lora.load_adapter(self.stage_c, directory, scale)
        self.stage_c.eval()  # the adapter's dropout layers are new modules
        if merge:
            lora.merge(self.stage_c)
        return self

    def set_adapter_scale(self, scale: float) -> None:
        """The loaded adapter's weight (1: as trained, 0: the base Stage C)."""
        lora.set_scale(self.stage_c, scale)

    def merge_adapter(self, merged: bool = True) -> None:
        """Fold the adapter into Stage C's weights (``merged=False``: take it out again)."""
        (lora.merge if merged else lora.unmerge)(self.stage_c)

    def _amp(self) -> contextlib.AbstractContextManager:
        # bfloat16 networks take the sampler's float32 inputs only under autocast
        default = self.device.type == "cuda" or torch.bfloat16 in self._network_dtypes()
        use = default if self.autocast is None else self.autocast
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()

    def _denoiser(self, model: nn.Module) -> Callable[..., Tensor]:
        def denoise(x: Tensor, r: Tensor, **cond: Tensor) -> Tensor:
            with self._amp():
                return model(x, r, **cond).float()
        return denoise

    # ---------------------------------------------------------------- text
    def encode_text(self, prompts: Prompts, stage: str = "prior") -> Tensor:
        """Text tokens (B, L, width) of ``prompts`` from the prior ("prior") or decoder ("decoder") text encoder."""
        if stage not in ("prior", "decoder"):
            raise ValueError(f"stage must be 'prior' or 'decoder', got {stage!r}")
        encoder = self.prior_text_encoder if stage == "prior" else self.decoder_text_encoder
        if encoder is None:
            raise ValueError(f"this pipeline has no {stage}_text_encoder: pass {stage}_text_embeds "
                             f"(and {stage}_negative_text_embeds for guidance > 1) instead of prompts")
        prompts = _prompt_list(prompts, "prompts")
        with torch.no_grad():
            out = encoder(prompts)
        tokens = getattr(out, "tokens", out)
        if not isinstance(tokens, Tensor) or tokens.dim() != 3 or tokens.shape[0] != len(prompts):
            raise TypeError(f"the {stage} text encoder must return (B={len(prompts)}, L, width) tokens, "
                            f"got {getattr(tokens, 'shape', type(tokens))}")
        return tokens.to(self.device, torch.float32)

    def _text_pair(self, stage: str, prompts: list[str] | None, negatives: list[str] | None,
                   embeds: Tensor | None, neg_embeds: Tensor | None, batch: int,
                   guidance: float) -> tuple[Tensor, Tensor | None]:
        """Conditional and (for guidance > 1) unconditional tokens for ``batch`` prompts."""
        if embeds is None:
            embeds = self.encode_text(prompts if prompts is not None else [""] * batch, stage)
        embeds = self._check_embeds(f"{stage}_text_embeds", embeds, batch)
        if guidance <= 1:
            return embeds, None
        if neg_embeds is None:
            neg = negatives if negatives is not None else [""] * batch
            neg_embeds = self.encode_text(neg, stage)
        neg_embeds = self._check_embeds(f"{stage}_negative_text_embeds", neg_embeds, batch)
        if neg_embeds.shape != embeds.shape:
            raise ValueError(f"{stage} negative text embeddings {tuple(neg_embeds.shape)} must be shaped like the "
                             f"text embeddings {tuple(embeds.shape)}")
        return embeds, neg_embeds

    def _check_embeds(self, name: str, e: Tensor, batch: int) -> Tensor:
        if not isinstance(e, Tensor) or e.dim() != 3:
            raise ValueError(f"{name} must be a (B, L, width) tensor, got {getattr(e, 'shape', type(e))}")
        if e.shape[0] != batch:
            raise ValueError(f"{name} has batch {e.shape[0]}, expected {batch} (one row per prompt)")
        return e.to(self.device, torch.float32)

    # ---------------------------------------------------------------- the three stages
    @torch.no_grad()
    def sample_stage_c(self, text_embeds: Tensor, negative_text_embeds: Tensor | None = None, *,
                       height: int = 1024, width: int = 1024, steps: int = 60,
                       timesteps: Sequence[float] | Tensor | None = None, guidance: float = 4.0,
                       generator: RNG | None = None, callback: StageCallback | None = None,
                       progress: bool = False, sampler: str = "ddpm", start: Tensor | None = None,
                       preview: PreviewCallback | None = None, preview_every: int = 1) -> Tensor:
        """Stage C: text tokens (B, L, c_cond) -> image embeddings (B, 16, ceil(H/42.67), ceil(W/42.67)) in the
        RAW Semantic Compressor space (``unscale_stage_c``: ``x*42 - 1`` with the v2 scaling), ready for Stage B.
        ``start``: latents in Stage C's space at ``timesteps[0]`` instead of drawn noise (``resample``).
        ``preview``: as in ``__call__`` (``adapters.preview_hooks``)."""
        b = text_embeds.shape[0]
        shape = (b, _config_int(self.stage_c, "c_in"), *stage_c_size(height, width, self.resolution_multiple))
        denoise, step = self._denoiser(self.stage_c), (lambda i, t, x: callback("c", i, t, x)) if callback else None
        if preview is not None:
            show = self.previewer.preview if self.previewer is not None else (lambda f: f)
            denoise, step = preview_hooks(denoise, step, guidance, self.stage_c_schedule,
                                          lambda x0: show(self.unscale_stage_c(x0)), preview, preview_every)
        x = sample(denoise, shape if start is None else start, timesteps if timesteps is not None else steps,
                   {"text_tokens": text_embeds},
                   {"text_tokens": negative_text_embeds} if negative_text_embeds is not None else None,
                   guidance, sampler, generator=generator, progress=progress, device=self.device,
                   callback=step, schedule=self.stage_c_schedule)
        return self.unscale_stage_c(x)

    def scale_stage_c(self, embeds: Tensor) -> Tensor:
        """The raw Semantic Compressor output -> Stage C's data space (the inverse of ``unscale_stage_c``)."""
        return self.latent_scaling.scale(embeds)

    def unscale_stage_c(self, x: Tensor) -> Tensor:
        """Stage C's data space -> the raw Semantic Compressor output that Stage B is conditioned on."""
        return self.latent_scaling.unscale(x)

    @torch.no_grad()
    def sample_stage_b(self, image_embeds: Tensor, text_embeds: Tensor, negative_text_embeds: Tensor | None = None,
                       *, steps: int = 12, timesteps: Sequence[float] | Tensor | None = None,
                       guidance: float = 0.0, latent_size: tuple[int, int] | None = None,
                       generator: RNG | None = None, callback: StageCallback | None = None,
                       progress: bool = False, sampler: str = "ddpm") -> Tensor:
        """Stage B: image embeddings (B, 16, h, w, raw compressor space) + text tokens -> Stage A latents
        (B, 4, int(h*10.67), int(w*10.67)) or ``latent_size``. The unconditional branch (guidance > 1) gets the
        negative text and a zero image embedding (docs/reference.md#classifier-free-guidance)."""
        if image_embeds.dim() != 4 or image_embeds.shape[0] != text_embeds.shape[0]:
            raise ValueError(f"image_embeds {tuple(image_embeds.shape)} must be (B, 16, h, w) with the batch of "
                             f"text_embeds {tuple(text_embeds.shape)}")
        size = latent_size or stage_b_size(tuple(image_embeds.shape[-2:]), self.latent_dim_scale)
        multiple = getattr(getattr(self.stage_b, "config", None), "downscale", 1)
        if size[0] % multiple or size[1] % multiple:
            raise ValueError(f"Stage B latent size {size} is not a multiple of {multiple}, which this Stage B needs; "
                             f"choose another image height/width")
        image_embeds = image_embeds.to(self.device, torch.float32)
        cond = {"sc_latent": image_embeds, "text_tokens": text_embeds}
        uncond = None
        if negative_text_embeds is not None:
            uncond = {"sc_latent": torch.zeros_like(image_embeds), "text_tokens": negative_text_embeds}
        shape = (image_embeds.shape[0], _config_int(self.stage_b, "c_in"), *size)
        return sample(self._denoiser(self.stage_b), shape, timesteps if timesteps is not None else steps, cond,
                      uncond, guidance, sampler, generator=generator, progress=progress, device=self.device,
                      callback=(lambda i, t, x: callback("b", i, t, x)) if callback else None)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Stage A: latents -> images in [0, 1] (``decode`` multiplies by the scale factor, no quantisation)."""
        with self._amp():
            images = self.stage_a.decode(latents)
        return images.float().clamp(0, 1)

    # ---------------------------------------------------------------- public entry points
    @torch.no_grad()
    def __call__(self, prompts: Prompts = None, negative_prompts: Prompts = None, *,
                 prior_text_embeds: Tensor | None = None, prior_negative_text_embeds: Tensor | None = None,
                 decoder_text_embeds: Tensor | None = None, decoder_negative_text_embeds: Tensor | None = None,
                 height: int = 1024, width: int = 1024, prior_steps: int = 60,
                 prior_timesteps: Sequence[float] | Tensor | None = None, prior_guidance: float | None = None,
                 decoder_steps: int = 12, decoder_timesteps: Sequence[float] | Tensor | None = None,
                 decoder_guidance: float | None = None, num_images_per_prompt: int = 1,
                 generator: RNG | None = None, callback: StageCallback | None = None,
                 progress: bool = False, sampler: str = "ddpm", preview: PreviewCallback | None = None,
                 preview_every: int = 1) -> Tensor:
        """Text to images: float tensor (B * num_images_per_prompt, 3, H', W') in [0, 1].

        ``prompts``: a string or a list (different prompts are fine). ``negative_prompts``: one string or one per
        prompt, used by whichever stage has guidance > 1 (default: the empty prompt). Precomputed text
        embeddings (B, 77, width) replace the prompts of either stage; without prompts the decoder text defaults
        to the empty prompt (as diffusers). Use a CPU ``generator`` for results that match diffusers' on any device; a
        list of one generator per image draws each image's noise from its own generator (as diffusers).
        ``sampler``: "ddpm" (the paper's, diffusers') or "ddim" (deterministic), for both stages.
        ``prior_guidance`` / ``decoder_guidance``: None takes the pipeline's own (``Pipeline(...)``, ``pipeline.json``).
        ``preview(step, images)``: after every ``preview_every``-th Stage C step and the last, the previewer's images
        of Stage C's current prediction (raw compressor latents without a previewer); the images are unchanged.
        """
        prior_guidance = self.prior_guidance if prior_guidance is None else prior_guidance
        decoder_guidance = self.decoder_guidance if decoder_guidance is None else decoder_guidance
        prompts = _prompt_list(prompts, "prompts")
        negatives = _prompt_list(negative_prompts, "negative_prompts")
        if prompts is None and prior_text_embeds is None:
            raise ValueError("pass prompts or prior_text_embeds")
        batch = len(prompts) if prompts is not None else prior_text_embeds.shape[0]
        if negatives is not None and len(negatives) != batch:
            if len(negatives) != 1:
                raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts: pass one or one per prompt")
            negatives = negatives * batch
        check_sampling_args(height=height, width=width, prior_steps=prior_steps, decoder_steps=decoder_steps,
                            prior_guidance=prior_guidance, decoder_guidance=decoder_guidance,
                            num_images_per_prompt=num_images_per_prompt)
        for timesteps in (prior_timesteps, decoder_timesteps):
            if timesteps is not None:
                make_timesteps(timesteps)  # validate before any work
        self._check_dtypes()
        n = num_images_per_prompt
        # sizes and memory before any sampling: a size Stage B cannot take would otherwise fail after Stage C
        configs = {s: getattr(m, "config", None) for s, m in (("c", self.stage_c), ("b", self.stage_b),
                                                               ("a", self.stage_a))}
        plan = plan_sizes(height, width, configs, self.resolution_multiple, self.latent_dim_scale)
        check_memory(estimate_memory(plan, configs, batch * n, prior_guidance, decoder_guidance), self.device,
                     f"{height} x {width} px, {batch * n} image(s)")

        c_text, c_neg = self._text_pair("prior", prompts, negatives, prior_text_embeds, prior_negative_text_embeds,
                                        batch, prior_guidance)
        b_text, b_neg = self._text_pair("decoder", prompts, negatives, decoder_text_embeds,
                                        decoder_negative_text_embeds, batch, decoder_guidance)
        rep = (lambda e: e.repeat_interleave(n, dim=0) if e is not None else None)
        image_embeds = self.sample_stage_c(rep(c_text), rep(c_neg), height=height, width=width, steps=prior_steps,
                                           timesteps=prior_timesteps, guidance=prior_guidance, generator=generator,
                                           callback=callback, progress=progress, sampler=sampler, preview=preview,
                                           preview_every=preview_every)
        latents = self.sample_stage_b(image_embeds, rep(b_text), rep(b_neg), steps=decoder_steps,
                                      timesteps=decoder_timesteps, guidance=decoder_guidance, generator=generator,
                                      callback=callback, progress=progress, sampler=sampler)
        return self.decode(latents)

    def compressor_embeds(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images in [0, 1] -> raw Semantic Compressor map and the Stage B latent size of the same image."""
        if self.semantic_compressor is None:
            raise ValueError("this pipeline has no semantic_compressor (pass one to Pipeline(...) or load a "
                             "checkpoint folder that has one)")
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got {getattr(images, 'shape', type(images))}")
        f = getattr(getattr(self.stage_a, "config", None), "downscale", 4)
        h, w = images.shape[-2:]
        if h % f or w % f:
            raise ValueError(f"image height and width must be multiples of {f} (Stage A), got {h} x {w}")
        images = images.to(self.device, torch.float32)
        with self._amp():
            if self.compressor_size is None:
                embeds = self.semantic_compressor.encode(images).float()
            else:
                scale = self.compressor_size / max(h, w)
                sized = preprocess(images, (max(1, round(h * scale)), max(1, round(w * scale))))
                embeds = self.semantic_compressor(sized).float()
        if getattr(self.semantic_compressor.config, "v2_scaling", False):
            embeds = embeds * 42 - 1  # Stage B is conditioned on the raw compressor output
        return embeds, (h // f, w // f)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, prompts: Prompts = None, *, decoder_text_embeds: Tensor | None = None,
                    decoder_steps: int = 12, decoder_timesteps: Sequence[float] | Tensor | None = None,
                    decoder_guidance: float | None = None, generator: RNG | None = None,
                    progress: bool = False) -> Tensor:
        """Image -> Semantic Compressor -> Stage B -> Stage A (paper §3.1, Figure 2's training path): how much of
        the image survives the 42x compressed map. Same size out as in; text: the caption or the empty prompt.
        ``decoder_guidance``: None takes the pipeline's own."""
        decoder_guidance = self.decoder_guidance if decoder_guidance is None else decoder_guidance
        embeds, size = self.compressor_embeds(images)
        prompts = _prompt_list(prompts, "prompts")
        if prompts is not None and len(prompts) != embeds.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {embeds.shape[0]} images")
        text, neg = self._text_pair("decoder", prompts, None, decoder_text_embeds, None, embeds.shape[0],
                                    decoder_guidance)
        latents = self.sample_stage_b(embeds, text, neg, steps=decoder_steps, timesteps=decoder_timesteps,
                                      guidance=decoder_guidance, latent_size=size, generator=generator,
                                      progress=progress)
        return self.decode(latents)

    @torch.no_grad()
    def resample(self, images: Tensor, prompts: Prompts, *, strength: float = 0.6, prior_steps: int = 60,
                 prior_guidance: float | None = None, decoder_steps: int = 12, decoder_guidance: float | None = None,
                 generator: RNG | None = None, callback: StageCallback | None = None,
                 progress: bool = False) -> Tensor:
        """Image-conditioned generation (SDEdit, Meng et al. 2022) in Stage C's space: the image's compressor map is
        noised to ``t = strength`` on the prior's schedule and denoised with ``prompts`` from there
        (``round(prior_steps * strength)`` DDPM steps), then Stage B and Stage A as in ``__call__``. Strength 1 is
        text-to-image; near 0, ``reconstruct``. What survives a strength tells at which noise level the prior
        decides it (for the tiny prior: docs/findings.md#stage-c-where-layouts-are-decided).
        Random numbers: the noise of the start, then Stage C's and Stage B's steps, all from ``generator``."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        prior_guidance = self.prior_guidance if prior_guidance is None else prior_guidance
        decoder_guidance = self.decoder_guidance if decoder_guidance is None else decoder_guidance
        prompts = _prompt_list(prompts, "prompts")
        embeds, size = self.compressor_embeds(images)
        if prompts is None or len(prompts) != embeds.shape[0]:
            raise ValueError(f"pass one prompt per image ({embeds.shape[0]} images)")
        schedule = self.stage_c_schedule
        x0 = self.scale_stage_c(embeds)
        t = torch.full((x0.shape[0],), float(strength), device=x0.device)
        x = diffuse(x0, t, randn(x0.shape, generator, x0.device, x0.dtype), schedule)
        timesteps = torch.linspace(float(strength), 0.0, max(1, round(prior_steps * strength)) + 1)
        c_text, c_neg = self._text_pair("prior", prompts, None, None, None, len(prompts), prior_guidance)
        b_text, b_neg = self._text_pair("decoder", prompts, None, None, None, len(prompts), decoder_guidance)
        image_embeds = self.sample_stage_c(c_text, c_neg, timesteps=timesteps, guidance=prior_guidance,
                                           generator=generator, callback=callback, progress=progress, start=x)
        latents = self.sample_stage_b(image_embeds, b_text, b_neg, steps=decoder_steps, guidance=decoder_guidance,
                                      latent_size=size, generator=generator, callback=callback, progress=progress)
        return self.decode(latents)

    @torch.no_grad()
    def variations(self, images: Tensor, num_variations: int = 4, *, decoder_text_embeds: Tensor | None = None,
                   decoder_steps: int = 12, decoder_guidance: float | None = None,
                   generator: RNG | None = None, progress: bool = False) -> Tensor:
        """Image variation: the image's compressor map -> Stage B with the empty prompt, ``num_variations``
        different noises per image -> (B * num_variations, 3, H, W); variations of image i are rows
        ``i*num_variations ...``. What differs between them is what the 16-channel map does not pin down.
        ``decoder_text_embeds`` (1, L, width) replaces the encoded empty prompt when there is no text encoder."""
        if num_variations < 1:
            raise ValueError(f"num_variations must be >= 1, got {num_variations}")
        decoder_guidance = self.decoder_guidance if decoder_guidance is None else decoder_guidance
        embeds, size = self.compressor_embeds(images)
        embeds = embeds.repeat_interleave(num_variations, dim=0)
        if decoder_text_embeds is not None:
            if decoder_text_embeds.dim() != 3 or decoder_text_embeds.shape[0] != 1:
                raise ValueError(f"decoder_text_embeds must be (1, L, width), got {tuple(decoder_text_embeds.shape)}")
            decoder_text_embeds = decoder_text_embeds.expand(embeds.shape[0], -1, -1)
        text, neg = self._text_pair("decoder", None, None, decoder_text_embeds, None, embeds.shape[0],
                                    decoder_guidance)
        latents = self.sample_stage_b(embeds, text, neg, steps=decoder_steps, guidance=decoder_guidance,
                                      latent_size=size, generator=generator, progress=progress)
        return self.decode(latents)
