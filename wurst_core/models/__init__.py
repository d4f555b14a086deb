"""The networks of Würstchen: Stage A (VQGAN), the Semantic Compressor, Stage B (DiffNeXt), Stage C (prior).

``NETWORKS`` maps the stage names used everywhere ("a", "b", "c", "semantic") to (model class, config class,
size registry); ``build_model("c", "tiny")`` builds one, ``stage_of(model)`` names a model's stage.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .semantic import SEMANTIC_SIZES, SemanticCompressor, SemanticCompressorConfig, preprocess, v2_scale, v2_unscale
from .stage_a import STAGE_A_SIZES, StageA, StageAConfig
from .stage_b import STAGE_B_SIZES, StageB, StageBConfig
from .stage_c import STAGE_C_SIZES, StageC, StageCConfig


class Network(NamedTuple):
    model: type[nn.Module]
    config: type
    sizes: dict[str, Any]


NETWORKS: dict[str, Network] = {
    "a": Network(StageA, StageAConfig, STAGE_A_SIZES),
    "semantic": Network(SemanticCompressor, SemanticCompressorConfig, SEMANTIC_SIZES),
    "b": Network(StageB, StageBConfig, STAGE_B_SIZES),
    "c": Network(StageC, StageCConfig, STAGE_C_SIZES),
}


def _network(stage: str) -> Network:
    if stage not in NETWORKS:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(NETWORKS)}")
    return NETWORKS[stage]


def get_config(stage: str, size: str | Any) -> Any:
    """A size name of the stage's registry, or a config instance (returned as it is after a type check)."""
    net = _network(stage)
    if isinstance(size, str):
        if size not in net.sizes:
            raise ValueError(f"unknown size {size!r} for stage {stage!r}; choose one of {sorted(net.sizes)}")
        return net.sizes[size]
    if not isinstance(size, net.config):
        raise TypeError(f"stage {stage!r} needs a {net.config.__name__}, got {type(size).__name__}")
    return size


def build_model(stage: str, size: str | Any = "tiny", device: str | torch.device | None = None) -> nn.Module:
    """Build a freshly initialised network; ``device="meta"`` builds it without memory (for counts and FLOPs)."""
    config = get_config(stage, size)
    with torch.device(device or "cpu"):
        return _network(stage).model(config)


def stage_of(model: nn.Module) -> str:
    for stage, net in NETWORKS.items():
        if isinstance(model, net.model):
            return stage
    raise TypeError(f"not a wurst_core network: {type(model).__name__}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "NETWORKS", "build_model", "get_config", "stage_of", "count_parameters",
    "StageA", "StageAConfig", "STAGE_A_SIZES",
    "SemanticCompressor", "SemanticCompressorConfig", "SEMANTIC_SIZES", "preprocess", "v2_scale", "v2_unscale",
    "StageB", "StageBConfig", "STAGE_B_SIZES",
    "StageC", "StageCConfig", "STAGE_C_SIZES",
]
