"""Text to image from the command line, checked before anything runs: ``wurst generate``.

Every number is checked for its domain, every size for what the networks can take, and the run's memory is
estimated from the networks' configs against what the machine has, before weights are loaded or a file written.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torchvision.utils import save_image

from .folders import locate_networks
from .pipeline import Pipeline
from .sizes import (LATENT_DIM_SCALE, RESOLUTION_MULTIPLE, check_memory, check_sampling_args, estimate_memory,
                    format_bytes, plan_sizes)
from .weights import check_dtype, read_config


def _check_output(out: Path) -> None:
    """Refuse an output path that saving would reject, before any work: not an image suffix PIL writes, a folder,
    or a place that cannot be written."""
    if out.is_dir():
        raise IsADirectoryError(f"output {out} is a folder; give a file name such as {out / 'image.png'}")
    Image.init()
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"output {out}: unknown image suffix {out.suffix!r}; use .png or .jpg")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:  # the folder that will hold the new ones
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output {out}: cannot write into {parent}")


def _stored_configs(root: Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Before loading: each network's config where its checkpoint stores one (``weights.read_config``), the
    settings of ``pipeline.json`` and the bytes of the weight files (what loading will take, in float32 files)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of Würstchen checkpoints")
    found = locate_networks(root)
    configs = {}
    for stage, path in found.items():
        if stage in ("a", "b", "c"):
            got = read_config(path, stage)
            configs[stage] = got[1] if got else None
    settings = {}
    if (root / "pipeline.json").is_file():
        try:
            settings = json.loads((root / "pipeline.json").read_text())
        except ValueError as e:
            raise ValueError(f"{root / 'pipeline.json'}: not JSON ({e})") from e
    files: set[Path] = set()
    for p in list(found.values()) + [root / n for n in ("text_encoder", "prior_text_encoder", "decoder_text_encoder")]:
        if p.is_file():
            files.add(p)
        elif p.is_dir():
            files.update(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file())
    return configs, settings, sum(f.stat().st_size for f in files)


def generate(prompt: str | Sequence[str], weights_dir: str | os.PathLike, seed: int = 0,
             out: str | os.PathLike = "image.png", *, device: str | torch.device | None = None,
             dtype: torch.dtype | str | None = None, progress: bool = True, **kwargs: Any) -> Path:
    """``wurst generate``: load ``weights_dir`` (``Pipeline.from_pretrained``), sample with a CPU generator seeded
    with ``seed`` (same image on CPU and GPU, same as diffusers for the same weights) and save a PNG (a grid for
    several images). ``kwargs`` go to ``Pipeline.__call__`` (height, width, prior_steps, ...). ``dtype``: the
    networks' (bfloat16 or float32; float16 is refused).

    Everything that can be checked without the weights is checked before loading them: the numbers, the output
    path, the sizes (exactly as asked: a size the networks would round is refused with the nearest that work) and
    the memory estimate (configs read from the checkpoints where they are stored, plus the weight files' size)."""
    dtype = check_dtype(dtype)
    accepted = set(inspect.signature(Pipeline.__call__).parameters) - {"self", "generator", "prompts"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {unknown} (the generator comes from seed)")
    check_sampling_args(seed=seed, **{k: v for k, v in kwargs.items() if k in (
        "height", "width", "prior_steps", "decoder_steps", "prior_guidance", "decoder_guidance",
        "num_images_per_prompt")})
    out = Path(out)
    _check_output(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs, settings, weight_bytes = _stored_configs(Path(weights_dir))
    height, width = kwargs.get("height", 1024), kwargs.get("width", 1024)
    plan = plan_sizes(height, width, configs, settings.get("resolution_multiple", RESOLUTION_MULTIPLE),
                      settings.get("latent_dim_scale", LATENT_DIM_SCALE), exact=True)
    batch = (1 if isinstance(prompt, str) else len(prompt)) * kwargs.get("num_images_per_prompt", 1)
    guidance = [kwargs.get(k) if kwargs.get(k) is not None else settings.get(k, default)
                for k, default in (("prior_guidance", 4.0), ("decoder_guidance", 0.0))]
    check_memory(weight_bytes + estimate_memory(plan, configs, batch, *guidance), device,
                 f"{height} x {width} px, {batch} image(s) (weights {format_bytes(weight_bytes)})")
    pipe = Pipeline.from_pretrained(weights_dir, device=device, dtype=dtype)
    images = pipe(prompt, generator=torch.Generator().manual_seed(seed), progress=progress, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, out, nrow=max(1, math.ceil(math.sqrt(images.shape[0]))))
    return out
