"""Captioned image datasets, batching and preview grids.

* :class:`ProceduralDataset` shapes with exact ground truth; :class:`EmojiDataset` colour-emoji scenes;
  :class:`FolderDataset` the user's images (folder + ``.txt``, CSV/JSONL manifest, WebDataset shards).
* Every item is a dict ``{"image": (3, H, W) float in [0, 1], "caption": str, "index": int, ...}``;
  generated datasets add ``"attributes"`` (the ground truth), folder datasets add ``"key"``.
* :func:`make_loader` / :func:`cycle` batch them for training (CPU, 0 workers by default, seeded shuffling).
"""
from __future__ import annotations

import math
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset

from ..io import atomic_write
from . import transforms
from .emoji import EmojiDataset
from .folder import (MAX_PIXELS, FolderDataset, check_max_pixels, require_root, split_of, write_demo_folder,
                     write_folder, write_shard)
from .procedural import ProceduralDataset
from .transforms import to_pil

DATASETS: dict[str, type[Dataset]] = {"procedural": ProceduralDataset, "emoji": EmojiDataset, "folder": FolderDataset}


def make_dataset(kind: str, *, max_pixels: int = MAX_PIXELS, **kwargs: Any) -> Dataset:
    """``make_dataset("procedural", size=1000, resolution=64, seed=0, split="train")`` and so on.

    ``max_pixels`` bounds the images a folder dataset decodes (generated kinds draw their own and ignore it);
    ``kind="folder"`` needs a non-empty ``root`` (the notebooks' ``data_dir``).
    """
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(DATASETS)}")
    check_max_pixels(max_pixels)
    if kind == "folder":
        # before any scanning: an empty root is Path(""), the current folder
        require_root(kwargs.get("root"))
        return DATASETS[kind](max_pixels=max_pixels, **kwargs)
    return DATASETS[kind](**kwargs)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``image`` tensors into (B, 3, H, W), ``index`` into a LongTensor; other fields become lists."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot stack {key!r} of different shapes {sorted(shapes)}; set a resolution")
            batch[key] = torch.stack(values)
        elif key == "index":
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch


def make_loader(dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                num_workers: int = 0) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` (its own generator, not the global RNG)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_last and len(dataset) < batch_size:
        raise ValueError(f"dataset of {len(dataset)} items is smaller than batch_size={batch_size} with drop_last")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=collate,
                      num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=num_workers > 0)


def cycle(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """Endless batches for step-based training; each pass reshuffles from the loader's seeded generator."""
    while True:
        yield from loader


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def preview_grid(dataset: Dataset, n: int = 16, cols: int | None = None, tile: int = 128,
                 caption_lines: int = 5, start: int = 0) -> Image.Image:
    """The first ``n`` items (from ``start``) as a grid of ``tile``-pixel images with their captions below."""
    n = min(n, len(dataset) - start)
    if n < 1:
        raise ValueError(f"nothing to preview: dataset has {len(dataset)} items, start={start}")
    cols = cols or min(n, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    font_size = max(8, tile // 13)
    line_h = font_size + 2
    text_h = caption_lines * line_h + 4
    font = _font(font_size)
    chars = max(8, int(tile / (font_size * 0.52)))
    grid = Image.new("RGB", (cols * tile, rows * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        item = dataset[start + i]
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        # nearest-neighbour upscaling keeps small images' pixels honest
        grid.paste(to_pil(item["image"]).resize((tile, tile), Image.NEAREST), (x, y))
        lines = textwrap.wrap(item["caption"], chars)
        if len(lines) > caption_lines:
            lines = lines[:caption_lines]
            lines[-1] = lines[-1][: max(0, chars - 3)] + "..."
        for j, line in enumerate(lines):
            draw.text((x + 2, y + tile + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return grid


def save_preview(kind: str, out: str | Path, n: int = 16, resolution: int = 64, seed: int = 0,
                 root: str | Path | None = None) -> Path:
    """``wurst data preview``: write a captioned grid of a dataset (``root`` is the folder for ``kind="folder"``)."""
    if kind == "folder":
        if root is None:
            raise ValueError("kind='folder' needs root=<folder or shards>")
        dataset = FolderDataset(root, resolution=resolution, seed=seed)
    else:
        dataset = make_dataset(kind, size=n, resolution=resolution, seed=seed)
    grid = preview_grid(dataset, n)
    out = Path(out)
    fmt = (out.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG")
    return atomic_write(out, lambda tmp: grid.save(tmp, format=fmt))


def attribute_table(dataset: Dataset, n: int) -> pd.DataFrame:
    """One row per object of the first ``n`` scenes (index, background, count and the object's attributes)."""
    rows = []
    for i in range(min(n, len(dataset))):
        attrs = dataset.attributes(i) if hasattr(dataset, "attributes") else dataset[i]["attributes"]
        for o in attrs["objects"]:
            rows.append({"index": i, "background": attrs["background"], "count": attrs["count"],
                         **{k: v for k, v in o.items() if k != "char"}})
    return pd.DataFrame(rows)


def images_per_second(dataset: Dataset, n: int = 200) -> float:
    """Items produced per second by ``dataset[i]`` (single process), over the first ``n``."""
    n = min(n, len(dataset))
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    return n / (time.perf_counter() - start)


__all__ = ["ProceduralDataset", "EmojiDataset", "FolderDataset", "DATASETS", "make_dataset", "collate",
           "make_loader", "cycle", "preview_grid", "save_preview", "split_of", "write_shard", "write_folder",
           "MAX_PIXELS", "write_demo_folder", "attribute_table", "images_per_second", "transforms"]
