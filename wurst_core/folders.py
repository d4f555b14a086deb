"""Pipeline folders on disk: where each network and text encoder lives, in our layout (``Pipeline.save``) and in
diffusers' combined and split pipelines, and loading the text encoders stored there."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .text import HFCLIPTextEncoder, TextEncoder, TinyClipConfig, register_tiny_clip

# where each network lives in a folder, by layout: ours (save), diffusers' combined and split pipelines
# where each network lives in a folder, by layout: ours (save), diffusers' combined and split pipelines
SUBFOLDERS = {"c": ("stage_c", "prior_prior", "prior"), "b": ("stage_b", "decoder"), "a": ("stage_a", "vqgan"),
               "semantic": ("semantic",)}


def locate_networks(root: Path) -> dict[str, Path]:
    """stage -> checkpoint folder or file inside ``root`` (see ``Pipeline.from_pretrained``)."""
    found: dict[str, Path] = {}
    for stage, names in SUBFOLDERS.items():
        for name in names:
            if (root / name / "model.json").is_file() or (root / name / "config.json").is_file():
                found[stage] = root / name
                break
    for stage, pattern in (("c", "*stage_c*.pt"), ("b", "*stage_b*.pt"), ("a", "*vqgan*.pt")):
        files = sorted(root.glob(pattern))
        if stage in found or not files:
            continue
        if stage == "c" and len(files) > 1:
            files = [f for f in files if "interpolation" in f.name] or files
        if len(files) > 1:
            raise ValueError(f"{root}: several {pattern} files {[f.name for f in files]}; keep one")
        found[stage] = files[0]
    if "semantic" not in found and found.get("b", Path()).suffix == ".pt":
        found["semantic"] = found["b"]  # the released Stage B file also holds 'effnet_state_dict'
    return found


def load_text_encoders(root: Path, device: str | torch.device,
                        layers: dict[str, str] | None = None) -> dict[str, Any]:
    """Text encoders stored in a checkpoint folder: transformers CLIP folders (diffusers' names) or open_clip
    checkpoints written by ``wurst_core.text`` (``text_encoder/`` then serves both stages). ``layers``: the hidden
    states each stage reads ({"prior": "penultimate", ...}, from ``pipeline.json``; default "last")."""
    layers = layers or {}
    out: dict[str, Any] = {}
    for stage, model_dir, tok_dir in (("prior", "prior_text_encoder", "prior_tokenizer"),
                                      ("decoder", "text_encoder", "tokenizer")):
        if (root / model_dir / "config.json").is_file() and (root / tok_dir).is_dir():
            from transformers import CLIPTextModel, CLIPTokenizer  # optional: only diffusers-style folders need it

            model = CLIPTextModel.from_pretrained(root / model_dir).to(device).eval()
            out[stage] = HFCLIPTextEncoder(CLIPTokenizer.from_pretrained(root / tok_dir), model,
                                           layer=layers.get(stage, "last"))
    loaded: dict[Path, Any] = {}  # one shared text_encoder/ is loaded once and serves both stages
    for stage, names in (("prior", ("prior_text_encoder", "text_encoder")),
                         ("decoder", ("decoder_text_encoder", "text_encoder"))):
        folder = next((root / n for n in names if (root / n / "model.json").is_file()), None)
        if stage not in out and folder is not None:
            if folder not in loaded:
                loaded[folder] = load_open_clip_text(folder, device)
            out[stage] = loaded[folder].with_layer(layers.get(stage, "last"))
    return out


def load_open_clip_text(folder: Path, device: str | torch.device) -> Any:
    meta = json.loads((folder / "model.json").read_text())
    if "tiny_clip" not in meta:
        raise ValueError(f"{folder / 'model.json'} is not a wurst_core.text checkpoint (no 'tiny_clip' entry)")
    name = register_tiny_clip(TinyClipConfig(**meta["tiny_clip"]))
    return TextEncoder.from_open_clip(name, folder / "model.safetensors", device=device)
