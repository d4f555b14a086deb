"""CLIP score and the PickScore procedure with any CLIP as judge (paper §4, "Evaluation Metrics", Table 1).

PickScore (Kirstain et al. 2023; docs/reference.md#pickscore) scores a candidate image for a prompt
as ``logit_scale.exp() * cos(text_emb, image_emb)`` with L2-normalised embeddings, and turns the scores of
the candidates for one prompt into a preference with a softmax. The paper reports, per other model, "the
percentage of images where PickScore preferred the image of Würstchen over the image of the other model":
one image per model and prompt, a win when ``p_A - p_B > tie_tol``.

Tie rule: a pair with ``|p_A - p_B| <= tie_tol`` counts as half a win for each side, as in PickScore's own
accuracy (0.5 for a tie). The default ``tie_tol = 0`` makes only exactly equal scores a tie (e.g. the same
image twice), which is the plain "A scores higher" count of the paper.

A judge is any CLIP: an open_clip model, a transformers ``CLIPModel`` (PickScore_v1 is one, see
:func:`load_pickscore`), or offline a tiny CLIP trained apart from the conditioning text encoder.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .stats import Estimate, bootstrap

# OpenAI CLIP normalisation, also used by the laion CLIP-H processor that PickScore_v1 ships with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: Tensor, size: int, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> Tensor:
    """CLIP's image transform on tensors in [0,1]: shortest side to ``size`` (bicubic, antialiased), centre
    crop ``size`` x ``size``, normalise. Mirrors ``CLIPImageProcessor`` (which works on PIL uint8 images, so
    values differ by resampling rounding only)."""
    _check_images(images)
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (B,3,H,W) in [0,1], got {shape}")


@dataclass
class ClipJudge:
    """A CLIP used as a judge: embeds images (B,3,H,W in [0,1]) and prompts into one space.

    ``encode_image`` receives preprocessed pixels (see :func:`clip_preprocess`), ``encode_text`` a list of
    strings; both return unnormalised embeddings. ``logit_scale`` is the model's ``logit_scale.exp()``.
    """

    encode_image: Callable[[Tensor], Tensor]
    encode_text: Callable[[list[str]], Tensor]
    logit_scale: float
    image_size: int
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD
    name: str = "clip"

    @torch.no_grad()
    def embed_images(self, images: Tensor, batch_size: int = 64) -> Tensor:
        _check_images(images)
        out = [self.encode_image(clip_preprocess(images[i:i + batch_size], self.image_size, self.mean, self.std))
               for i in range(0, images.shape[0], batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str], batch_size: int = 256) -> Tensor:
        prompts = _check_prompts(prompts)
        out = [self.encode_text(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1)

    def cosine(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        """Cosine similarity of each prompt with its image, shape (P,)."""
        _check_pairs(prompts, images)
        return (self.embed_texts(prompts) * self.embed_images(images)).sum(-1)

    def scores(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        """PickScore of each (prompt, image) pair: ``logit_scale * cos``, shape (P,)."""
        return self.logit_scale * self.cosine(prompts, images)

    @classmethod
    def from_open_clip(cls, model: torch.nn.Module, tokenizer: Callable[[list[str]], Tensor] | None = None,
                       mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                       name: str = "open_clip") -> "ClipJudge":
        """Wrap an open_clip ``CLIP``; the default tokenizer is open_clip's CLIP BPE (ships in the wheel)."""
        model = model.eval()
        context = int(getattr(model, "context_length", 77))
        tok = tokenizer or (lambda texts: _bpe_tokenizer()(texts, context_length=context))
        size = model.visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        device = next(model.parameters()).device
        return cls(encode_image=lambda x: model.encode_image(x.to(device)),
                   encode_text=lambda texts: model.encode_text(tok(texts).to(device)),
                   logit_scale=model.logit_scale.exp().item(), image_size=size, mean=mean, std=std, name=name)

    @classmethod
    def from_transformers(cls, model: torch.nn.Module, tokenizer: Callable | None = None,
                          mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                          name: str = "hf_clip") -> "ClipJudge":
        """Wrap a transformers ``CLIPModel``. ``tokenizer``: a transformers CLIP tokenizer, or None for
        open_clip's BPE, whose ids equal the HF CLIP tokenizer's (docs/reference.md#tokenizer)."""
        model = model.eval()
        device = next(model.parameters()).device
        max_len = int(model.config.text_config.max_position_embeddings)
        vocab = int(model.config.text_config.vocab_size)

        def encode_text(texts: list[str]) -> Tensor:
            if tokenizer is not None:
                enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
                ids, mask = enc["input_ids"], enc["attention_mask"]
            else:
                ids, mask = _open_clip_ids(texts, max_len)
            if int(ids.max()) >= vocab:
                raise ValueError(f"token id {int(ids.max())} outside the judge's vocabulary of {vocab}")
            return _pooled(model.get_text_features(input_ids=ids.to(device), attention_mask=mask.to(device)))

        size = int(model.config.vision_config.image_size)
        return cls(encode_image=lambda x: _pooled(model.get_image_features(pixel_values=x.to(device))),
                   encode_text=encode_text, logit_scale=model.logit_scale.exp().item(), image_size=size,
                   mean=mean, std=std, name=name)


def _pooled(out: Tensor | object) -> Tensor:
    # transformers >= 5 wraps the projected embedding in pooler_output (docs/reference.md#evaluation-metrics)
    return out if isinstance(out, Tensor) else out.pooler_output


@functools.lru_cache(maxsize=1)
def _bpe_tokenizer() -> Callable:
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")  # CLIP BPE, 49,408 tokens, context 77; no network


def _open_clip_ids(texts: list[str], context_length: int) -> tuple[Tensor, Tensor]:
    ids = _bpe_tokenizer()(texts, context_length=context_length)
    eot = ids.argmax(-1, keepdim=True)  # <|endoftext|> = 49407 is the largest id: its first position
    mask = (torch.arange(ids.shape[1]).unsqueeze(0) <= eot).long()
    return ids, mask


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a sequence of strings")
    return list(prompts)


def _check_pairs(prompts: Sequence[str], images: Tensor) -> None:
    _check_images(images)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {images.shape[0]} images: one image per prompt expected")


def load_pickscore(model_dir: str | PathLike, processor_dir: str | PathLike | None = None,
                   device: str | torch.device = "cpu") -> ClipJudge:
    """PickScore_v1 (``yuvalkirstain/PickScore_v1``) from a local folder, as a judge. Nothing is downloaded.

    ``model_dir`` holds the CLIPModel (``config.json`` + weights). The tokenizer and the image normalisation
    are read from ``processor_dir`` (a local copy of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s processor
    files, as in PickScore's README) or ``model_dir``; without tokenizer files, open_clip's identical BPE is
    used.
    """
    from transformers import CLIPModel, CLIPTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no PickScore model at {model_dir} (expected config.json and weights)")
    model = CLIPModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
    proc = Path(processor_dir) if processor_dir is not None else model_dir
    tokenizer = None
    if (proc / "vocab.json").is_file() and (proc / "merges.txt").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(proc, local_files_only=True)
    mean, std = CLIP_MEAN, CLIP_STD
    if (proc / "preprocessor_config.json").is_file():
        cfg = json.loads((proc / "preprocessor_config.json").read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return ClipJudge.from_transformers(model, tokenizer, mean=mean, std=std, name="PickScore_v1")


def clip_score(judge: ClipJudge, prompts: Sequence[str], images: Tensor, n_boot: int = 1000,
               seed: int = 0) -> Estimate:
    """CLIP score as torchmetrics defines it: ``max(100 * mean_i cos_i, 0)`` (the clamp is on the mean)."""
    cos = judge.cosine(prompts, images).double()
    return bootstrap(lambda i: max(100.0 * cos[i].mean().item(), 0.0), len(cos), n_boot=n_boot, seed=seed)


def pick_scores(judge: ClipJudge, prompts: Sequence[str], images: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """PickScore of every model's image for every prompt: ``{model: (P,)}``; the prompts are embedded once."""
    text = judge.embed_texts(prompts)
    out = {}
    for name, imgs in images.items():
        _check_pairs(prompts, imgs)
        out[name] = judge.logit_scale * (text * judge.embed_images(imgs)).sum(-1)
    return out


def preference_probs(scores: Tensor) -> Tensor:
    """Softmax over the candidates of each prompt: ``scores`` (P, M) -> preference probabilities (P, M)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (prompts, candidates), got shape {tuple(scores.shape)}")
    return torch.softmax(scores.double(), dim=-1)


def pairwise_outcomes(scores_a: Tensor, scores_b: Tensor, tie_tol: float = 0.0) -> Tensor:
    """Per-prompt outcome of A against B: 1 (A preferred), 0.5 (tie, see module docstring), 0 (B preferred)."""
    if scores_a.shape != scores_b.shape or scores_a.dim() != 1:
        raise ValueError(f"expected two (P,) score vectors, got {tuple(scores_a.shape)} and {tuple(scores_b.shape)}")
    if tie_tol < 0:
        raise ValueError(f"tie_tol must be >= 0, got {tie_tol}")
    p = preference_probs(torch.stack([scores_a, scores_b], dim=-1))
    margin = p[:, 0] - p[:, 1]
    return torch.where(margin.abs() <= tie_tol, 0.5, (margin > 0).double())


def win_rate(scores_a: Tensor, scores_b: Tensor, tie_tol: float = 0.0, n_boot: int = 1000,
             seed: int = 0) -> Estimate:
    """Percentage of prompts on which A's image is preferred over B's (paper Table 1), with a bootstrap CI."""
    outcomes = pairwise_outcomes(scores_a, scores_b, tie_tol)
    return bootstrap(lambda i: 100.0 * outcomes[i].mean().item(), len(outcomes), n_boot=n_boot, seed=seed)
