"""Loading, saving and exporting the networks, in every released layout (docs/reference.md#checkpoint-formats,
docs/reference.md#key-conversion).

``load_model(path, stage=None)`` detects the format:

* **original ``.pt`` dicts** (dome272/wuerstchen): Stage A ``{'state_dict'}``; Stage B ``{'state_dict',
  'effnet_state_dict'}`` (the Semantic Compressor is stage ``"semantic"`` of the same file); Stage C
  ``{'ema_state_dict', ...}``; attention packed as ``nn.MultiheadAttention`` ``in_proj_*`` (our own layout). A
  bare state dict (``.pt``/``.safetensors``) in the official or the diffusers key layout works too.
* **diffusers folders** (``warp-ai/wuerstchen`` ``vqgan/`` and ``decoder/``, ``warp-ai/wuerstchen-prior``
  ``prior/``, or a pipeline folder holding them): ``config.json`` + ``diffusion_pytorch_model.safetensors``
  (or ``.bin``, or sharded), attention split into ``to_q/to_k/to_v`` and ``to_out.0``.
* **our checkpoints** (``save_model``): ``model.safetensors`` + ``model.json`` ``{"stage", "config"}``.
* **a hub id** (``"warp-ai/wuerstchen"``, ``"warp-ai/wuerstchen-prior"``, or ``"owner/repo/file.pt"``):
  downloaded with huggingface_hub when online; offline, the error says what to download and where.

Configs are read from the checkpoint where it stores them (diffusers, ours) and otherwise inferred from the
tensor shapes (the number of attention heads, which shapes cannot tell, comes from the size registry, else
width / 64 as in every released model); pass ``config=`` to override. A checkpoint that does not fit the network
raises ``CheckpointError`` listing the missing, unexpected and mis-shaped keys: there is no partial load. Where the
inferred architecture misfits (a damaged tensor among those it is read from), the registry's sizes are tried too
and the error names the keys that do not fit the closest one. Pickles are read with ``torch.load(weights_only=True)``
(``io.load_torch``); one holding other objects is refused. float16 is refused (``FLOAT16_REFUSED``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from . import io, paths
from .layouts import (STAGE_NAMES, CheckpointError, Tensors, _is_diffusers_layout,
                      config_from_dict, config_from_diffusers, config_to_diffusers, detect_stage,
                      diffusers_from_official, infer_config, official_from_diffusers)
from .models import NETWORKS, get_config, stage_of


PIPELINE_SUBFOLDERS = {"a": "vqgan", "b": "decoder", "c": "prior"}
COMBINED_PIPELINE_PRIOR = "prior_prior"  # WuerstchenCombinedPipeline's name for the prior
# where each released network lives on the hub (diffusers layout)
HUB_REPOS = {"warp-ai/wuerstchen": ("a", "b"), "warp-ai/wuerstchen-prior": ("c",)}




# --------------------------------------------------------------------------------------------- public API

def load_model(path: str | os.PathLike, stage: str | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, config: Any = None) -> nn.Module:
    """Load a network from a checkpoint file, a folder or a hub id; returns it in eval mode.

    ``stage``: "a", "b", "c" or "semantic"; needed only where a file or folder holds several networks (a Stage B
    ``.pt`` holds "b" and "semantic"; a pipeline folder holds "a" and "b"). ``dtype``: cast after loading
    (default: float32). ``config``: use this architecture instead of the one stored or inferred.
    """
    if stage is not None and stage not in NETWORKS:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(NETWORKS)}")
    dtype = check_dtype(dtype)
    local = Path(path)
    if not local.exists():
        local = _from_hub(str(path), stage)
    found_stage, sd, stored_config = _read_checkpoint(local, stage)
    if config is not None:
        model = _instantiate(found_stage, get_config(found_stage, config), sd, source=str(path))
    elif stored_config is not None:
        model = _instantiate(found_stage, stored_config, sd, source=str(path))
    else:
        model = _instantiate_inferred(found_stage, sd, source=str(path))
    return model.to(device=device, dtype=dtype or torch.float32).eval()


FLOAT16_REFUSED = ("float16 is refused: Würstchen's activations can exceed float16's range (max 65504), which gives "
                   "inf/NaN and black images; use bfloat16 (half the memory of float32, with float32's range) or "
                   "float32")
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "float64": torch.float64}


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating torch dtype or its name ("float32", "bfloat16", "torch.bfloat16") -> the torch dtype; None stays
    None. float16 raises ``ValueError`` (``FLOAT16_REFUSED``)."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use bfloat16 or float32")
        dtype = _DTYPE_NAMES[name]
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (bfloat16 or float32), got {dtype!r}")
    if dtype == torch.float16:
        raise ValueError(FLOAT16_REFUSED)
    return dtype


def read_config(path: str | os.PathLike, stage: str | None = None) -> tuple[str, Any] | None:
    """(stage, config) of a checkpoint that stores its config (ours, diffusers), read without its tensors; None
    for files whose architecture only the tensor shapes tell (released ``.pt``, bare state dicts)."""
    path = Path(path)
    if path.is_dir() and (path / "model.json").is_file():
        return _read_ours_config(path / "model.json", stage)
    if path.is_dir() and (path / "config.json").is_file():
        return _read_diffusers_config(path, stage)
    if path.suffix == ".json" and path.is_file():
        return _read_ours_config(path, stage)
    if path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
        return _read_ours_config(path.with_suffix(".json"), stage)
    return None


def save_model(model: nn.Module, directory: str | os.PathLike, sampling: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` ({"stage", "config"}) atomically; returns the folder.
    ``sampling``: settings that belong to these weights (e.g. Stage B's guidance), read back by :func:`sampling_of`."""
    stage = stage_of(model)
    meta = {"format": "wurst_core", "stage": stage, "config": dataclasses.asdict(model.config)}
    if sampling:
        meta["sampling"] = sampling
    io.save_model_checkpoint(directory, model.state_dict(), meta, name="model")
    return Path(directory)


def sampling_of(directory: str | os.PathLike) -> dict[str, Any]:
    """The sampling settings saved with a checkpoint folder by :func:`save_model` ({} if none)."""
    meta = Path(directory) / "model.json"
    return json.loads(meta.read_text()).get("sampling", {}) if meta.is_file() else {}


def export_diffusers(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) that
    ``PaellaVQModel`` / ``WuerstchenDiffNeXt`` / ``WuerstchenPrior.from_pretrained`` load, so the diffusers
    Würstchen pipelines run networks trained here. The Semantic Compressor has no diffusers model."""
    stage = stage_of(model)
    if stage == "semantic":
        raise ValueError("the Semantic Compressor has no diffusers counterpart (the pipelines take its output)")
    directory = Path(directory)
    sd = diffusers_from_official(stage, model.state_dict())
    io.save_safetensors(directory / "diffusion_pytorch_model.safetensors", sd)
    io.write_json(directory / "config.json", config_to_diffusers(model.config))
    return directory


# ---------------------------------------------------------------------------------------- reading files

def _read_tensors(path: Path) -> Any:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return io.load_torch(path)
    except io.UnsafePickleError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:
        # never echo a torch message that advises an unrestricted (code-running) load
        detail = f": {e}" if "weights_only" not in str(e) else ""
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}{detail} (truncated or corrupt file?)") from e


def _read_checkpoint(path: Path, stage: str | None) -> tuple[str, Tensors, Any]:
    """-> (stage, official-layout state dict, config stored with it or None)."""
    if path.is_dir():
        if (path / "model.json").exists():
            return _read_ours(path / "model.json", stage)
        if (path / "model_index.json").exists():  # a diffusers pipeline: pick the network's subfolder
            subfolders = {s: path / sub for s, sub in PIPELINE_SUBFOLDERS.items()}
            if not (subfolders["c"] / "config.json").exists():
                subfolders["c"] = path / COMBINED_PIPELINE_PRIOR
            candidates = [s for s, sub in subfolders.items() if (sub / "config.json").exists()]
            chosen = [stage] if stage in candidates else candidates if stage is None else []
            if len(chosen) != 1:
                raise CheckpointError(f"{path} is a diffusers pipeline holding stages {candidates}; "
                                      f"pass stage= one of them" + (f" (not {stage!r})" if stage else ""))
            path = subfolders[chosen[0]]
        if (path / "config.json").exists():
            return _read_diffusers(path, stage)
        raise CheckpointError(f"{path}: no model.json (wurst_core), config.json (diffusers) or model_index.json")
    if path.suffix == ".json":
        return _read_ours(path, stage)
    if path.suffix == ".safetensors" and path.with_suffix(".json").exists():
        return _read_ours(path.with_suffix(".json"), stage)
    obj = _read_tensors(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    wrapped = any(isinstance(obj.get(k), dict) for k in ("state_dict", "ema_state_dict", "effnet_state_dict"))
    sd = _pick_official(obj, stage, path) if wrapped else obj
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (keys: {sorted(sd)[:10]})")
    found = detect_stage(sd)
    if _is_diffusers_layout(sd):
        sd = official_from_diffusers(found, sd)
    _check_stage(found, stage, path)
    return found, sd, None


def _pick_official(obj: dict, stage: str | None, path: Path) -> Tensors:
    """The network's dict inside an original training checkpoint."""
    if stage == "semantic":
        if "effnet_state_dict" not in obj:
            raise CheckpointError(f"{path} has no 'effnet_state_dict' (the Semantic Compressor is saved with Stage B)")
        return obj["effnet_state_dict"]
    # Stage C releases carry the EMA weights (model_v2_stage_c.pt: 'ema_state_dict'); prefer them
    for key in ("ema_state_dict", "state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    raise CheckpointError(f"{path} has no 'state_dict' or 'ema_state_dict' (keys: {sorted(obj)[:10]})")


def _read_ours_config(meta_path: Path, stage: str | None) -> tuple[str, Any]:
    try:
        meta = json.loads(meta_path.read_text())
        found, values = meta["stage"], meta["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: not a wurst_core model.json ({e})") from e
    if found not in NETWORKS:
        raise CheckpointError(f"{meta_path}: unknown stage {found!r}")
    _check_stage(found, stage, meta_path)
    try:
        return found, config_from_dict(found, values)
    except (TypeError, ValueError) as e:  # a field of the wrong type or an impossible architecture
        raise CheckpointError(f"{meta_path}: bad config ({e})") from e


def _read_ours(meta_path: Path, stage: str | None) -> tuple[str, Tensors, Any]:
    found, config = _read_ours_config(meta_path, stage)
    weights = meta_path.with_suffix(".safetensors")
    if not weights.exists():
        raise CheckpointError(f"{meta_path}: the weights file {weights.name} is missing")
    return found, _read_tensors(weights), config


def _read_diffusers_config(folder: Path, stage: str | None) -> tuple[str, Any]:
    try:
        values = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: unreadable ({e})") from e
    found, config = config_from_diffusers(values)
    _check_stage(found, stage, folder)
    return found, config


def _read_diffusers(folder: Path, stage: str | None) -> tuple[str, Tensors, Any]:
    found, config = _read_diffusers_config(folder, stage)
    sd: Tensors = {}
    for file in _diffusers_weight_files(folder):
        sd.update(_read_tensors(file))
    return found, official_from_diffusers(found, sd), config


def _diffusers_weight_files(folder: Path) -> list[Path]:
    for ext in ("safetensors", "bin"):
        index = folder / f"diffusion_pytorch_model.{ext}.index.json"
        if index.exists():  # sharded
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
        if (folder / f"diffusion_pytorch_model.{ext}").exists():
            return [folder / f"diffusion_pytorch_model.{ext}"]
    variants = sorted(folder.glob("diffusion_pytorch_model.*.safetensors"))  # e.g. the fp16 variant
    if variants:
        return variants[:1]
    raise CheckpointError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin")


def _check_stage(found: str, wanted: str | None, where: Any) -> None:
    if wanted is not None and found != wanted:
        raise CheckpointError(f"{where} holds a {STAGE_NAMES[found]}, not a {STAGE_NAMES[wanted]}")


# ----------------------------------------------------------------------------------- building the model

def _instantiate(stage: str, config: Any, sd: Tensors, source: str) -> nn.Module:
    net = NETWORKS[stage]
    # Stages B and C (1B parameters, no buffers) are built without memory and take the checkpoint's tensors;
    # Stage A and the compressor are small and have buffers (BN statistics, normalisation) to initialise.
    meta = stage in ("b", "c")
    with torch.device("meta" if meta else "cpu"):
        model = net.model(config)
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, strict=True, assign=meta)
    return model


# the text-token width: a registry size trained with another text encoder differs only there
_TEXT_WIDTH = {"c": ("c_cond", "cond_mapper.0.weight"), "b": ("clip_embd", "clip_mapper.weight")}
_LISTED = 5  # mismatching keys named in an error; the rest are counted


class _Reads(dict):
    """A state dict that records which keys were read (``infer_config`` reads the architecture off them)."""

    def __init__(self, sd: Mapping[str, torch.Tensor]) -> None:
        super().__init__(sd)
        self.read: list[str] = []

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.read:
            self.read.append(key)
        return super().__getitem__(key)


def _instantiate_inferred(stage: str, sd: Tensors, source: str) -> nn.Module:
    """Build the network whose architecture the shapes tell. Inference reads a few tensors: when one of those is
    damaged, the inferred architecture misfits nearly every key, so the sizes of the registry (with the
    checkpoint's text width) are tried too and the error names the keys that do not fit the closest one."""
    reads = _Reads(sd)
    inferred, failure = None, None
    try:
        inferred = infer_config(stage, reads)
        return _instantiate(stage, inferred, sd, source)
    except CheckpointError as e:
        failure = e
    # registry sizes first: on a tie, a known architecture explains the checkpoint better than a bespoke one
    candidates = _registry_candidates(stage, sd)
    candidates += [("the architecture inferred from the shapes", inferred)] if inferred is not None else []
    scored = [(len(lines), i, label, lines) for i, (label, config) in enumerate(candidates)
              for lines in [_mismatches(stage, config, sd)]]
    hint = (f"\n  (architecture read off {', '.join(reads.read[:_LISTED])}"
            f"{f' and {len(reads.read) - _LISTED} more' if len(reads.read) > _LISTED else ''}: if one of them is "
            f"damaged, correct keys look mis-shaped; pass config= to choose the architecture)")
    if not scored:
        raise CheckpointError(str(failure) + hint) from failure
    bad, best, label, lines = min(scored)
    # a size that misfits a quarter of the tensors is no diagnosis: report the inferred architecture's misfit
    if candidates[best][1] == inferred or bad > len(sd) // 4:
        raise CheckpointError(str(failure) + hint) from failure
    was = (f"the architecture inferred from the shapes misfits {scored[-1][0]} keys" if inferred is not None
           else f"no architecture could be inferred from the shapes: {failure}")
    text = (f"{source} does not fit a {STAGE_NAMES[stage]}; closest architecture: {label} ({was}). Keys that do "
            f"not fit it ({bad} of {len(sd)}):" + "".join(f"\n    {x}" for x in lines[:_LISTED]))
    if len(lines) > _LISTED:
        text += f"\n    ... and {len(lines) - _LISTED} more"
    raise CheckpointError(text) from None


def _registry_candidates(stage: str, sd: Mapping[str, torch.Tensor]) -> list[tuple[str, Any]]:
    field, key = _TEXT_WIDTH.get(stage, (None, None))
    width = sd[key].shape[1] if key in sd and sd[key].dim() == 2 else None
    out = []
    for name, size in NETWORKS[stage].sizes.items():
        out.append((f"size {name!r}", size))
        if width is not None and getattr(size, field) != width:
            try:
                out.append((f"size {name!r} with {field}={width}", dataclasses.replace(size, **{field: width})))
            except ValueError:  # the width does not suit the size's heads
                pass
    return out


def _mismatches(stage: str, config: Any, sd: Mapping[str, torch.Tensor]) -> list[str]:
    """One line per key of ``sd`` that the network of ``config`` lacks, misses or shapes otherwise."""
    with torch.device("meta"):  # shapes only: no memory
        own = {k: tuple(v.shape) for k, v in NETWORKS[stage].model(config).state_dict().items()}
    lines = [f"{k}: expected {own[k]}, got {tuple(sd[k].shape)}"
             for k in own if k in sd and tuple(sd[k].shape) != own[k]]
    lines += [f"{k}: missing (expected {own[k]})" for k in own if k not in sd]
    lines += [f"{k}: unexpected {tuple(sd[k].shape)}" for k in sorted(sd, key=_natural) if k not in own]
    return lines


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` listing missing, unexpected and mis-shaped keys unless ``sd`` fits exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = sorted((k for k in sd if k not in own), key=_natural)
    misshaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or misshaped:
        text = f"{source} does not fit {type(model).__name__}({model.config}):"
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
            if items:
                text += f"\n  {name} ({len(items)}):" + "".join(f"\n    {x}" for x in items[:12])
                text += f"\n    ... {len(items) - 12} more" if len(items) > 12 else ""
        raise CheckpointError(text)


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]  # blocks.2 before blocks.10


# ------------------------------------------------------------------------------------------------ hub

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return True


def _from_hub(ref: str, stage: str | None) -> Path:
    """Resolve a hub id to a local path: the huggingface_hub cache, else a download (online only)."""
    if not _HUB_ID.match(ref):
        raise FileNotFoundError(f"no such checkpoint file or folder: {ref}")
    parts = ref.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    patterns = None
    if filename is None and repo in HUB_REPOS:
        stages = HUB_REPOS[repo] if stage is None else [stage]
        if any(s not in HUB_REPOS[repo] for s in stages):
            raise CheckpointError(f"{repo} holds stages {list(HUB_REPOS[repo])}, not {stage!r}")
        patterns = ["model_index.json"] + [f"{PIPELINE_SUBFOLDERS[s]}/*" for s in stages]
    target = paths.cache_dir() / "hub" / repo.replace("/", "--")
    include = " ".join(f"--include '{p}'" for p in patterns or [])
    how = (f"download it on a machine with network access:\n    hf download {repo} "
           f"{filename or include} --local-dir {target}\nthen call load_model('{target / filename if filename else target}'"
           f"{', stage=' + repr(stage) if stage else ''})")
    try:
        import huggingface_hub as hub
    except ImportError as e:
        raise CheckpointError(f"{ref} is not a local path and huggingface_hub is not installed; {how}") from e

    def fetch(local_only: bool) -> Path:
        if filename:
            return Path(hub.hf_hub_download(repo, filename, local_files_only=local_only))
        return Path(hub.snapshot_download(repo, allow_patterns=patterns, local_files_only=local_only))

    try:
        return fetch(local_only=True)  # already in the huggingface_hub cache
    except Exception:
        pass
    if _hub_offline():
        raise CheckpointError(f"{ref} is not a local path and the machine is offline (HF_HUB_OFFLINE); {how}")
    try:
        return fetch(local_only=False)
    except Exception as e:  # no network, no such repo or file, ...
        raise CheckpointError(f"could not download {ref} ({type(e).__name__}: {e}); {how}") from e
