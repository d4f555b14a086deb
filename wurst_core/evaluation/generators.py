"""Generators to compare: any callable ``prompts -> images (B,3,H,W) in [0,1]`` plugs in.

A trained Würstchen, a checkpoint at another step, another architecture, or released weights on a machine that has
them are all wrapped the same way (:func:`pipeline_generator` for a ``wurst_core.Pipeline``). Systems compared prompt
by prompt draw with per-prompt seeds (:func:`per_prompt_generator`): prompt ``i`` gets the same seed in every system,
and its image does not depend on the batch it was drawn in. Reference rows make
the tables readable before any model is trained: the ground-truth renders of the prompts (the ceiling), the renders
of other prompts (the chance floor of prompt adherence, at real-image quality) and uniform noise.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Generator = Callable[[list[str]], Tensor]


def generate(generator: Generator, prompts: Sequence[str], batch_size: int = 16, size: int | None = None,
             seconds: list[float] | None = None) -> Tensor:
    """Images for ``prompts`` in batches, checked, clamped to [0,1] and (optionally) resized to ``size``; each
    batch's wall seconds appended to ``seconds`` when given."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to generate from")
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        start = time.perf_counter()
        # a positional generator (stored images) is told where each prompt sits, so equal prompts never collide
        images = (generator(chunk, positions=list(range(i, i + len(chunk))))
                  if getattr(generator, "positional", False) else generator(chunk))
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[:2] != (len(chunk), 3):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"a generator must return ({len(chunk)}, 3, H, W) images for {len(chunk)} prompts, got {shape}")
        if not torch.isfinite(images).all():
            raise ValueError("generator returned non-finite pixel values")
        images = images.detach().float().cpu()
        if seconds is not None:
            seconds.append(time.perf_counter() - start)
        if size is not None and images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out.append(images.clamp(0, 1))
    return torch.cat(out)


class _Lookup:
    """Stored images served by position: the i-th prompt of the evaluated list gets the i-th stored image."""

    positional = True  # generate() passes each prompt's position in the evaluated list

    def __init__(self, prompts: Sequence[str], images: Tensor):
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts but {images.shape[0]} images")
        self.prompts, self.images = list(prompts), images

    def __call__(self, batch: list[str], positions: Sequence[int] | None = None) -> Tensor:
        if positions is None:
            positions = [-1] * len(batch)
        if len(positions) != len(batch):
            raise ValueError(f"{len(batch)} prompts but {len(positions)} positions")
        # the position decides when it holds that prompt; otherwise only a prompt stored once is found by its text
        found = [i if 0 <= i < len(self.prompts) and self.prompts[i] == p else self._only_position(p)
                 for i, p in zip(positions, batch)]
        return self.images[found]

    def _only_position(self, prompt: str) -> int:
        found = [i for i, p in enumerate(self.prompts) if p == prompt]
        if not found:
            raise KeyError(f"no stored image for prompt {prompt!r}")
        if len(found) > 1:  # a string alone cannot say which of the equal prompts is meant
            raise KeyError(f"prompt {prompt!r} is stored at positions {found}: generate() over the stored "
                           f"prompt list looks it up by position")
        return found[0]


def lookup_generator(prompts: Sequence[str], images: Tensor) -> Generator:
    """Returns the stored image of each prompt: with the dataset's renders, the ceiling of every metric.

    The lookup is by (position, prompt): through :func:`generate` on the stored prompt list, the i-th prompt gets
    the i-th image, so equal prompts keep their own images. Where the position does not hold the prompt (another
    list, or a direct call with prompts alone), a prompt stored once is found by its text and one stored more
    than once is refused as ambiguous.
    """
    return _Lookup(prompts, images)


def shuffled_generator(prompts: Sequence[str], images: Tensor, seed: int = 0) -> Generator:
    """Returns the stored image of *another* position (a random cycle): real-image quality, chance adherence.

    Positional like :func:`lookup_generator`; with repeated prompts, a position may draw an equal prompt's image.
    """
    n = len(prompts)
    if n < 2 or n != images.shape[0]:
        raise ValueError(f"need >= 2 prompts and as many images, got {n} and {images.shape[0]}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    other = torch.empty(n, dtype=torch.long)
    for i in range(n):
        other[perm[i]] = perm[(i + 1) % n]
    return lookup_generator(prompts, images[other])


def noise_generator(size: int = 64, seed: int = 0) -> Generator:
    """Uniform noise images; deterministic for a seed and a sequence of calls."""
    gen = torch.Generator().manual_seed(seed)
    return lambda batch: torch.rand(len(batch), 3, size, size, generator=gen)


def prompt_generators(seed: int, positions: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per prompt, seeded from ``(seed, position)``: the same seed and position give the same
    generator in every system and in any batch."""
    if seed < 0 or any(i < 0 for i in positions):
        raise ValueError(f"seed and positions must be >= 0, got {seed} and {list(positions)}")
    # SeedSequence mixes the pair into 32 bits: torch's CPU generator keeps only a seed's low 32 bits
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
            for i in positions]


class _PerPrompt:
    """``sample(prompts, generators)`` called with one generator per prompt, from each prompt's position."""

    positional = True  # generate() passes each prompt's position in the evaluated list

    def __init__(self, sample: Callable[[list[str], list[torch.Generator]], Tensor], seed: int):
        self.sample, self.seed = sample, seed

    def __call__(self, batch: list[str], positions: Sequence[int] | None = None) -> Tensor:
        if positions is None or len(positions) != len(batch):
            raise ValueError("per-prompt seeds need each prompt's position: draw through generate()")
        return self.sample(list(batch), prompt_generators(self.seed, positions))


class _Reindexed:
    """A positional generator drawn for a subset of the evaluated prompts, each at its position in the whole list."""

    positional = True

    def __init__(self, generator: Generator, positions: Sequence[int]):
        self.generator, self.positions = generator, list(positions)

    def __call__(self, batch: list[str], positions: Sequence[int] | None = None) -> Tensor:
        if positions is None or len(positions) != len(batch):
            raise ValueError("a reindexed generator needs each prompt's position: draw through generate()")
        return self.generator(batch, positions=[self.positions[i] for i in positions])


def reindexed(generator: Generator, positions: Sequence[int]) -> Generator:
    """``generator`` for the prompts at ``positions`` of a longer list: prompt i of the subset is drawn as the
    whole list's prompt ``positions[i]`` (the same per-prompt seed), so a subset pairs with the full draw."""
    if not getattr(generator, "positional", False):
        raise ValueError("only a positional generator (per-prompt seeds, stored images) can be reindexed")
    return _Reindexed(generator, positions)


def per_prompt_generator(sample: Callable[[list[str], list[torch.Generator]], Tensor], seed: int = 0) -> Generator:
    """A sampler that takes one generator per prompt (``sample(prompts, generators)``; the samplers draw row ``i``
    from ``generators[i]``) as a generator with per-prompt seeds (:func:`prompt_generators`): two systems drawn with
    the same ``seed`` get the same seed for each prompt, whatever the batches. Positional, like
    :func:`lookup_generator`: draw through :func:`generate`."""
    return _PerPrompt(sample, seed)


def pipeline_generator(pipe: Any, size: int, prior_steps: int = 60, decoder_steps: int = 12,
                       prior_guidance: float | None = None, decoder_guidance: float | None = None,
                       seed: int = 0, per_prompt: bool = False) -> Generator:
    """A ``wurst_core.Pipeline`` (or anything with its call signature) as a generator; one CPU RNG for all calls,
    so the same prompts in the same batches give the same images, or with ``per_prompt`` one generator per prompt
    (:func:`per_prompt_generator`). Guidance None: the pipeline's own."""
    def call(batch: list[str], gen: Any) -> Tensor:
        return pipe(batch, height=size, width=size, prior_steps=prior_steps, decoder_steps=decoder_steps,
                    prior_guidance=prior_guidance, decoder_guidance=decoder_guidance, generator=gen)

    if per_prompt:
        return per_prompt_generator(call, seed)
    stream = torch.Generator().manual_seed(seed)
    return lambda batch: call(batch, stream)
