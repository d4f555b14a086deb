"""Text conditioning: open_clip text towers, the transformers wrapper of the pipelines, and a tiny custom CLIP.

Würstchen conditions Stages B and C on *un-pooled* CLIP text embeddings (paper §4: CLIP-H; released v2
Stage C: CLIP-bigG), all 77 token vectors of the final layer after the final LayerNorm: HF
``CLIPTextModel(...).last_hidden_state`` with ``padding="max_length"`` and the attention mask passed
(reference/official-implementation.md §6a, diffusers-reference.md §2.2). StableCascade (v3) instead takes the last
layer *before* the final norm (HF ``hidden_states[-1]``), here ``layer="pre_norm"``; SD2's penultimate layer
(``ln_final`` of layer L-1) is ``layer="penultimate"``.

Padding. open_clip pads with id 0 and only applies the causal mask; the HF tokenizer of the released models pads
with ``<|endoftext|>`` and the attention mask hides padded keys. The token vectors up to and including the end
token are identical either way; the padded positions (which Stage B/C attend to) differ. ``hf_padding=True``
(default) reproduces the HF/diffusers computation with open_clip weights.

The tiny CLIP (a registered open_clip config, ViT image tower at 64 px) is trained contrastively on the
procedural dataset, saved as safetensors + JSON under ``cache_dir()/<profile>/text_encoder`` and reloaded
frozen (paper §3: the text encoder is frozen) by the Stage B/C notebooks.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import paths
from .io import save_model_checkpoint, write_json
from .notebook import PROFILES, choice, param

CONTEXT_LENGTH = 77
SOT_ID, EOT_ID = 49406, 49407  # <|startoftext|>, <|endoftext|> of the CLIP BPE (open_clip and HF agree)
Layer = Literal["last", "pre_norm", "penultimate"]
LAYERS: tuple[str, ...] = ("last", "pre_norm", "penultimate")
TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


class TextOutput(NamedTuple):
    tokens: torch.Tensor  # (B, context_length (77 released), width): the sequence Stages B and C cross-attend to
    pooled: torch.Tensor  # (B, embed_dim): end-token feature after ln_final, projected (CLIP's text embedding)


# --------------------------------------------------------------------------------------------- tokenizer
@functools.lru_cache(maxsize=1)
def _simple_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=CONTEXT_LENGTH)  # its BPE file ships in the open_clip wheel: offline


def tokenize(prompts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP BPE ids (B, context_length): ``<sot> ... <eot>`` then 0-padding; long prompts are truncated."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"expected a non-empty list of strings, got {prompts!r:.100}")
    return _simple_tokenizer()(prompts, context_length=context_length)


def _check_layer(layer: str) -> None:
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")


# --------------------------------------------------------------------------------------------- open_clip
def _load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Only the text-tower tensors of an open_clip checkpoint (.safetensors, .pt/.bin with or without a wrapper)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:  # lazy: the vision tower is never read
            keys = [k for k in f.keys() if k.startswith("text.") or k.startswith(TEXT_KEYS)]
            sd = {k: f.get_tensor(k) for k in keys}
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("text.") for k in sd):  # CustomTextCLIP layout
        return {k.removeprefix("text."): v for k, v in sd.items() if k.startswith("text.")}
    text = {k: v for k, v in sd.items() if k.startswith(TEXT_KEYS)}
    if not text:
        hint = " (a transformers checkpoint: use HFCLIPTextEncoder)" if any("text_model" in k for k in sd) else ""
        raise ValueError(f"{path} holds no open_clip text-tower weights{hint}; keys start {sorted(sd)[:5]}")
    return text


def _build_text_tower(name: str) -> nn.Module:
    import open_clip
    from open_clip.model import _build_text_tower as build

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {name!r}; known: {', '.join(open_clip.list_models()[:12])}, ...")
    text_cfg = cfg["text_cfg"]
    if text_cfg.get("hf_model_name"):
        raise ValueError(f"{name} uses a Hugging Face text tower ({text_cfg['hf_model_name']}); use HFCLIPTextEncoder")
    return build(cfg["embed_dim"], text_cfg, quick_gelu=cfg.get("quick_gelu", False))


class TextEncoder(nn.Module):
    """An open_clip text tower: ``forward(prompts) -> TextOutput(tokens (B, 77, width), pooled (B, embed_dim))``.

    ``layer``: ``"last"`` (released v2, after ln_final), ``"pre_norm"`` (StableCascade, before ln_final) or
    ``"penultimate"`` (SD2). ``hf_padding``: pad with ``<|endoftext|>`` and mask padded keys, as the HF text
    model with ``attention_mask`` that the official code and diffusers use (see the module docstring).
    """

    def __init__(self, text: nn.Module, layer: Layer = "last", hf_padding: bool = True, name: str = "") -> None:
        super().__init__()
        _check_layer(layer)
        if getattr(text, "cls_emb", None) is not None or getattr(text, "pool_type", "argmax") != "argmax":
            raise ValueError("only CLIP-style text towers (causal, pooled at the end token) are supported")
        self.text, self.layer, self.hf_padding, self.name = text, layer, hf_padding, name

    def with_layer(self, layer: Layer) -> "TextEncoder":
        """The same text tower (shared weights, not a copy) read at another ``layer``; ``self`` if it is the same."""
        return self if layer == self.layer else TextEncoder(self.text, layer, self.hf_padding, self.name)

    @property
    def width(self) -> int:
        return int(self.text.width)

    @property
    def embed_dim(self) -> int:
        proj = self.text.text_projection
        if proj is None:
            return self.width
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.text.context_length)

    @property
    def device(self) -> torch.device:
        return self.text.positional_embedding.device

    @classmethod
    def from_open_clip(cls, name: str, weights_path: str | os.PathLike | None = None, layer: Layer = "last",
                       hf_padding: bool = True, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                       freeze: bool = True) -> "TextEncoder":
        """The text tower of open_clip architecture ``name`` (``"ViT-H-14"``, ``"ViT-bigG-14"``, a registered config)
        with weights from a local open_clip checkpoint (full CLIP or text only); random weights if ``None``.

        Only the text tower is built; with weights it is built on the meta device and the tensors are assigned,
        so a ViT-bigG text tower loads without a second copy in memory.
        """
        if weights_path is None:
            with torch.device(device):
                text = _build_text_tower(name)
        else:
            sd = _load_state_dict(weights_path)
            with torch.device("meta"):
                text = _build_text_tower(name)
            missing, unexpected = text.load_state_dict(sd, strict=False, assign=True)
            if missing or unexpected:
                raise ValueError(f"{weights_path} does not match {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
            if getattr(text, "attn_mask", None) is not None:  # non-persistent buffer, still on meta
                text.register_buffer("attn_mask", text.build_causal_mask(), persistent=False)
            text = text.to(device)
        encoder = cls(text, layer=layer, hf_padding=hf_padding, name=name)
        if dtype is not None:
            encoder = encoder.to(dtype)
        return encoder.freeze() if freeze else encoder

    @classmethod
    def from_clip(cls, model: nn.Module, name: str, layer: Layer = "last", hf_padding: bool = True,
                  freeze: bool = True) -> "TextEncoder":
        """The text tower of an in-memory open_clip model (a copy; ``name`` is its registered architecture)."""
        if hasattr(model, "text"):  # CustomTextCLIP
            sd = model.text.state_dict()
        else:
            sd = {k: v for k, v in model.state_dict().items() if k.startswith(TEXT_KEYS)}
        with torch.device(model.logit_scale.device):
            text = _build_text_tower(name)
        text.load_state_dict(sd)
        encoder = cls(text.to(model.logit_scale.dtype), layer=layer, hf_padding=hf_padding, name=name)
        return encoder.freeze() if freeze else encoder

    def freeze(self) -> "TextEncoder":
        """Eval mode, no gradients: the paper keeps the text encoder frozen."""
        self.eval()
        self.requires_grad_(False)
        return self

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        return tokenize(prompts, self.context_length)

    def forward(self, prompts: str | Sequence[str] | torch.Tensor) -> TextOutput:
        ids = prompts if isinstance(prompts, torch.Tensor) else self.tokenize(prompts)
        ids = ids.to(self.device)
        text = self.text
        b, n = ids.shape
        eot_pos = ids.argmax(dim=-1)  # the end token has the largest id (open_clip's 'argmax' pooling)
        mask = text.attn_mask[:n, :n] if text.attn_mask is not None else None
        if self.hf_padding:
            after = torch.arange(n, device=ids.device)[None, :] > eot_pos[:, None]  # (B, n) padded positions
            ids = ids.masked_fill(after, EOT_ID)
            keys = torch.zeros(b, 1, n, device=ids.device).masked_fill(after[:, None, :], float("-inf"))
            mask = (keys if mask is None else mask[None] + keys).repeat_interleave(text.heads, dim=0)
        dtype = text.positional_embedding.dtype
        x = text.token_embedding(ids).to(dtype) + text.positional_embedding[:n].to(dtype)
        mask = mask.to(dtype) if mask is not None else None
        batch_first = getattr(text.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        blocks = text.transformer.resblocks
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                x_penultimate = x
            x = block(x, attn_mask=mask)
        if not batch_first:
            x, x_penultimate = x.transpose(0, 1), x_penultimate.transpose(0, 1)
        final = text.ln_final(x)
        pooled = final[torch.arange(b, device=ids.device), eot_pos]
        proj = text.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        tokens = {"last": final, "pre_norm": x}.get(self.layer)
        if tokens is None:
            tokens = text.ln_final(x_penultimate)
        return TextOutput(tokens, pooled)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, width={self.width}, embed_dim={self.embed_dim}, layer={self.layer!r}, hf_padding={self.hf_padding}"


# --------------------------------------------------------------------------------------------- transformers
class HFCLIPTextEncoder(nn.Module):
    """A transformers ``CLIPTokenizer`` + ``CLIPTextModel(WithProjection)`` used as diffusers' Würstchen pipelines do:
    ``padding="max_length"`` (77), truncation, ``attention_mask`` passed, ``last_hidden_state``.

    ``pooled`` is ``text_embeds`` for a model with projection, else the unprojected ``pooler_output``.
    """

    def __init__(self, tokenizer: Any, model: nn.Module, layer: Layer = "last", max_length: int = CONTEXT_LENGTH) -> None:
        super().__init__()
        _check_layer(layer)
        self.tokenizer, self.model, self.layer, self.max_length = tokenizer, model, layer, max_length

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, prompts: str | Sequence[str]) -> TextOutput:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        enc = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        device = next(self.model.parameters()).device
        out = self.model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                         output_hidden_states=self.layer != "last")
        if self.layer == "last":
            tokens = out.last_hidden_state
        elif self.layer == "pre_norm":
            tokens = out.hidden_states[-1]  # HF hidden_states[-1] is the last layer before final_layer_norm
        else:
            tokens = getattr(self.model, "text_model", self.model).final_layer_norm(out.hidden_states[-2])
        pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
        return TextOutput(tokens, pooled)


@functools.lru_cache(maxsize=1)
def _bpe_vocab_merges() -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary and merges, rebuilt from open_clip's shipped BPE file (what ``SimpleTokenizer`` does)."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {v: i for i, v in enumerate(vocab)}, merges


def hf_tokenizer(context_length: int = CONTEXT_LENGTH) -> Any:
    """A transformers ``CLIPTokenizer`` built offline from open_clip's BPE (same ids as :func:`tokenize`)."""
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_vocab_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=context_length)


def to_hf(encoder: TextEncoder, with_projection: bool = False) -> tuple[Any, nn.Module]:
    """Export an open_clip text tower as (``CLIPTokenizer``, ``CLIPTextModel[WithProjection]``) with equal outputs,
    e.g. to run our tiny text encoder inside diffusers' Würstchen pipelines."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text = encoder.text
    blocks = text.transformer.resblocks
    act = blocks[0].mlp.gelu
    hidden_act = "quick_gelu" if type(act).__name__ == "QuickGELU" else "gelu"
    if getattr(act, "approximate", "none") != "none" or not isinstance(text.ln_final, nn.LayerNorm):
        raise ValueError("only plain GELU/QuickGELU text towers with LayerNorm can be exported")
    config = CLIPTextConfig(vocab_size=text.vocab_size, hidden_size=encoder.width,
                            intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
                            num_attention_heads=text.heads, max_position_embeddings=encoder.context_length,
                            hidden_act=hidden_act, layer_norm_eps=text.ln_final.eps, projection_dim=encoder.embed_dim,
                            bos_token_id=SOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID)
    sd = {"embeddings.token_embedding.weight": text.token_embedding.weight,
          "embeddings.position_embedding.weight": text.positional_embedding,
          "final_layer_norm.weight": text.ln_final.weight, "final_layer_norm.bias": text.ln_final.bias}
    for i, blk in enumerate(blocks):
        p = f"encoder.layers.{i}."
        q, k, v = blk.attn.in_proj_weight.chunk(3)
        qb, kb, vb = blk.attn.in_proj_bias.chunk(3)
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                   p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb, p + "self_attn.v_proj.bias": vb,
                   p + "self_attn.out_proj.weight": blk.attn.out_proj.weight,
                   p + "self_attn.out_proj.bias": blk.attn.out_proj.bias,
                   p + "layer_norm1.weight": blk.ln_1.weight, p + "layer_norm1.bias": blk.ln_1.bias,
                   p + "layer_norm2.weight": blk.ln_2.weight, p + "layer_norm2.bias": blk.ln_2.bias,
                   p + "mlp.fc1.weight": blk.mlp.c_fc.weight, p + "mlp.fc1.bias": blk.mlp.c_fc.bias,
                   p + "mlp.fc2.weight": blk.mlp.c_proj.weight, p + "mlp.fc2.bias": blk.mlp.c_proj.bias})
    sd = {k: v.detach().clone() for k, v in sd.items()}
    if with_projection:
        model = CLIPTextModelWithProjection(config)
        model.text_model.load_state_dict(sd)
        proj = text.text_projection
        model.text_projection.weight.data.copy_(proj.weight if isinstance(proj, nn.Linear) else proj.detach().T)
    else:
        model = CLIPTextModel(config)
        getattr(model, "text_model", model).load_state_dict(sd)
    return hf_tokenizer(encoder.context_length), model.eval()


# --------------------------------------------------------------------------------------------- tiny CLIP
@dataclass(frozen=True)
class TinyClipConfig:
    """A small open_clip CLIP: ViT image tower, causal text transformer over the 49,408-token CLIP BPE."""

    embed_dim: int = 64
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 2
    vision_head_width: int = 32
    text_width: int = 128  # the conditioning width (clip_embd / c_cond) of the tiny Stage B / C
    text_heads: int = 4
    text_layers: int = 2
    context_length: int = CONTEXT_LENGTH  # token positions: the length of the sequence Stages B and C attend to

    def open_clip_config(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim,
                "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers, "width": self.vision_width,
                               "head_width": self.vision_head_width, "patch_size": self.patch_size},
                "text_cfg": {"context_length": self.context_length, "vocab_size": 49408, "width": self.text_width,
                             "heads": self.text_heads, "layers": self.text_layers}}

    @property
    def name(self) -> str:
        """The open_clip architecture name this config is registered under (content-addressed)."""
        digest = hashlib.sha1(json.dumps(self.open_clip_config(), sort_keys=True).encode()).hexdigest()[:8]
        return f"wurst-tiny-clip-{digest}"


# The token table (49,408 x text_width) dominates: 6.3 M of the tiny model's 7.2 M parameters.
TINY_CLIP_SIZES: dict[str, TinyClipConfig] = {
    "smoke": TinyClipConfig(vision_layers=1, text_layers=1),
    # The longest procedural caption has 36 BPE tokens, the longest emoji caption 42. The causal mask makes the first
    # 48 outputs of a 77-position tower equal to those of a 48-position one, so the shorter context only drops padding
    # positions, which Stages B and C would otherwise attend to: -20 % of a tiny Stage C training step.
    "tiny": TinyClipConfig(context_length=48),
    "paper": TinyClipConfig(embed_dim=256, vision_width=256, vision_layers=6, vision_head_width=64, text_width=256,
                            text_heads=4, text_layers=6),
}


@dataclass(frozen=True)
class ClipTraining:
    """Contrastive training of the tiny CLIP on the procedural dataset (one row per profile)."""

    steps: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 20
    pool: int = 4096      # rendered training images, re-used across epochs (rendering would dominate on CPU)
    eval_size: int = 256  # held-out (split="val") items for retrieval
    # Hard negatives: this fraction of each batch are counterfactual twins of the other items (the same scene with
    # its objects moved to other cells, data.procedural.counterfactual). Without them the tiny CLIP separates
    # captions by colour and background alone: after 300 steps its held-out position twin accuracy was 0.49 (chance
    # 0.5; colour 1.00), so Stage C, conditioned on its tokens, had no position to follow. With position twins,
    # 1,000 steps reach 0.96 (position and shape twins: 0.74; twin_accuracy below).
    twins: float = 0.5
    twin_kinds: tuple[str, ...] = ("position",)
    # Weight of a token-wise (FILIP, Yao et al. 2022) contrastive term beside the pooled one: each caption token is
    # matched to its most similar image patch and each patch to its token, so every token state is trained, not
    # only the end token's. 0: plain CLIP.
    filip: float = 0.0
    filip_batch: int = 64  # captions in the token-wise term (half originals, half their twins): its cost is quadratic

    def __post_init__(self) -> None:
        from .data.procedural import COUNTERFACTUALS

        if not 0 <= self.twins <= 0.5:
            raise ValueError(f"twins must be in [0, 0.5] (each twin needs its original in the batch), got {self.twins}")
        if self.filip < 0:
            raise ValueError(f"filip must be >= 0, got {self.filip}")
        if self.twins and not (self.twin_kinds and set(self.twin_kinds) <= set(COUNTERFACTUALS)):
            raise ValueError(f"twin_kinds must be a non-empty subset of {COUNTERFACTUALS}, got {self.twin_kinds}")


# tiny, measured on one CPU core (another job beside it): 1000 steps with position twins in 635 s, held-out t2i top-1
# 0.92 over 256 pairs, position twin accuracy 0.96 (300 steps without twins: 0.80 and 0.49).
# The token-wise term (filip) makes the layout readable from the token states, which Stage C cross-attends to: the
# layout probe of 05_stage_c (9 learned queries over frozen tokens, held-out occupied cells right after 300 / 1000 /
# 3000 steps) read the last layer 17 / 48 / 68 % without it and 25 / 72 / 88 % with it (penultimate layer: 24 / 51
# / 76 % and 28 / 65 / 96 %); retrieval and twin accuracy stayed the same (t2i top-1 0.92, position twins 0.95).
# It costs 0.36 s a step on one core (1000 steps: 920 s against 559 s; the whole batch of 128 instead of
# filip_batch 64 would cost 2.9 s a step).
CLIP_TRAINING: dict[str, ClipTraining] = {
    "smoke": ClipTraining(steps=20, batch_size=32, pool=256, eval_size=64, warmup=5, filip=1.0),
    "tiny": ClipTraining(steps=1000, batch_size=128, pool=8192, eval_size=256, filip=1.0),
    "paper": ClipTraining(steps=20_000, batch_size=512, lr=5e-4, warmup=500, pool=200_000, eval_size=1024, filip=1.0),
}


def register_tiny_clip(cfg: TinyClipConfig) -> str:
    """Register ``cfg`` with open_clip (a JSON in a temp folder + ``open_clip.add_model_config``); returns its name."""
    import open_clip

    name = cfg.name
    if open_clip.get_model_config(name) is None:
        directory = Path(tempfile.gettempdir()) / f"wurst_open_clip_configs_{os.getuid()}"
        path = directory / f"{name}.json"
        write_json(path, cfg.open_clip_config())
        open_clip.add_model_config(path)
    return name


def create_tiny_clip(cfg: TinyClipConfig, seed: int = 0) -> nn.Module:
    """A randomly initialised tiny CLIP (open_clip ``CLIP`` with ``output_dict=True``)."""
    import open_clip

    name = register_tiny_clip(cfg)
    torch.manual_seed(seed)
    if cfg.context_length == CONTEXT_LENGTH:
        return open_clip.create_model(name, pretrained=None, output_dict=True)
    # The weights of a shorter-context CLIP are the first rows of the 77-position initialisation: with the causal
    # mask it then trains exactly as the 77-position one (the loss reads the end token only). A fresh draw was a
    # different network: its position twin accuracy came out 0.61 instead of 0.96 (the tiny CLIP is init-sensitive).
    full = open_clip.create_model(register_tiny_clip(dataclasses.replace(cfg, context_length=CONTEXT_LENGTH)),
                                  pretrained=None, output_dict=True)
    model = open_clip.create_model(name, pretrained=None, output_dict=True)
    sd = full.state_dict()
    sd["positional_embedding"] = sd["positional_embedding"][:cfg.context_length]
    model.load_state_dict(sd)
    return model


class _Pool(torch.utils.data.Dataset):
    """A rendered, uint8 copy of the first ``n`` items of a dataset (images, captions, attributes if any)."""

    def __init__(self, dataset: torch.utils.data.Dataset, n: int) -> None:
        n = min(n, len(dataset))
        items = [dataset[i] for i in range(n)]
        self.images = torch.stack([(it["image"] * 255).round().to(torch.uint8) for it in items])
        self.captions = [it["caption"] for it in items]
        self.attributes = [it.get("attributes") for it in items]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i].float() / 255, "caption": self.captions[i], "index": i}


def add_twins(batch: dict[str, Any], attributes: Sequence[dict[str, Any]], n: int, rng: random.Random,
              kinds: Sequence[str] = ("position",)) -> dict[str, Any]:
    """``batch`` plus counterfactual twins of its first ``n`` items (``attributes`` are the batch's scenes), each
    with a random kind of change from ``kinds``, rendered at the batch's size: in-batch hard negatives for the
    contrastive loss."""
    from .data.procedural import caption, counterfactual, render

    twins = [counterfactual(a, rng.choice(list(kinds)), rng) for a in attributes[:n]]
    images = torch.stack([render(t, tuple(batch["image"].shape[-2:])) for t in twins])
    return {"image": torch.cat([batch["image"], images.to(batch["image"])]),
            "caption": list(batch["caption"]) + [caption(t, rng) for t in twins]}


@torch.no_grad()
def twin_accuracy(model: nn.Module, dataset: torch.utils.data.Dataset, n: int = 256, seed: int = 0,
                  batch_size: int = 128) -> dict[str, float]:
    """What the text tower tells apart: for held-out scenes and their counterfactual twins of each kind
    (``data.procedural.counterfactual``), the fraction of captions closer to their own image than to the twin's
    image, both ways (chance 0.5). Needs a dataset with ground-truth ``attributes``."""
    from .data.procedural import COUNTERFACTUALS, caption, counterfactual, render

    model.eval()
    device = model.logit_scale.device
    size = model.visual.image_size[0]
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    if any(it.get("attributes") is None for it in items):
        raise ValueError("twin_accuracy needs a dataset with ground-truth attributes (procedural)")

    def features(images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        img, txt = [], []
        for s in range(0, len(captions), batch_size):
            img.append(F.normalize(model.encode_image(_image_input(images[s:s + batch_size].to(device), size)), dim=-1))
            ids = tokenize(captions[s:s + batch_size], _context(model)).to(device)
            txt.append(F.normalize(model.encode_text(ids), dim=-1))
        return torch.cat(img), torch.cat(txt)

    image, text = features(torch.stack([it["image"] for it in items]), [it["caption"] for it in items])
    out = {}
    for kind in COUNTERFACTUALS:
        rng = random.Random(f"twins:{seed}:{kind}")
        twins = [counterfactual(it["attributes"], kind, rng) for it in items]
        t_image, t_text = features(torch.stack([render(t, size) for t in twins]), [caption(t, rng) for t in twins])
        own = (text * image).sum(-1), (t_text * t_image).sum(-1)
        cross = (text * t_image).sum(-1), (t_text * image).sum(-1)
        out[kind] = torch.cat([own[0] > cross[0], own[1] > cross[1]]).float().mean().item()
    return out


def _image_input(images: torch.Tensor, size: int) -> torch.Tensor:
    from .data.transforms import clip_normalize

    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return clip_normalize(images)


def _context(model: nn.Module) -> int:
    """Token positions of an open_clip CLIP (77 unless its config says otherwise)."""
    return int(getattr(model, "context_length", CONTEXT_LENGTH))


def _text_features(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``model.encode_text`` (normalised) on the prefix up to the batch's last end token: with the causal mask
    the pooled end-token feature does not depend on later positions, and captions are far shorter than the context.
    Also every position's normalised projected state and which positions hold the caption (its words and end token,
    for :func:`filip_loss`): ``(pooled, tokens, valid)``."""
    n = int(ids.argmax(dim=-1).max()) + 1
    ids = ids[:, :n]
    x = model.token_embedding(ids) + model.positional_embedding[:n]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    eot = ids.argmax(dim=-1)
    pooled = F.normalize(x[torch.arange(ids.shape[0], device=ids.device), eot] @ model.text_projection, dim=-1)
    position = torch.arange(n, device=ids.device)[None, :]
    return pooled, F.normalize(x @ model.text_projection, dim=-1), (position >= 1) & (position <= eot[:, None])


def _image_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pooled image embedding and patch embeddings (B, patches, embed_dim) of the ViT tower, in one pass
    (open_clip's class-token pooling: ``ln_post`` on every position, then the projection)."""
    visual = model.visual
    x = visual.ln_post(visual.transformer(visual._embeds(images)))
    x = x @ visual.proj
    return F.normalize(x[:, 0], dim=-1), F.normalize(x[:, 1:], dim=-1)


def filip_loss(tokens: torch.Tensor, valid: torch.Tensor, patches: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FILIP's token-wise contrastive loss (Yao et al. 2022, eq. 4-5): caption-to-image similarity is the mean over
    the caption's tokens of their best patch, image-to-caption the mean over patches of their best token; InfoNCE
    both ways over the batch. tokens (B, n, d) and patches (B, P, d) normalised, valid (B, n) the caption tokens."""
    sim = torch.einsum("tkd,ipd->tikp", tokens, patches)  # (captions, images, tokens, patches)
    w = valid.to(sim.dtype)[:, None, :]
    t2i = (sim.amax(dim=3) * w).sum(-1) / w.sum(-1)
    i2t = sim.masked_fill(~valid[:, None, :, None], float("-inf")).amax(dim=2).mean(-1)
    target = torch.arange(tokens.shape[0], device=tokens.device)
    return 0.5 * (F.cross_entropy(scale * t2i, target) + F.cross_entropy(scale * i2t.T, target))


def train_tiny_clip(cfg: TinyClipConfig, dataset: torch.utils.data.Dataset, training: ClipTraining,
                    seed: int = 0, progress: bool = True, model: nn.Module | None = None,
                    device: str | torch.device | None = None, threads: int | None = 1) -> tuple[nn.Module, list[float]]:
    """Contrastive (InfoNCE, open_clip ``ClipLoss``) training; returns the model (eval mode) and the loss per step.

    ``device``: default CUDA when available, else CPU. ``threads``: CPU intra-op threads during training
    (``None``: torch's setting). The tiny model's ops are too small to gain from several threads, and on a shared
    CPU oversubscribed threads spin: on the 2-core workbench machine under load a batch-128 step took 7.3 s with
    2 threads and 1.2 s with 1.

    AdamW with linear warmup then cosine decay, no weight decay on gains/biases/logit scale, gradient clip 1.0.
    The 49,408-row token table gets sparse gradients and SparseAdam: a dense update of the whole table would cost
    more than the rest of the step on CPU, and a batch only touches a few dozen rows.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads_before = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        return _train(cfg, dataset, training, seed, progress, model, device)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: TinyClipConfig, dataset: torch.utils.data.Dataset, training: ClipTraining, seed: int,
           progress: bool, model: nn.Module | None, device: torch.device) -> tuple[nn.Module, list[float]]:
    from open_clip.loss import ClipLoss
    from tqdm.auto import tqdm

    from .data import cycle, make_loader

    model = (model if model is not None else create_tiny_clip(cfg, seed)).to(device)
    model.train()
    pool = _Pool(dataset, training.pool)
    n_twins = int(round(training.batch_size * training.twins))
    if n_twins and any(a is None for a in pool.attributes):
        raise ValueError("twins > 0 needs a dataset with ground-truth attributes (procedural); set twins=0")
    batches = cycle(make_loader(pool, min(training.batch_size - n_twins, len(pool)), seed=seed))
    twin_rng = random.Random(f"clip-twins:{seed}")
    table = model.token_embedding.weight
    model.token_embedding.sparse = True
    dense = [p for p in model.parameters() if p is not table]
    opt = torch.optim.AdamW([{"params": [p for p in dense if p.ndim >= 2], "weight_decay": training.weight_decay},
                             {"params": [p for p in dense if p.ndim < 2], "weight_decay": 0.0}],
                            lr=training.lr, betas=(0.9, 0.98), eps=1e-6)
    opt_table = torch.optim.SparseAdam([table], lr=training.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < training.warmup:
            return (step + 1) / training.warmup
        t = (step - training.warmup) / max(1, training.steps - training.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_at) for o in (opt, opt_table)]
    loss_fn = ClipLoss()
    losses: list[float] = []
    bar = tqdm(range(training.steps), desc="tiny CLIP", disable=not progress, mininterval=2.0)
    for _ in bar:
        batch = next(batches)
        if n_twins:
            batch = add_twins(batch, [pool.attributes[i] for i in batch["index"].tolist()], n_twins, twin_rng,
                              training.twin_kinds)
        image_f, patches = _image_features(model, _image_input(batch["image"].to(device), cfg.image_size))
        ids = tokenize(batch["caption"], _context(model)).to(device)
        text_f, tokens, valid = _text_features(model, ids)
        loss = loss_fn(image_f, text_f, model.logit_scale.exp())
        if training.filip:
            k = min(training.filip_batch // 2, n_twins) if n_twins else min(training.filip_batch, len(ids))
            sub = torch.arange(k, device=device)
            if n_twins:  # originals [0, k) with their twins, which follow the len(ids) - n_twins originals
                sub = torch.cat([sub, sub + len(ids) - n_twins])
            loss = loss + training.filip * filip_loss(tokens[sub], valid[sub], patches[sub], model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        opt_table.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense, 1.0)
        opt.step()
        opt_table.step()
        for s in scheds:
            s.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100 (open_clip training does the same)
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.token_embedding.sparse = False
    return model.eval(), losses


@torch.no_grad()
def encode_pairs(model: nn.Module, dataset: torch.utils.data.Dataset, n: int | None = None,
                 image_size: int | None = None, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Normalised image and text features of the first ``n`` items, and the items (without images)."""
    model.eval()
    device = model.logit_scale.device
    n = min(n or len(dataset), len(dataset))
    size = image_size or model.visual.image_size[0]
    image_f, text_f, items = [], [], []
    for start in range(0, n, batch_size):
        batch = [dataset[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([b["image"] for b in batch]).to(device)
        image_f.append(F.normalize(model.encode_image(_image_input(images, size)), dim=-1).cpu())
        ids = tokenize([b["caption"] for b in batch], _context(model)).to(device)
        text_f.append(F.normalize(model.encode_text(ids), dim=-1).cpu())
        items += [{k: v for k, v in b.items() if k != "image"} for b in batch]
    return torch.cat(image_f), torch.cat(text_f), items


def retrieval_metrics(image_f: torch.Tensor, text_f: torch.Tensor, items: Sequence[dict] | None = None) -> dict[str, float]:
    """Text->image retrieval over N held-out pairs (chance 1/N for top-1).

    ``t2i_top1``/``t2i_top5``: the paired image ranks first / in the top 5; ``i2t_top1`` the other way.
    With ground truth: ``t2i_top1_attributes`` counts the top image as right when its caption-visible attributes
    equal the query's (duplicates are legitimate ties), and ``t2i_background``/``t2i_count`` the top image's
    background / object count.
    """
    n = image_f.shape[0]
    sim = text_f @ image_f.T  # (text, image)
    target = torch.arange(n)
    ranks = sim.argsort(dim=1, descending=True)
    metrics = {"n": float(n), "chance_top1": 1.0 / n, "chance_top5": min(1.0, 5.0 / n),
               "t2i_top1": (ranks[:, 0] == target).float().mean().item(),
               "t2i_top5": (ranks[:, :5] == target[:, None]).any(dim=1).float().mean().item(),
               "i2t_top1": (sim.argmax(dim=0) == target).float().mean().item()}
    if items is not None and all("attributes" in it for it in items):
        from .data.procedural import signature

        attrs = [it["attributes"] for it in items]
        top = ranks[:, 0].tolist()
        metrics["t2i_top1_attributes"] = sum(signature(attrs[j]) == signature(attrs[i]) for i, j in enumerate(top)) / n
        metrics["t2i_background"] = sum(attrs[j]["background"] == attrs[i]["background"] for i, j in enumerate(top)) / n
        metrics["t2i_count"] = sum(attrs[j]["count"] == attrs[i]["count"] for i, j in enumerate(top)) / n
    return metrics


def plot_similarity(sim: torch.Tensor, images: torch.Tensor, captions: Sequence[str], max_chars: int = 60) -> Any:
    """Heatmap of text-image cosine similarities (rows: captions, columns: the images shown above)."""
    import matplotlib.pyplot as plt

    n = sim.shape[0]
    fig = plt.figure(figsize=(3 + 0.55 * n + max_chars * 0.06, 1.2 + 0.5 * n))
    grid = fig.add_gridspec(2, 1, height_ratios=[1, n], hspace=0.02)
    top, ax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    top.imshow(torch.cat(list(images.clamp(0, 1)), dim=2).permute(1, 2, 0).numpy(), extent=(-0.5, n - 0.5, 0, 1),
               aspect="auto")
    top.axis("off")
    im = ax.imshow(sim.numpy(), cmap="viridis", aspect="auto")
    ax.set_yticks(range(n), [c if len(c) <= max_chars else c[: max_chars - 3] + "..." for c in captions], fontsize=7)
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("held-out image")
    for i in range(n):
        ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1))
    fig.colorbar(im, ax=ax, fraction=0.03, label="cosine similarity")
    return fig


# --------------------------------------------------------------------------------------------- save / load
def save_tiny_clip(model: nn.Module, cfg: TinyClipConfig, directory: str | os.PathLike,
                   extra: dict[str, Any] | None = None) -> Path:
    """``model.safetensors`` + ``model.json`` (architecture, open_clip config, ``extra`` e.g. metrics), atomically."""
    config = {"kind": "open_clip", "architecture": cfg.name, "tiny_clip": dataclasses.asdict(cfg),
              "open_clip_config": cfg.open_clip_config(), **(extra or {})}
    return save_model_checkpoint(directory, model.state_dict(), config)


def _read_checkpoint_config(directory: Path) -> tuple[TinyClipConfig, dict[str, Any]]:
    meta_path = directory / "model.json"
    if not meta_path.is_file() or not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"no tiny-CLIP checkpoint (model.safetensors + model.json) in {directory}")
    meta = json.loads(meta_path.read_text())
    return TinyClipConfig(**meta["tiny_clip"]), meta


def load_tiny_clip(directory: str | os.PathLike) -> tuple[nn.Module, TinyClipConfig, dict[str, Any]]:
    """The full tiny CLIP (both towers, eval mode, frozen), its config and the checkpoint's JSON."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg, meta = _read_checkpoint_config(directory)
    model = create_tiny_clip(cfg)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    model.eval().requires_grad_(False)
    return model, cfg, meta


def text_encoder_dir(profile: str) -> Path:
    """Where each profile's trained tiny text encoder lives, shared by all notebooks of that profile."""
    return paths.cache_dir() / profile / "text_encoder"


def load_text_encoder(directory: str | os.PathLike, layer: Layer = "last", hf_padding: bool = True,
                      device: str | torch.device = "cpu") -> TextEncoder:
    """The frozen text tower of a tiny-CLIP checkpoint folder written by :func:`save_tiny_clip`."""
    directory = Path(directory)
    cfg, _ = _read_checkpoint_config(directory)
    return TextEncoder.from_open_clip(register_tiny_clip(cfg), directory / "model.safetensors", layer=layer,
                                      hf_padding=hf_padding, device=device)


def load_tiny_text_encoder(profile: str, layer: Layer = "last", hf_padding: bool = True) -> TextEncoder:
    """The frozen text tower of the profile's trained tiny CLIP (error if notebook 01 has not trained it)."""
    return load_text_encoder(text_encoder_dir(profile), layer=layer, hf_padding=hf_padding)


def train_and_save_tiny_clip(profile: str, seed: int = 0, progress: bool = True,
                             directory: str | os.PathLike | None = None,
                             training: ClipTraining | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train the profile's tiny CLIP on the procedural dataset (``training`` overrides the profile's schedule),
    measure held-out text->image retrieval, save to ``directory`` (default: the profile's shared
    :func:`text_encoder_dir`); returns (model, info) with the losses, retrieval metrics and wall time."""
    from .data import ProceduralDataset

    if profile not in TINY_CLIP_SIZES:
        raise ValueError(f"no tiny CLIP for profile {profile!r}; expected one of {sorted(TINY_CLIP_SIZES)}")
    cfg, training = TINY_CLIP_SIZES[profile], training or CLIP_TRAINING[profile]
    train = ProceduralDataset(training.pool, cfg.image_size, seed=seed, split="train")
    held_out = ProceduralDataset(training.eval_size, cfg.image_size, seed=seed, split="val")
    t0 = time.time()
    model, losses = train_tiny_clip(cfg, train, training, seed=seed, progress=progress)
    wall = time.time() - t0
    metrics = retrieval_metrics(*encode_pairs(model, held_out))
    info = {"profile": profile, "seed": seed, "training": dataclasses.asdict(training), "train_seconds": wall,
            "final_loss": losses[-1], "retrieval": metrics,
            "twin_accuracy": twin_accuracy(model, held_out, training.eval_size, seed=seed)}
    save_tiny_clip(model, cfg, directory or text_encoder_dir(profile), extra=info)
    return model, {**info, "losses": losses}


def get_or_train_tiny_text_encoder(profile: str, layer: Layer = "last", progress: bool = False) -> TextEncoder:
    """The profile's frozen tiny text encoder, training and caching it first if it is missing."""
    if not (text_encoder_dir(profile) / "model.json").is_file():
        train_and_save_tiny_clip(profile, progress=progress)
    return load_tiny_text_encoder(profile, layer=layer)


@dataclass(frozen=True)
class NotebookParams:
    """Parameters of notebooks/01_text_encoder.ipynb (0 / -1: the profile's value in ``CLIP_TRAINING``)."""

    profile: str = choice("tiny", *PROFILES)
    seed: int = param(0, ge=0)
    steps: int = param(0, ge=1)
    batch_size: int = param(0, ge=2)        # a contrastive batch needs negatives
    lr: float = param(0.0, gt=0, le=1)
    pool: int = param(0, ge=1)
    eval_size: int = param(0, ge=2)
    install: bool = True  # also save as the profile's shared text encoder (used by Stages B and C)
    twins: float = param(-1.0, ge=0, le=0.5, unset=-1.0)  # fraction of each batch that are hard-negative twins
    filip: float = param(-1.0, ge=0, unset=-1.0)          # weight of the token-wise (FILIP) term; 0: plain CLIP

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        t = CLIP_TRAINING[profile]
        return {"steps": t.steps, "batch_size": t.batch_size, "lr": t.lr, "pool": t.pool, "eval_size": t.eval_size,
                "twins": t.twins, "filip": t.filip}

    def training(self) -> ClipTraining:
        return dataclasses.replace(CLIP_TRAINING[self.profile], steps=self.steps, batch_size=self.batch_size,
                                   lr=self.lr, pool=self.pool, eval_size=self.eval_size, twins=self.twins,
                                   filip=self.filip)


def char_tokenizer(context_length: int = CONTEXT_LENGTH) -> Any:
    """An offline transformers ``CLIPTokenizer`` over a character vocabulary (diffusers-reference.md §3), for
    random-weight parity tests and benchmarks: prompts still pad to 77 tokens with ``<|endoftext|>``."""
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,'-!?":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=context_length)
