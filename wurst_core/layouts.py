"""Checkpoint layouts: official <-> diffusers key names (attention packed or split), configs to and from diffusers'
``config.json``, and the architecture inferred from a state dict's tensor shapes (docs/reference.md#key-conversion,
docs/reference.md#checkpoint-formats). Pure functions over state dicts: reading and writing files is ``weights``'."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import torch

from .models import NETWORKS

Tensors = dict[str, torch.Tensor]
DIFFUSERS_CLASSES = {"a": "PaellaVQModel", "b": "WuerstchenDiffNeXt", "c": "WuerstchenPrior"}
STAGE_NAMES = {"a": "Stage A (VQGAN)", "b": "Stage B (DiffNeXt)", "c": "Stage C (prior)",
               "semantic": "Semantic Compressor"}
# diffusers fills config.json keys that are absent with its class defaults (the prior's are the paper's 16 blocks)
_DIFFUSERS_DEFAULTS = {
    "PaellaVQModel": dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=12,
                          embed_dim=384, latent_channels=4, num_vq_embeddings=8192, scale_factor=0.3764),
    "WuerstchenPrior": dict(c_in=16, c=1280, c_cond=1024, c_r=64, depth=16, nhead=16, dropout=0.1),
    "WuerstchenDiffNeXt": {f.name: f.default for f in dataclasses.fields(NETWORKS["b"].config) if f.name != "self_attn"},
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the network."""


# ----------------------------------------------------------------------------------------- key layouts

_ATTN = re.compile(r"^(.*\.attention)\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$")
_ATTN_DF = re.compile(r"^(.*\.attention)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")


def diffusers_from_official(stage: str, sd: Mapping[str, torch.Tensor]) -> Tensors:
    """Official key layout -> diffusers (the inverse of diffusers' ``convert_wuerstchen.py``)."""
    out: Tensors = {}
    for k, v in sd.items():
        m = _ATTN.match(k)
        if m:
            base, name = m.groups()
            if name.startswith("in_proj"):
                kind = name.split("_")[-1]  # weight | bias
                for part, t in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                    out[f"{base}.{part}.{kind}"] = t.clone()
            else:
                out[f"{base}.to_out.0.{name.split('.')[-1]}"] = v
        elif stage == "a" and k == "vquantizer.codebook.weight":
            out["vquantizer.embedding.weight"] = v
        else:
            out[k] = v
    return out


def official_from_diffusers(stage: str, sd: Mapping[str, torch.Tensor]) -> Tensors:
    """diffusers key layout -> official (what ``convert_wuerstchen.py`` undid): packs q/k/v into ``in_proj``."""
    out: Tensors = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = _ATTN_DF.match(k)
        if m:
            base, part, kind = m.groups()
            if part == "to_out.0":
                out[f"{base}.attn.out_proj.{kind}"] = v
            else:
                parts.setdefault((base, kind), {})[part] = v
        elif stage == "a" and k == "vquantizer.embedding.weight":
            out["vquantizer.codebook.weight"] = v
        else:
            out[k] = v
    for (base, kind), qkv in parts.items():
        missing = {"to_q", "to_k", "to_v"} - set(qkv)
        if missing:
            raise CheckpointError(f"attention {base} lacks {sorted(missing)} {kind}")
        out[f"{base}.attn.in_proj_{kind}"] = torch.cat([qkv["to_q"], qkv["to_k"], qkv["to_v"]], dim=0)
    return out


def _is_diffusers_layout(sd: Mapping[str, Any]) -> bool:
    return "vquantizer.embedding.weight" in sd or any(_ATTN_DF.match(k) for k in sd)


def detect_stage(sd: Mapping[str, Any]) -> str:
    """Which network an (official-layout) state dict belongs to, from its characteristic keys."""
    if "vquantizer.codebook.weight" in sd or "vquantizer.embedding.weight" in sd:
        return "a"
    if "cond_mapper.0.weight" in sd:
        return "c"
    if "clip_mapper.weight" in sd and "embedding.1.weight" in sd:
        return "b"
    if "mapper.0.weight" in sd and any(k.startswith("backbone.") for k in sd):
        return "semantic"
    raise CheckpointError(f"not a Würstchen v2 network: unrecognised keys (first: {sorted(sd)[:5]})")


# ------------------------------------------------------------------------------------------- configs

def config_from_dict(stage: str, values: Mapping[str, Any]) -> Any:
    """A stage config from JSON values (lists become tuples); unknown keys are an error."""
    cls = NETWORKS[stage].config
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise CheckpointError(f"{cls.__name__} has no field(s) {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def config_to_diffusers(config: Any) -> dict[str, Any]:
    """Our config -> the diffusers ``config.json`` of the matching class."""
    stage = next(s for s, net in NETWORKS.items() if isinstance(config, net.config))
    if stage == "semantic":
        raise ValueError("the Semantic Compressor has no diffusers counterpart")
    head = {"_class_name": DIFFUSERS_CLASSES[stage], "_diffusers_version": _diffusers_version()}
    if stage == "a":
        return head | dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=config.levels,
                           bottleneck_blocks=config.bottleneck_blocks, embed_dim=config.c_hidden,
                           latent_channels=config.c_latent, num_vq_embeddings=config.codebook_size,
                           scale_factor=config.scale_factor)
    values = dataclasses.asdict(config)
    if stage == "b":
        if not values.pop("self_attn"):
            raise ValueError("diffusers' WuerstchenDiffNeXt always uses self-attention; cannot export self_attn=False")
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return head | values


def config_from_diffusers(values: Mapping[str, Any]) -> tuple[str, Any]:
    """A diffusers ``config.json`` -> (stage, our config)."""
    name = values.get("_class_name")
    stage = {v: k for k, v in DIFFUSERS_CLASSES.items()}.get(name)
    if stage is None:
        raise CheckpointError(f"config.json describes {name!r}, not one of {sorted(DIFFUSERS_CLASSES.values())}")
    v = _DIFFUSERS_DEFAULTS[name] | {k: x for k, x in values.items() if not k.startswith("_")}
    if stage == "a":
        if (v["in_channels"], v["out_channels"], v["up_down_scale_factor"]) != (3, 3, 2):
            raise CheckpointError("only RGB PaellaVQModels with up_down_scale_factor=2 are supported")
        return stage, config_from_dict("a", dict(levels=v["levels"], bottleneck_blocks=v["bottleneck_blocks"],
                                                 c_hidden=v["embed_dim"], c_latent=v["latent_channels"],
                                                 codebook_size=v["num_vq_embeddings"], scale_factor=v["scale_factor"]))
    if stage == "b" and isinstance(v.get("dropout"), list):
        if len(set(v["dropout"])) != 1:
            raise CheckpointError(f"per-level dropout {v['dropout']} is not supported")
        v["dropout"] = v["dropout"][0]
    known = {f.name for f in dataclasses.fields(NETWORKS[stage].config)}
    return stage, config_from_dict(stage, {k: x for k, x in v.items() if k in known})


def infer_config(stage: str, sd: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the architecture config of an official-layout state dict from its tensor shapes."""
    try:
        config = {"a": _infer_a, "b": _infer_b, "c": _infer_c, "semantic": _infer_semantic}[stage](sd)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"cannot infer the {STAGE_NAMES[stage]} architecture from the checkpoint ({e}); "
                              f"pass config=") from e
    # shapes cannot tell the number of heads (or dropout): take them from a registry size that agrees otherwise
    unknowable = {k: getattr(config, k) for k in ("nhead", "dropout") if hasattr(config, k)}
    for known in NETWORKS[stage].sizes.values():
        try:
            if dataclasses.replace(known, **unknowable) == config:
                return known
        except ValueError:  # another number of levels
            continue
    return config


def _indices(sd: Mapping[str, Any], prefix: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _infer_a(sd: Mapping[str, torch.Tensor]) -> Any:
    c_hidden, c_latent = sd["up_blocks.0.0.weight"].shape[:2]
    c0 = sd["in_block.1.weight"].shape[0]
    levels = int(round(math.log2(c_hidden / c0))) + 1
    n_up = len(_indices(sd, "up_blocks"))
    return NETWORKS["a"].config(levels=levels, bottleneck_blocks=n_up - 1 - 2 * (levels - 1), c_hidden=c_hidden,
                                c_latent=c_latent, codebook_size=sd["vquantizer.codebook.weight"].shape[0])


def _infer_c(sd: Mapping[str, torch.Tensor]) -> Any:
    c, c_in = sd["projection.weight"].shape[:2]
    return NETWORKS["c"].config(c_in=c_in, c=c, c_cond=sd["cond_mapper.0.weight"].shape[1],
                                c_r=sd["blocks.1.mapper.weight"].shape[1], depth=len(_indices(sd, "blocks")) // 3,
                                nhead=_heads(c))


def _infer_b(sd: Mapping[str, torch.Tensor]) -> Any:
    levels = _indices(sd, "down_blocks")
    c_hidden, letters_per_level, c_r, kernel = [], [], None, None
    for lvl in levels:
        letters, width = "", 0
        for n in _indices(sd, f"down_blocks.{lvl}"):
            p = f"down_blocks.{lvl}.{n}."
            if p + "depthwise.weight" in sd:
                letters += "C"
                kernel, width = sd[p + "depthwise.weight"].shape[-1], sd[p + "depthwise.weight"].shape[0]
            elif p + "mapper.weight" in sd:
                letters += "T"
                c_r, width = sd[p + "mapper.weight"].shape[1], sd[p + "mapper.weight"].shape[0] // 2
            elif p + "attention.attn.in_proj_weight" in sd:
                letters += "A"
                width = sd[p + "attention.attn.in_proj_weight"].shape[1]
        c_hidden.append(width)
        letters_per_level.append(letters)
    level_config, blocks = [], []
    for letters in letters_per_level:  # the shortest pattern whose repetition gives the level
        period = next(p for p in range(1, len(letters) + 1)
                      if len(letters) % p == 0 and letters[:p] * (len(letters) // p) == letters)
        level_config.append(letters[:period])
        blocks.append(len(letters) // period)
    mappers = _indices(sd, "effnet_mappers")
    inject = tuple(i in mappers for i in range(len(levels)))
    c_cond, clip_embd = sd["clip_mapper.weight"].shape
    emb_in = sd["embedding.1.weight"].shape[1]
    # c_in * patch**2 channels; c_in is Stage A's 4 latent channels in the released and the workbench models
    patch = math.isqrt(emb_in // 4) if emb_in % 4 == 0 and math.isqrt(emb_in // 4) ** 2 == emb_in // 4 else 1
    return NETWORKS["b"].config(
        c_in=emb_in // patch ** 2, c_out=sd["clf.1.weight"].shape[0] // (2 * patch ** 2), c_r=c_r, patch_size=patch,
        c_cond=c_cond, c_hidden=tuple(c_hidden),
        nhead=tuple(_heads(c) if "A" in lc else -1 for c, lc in zip(c_hidden, level_config)),
        blocks=tuple(blocks), level_config=tuple(level_config), inject_effnet=inject,
        effnet_embd=sd[f"effnet_mappers.{mappers[0]}.weight"].shape[1] if mappers else 16,
        clip_embd=clip_embd, kernel_size=kernel)


def _infer_semantic(sd: Mapping[str, torch.Tensor]) -> Any:
    cls, sizes = NETWORKS["semantic"].config, NETWORKS["semantic"].sizes
    c_latent = sd["mapper.0.weight"].shape[0]
    shapes = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("backbone.")}
    for backbone in ("efficientnet_v2_s", "efficientnet_v2_l", "tiny"):
        image_size = next((c.image_size for c in sizes.values() if c.backbone == backbone), 768)
        extra = {}
        if backbone == "tiny":  # one stride-2 conv per stage (backbone.<i>.0): its output channels are the widths
            convs = sorted((int(m[1]), shape[0]) for k, shape in shapes.items()
                           if (m := re.fullmatch(r"backbone\.(\d+)\.0\.weight", k)))
            extra["tiny_widths"] = tuple(c for _, c in convs) or (1,)
        config = cls(backbone=backbone, c_latent=c_latent, image_size=image_size, **extra)
        with torch.device("meta"):
            candidate = NETWORKS["semantic"].model(config)
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items() if k.startswith("backbone.")} == shapes:
            return config
    raise ValueError("the backbone is none of efficientnet_v2_s, efficientnet_v2_l, tiny")


def _heads(c: int) -> int:
    return c // 64 if c % 64 == 0 else 1  # every released model uses 64-wide heads


def _diffusers_version() -> str:
    try:
        import diffusers
        return diffusers.__version__
    except ImportError:
        return "0.27.0"
