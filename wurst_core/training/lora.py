"""LoRA for Stage C through ``peft``: injection, trainable-parameter filtering, adapter files, scale, merge.

``inject_lora(stage_c, LoraSpec(...))`` wraps the named projections of a (trained) network in place with peft LoRA
layers (Hu et al. 2022: ``W x + (alpha / rank) * B A x``, ``B`` zero at the start so the network is unchanged) and
leaves only the adapter matrices trainable, so :func:`wurst_core.training.fit` optimises, averages (EMA) and
all-reduces (DDP) the adapters alone; its checkpoints and exact resume work unchanged.

Targets (``LORA_TARGETS``), by name in the Stage C blocks (``models/blocks.py``):

* ``kv_mapper``: the Linear mapping the text tokens to the attention's width (where a caption word enters);
* ``out_proj``: the attention's output projection (Stable Cascade's own LoRA targets this one);
* ``qkv``: the packed query/key/value ``in_proj_weight`` of the attention (a parameter, not a module: peft's
  ``target_parameters``, injected in a second pass so that ``out_proj`` inside the same module stays reachable);
* ``channelwise``: the two Linears of each ConvNeXt block; ``cond_mapper``: the text mapper before the blocks.

An adapter folder holds ``adapter.safetensors`` (the LoRA matrices, keys as in the wrapped network without the
adapter name) and ``adapter.json`` (the spec, the base network's config, free metadata); ``load_adapter`` injects
the same layers into a network of that config and loads them, at a ``scale`` (0: the base network). ``merge``
folds ``scale * B A`` into the base weights (sampling at the base network's cost), ``unmerge`` takes it out again;
merged or not, the outputs agree up to float rounding (``tests/test_finetune.py``). ``peft`` is imported when
first needed (it pulls in transformers, seconds to import).
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from ..io import save_safetensors, write_json

ADAPTER = "default"  # peft's adapter name; a network carries one adapter here
# target name -> (peft kind, names matched at the end of module paths)
LORA_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kv_mapper": ("module", ("kv_mapper.1",)),
    "out_proj": ("module", ("out_proj",)),
    "qkv": ("parameter", ("in_proj_weight",)),
    "channelwise": ("module", ("channelwise.0", "channelwise.4")),
    "cond_mapper": ("module", ("cond_mapper.0", "cond_mapper.2")),
}
DEFAULT_TARGETS = ("kv_mapper", "out_proj")


@dataclass(frozen=True)
class LoraSpec:
    """Rank, alpha (the update is scaled by ``alpha / rank``), dropout on the adapter's input, and targets."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1 or not self.alpha > 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1): {self}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if not self.targets or unknown:
            raise ValueError(f"LoRA targets must be a non-empty subset of {sorted(LORA_TARGETS)}, got {self.targets}")
        if self.dropout and any(LORA_TARGETS[t][0] == "parameter" for t in self.targets):
            raise ValueError("LoRA dropout cannot apply to a parameter target (qkv): peft's adapter of a parameter "
                             "has no input to drop; use dropout 0 or leave qkv out")

    def peft_configs(self) -> list[Any]:
        """One peft ``LoraConfig`` for the module targets, then one for the parameter targets (two passes)."""
        from peft import LoraConfig

        common = dict(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none")
        modules = [n for t in self.targets if LORA_TARGETS[t][0] == "module" for n in LORA_TARGETS[t][1]]
        params = [n for t in self.targets if LORA_TARGETS[t][0] == "parameter" for n in LORA_TARGETS[t][1]]
        out = [LoraConfig(target_modules=modules, **common)] if modules else []
        if params:
            out.append(LoraConfig(target_modules=[], target_parameters=params, **common))
        return out


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def inject_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Wrap ``spec.targets`` of ``model`` in LoRA layers in place, freeze everything else; returns ``model``.
    A network that already carries an adapter is refused (merge it with :func:`merged_copy` first)."""
    from peft import inject_adapter_in_model

    if tuner_layers(model):
        raise ValueError("this network already carries a LoRA adapter; merge it into a copy first (merged_copy)")
    for config in spec.peft_configs():
        with warnings.catch_warnings():  # the second pass: peft warns that the model already has a peft_config
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    if hasattr(model, "peft_config"):
        del model.peft_config  # peft's bookkeeping; the spec travels in adapter.json instead
    if not tuner_layers(model):
        raise ValueError(f"no module of {type(model).__name__} matches the LoRA targets {spec.targets}")
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_parameter(name))
    return model


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    """peft's LoRA layers inside ``model`` (each wraps one Linear or one parameter's module)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"trainable": n, "total": n}`` parameters (a merged LoRA's matrices still count as parameters)."""
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's matrices, keyed as in ``model`` without peft's adapter name (``...lora_A.weight``)."""
    tag = f".{ADAPTER}."
    return {k.replace(tag, "."): v.detach() for k, v in model.state_dict().items() if is_lora_parameter(k)}


def base_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}


def save_adapter(model: nn.Module, spec: LoraSpec, directory: str | os.PathLike,
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """``adapter.safetensors`` + ``adapter.json`` (spec, base config, ``metadata``), atomically, JSON last."""
    directory = Path(directory)
    state = lora_state_dict(model)
    if not state:
        raise ValueError("the network carries no LoRA adapter to save (inject_lora first)")
    save_safetensors(directory / "adapter.safetensors", state)
    write_json(directory / "adapter.json", {"format": "wurst_core.lora", "lora": dataclasses.asdict(spec),
                                            "base_config": base_config(model), "metadata": dict(metadata or {})})
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[LoraSpec, dict[str, torch.Tensor], dict[str, Any]]:
    """The spec, the matrices and the JSON of an adapter folder; a clear error for anything else."""
    directory = Path(directory)
    meta_path = directory / "adapter.json"
    if not meta_path.is_file() or not (directory / "adapter.safetensors").is_file():
        raise FileNotFoundError(f"{directory} is not a LoRA adapter folder (adapter.json + adapter.safetensors); "
                                "notebooks/12_finetune.ipynb writes one into its run's checkpoints/adapter")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "wurst_core.lora":
        raise ValueError(f"{meta_path} is not a wurst_core LoRA adapter (format {meta.get('format')!r})")
    spec = meta["lora"]
    return LoraSpec(**{**spec, "targets": tuple(spec["targets"])}), load_file(directory / "adapter.safetensors"), meta


def load_adapter(model: nn.Module, directory: str | os.PathLike, scale: float = 1.0) -> nn.Module:
    """Inject the adapter of ``directory`` into ``model`` (in place, the same targets) and load its matrices at
    ``scale``. The base network must have the config the adapter was trained on, and no adapter yet."""
    spec, state, meta = read_adapter(directory)
    recorded, own = meta.get("base_config") or {}, base_config(model)
    if recorded and own and recorded != own:
        changed = sorted(k for k in set(recorded) | set(own) if recorded.get(k) != own.get(k))
        raise ValueError(f"the adapter in {directory} was trained on another network (config differs in {changed})")
    inject_lora(model, spec)
    tag = f".{ADAPTER}."
    expected = {k.replace(tag, "."): k for k in model.state_dict() if is_lora_parameter(k)}
    if set(expected) != set(state):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"adapter {directory} does not fit: missing {missing[:4]}, unexpected {extra[:4]}")
    model.load_state_dict({expected[k]: v for k, v in state.items()}, strict=False)
    set_scale(model, scale)
    return model


def _layers_or_raise(model: nn.Module) -> list[nn.Module]:
    layers = tuner_layers(model)
    if not layers:
        raise ValueError("this network carries no LoRA adapter (load_adapter first)")
    return layers


def set_scale(model: nn.Module, scale: float) -> None:
    """The adapter's weight in the output: ``scale * alpha / rank * B A`` (1: as trained, 0: the base network).
    A merged adapter is taken out, rescaled and merged again."""
    layers = _layers_or_raise(model)
    merged = is_merged(model)
    if merged:
        unmerge(model)
    for layer in layers:
        layer.set_scale(ADAPTER, float(scale))
    if merged:
        merge(model)


def is_merged(model: nn.Module) -> bool:
    return any(layer.merged for layer in tuner_layers(model))


def merge(model: nn.Module) -> None:
    """Fold the adapter into the base weights (no extra cost per step); idempotent."""
    for layer in _layers_or_raise(model):
        if not layer.merged:
            layer.merge()


def unmerge(model: nn.Module) -> None:
    """Take a merged adapter back out of the base weights; idempotent."""
    for layer in _layers_or_raise(model):
        if layer.merged:
            layer.unmerge()


def _parents(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            yield parent, name, child


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` with its adapter folded in and the LoRA layers removed: the state-dict keys of the
    base network again (``weights.save_model`` writes it like any Stage C). ``model`` itself is unchanged."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(model)
    merge(out)
    for _ in range(8):  # nested wrappers (a parameter wrapper around a module with a wrapped child) unwrap outside-in
        found = False
        for parent, name, child in _parents(out):
            if isinstance(child, BaseTunerLayer):
                setattr(parent, name, child.get_base_layer())
                found = True
        if not found:
            break
    for p in out.parameters():
        p.requires_grad_(True)
    return out
