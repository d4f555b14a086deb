"""Captioned scenes of colour-emoji glyphs (Noto Color Emoji) with ground truth.

One or two emoji, each small or large, in distinct cells of a 3x3 grid on a plain background; the caption
names each emoji by its Unicode name ("dog face"), its size and position, and the background. The attribute
dict follows the procedural schema where it applies, with ``"emoji"`` (the name) and ``"char"`` in place of
shape and colour. The font is Debian's ``fonts-noto-color-emoji`` (CBDT bitmaps, one strike at 109 ppem;
docs/reference.md#emoji-font); its path is configurable (argument or ``WURST_EMOJI_FONT``).
"""
from __future__ import annotations

import functools
import os
import random
import unicodedata
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from .procedural import (BACKGROUNDS, COUNT_WORDS, POSITION_PHRASES, SIZES, TEMPLATES, Resolution, _hw,
                         draw_for_split, item_rng, join_phrases, sample_layout)
from .transforms import to_tensor

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_PACKAGE = "fonts-noto-color-emoji"
PPEM = 109  # the only bitmap strike in NotoColorEmoji.ttf; other sizes fail to load
# Emoji are drawn larger than the shapes (their detail needs pixels); both sizes still fit one grid cell.
SIZE_FRACTION: dict[str, float] = {"small": 0.22, "large": 0.32}
# Code points in the font that are not standalone pictures: regional indicators (flags need pairs),
# skin-tone modifiers, tags, variation selectors, joiners and keycap parts.
_EXCLUDED = [(0x1F1E6, 0x1F1FF), (0x1F3FB, 0x1F3FF), (0xE0000, 0xE007F), (0xFE00, 0xFE0F), (0x200D, 0x200D),
             (0x20E3, 0x20E3)]


def font_path(path: str | os.PathLike | None = None) -> Path:
    """Resolve the emoji font: ``path``, else ``$WURST_EMOJI_FONT``, else Debian's location. Clear error if absent."""
    resolved = Path(path or os.environ.get("WURST_EMOJI_FONT") or DEFAULT_FONT)
    if not resolved.is_file():
        raise FileNotFoundError(
            f"emoji font not found at {resolved}. Install the Debian/Ubuntu package {FONT_PACKAGE} "
            f"(`sudo apt-get install {FONT_PACKAGE}`), or pass font_path= / set WURST_EMOJI_FONT to a "
            "NotoColorEmoji.ttf")
    return resolved


@functools.lru_cache(maxsize=4)
def _font(path: str) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(path, PPEM)
    except OSError as e:
        raise OSError(f"cannot load {path} at {PPEM} ppem as a colour-emoji font ({e}); "
                      f"expected NotoColorEmoji.ttf from {FONT_PACKAGE}") from e


@functools.lru_cache(maxsize=4096)
def _glyph(path: str, char: str) -> Image.Image:
    """The glyph as an RGBA image cropped to its visible pixels (empty 1x1 if the font draws nothing)."""
    font = _font(path)
    left, top, right, bottom = font.getbbox(char)
    canvas = Image.new("RGBA", (max(1, right), max(1, bottom)), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    return canvas.crop(box) if box else Image.new("RGBA", (1, 1), (0, 0, 0, 0))


@functools.lru_cache(maxsize=4)
def _available(path: str) -> tuple[str, ...]:
    from fontTools.ttLib import TTFont  # a matplotlib dependency

    with TTFont(path, lazy=True) as font:
        cmap = font["cmap"].getBestCmap()
    chars = []
    for cp in sorted(cmap):
        if cp < 0x2190 or any(lo <= cp <= hi for lo, hi in _EXCLUDED) or not unicodedata.name(chr(cp), ""):
            continue  # ASCII, (c), (r), TM and the other text-like symbols are not pictures
        chars.append(chr(cp))
    return tuple(chars)


def available_emoji(path: str | os.PathLike | None = None) -> list[str]:
    """Every single-code-point emoji of the font that has a Unicode name (1,373 in Debian's 2.042)."""
    return list(_available(str(font_path(path))))


def emoji_name(char: str) -> str:
    """The caption word(s) of an emoji: its Unicode name in lower case ("DOG FACE" -> "dog face")."""
    name = unicodedata.name(char, "")
    if not name:
        raise ValueError(f"{char!r} has no Unicode name")
    return name.lower()


def caption(attributes: dict[str, Any], rng: random.Random | None = None) -> str:
    """Names every emoji (Unicode name), its size and cell, and the background; templates as the shapes'."""
    objects = list(attributes["objects"])
    template = TEMPLATES[0]
    if rng is not None:
        template = rng.choice(TEMPLATES)
        rng.shuffle(objects)
    phrases = [f"a {o['size']} {o['emoji']} {POSITION_PHRASES[(o['vpos'], o['hpos'])]}" for o in objects]
    return template.format(objects=join_phrases(phrases), bg=attributes["background"],
                           count=COUNT_WORDS[len(objects)], noun="emoji")


def render(attributes: dict[str, Any], resolution: Resolution = 64, font: str | os.PathLike | None = None) -> torch.Tensor:
    """Compose the scene: each glyph scaled (Lanczos) to its size and alpha-composited on the background."""
    h, w = _hw(resolution)
    path = str(font_path(font))
    canvas = Image.new("RGBA", (w, h), BACKGROUNDS[attributes["background"]] + (255,))
    side = min(w, h)
    for obj in attributes["objects"]:
        glyph = _glyph(path, obj["char"])
        target = max(1, round(SIZE_FRACTION[obj["size"]] * side))
        scale = target / max(glyph.size)
        gw, gh = max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale))
        scaled = glyph.resize((gw, gh), Image.LANCZOS)
        canvas.alpha_composite(scaled, (round(obj["cx"] * w - gw / 2), round(obj["cy"] * h - gh / 2)))
    return to_tensor(canvas.convert("RGB"))


class EmojiDataset(Dataset):
    """``size`` scenes of 1-2 emoji; item ``i`` of ``(seed, split)`` is always the same.

    ``emoji``: the characters to draw from (default: every emoji of the font). Splits use disjoint random streams.
    """

    def __init__(self, size: int = 10_000, resolution: Resolution = 64, seed: int = 0, split: str = "train",
                 font: str | os.PathLike | None = None, emoji: Sequence[str] | None = None,
                 min_objects: int = 1, max_objects: int = 2) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 1 <= min_objects <= max_objects <= 3:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 3, got {min_objects}, {max_objects}")
        self.font = str(font_path(font))
        self.size, self.resolution, self.seed, self.split = size, _hw(resolution), seed, split
        self.min_objects, self.max_objects = min_objects, max_objects
        self.emoji = tuple(emoji) if emoji is not None else _available(self.font)
        if not self.emoji:
            raise ValueError("empty emoji list")
        for char in self.emoji:
            emoji_name(char)  # every emoji needs a caption
        item_rng("emoji", seed, split, 0)  # validates split

    def __len__(self) -> int:
        return self.size

    def attributes(self, index: int) -> dict[str, Any]:
        return self._rng_attributes(index)[1]

    def _rng_attributes(self, index: int) -> tuple[random.Random, dict[str, Any]]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size}")
        rng = item_rng("emoji", self.seed, self.split, index)

        def draw() -> dict[str, Any]:
            count = rng.randint(self.min_objects, self.max_objects)
            background = rng.choice(list(BACKGROUNDS))
            objects = []
            for cell in sample_layout(rng, count, SIZE_FRACTION):
                char = rng.choice(self.emoji)
                objects.append({"emoji": emoji_name(char), "char": char, **cell})
            return {"background": background, "count": count, "objects": objects}
        # compositions reserved for the test split never reach train or val (procedural.is_novel)
        return rng, draw_for_split(draw, self.split, index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng, attrs = self._rng_attributes(int(index))
        return {"image": render(attrs, self.resolution, self.font), "caption": caption(attrs, rng),
                "attributes": attrs, "index": int(index)}

    def __repr__(self) -> str:
        return (f"EmojiDataset(size={self.size}, resolution={self.resolution}, seed={self.seed}, split={self.split!r}, "
                f"{len(self.emoji)} emoji, font={self.font})")


__all__ = ["EmojiDataset", "available_emoji", "emoji_name", "caption", "render", "font_path", "SIZES",
           "SIZE_FRACTION", "DEFAULT_FONT", "FONT_PACKAGE"]
