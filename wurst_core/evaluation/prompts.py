"""Loaders for the paper's three prompt sets (§4 "Datasets"), for users who have the files locally.

* COCO-30K: 30,000 captions drawn at random from the MS-COCO validation captions
  (``annotations/captions_val2014.json`` or ``captions_val2017.json``: ``{"annotations": [{"image_id", "caption"}]}``).
* Localized Narratives-COCO-5K: 5,000 narratives of the COCO subset of Localized Narratives
  (``coco_val_localized_narratives.jsonl``: one JSON object per line with a ``"caption"`` field).
* Parti-prompts: the 1,633 prompts of ``PartiPrompts.tsv`` (tab-separated, columns Prompt, Category,
  Challenge, Note).

Nothing is downloaded. Subsampling uses a seeded ``random.Random`` so a prompt set is reproducible.
"""
from __future__ import annotations

import csv
import json
import random
from os import PathLike
from pathlib import Path


def _subsample(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return items
    if n < 1:
        raise ValueError(f"n must be >= 1 or None, got {n}")
    return random.Random(seed).sample(items, n)


def _existing(path: str | PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} (the workbench never downloads prompt sets)")
    return path


def load_coco_captions(path: str | PathLike, n: int | None = 30_000, seed: int = 0,
                       one_per_image: bool = True) -> list[str]:
    """Captions from a COCO captions JSON; ``n`` drawn at random (paper: 30,000 from the validation set).

    ``one_per_image`` keeps the first caption of each image (COCO has ~5 per image), so that the prompts
    of COCO-30K describe 30K distinct images; set it False to draw among all captions.
    """
    try:
        data = json.loads(_existing(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a COCO captions JSON file ({e})") from None
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path}: not a COCO captions file (no 'annotations' list)")
    captions: list[str] = []
    seen: set = set()
    for ann in data["annotations"]:
        if one_per_image:
            if ann["image_id"] in seen:
                continue
            seen.add(ann["image_id"])
        captions.append(" ".join(str(ann["caption"]).split()))
    return _subsample(captions, n, seed)


def load_localized_narratives(path: str | PathLike, n: int | None = 5_000, seed: int = 0) -> list[str]:
    """Narrative captions from a Localized Narratives JSONL file (paper: 5,000 of the COCO subset)."""
    captions = []
    with open(_existing(path)) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "caption" not in record:
                raise ValueError(f"{path}:{lineno}: no 'caption' field in Localized Narratives record")
            captions.append(" ".join(str(record["caption"]).split()))
    return _subsample(captions, n, seed)


def load_parti_prompts(path: str | PathLike, category: str | None = None, n: int | None = None,
                       seed: int = 0) -> list[str]:
    """Prompts of ``PartiPrompts.tsv`` (1,633 in all), optionally of one ``Category`` only."""
    with open(_existing(path), newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and "Prompt" not in rows[0]:
        raise ValueError(f"{path}: not a PartiPrompts TSV (columns {list(rows[0])}, expected 'Prompt')")
    if category is not None:
        rows = [r for r in rows if r.get("Category") == category]
        if not rows:
            raise ValueError(f"{path}: no prompt of category {category!r}")
    return _subsample([r["Prompt"].strip() for r in rows], n, seed)
