"""Which pairs a study shows: balanced across prompts and system pairs, with attention checks and repeated pairs.

* Pair items: every prompt gets ``pairs_per_prompt`` of the ``S (S - 1) / 2`` system pairs, taken in turn from one
  shuffled cycle of all pairs, so that over the prompts every system pair is shown equally often (within one) and
  every prompt is judged on as many pairs.
* Attention checks: a share of extra items put the prompt's ground-truth render against uniform noise; the render is
  the right answer (``system_a``). A rater who keeps missing them is not reading the page.
* Repeated pairs: a share of the pair items appears a second time (``repeat_of`` names the first), to measure how
  consistently a rater judges the same two images.
* Sides: decided per showing (:func:`a_on_left`), from a hash of the study's seed, the rater and the item: balanced
  over showings, reproducible, and the same for a rater who reloads the page.
* Order: every rater walks the items in their own random order (:func:`rater_order`), so any rater's first pairs
  are a random sample of the design, and raters who stop early still cover it together.

Item ids are random hex strings: they name neither the systems nor the prompt.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

ATTENTION_TRUTH = "attention: ground truth"
ATTENTION_NOISE = "attention: noise"


@dataclass(frozen=True)
class DesignSpec:
    """How many pairs per prompt, and the shares of attention checks and repeats (of the pair items)."""

    pairs_per_prompt: int = 3
    attention_share: float = 0.1
    repeat_share: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pairs_per_prompt < 1:
            raise ValueError(f"pairs_per_prompt must be >= 1, got {self.pairs_per_prompt}")
        for name in ("attention_share", "repeat_share"):
            share = getattr(self, name)
            if not 0 <= share <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {share}")


@dataclass(frozen=True)
class Item:
    item_id: str
    position: int
    kind: str            # pair | attention | repeat
    prompt_id: int
    system_a: str        # for attention checks: the right answer (the ground-truth render)
    system_b: str
    repeat_of: str | None = None


def system_pairs(systems: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair of distinct systems, in the systems' order."""
    if len(set(systems)) != len(systems):
        raise ValueError(f"system names must be distinct, got {list(systems)}")
    if len(systems) < 2:
        raise ValueError(f"a preference study needs at least two systems, got {list(systems)}")
    return list(combinations(systems, 2))


def balanced_pairs(prompt_ids: Sequence[int], systems: Sequence[str], pairs_per_prompt: int,
                   rng: random.Random) -> list[tuple[int, str, str]]:
    """``(prompt_id, system_a, system_b)`` for each prompt's pairs; the pairs' counts differ by at most one."""
    cycle = system_pairs(systems)
    if pairs_per_prompt > len(cycle):
        raise ValueError(f"pairs_per_prompt {pairs_per_prompt} exceeds the {len(cycle)} pairs of {len(systems)} "
                         "systems")
    rng.shuffle(cycle)
    out, k = [], 0
    for prompt in prompt_ids:
        for _ in range(pairs_per_prompt):
            a, b = cycle[k % len(cycle)]
            out.append((prompt, *((a, b) if rng.random() < 0.5 else (b, a))))
            k += 1
    return out


def make_design(prompt_ids: Sequence[int], systems: Sequence[str], spec: DesignSpec,
                attention: bool = True) -> list[Item]:
    """The study's items in a shuffled order (see the module docstring). ``attention=False``: no attention checks
    (the study has no ground-truth renders)."""
    if not prompt_ids:
        raise ValueError("a study needs at least one prompt")
    rng = random.Random(f"design:{spec.seed}")
    pairs = balanced_pairs(prompt_ids, systems, spec.pairs_per_prompt, rng)
    ids: set[str] = set()

    def new_id() -> str:
        while True:
            token = f"{rng.getrandbits(64):016x}"
            if token not in ids:
                ids.add(token)
                return token

    items = [Item(new_id(), 0, "pair", p, a, b) for p, a, b in pairs]
    n_attention = round(spec.attention_share * len(items)) if attention else 0
    prompts = list(prompt_ids)
    rng.shuffle(prompts)
    items += [Item(new_id(), 0, "attention", prompts[k % len(prompts)], ATTENTION_TRUTH, ATTENTION_NOISE)
              for k in range(n_attention)]
    originals = rng.sample([i for i in items if i.kind == "pair"], round(spec.repeat_share * len(pairs)))
    items += [Item(new_id(), 0, "repeat", o.prompt_id, o.system_a, o.system_b, repeat_of=o.item_id)
              for o in originals]
    rng.shuffle(items)
    return [Item(i.item_id, k, i.kind, i.prompt_id, i.system_a, i.system_b, i.repeat_of) for k, i in enumerate(items)]


def _hash(*parts: object) -> bytes:
    return hashlib.sha256(":".join(map(str, parts)).encode()).digest()


def a_on_left(seed: int, rater_id: str, item_id: str) -> bool:
    """Whether the item's ``system_a`` image is shown on the left for this rater (half of all showings)."""
    return _hash("side", seed, rater_id, item_id)[0] & 1 == 1


def rater_order(seed: int, rater_id: str, item_ids: Sequence[str]) -> list[str]:
    """The items in this rater's own random (and reproducible) order."""
    return sorted(item_ids, key=lambda i: _hash("order", seed, rater_id, i))
