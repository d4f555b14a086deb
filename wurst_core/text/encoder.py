"""Text conditioning: open_clip text towers and the transformers wrapper of the pipelines.

Würstchen conditions Stages B and C on *un-pooled* CLIP text embeddings (paper §4: CLIP-H; released v2
Stage C: CLIP-bigG), all 77 token vectors of the final layer after the final LayerNorm: HF
``CLIPTextModel(...).last_hidden_state`` with ``padding="max_length"`` and the attention mask passed
(docs/reference.md#text-conditioning). StableCascade (v3) instead takes the last
layer *before* the final norm (HF ``hidden_states[-1]``), here ``layer="pre_norm"``; SD2's penultimate layer
(``ln_final`` of layer L-1) is ``layer="penultimate"``.

Padding. open_clip pads with id 0 and only applies the causal mask; the HF tokenizer of the released models pads
with ``<|endoftext|>`` and the attention mask hides padded keys. The token vectors up to and including the end
token are identical either way; the padded positions (which Stage B/C attend to) differ. ``hf_padding=True``
(default) reproduces the HF/diffusers computation with open_clip weights.

The tiny CLIP that the small profiles condition on, its training, saving and loading are in :mod:`.clip`.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import torch
from torch import nn

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


def char_tokenizer(context_length: int = CONTEXT_LENGTH) -> Any:
    """An offline transformers ``CLIPTokenizer`` over a character vocabulary (docs/reference.md#tokenizer), for
    random-weight parity tests and benchmarks: prompts still pad to 77 tokens with ``<|endoftext|>``."""
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,'-!?":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=context_length)
