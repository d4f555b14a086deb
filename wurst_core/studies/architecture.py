"""Architecture facts behind ``notebooks/02_architecture.ipynb``: parameter tables, FLOPs per forward pass
(``torch.utils.flop_counter`` on the meta device, so the 1B-parameter stages cost no memory), the latent shapes
through the pipeline and the compression ratios (paper §3: f4 for Stage A, 42:1 spatial for Stage C).

Everything is measured by building the networks and running them on meta tensors, not restated from the paper.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models import NETWORKS, build_model, count_parameters
from ..params import PROFILES, choice, param

NETWORK_NAMES = {"a": "Stage A (VQGAN)", "semantic": "Semantic Compressor", "b": "Stage B (DiffNeXt)",
                 "c": "Stage C (prior)"}
STAGE_C_RESOLUTION_MULTIPLE = 42.67  # Stage C latent side = ceil(H / 42.67) (docs/reference.md#resolution-rules)
SEMANTIC_RESIZE = 0.75               # 1024 -> 768 px for the compressor (docs/reference.md#compressor-input-size)


@dataclass(frozen=True)
class ArchitectureParams:
    """Parameters of notebooks/02_architecture.ipynb (0 / "" = the profile's value)."""

    profile: str = choice("tiny", *PROFILES)
    # comma-separated sizes to tabulate, e.g. "tiny,paper": each must be in some stage's registry
    sizes: str = param("", item_choices=tuple(sorted(set().union(*(n.sizes for n in NETWORKS.values())))))
    image_size: int = param(0, ge=64, le=8192)  # image side in pixels for the FLOPs and the shape walk

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        if profile == "smoke":  # seconds: the tiny networks only, at a small image size
            return {"sizes": "tiny", "image_size": 128}
        return {"sizes": "tiny,paper", "image_size": 1024}

    @property
    def size_list(self) -> list[str]:
        return [s.strip() for s in self.sizes.split(",") if s.strip()]


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def latent_sides(image_size: int) -> dict[str, int]:
    """Sides of every tensor of the pipeline for a square image: Stage A latent (f4), the compressor's input,
    the Stage C latent (the released rule ceil(H / 42.67))."""
    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4 (Stage A is f4), got {image_size}")
    return {"image": image_size, "stage_a": image_size // 4, "semantic_input": round(image_size * SEMANTIC_RESIZE),
            "stage_c": math.ceil(image_size / STAGE_C_RESOLUTION_MULTIPLE)}


def parameter_table(stage: str, size: str) -> pd.DataFrame:
    """Parameters per top-level module of one network (built on the meta device)."""
    model = build_model(stage, size, device="meta")
    rows = [{"module": name, "params": count_parameters(child)} for name, child in model.named_children()]
    total = count_parameters(model)
    rows.append({"module": "total", "params": total})
    table = pd.DataFrame(rows)
    table["share_%"] = (100 * table["params"] / total).round(2)
    return table


def parameter_summary(sizes: list[str]) -> pd.DataFrame:
    """One row per (network, size) present in the registries: total parameters and the config."""
    rows = []
    for stage, net in NETWORKS.items():
        for size in sizes:
            if size in net.sizes:
                model = build_model(stage, size, device="meta")
                rows.append({"network": NETWORK_NAMES[stage], "size": size, "params": count_parameters(model),
                             "config": str(dataclasses.asdict(net.sizes[size]))})
    return pd.DataFrame(rows)


def _count(fn: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_flops(stage: str, size: str, image_size: int = 1024) -> dict[str, int]:
    """FLOPs of one forward pass for one image of ``image_size`` px (batch 1; a multiply-add counts 2).
    Stage A reports ``encode`` and ``decode`` separately; Stage B/C get 77 text tokens (the released context;
    the tiny CLIP has 48)."""
    model = build_model(stage, size, device="meta").eval()
    cfg = model.config
    s = latent_sides(image_size)
    r = _meta(1)
    if stage == "a":
        return {"encode": _count(lambda: model.encode(_meta(1, 3, image_size, image_size))),
                "decode": _count(lambda: model.decode(_meta(1, cfg.c_latent, s["stage_a"], s["stage_a"])))}
    if stage == "semantic":
        return {"forward": _count(lambda: model(_meta(1, 3, s["semantic_input"], s["semantic_input"])))}
    if stage == "b":
        return {"forward": _count(lambda: model(_meta(1, cfg.c_in, s["stage_a"], s["stage_a"]), r,
                                                _meta(1, cfg.effnet_embd, s["stage_c"], s["stage_c"]),
                                                _meta(1, 77, cfg.clip_embd)))}
    return {"forward": _count(lambda: model(_meta(1, cfg.c_in, s["stage_c"], s["stage_c"]), r, _meta(1, 77, cfg.c_cond)))}


def flops_table(sizes: list[str], image_size: int = 1024) -> pd.DataFrame:
    rows = []
    for stage, net in NETWORKS.items():
        for size in sizes:
            if size in net.sizes:
                for what, flops in forward_flops(stage, size, image_size).items():
                    rows.append({"network": NETWORK_NAMES[stage], "size": size, "part": what,
                                 "image_px": image_size, "GFLOP": round(flops / 1e9, 3)})
    return pd.DataFrame(rows)


def pipeline_shapes(size: str, image_size: int = 1024) -> pd.DataFrame:
    """The tensors of the pipeline, measured by running the meta networks of one registry size: training
    direction (image -> Stage A latent, image -> C_sc) and sampling direction (Stage C -> B -> A)."""
    s = latent_sides(image_size)
    a, sc, b, c = (build_model(k, size, device="meta").eval() for k in ("a", "semantic", "b", "c"))
    image = _meta(1, 3, image_size, image_size)
    text_c, text_b, r = _meta(1, 77, c.config.c_cond), _meta(1, 77, b.config.clip_embd), _meta(1)
    sc_input = _meta(1, 3, s["semantic_input"], s["semantic_input"])
    steps = [
        ("image X", "input", image),
        ("Stage A encode -> X_q latent", "training", a.encode(image)),
        ("compressor input (bicubic resize)", "training", sc_input),
        ("Semantic Compressor -> C_sc", "training", sc(sc_input)),
        ("Stage C sample (noise -> X_sc)", "sampling", c(_meta(1, c.config.c_in, s["stage_c"], s["stage_c"]), r, text_c)),
        ("Stage B sample (X_sc -> latent)", "sampling", b(_meta(1, b.config.c_in, s["stage_a"], s["stage_a"]), r,
                                                         _meta(1, b.config.effnet_embd, s["stage_c"], s["stage_c"]), text_b)),
        ("Stage A decode -> image", "sampling", a.decode(_meta(1, a.config.c_latent, s["stage_a"], s["stage_a"]))),
    ]
    rows = []
    for name, phase, t in steps:
        shape = tuple(t.shape[1:])
        rows.append({"step": name, "phase": phase, "shape (C, H, W)": str(shape), "elements": math.prod(shape),
                     "spatial ratio": round(image_size / shape[-1], 2),
                     "element ratio": round(3 * image_size ** 2 / math.prod(shape), 2)})
    return pd.DataFrame(rows)


def compression_ratios(image_size: int = 1024, size: str = "paper") -> dict[str, float]:
    """Spatial compression (image side / latent side) and element compression of Stage A and Stage C."""
    shapes = pipeline_shapes(size, image_size).set_index("step")
    a = shapes.loc["Stage A encode -> X_q latent"]
    c = shapes.loc["Stage C sample (noise -> X_sc)"]
    return {"stage_a_spatial": float(a["spatial ratio"]), "stage_a_elements": float(a["element ratio"]),
            "stage_c_spatial": float(c["spatial ratio"]), "stage_c_elements": float(c["element ratio"])}
