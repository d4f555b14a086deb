"""Write a new study: every system's image for every prompt (rendered once, stored by content), the automated
judges' scores of each image, and the design (``design.make_design``), into a new database.

What makes the images is the caller's business (``wurst_core.studies.preference_study`` samples pipelines, renders
ground truth or reads image folders); this module only needs one image per system and prompt, in prompt order.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .design import ATTENTION_NOISE, ATTENTION_TRUTH, DesignSpec, make_design
from .store import Store

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Prompt:
    text: str
    prompt_set: str = "prompts"
    truth: dict[str, Any] | None = None   # the scene the prompt states (procedural prompts), for attribute checks


@dataclass
class SystemImages:
    """One system's images, one per prompt in prompt order: (P, 3, H, W) arrays or tensors in [0, 1], or PIL images.

    ``judge_scores``: the judge CLIP's PickScore-procedure score of each image for its prompt; ``attribute_scores``:
    the exact compositional judge's count of attribute checks passed (None where unknown)."""

    name: str
    images: Any
    description: str = ""
    judge_scores: Sequence[float | None] | None = None
    attribute_scores: Sequence[float | None] | None = None
    role: str = "compared"
    extra: dict[str, Any] = field(default_factory=dict)


def to_png(image: Any) -> bytes:
    """PNG bytes of a PIL image or a (3, H, W) array in [0, 1]: deterministic (no metadata), so equal pixels give an
    equal file and an equal digest."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image, dtype=np.float32)
        if array.ndim != 3 or array.shape[0] != 3:
            raise ValueError(f"an image must be (3, H, W) in [0, 1], got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("an image has non-finite pixel values")
        image = Image.fromarray((array.clip(0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def folder_images(folder: str | os.PathLike, n: int) -> list[Image.Image]:
    """The first ``n`` images of a folder in name order, one per prompt in prompt order (a folder system)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder {root}")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < n:
        raise ValueError(f"image folder {root} holds {len(files)} images; the study's {n} prompts need one each "
                         "(in name order)")
    out = []
    for path in files[:n]:
        with Image.open(path) as im:
            out.append(im.convert("RGB"))
    return out


def _rows(system: SystemImages, n: int) -> list[Any]:
    images = list(system.images)
    if len(images) != n:
        raise ValueError(f"system {system.name!r} has {len(images)} images for {n} prompts: one per prompt expected")
    for name in ("judge_scores", "attribute_scores"):
        values = getattr(system, name)
        if values is not None and len(values) != n:
            raise ValueError(f"system {system.name!r}: {len(values)} {name} for {n} prompts")
    return images


def _score(values: Sequence[float | None] | None, i: int) -> float | None:
    if values is None or values[i] is None:
        return None
    return float(values[i])


def build_study(path: str | os.PathLike, prompts: Sequence[Prompt], systems: Sequence[SystemImages],
                spec: DesignSpec, attention: tuple[SystemImages, SystemImages] | None = None,
                info: dict[str, Any] | None = None) -> Store:
    """Create the study at ``path``: images, judges' scores and design; ``attention``: (ground truth, noise) images
    for the attention checks (None: no checks). ``info`` goes into ``meta`` (how the images were made, notes)."""
    if not prompts:
        raise ValueError("a study needs at least one prompt")
    names = [s.name for s in systems]
    reserved = {ATTENTION_TRUTH, ATTENTION_NOISE} & set(names)
    if reserved:
        raise ValueError(f"system names {sorted(reserved)} are reserved for the attention checks")
    items = make_design(list(range(len(prompts))), names, spec, attention=attention is not None)
    all_systems = list(systems)
    if attention is not None:
        truth, noise = attention
        all_systems += [SystemImages(ATTENTION_TRUTH, truth.images, truth.description, role="attention"),
                        SystemImages(ATTENTION_NOISE, noise.images, noise.description, role="attention")]
    store = Store.create(path)
    try:
        digests: dict[tuple[str, int], str] = {}
        rows = []
        for system in all_systems:
            for i, image in enumerate(_rows(system, len(prompts))):
                digest = store.put_image(to_png(image))
                digests[system.name, i] = digest
                rows.append((system.name, i, digest, _score(system.judge_scores, i),
                             _score(system.attribute_scores, i)))
        with store.write() as con:
            con.executemany("INSERT INTO systems VALUES (?, ?, ?, ?)",
                            [(s.name, k, s.role, s.description) for k, s in enumerate(all_systems)])
            con.executemany("INSERT INTO prompts VALUES (?, ?, ?, ?)",
                            [(i, p.prompt_set, p.text, json.dumps(p.truth) if p.truth is not None else None)
                             for i, p in enumerate(prompts)])
            con.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?)", rows)
            con.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [(it.item_id, it.position, it.kind, it.prompt_id, it.system_a, it.system_b,
                              digests[it.system_a, it.prompt_id], digests[it.system_b, it.prompt_id], it.repeat_of)
                             for it in sorted(items, key=lambda it: it.kind == "repeat")])  # originals first
        store.set_meta(design={"pairs_per_prompt": spec.pairs_per_prompt, "attention_share": spec.attention_share,
                               "repeat_share": spec.repeat_share},
                       seed=spec.seed, simulated=False, systems=names, **(info or {}))
    except BaseException:
        for suffix in ("", "-wal", "-shm"):  # a half-written study is no study: the next create may use the path
            Path(f"{store.path}{suffix}").unlink(missing_ok=True)
        raise
    return store
