"""A procedural captioned dataset of coloured shapes with exact ground truth.

Every item is a pure function of ``(seed, split, index)``: one to three shapes (shape, colour, size, position on
a 3x3 grid) on a plain background, and a caption drawn from varied templates that names every visible attribute
and nothing else. Because the generator knows the ground truth, compositional accuracy of generated images can
be measured exactly (docs/reference.md#compositional-evaluation).

Attribute schema (fixed; the evaluation probe relies on it)::

    {"background": str, "count": int,
     "objects": [{"shape": str, "color": str, "size": "small"|"large", "cx": float, "cy": float,
                  "hpos": "left"|"center"|"right", "vpos": "top"|"middle"|"bottom"}]}

``cx``/``cy`` are the object's centre as fractions of the image width/height. Objects occupy distinct grid cells
and stay inside their cell, so they never overlap and ``hpos``/``vpos`` are unambiguous.

Held-out means novel: a deterministic hash of each scene's composition (what its caption states, :func:`signature`)
reserves :data:`NOVEL_FRACTION` of all compositions for the test split. The train and val splits redraw a reserved
composition, so none is ever rendered for training; even test items are novel, odd test items are drawn as training
items are (docs/findings.md#held-out-means-novel).
"""
from __future__ import annotations

import hashlib
import random
import re
from typing import Any, Callable, Sequence

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .transforms import to_tensor

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Hues far apart so that a nearest-palette colour parser is exact on clean renders.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 215, 35),
    "green": (40, 160, 65),
    "blue": (40, 90, 215),
    "purple": (140, 60, 185),
}
# Background names are disjoint from object colour names, so a caption word identifies its role.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "beige": (225, 205, 170),
}
SIZES: tuple[str, ...] = ("small", "large")
# Diameter of the shape's bounding square as a fraction of the image's shorter side; both fit a grid cell (1/3).
SIZE_FRACTION: dict[str, float] = {"small": 0.16, "large": 0.28}
HPOS: tuple[str, ...] = ("left", "center", "right")
VPOS: tuple[str, ...] = ("top", "middle", "bottom")
SPLITS: tuple[str, ...] = ("train", "val", "test")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

# One canonical phrase per grid cell (vpos, hpos); used by the captions and by parse_caption.
POSITION_PHRASES: dict[tuple[str, str], str] = {
    ("top", "left"): "in the top left",
    ("top", "center"): "at the top",
    ("top", "right"): "in the top right",
    ("middle", "left"): "on the left",
    ("middle", "center"): "in the center",
    ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left",
    ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}

# {objects}: "a large red circle in the top left and a small blue square at the bottom"; {bg}: background name.
TEMPLATES: tuple[str, ...] = (
    "{objects} on a {bg} background",
    "a {bg} background with {objects}",
    "{count} {noun} on {bg}: {objects}",
    "a picture of {objects}, on a {bg} background",
    "on a {bg} background, {objects}",
    "an image showing {objects} against a {bg} background",
    "{objects}; the background is {bg}",
)

Resolution = int | tuple[int, int]


def _hw(resolution: Resolution) -> tuple[int, int]:
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    if h < 8 or w < 8:
        raise ValueError(f"resolution must be at least 8 pixels per side, got {resolution!r}")
    return int(h), int(w)


def item_rng(kind: str, seed: int, split: str, index: int) -> random.Random:
    """The random stream of one item. String seeds are hashed with SHA-512, so this is stable across runs."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return random.Random(f"{kind}:{seed}:{split}:{index}")


def sample_layout(rng: random.Random, count: int,
                  size_fraction: dict[str, float] = SIZE_FRACTION) -> list[dict[str, Any]]:
    """``count`` objects in distinct cells of the 3x3 grid, each with a size and a jittered centre inside its cell.

    Returns dicts with ``size, cx, cy, hpos, vpos`` (shared by the procedural and emoji datasets).
    """
    return [place(rng, rng.choice(SIZES), cell, size_fraction) for cell in rng.sample(range(9), count)]


def place(rng: random.Random, size: str, cell: int,
          size_fraction: dict[str, float] = SIZE_FRACTION) -> dict[str, Any]:
    """An object of ``size`` in grid ``cell`` (0-8, row-major): ``size, cx, cy, hpos, vpos``, centre jittered."""
    row, col = divmod(cell, 3)
    slack = max(0.0, (1 / 3 - size_fraction[size]) / 2 * 0.9)  # keep the whole object inside its cell
    cx = (col + 0.5) / 3 + rng.uniform(-slack, slack)
    cy = (row + 0.5) / 3 + rng.uniform(-slack, slack)
    return {"size": size, "cx": round(cx, 4), "cy": round(cy, 4), "hpos": HPOS[col], "vpos": VPOS[row]}


COUNTERFACTUALS: tuple[str, ...] = ("position", "shape", "size", "color")


def counterfactual(attributes: dict[str, Any], kind: str, rng: random.Random) -> dict[str, Any]:
    """The same scene with one attribute ``kind`` changed for every object (a hard negative for contrastive
    training, and a minimal pair for measuring what a text encoder distinguishes).

    ``position``: the objects move to other cells (each object leaves its own cell); ``shape``/``color``: each
    object takes another value; ``size``: small and large swap. Background and count stay.
    """
    if kind not in COUNTERFACTUALS:
        raise ValueError(f"kind must be one of {COUNTERFACTUALS}, got {kind!r}")
    objects = [dict(o) for o in attributes["objects"]]
    if kind == "position":
        own = [VPOS.index(o["vpos"]) * 3 + HPOS.index(o["hpos"]) for o in objects]
        while True:  # a derangement of cells: with at most 3 of 9 cells this takes a couple of draws
            cells = rng.sample(range(9), len(objects))
            if all(c != o for c, o in zip(cells, own)):
                break
        objects = [{**o, **place(rng, o["size"], c)} for o, c in zip(objects, cells)]
    elif kind == "size":
        objects = [{**o, **place(rng, "small" if o["size"] == "large" else "large",
                                 VPOS.index(o["vpos"]) * 3 + HPOS.index(o["hpos"]))} for o in objects]
    else:
        values = list(SHAPES if kind == "shape" else COLORS)
        objects = [{**o, kind: rng.choice([v for v in values if v != o[kind]])} for o in objects]
    return {**attributes, "objects": objects}


def sample_attributes(rng: random.Random, min_objects: int = 1, max_objects: int = 3) -> dict[str, Any]:
    """Draw one scene's ground truth from ``rng``."""
    if not 1 <= min_objects <= max_objects <= 3:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 3, got {min_objects}, {max_objects}")
    count = rng.randint(min_objects, max_objects)
    background = rng.choice(list(BACKGROUNDS))
    objects = [{"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), **cell}
               for cell in sample_layout(rng, count)]
    return {"background": background, "count": count, "objects": objects}


def object_phrase(obj: dict[str, Any]) -> str:
    return f"a {obj['size']} {obj['color']} {obj['shape']} {POSITION_PHRASES[(obj['vpos'], obj['hpos'])]}"


def join_phrases(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(attributes: dict[str, Any], rng: random.Random | None = None) -> str:
    """A caption naming exactly the visible attributes: background, and each object's size, colour, shape, cell.

    ``rng`` picks the template and the order of the objects; ``None`` gives the first template in scene order.
    """
    objects = list(attributes["objects"])
    template = TEMPLATES[0]
    if rng is not None:
        template = rng.choice(TEMPLATES)
        rng.shuffle(objects)
    count = len(objects)
    return template.format(objects=join_phrases([object_phrase(o) for o in objects]), bg=attributes["background"],
                           count=COUNT_WORDS[count], noun="shape" if count == 1 else "shapes")


_OBJECT_RE = re.compile(
    r"\ba (?P<size>{}) (?P<color>{}) (?P<shape>{}) (?P<pos>{})".format(
        "|".join(SIZES), "|".join(COLORS), "|".join(SHAPES),
        "|".join(sorted(map(re.escape, POSITION_PHRASES.values()), key=len, reverse=True))))
_BACKGROUND_RE = re.compile(r"\b({})\b".format("|".join(BACKGROUNDS)))
_PHRASE_TO_CELL = {v: k for k, v in POSITION_PHRASES.items()}


def parse_caption(text: str) -> dict[str, Any]:
    """Recover ``{"background", "count", "objects": [{shape, color, size, hpos, vpos}]}`` from a caption.

    Objects come back sorted (see :func:`signature`), without ``cx``/``cy`` (captions do not state them).
    Raises ``ValueError`` if the caption names no background or no object.
    """
    backgrounds = set(_BACKGROUND_RE.findall(text))
    if len(backgrounds) != 1:
        raise ValueError(f"caption names {len(backgrounds)} backgrounds: {text!r}")
    objects = []
    for m in _OBJECT_RE.finditer(text):
        vpos, hpos = _PHRASE_TO_CELL[m["pos"]]
        objects.append({"shape": m["shape"], "color": m["color"], "size": m["size"], "hpos": hpos, "vpos": vpos})
    if not objects:
        raise ValueError(f"caption names no object: {text!r}")
    objects.sort(key=lambda o: (o["vpos"], o["hpos"], o["shape"], o["color"], o["size"]))
    return {"background": backgrounds.pop(), "count": len(objects), "objects": objects}


def signature(attributes: dict[str, Any]) -> tuple:
    """A hashable summary of what a caption can state: the background and the sorted objects without their
    jittered centres (and, for emoji, the glyph character). Equal for a scene and its parsed caption."""
    objects = (tuple(sorted((k, v) for k, v in o.items() if k not in ("cx", "cy", "char")))
               for o in attributes["objects"])
    return attributes["background"], tuple(sorted(objects))


NOVEL_FRACTION = 0.25  # share of all compositions that only the test split ever draws
_HASH_SPACE = 2 ** 64


def composition_key(attributes: dict[str, Any]) -> str:
    """The scene's composition as a stable string: equal for two scenes whose captions state the same content."""
    return repr(signature(attributes))


def is_novel(attributes: dict[str, Any], fraction: float = NOVEL_FRACTION) -> bool:
    """Whether the scene's composition is reserved for the test split (a SHA-256 of :func:`composition_key`)."""
    digest = hashlib.sha256(composition_key(attributes).encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * _HASH_SPACE


def wants_novel(split: str, index: int) -> bool:
    """The test split alternates novel (even items) and training-like (odd items); train and val are never novel."""
    return split == "test" and index % 2 == 0


def draw_for_split(draw: Callable[[], dict[str, Any]], split: str, index: int) -> dict[str, Any]:
    """``draw()`` repeated (on the item's own random stream) until the scene's novelty is what ``split`` and ``index``
    ask for (:func:`wants_novel`): deterministic, and a reserved composition never reaches train or val."""
    want = wants_novel(split, index)
    for _ in range(10_000):  # a quarter of compositions are novel: a handful of draws, bounded all the same
        attributes = draw()
        if is_novel(attributes) == want:
            return attributes
    raise RuntimeError(f"no {'novel' if want else 'non-novel'} composition in 10,000 draws ({split} item {index})")


def training_counterfactual(attributes: dict[str, Any], kinds: Sequence[str], rng: random.Random) -> dict[str, Any]:
    """A counterfactual twin to train on: its kind drawn from ``kinds``, redrawn until its composition is not reserved
    for the test split (hard negatives are rendered too)."""
    for _ in range(1000):
        twin = counterfactual(attributes, rng.choice(list(kinds)), rng)
        if not is_novel(twin):
            return twin
    raise RuntimeError("no counterfactual twin outside the reserved compositions in 1,000 draws")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, fill: tuple[int, int, int], x: float, y: float, d: float) -> None:
    r = d / 2
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        s = r * 0.85  # similar visual area to the circle
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif shape == "triangle":
        # isosceles, apex up, base = full width of the bounding square
        draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(attributes: dict[str, Any], resolution: Resolution = 64, supersample: int = 4) -> torch.Tensor:
    """Draw a scene as a float tensor (3, H, W) in [0, 1].

    Drawn ``supersample`` times larger and box-filtered down: anti-aliased edges at PIL-draw speed.
    """
    h, w = _hw(resolution)
    if attributes["background"] not in BACKGROUNDS:
        raise ValueError(f"unknown background {attributes['background']!r}; expected one of {list(BACKGROUNDS)}")
    ss = max(1, int(supersample))
    canvas = Image.new("RGB", (w * ss, h * ss), BACKGROUNDS[attributes["background"]])
    draw = ImageDraw.Draw(canvas)
    side = min(w, h) * ss
    for obj in attributes["objects"]:
        if obj["color"] not in COLORS:
            raise ValueError(f"unknown color {obj['color']!r}; expected one of {list(COLORS)}")
        _draw_shape(draw, obj["shape"], COLORS[obj["color"]], obj["cx"] * w * ss, obj["cy"] * h * ss,
                    SIZE_FRACTION[obj["size"]] * side)
    if ss > 1:
        canvas = canvas.resize((w, h), Image.BOX)  # exact area average for an integer factor
    return to_tensor(canvas)


class ProceduralDataset(Dataset):
    """``size`` items; item ``i`` of ``(seed, split)`` is always the same image, caption and attributes.

    Splits draw from disjoint random streams, so ``split="val"`` is a held-out set fixed by the seed; compositions
    reserved for ``split="test"`` (:func:`is_novel`) never occur in train or val.
    """

    def __init__(self, size: int = 10_000, resolution: Resolution = 64, seed: int = 0, split: str = "train",
                 min_objects: int = 1, max_objects: int = 3, supersample: int = 4) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size, self.resolution, self.seed, self.split = size, _hw(resolution), seed, split
        self.min_objects, self.max_objects, self.supersample = min_objects, max_objects, supersample
        item_rng("procedural", seed, split, 0)  # validates split
        sample_attributes(random.Random(0), min_objects, max_objects)  # validates the object counts

    def __len__(self) -> int:
        return self.size

    def _rng_attributes(self, index: int) -> tuple[random.Random, dict[str, Any]]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size}")
        rng = item_rng("procedural", self.seed, self.split, index)
        return rng, draw_for_split(lambda: sample_attributes(rng, self.min_objects, self.max_objects), self.split,
                                   index)

    def attributes(self, index: int) -> dict[str, Any]:
        return self._rng_attributes(index)[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng, attrs = self._rng_attributes(int(index))
        return {"image": render(attrs, self.resolution, self.supersample), "caption": caption(attrs, rng),
                "attributes": attrs, "index": int(index)}

    def __repr__(self) -> str:
        return (f"ProceduralDataset(size={self.size}, resolution={self.resolution}, seed={self.seed}, "
                f"split={self.split!r}, objects={self.min_objects}-{self.max_objects})")
