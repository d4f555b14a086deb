"""The user's own images: a folder with same-named ``.txt`` captions, a CSV/JSONL manifest, or WebDataset shards.

Sources (detected from ``root``):

* a folder, scanned recursively: ``a/cat.jpg`` + ``a/cat.txt``; a ``metadata.csv`` / ``metadata.jsonl`` in the
  folder (or ``manifest=``) replaces the ``.txt`` files: one row per image with an ``image`` (or ``file_name``,
  ``file``, ``path``) and a ``caption`` (or ``text``, ``prompt``) column, paths relative to the manifest;
* WebDataset tar shards (``.tar``, ``.tar.gz``, ``.tgz``): a shard file, a list of them, or every shard in the
  folder; members sharing a key (the path up to the first dot of the file name) form one sample, an image
  (``jpg``, ``png``, ...) plus ``txt``. Read with :mod:`tarfile`; uncompressed shards are read by offset.

Every candidate is checked when the dataset is built (the image fully decoded unless ``check="header"``), so a
corrupt image, an image over ``max_pixels`` (a decompression bomb), a missing or non-UTF-8 caption, or the
samples a truncated shard cuts off are skipped, counted and reported (``.skipped`` and one warning) instead of
crashing a training run at step 5,000. An image that still fails later is skipped the same way and replaced
by the next sample (with loader worker processes, such late skips are reported by the workers' warnings).
An empty ``data_dir``, a missing folder, or one without a usable pair, is a clear error.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, NamedTuple, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..io import atomic_write
from .procedural import ProceduralDataset
from .transforms import Crop, resize_crop, to_pil, to_tensor

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
SHARD_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
MANIFEST_NAMES: tuple[str, ...] = ("metadata.csv", "metadata.jsonl")
IMAGE_COLUMNS: tuple[str, ...] = ("image", "file_name", "file", "path")
CAPTION_COLUMNS: tuple[str, ...] = ("caption", "text", "prompt")
# PIL's default Image.MAX_IMAGE_PIXELS (~0.27 GB as RGB); PIL only warns there, we refuse above it in every check mode
MAX_PIXELS: int = 89_478_485


class ImageTooLarge(ValueError):
    """An image whose header claims more than ``max_pixels`` pixels; refused before any pixel is decoded."""


def require_root(root: Any) -> list[Path]:
    """``root`` as a list of paths; raise unless it names at least one: ``Path("")`` would scan the current folder."""
    roots = [root] if root is None or isinstance(root, (str, Path)) else list(root)
    if not roots or any(r is None or not str(r).strip() for r in roots):
        raise ValueError(f"dataset='folder' needs data_dir (the folder dataset's root), got {root!r}: set data_dir to "
                         "a folder of images with same-named .txt captions, a metadata.csv/.jsonl manifest, "
                         "or WebDataset .tar shards")
    return [Path(r) for r in roots]


def check_max_pixels(max_pixels: int) -> int:
    # a bool is an int to Python and a float limit is a typo: both would silently pass a bare comparison
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    return max_pixels


class Skipped(NamedTuple):
    item: str     # file path, or "shard.tar:key"
    # "unreadable image" | "too large image" | "no caption" | "unreadable caption" | "missing image" | "no image"
    # | "truncated sample" | "unreadable shard"
    reason: str
    detail: str


@dataclass(frozen=True)
class _Sample:
    key: str                 # stable identity, used for the split
    source: str              # image file, or shard file
    caption: str
    member: str | None = None    # tar member name
    offset: int | None = None    # byte offset of the member's data in an uncompressed shard
    length: int | None = None


def split_of(key: str, seed: int = 0, val_fraction: float = 0.1) -> str:
    """``"val"`` for a fixed ``val_fraction`` of keys, else ``"train"``: a hash of (seed, key), so an item's split
    never changes when other files are added or removed."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _is_shard(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(SHARD_SUFFIXES)


def _is_image(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def _read_caption(path: Path) -> str:
    # strict: a caption with replacement characters would silently teach the model garbage
    return path.read_bytes().decode("utf-8").strip() if path.is_file() else ""


def _not_utf8(name: str, e: UnicodeDecodeError) -> str:
    return f"{name} is not UTF-8 text ({e.reason} at byte {e.start})"


def _skip_reason(e: Exception) -> str:
    return "too large image" if isinstance(e, (ImageTooLarge, Image.DecompressionBombError)) else "unreadable image"


def _first(row: dict[str, Any], names: Sequence[str]) -> Any:
    return next((row[n] for n in names if row.get(n) not in (None, "")), None)


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON object per line ({e})") from e
        return rows
    raise ValueError(f"manifest must be .csv or .jsonl, got {path}")


class FolderDataset(Dataset):
    """Image-caption pairs from a folder, a manifest or WebDataset shards (see the module docstring).

    Items are ``{"image": (3, H, W) in [0, 1], "caption": str, "index": int, "key": str}``; ``resolution``
    resizes the shorter side and crops a square (``crop="center"``, ``"random"`` or ``"none"``: squash);
    ``resolution=None`` keeps the original size. ``split="train"|"val"`` keeps the keys that
    :func:`split_of` assigns to it. Images whose header claims more than ``max_pixels`` pixels are skipped in
    either ``check`` mode and never decoded (PIL's own global limit, which errors at twice its
    ``Image.MAX_IMAGE_PIXELS``, still applies on top).
    """

    def __init__(self, root: str | Path | Sequence[str | Path], resolution: int | None = 64, crop: Crop = "center",
                 split: str | None = None, val_fraction: float = 0.1, seed: int = 0,
                 manifest: str | Path | None = None, check: Literal["decode", "header"] = "decode",
                 warn: bool = True, max_pixels: int = MAX_PIXELS) -> None:
        roots = require_root(root)
        if split not in (None, "train", "val"):
            raise ValueError(f"split must be None, 'train' or 'val', got {split!r}")
        if check not in ("decode", "header"):
            raise ValueError(f"check must be 'decode' or 'header', got {check!r}")
        if crop not in ("center", "random", "none"):
            raise ValueError(f"crop must be 'center', 'random' or 'none', got {crop!r}")
        self.resolution, self.crop, self.split, self.seed, self.check = resolution, crop, split, seed, check
        self.val_fraction, self.max_pixels = val_fraction, check_max_pixels(max_pixels)
        self.skipped: list[Skipped] = []
        for r in roots:
            if not r.exists():
                raise FileNotFoundError(f"dataset path {r} (data_dir) does not exist")
        self.root = roots[0] if len(roots) == 1 else roots
        candidates = self._scan(roots, Path(manifest) if manifest is not None else None)
        self.num_candidates = len(candidates) + len(self.skipped)
        if split is not None:
            candidates = [s for s in candidates if split_of(s.key, seed, val_fraction) == split]
        self.samples: list[_Sample] = []
        for s in candidates:
            try:
                self._check(s, full=check == "decode")
                self.samples.append(s)
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
                self.skipped.append(Skipped(self._name(s), _skip_reason(e), f"{type(e).__name__}: {e}"))
        if warn and self.skipped:
            warnings.warn(f"{self.__class__.__name__}({self.root}): {self.skip_summary()} (see .skipped)", stacklevel=2)
        if not self.samples:
            what = f" in split {split!r}" if split else ""
            raise ValueError(f"no usable image-caption pairs{what} in data_dir={self.root}: {self.num_candidates} "
                             f"candidates, {self.skip_summary()}. Expected images ({', '.join(IMAGE_EXTENSIONS)}) "
                             "with same-named .txt captions, a metadata.csv/.jsonl manifest, or WebDataset .tar shards")

    # ---------------------------------------------------------------- scanning
    def _scan(self, roots: list[Path], manifest: Path | None) -> list[_Sample]:
        if manifest is not None:
            if not manifest.is_file():
                raise FileNotFoundError(f"manifest {manifest} does not exist")
            return self._scan_manifest(manifest)
        samples: list[_Sample] = []
        for root in roots:
            if _is_shard(root):
                samples += self._scan_shard(root)
            elif root.is_dir():
                found = [root / m for m in MANIFEST_NAMES if (root / m).is_file()]
                if found:
                    samples += self._scan_manifest(found[0])
                    continue
                for path in sorted(p for p in root.rglob("*") if p.is_file()):
                    if any(part.startswith(".") for part in path.relative_to(root).parts):
                        continue  # hidden files and folders (.ipynb_checkpoints, .git, ...)
                    if _is_shard(path):
                        samples += self._scan_shard(path)
                    elif _is_image(path):
                        try:
                            cap = _read_caption(path.with_suffix(".txt"))
                        except UnicodeDecodeError as e:
                            why = _not_utf8(f"{path.stem}.txt", e)
                            self.skipped.append(Skipped(str(path), "unreadable caption", why))
                            continue
                        key = str(path.relative_to(root).with_suffix(""))
                        if cap:
                            samples.append(_Sample(key, str(path), cap))
                        else:
                            self.skipped.append(Skipped(str(path), "no caption", f"no non-empty {path.stem}.txt"))
            else:
                raise ValueError(f"{root} is neither a folder nor a WebDataset shard ({', '.join(SHARD_SUFFIXES)})")
        return samples

    def _scan_manifest(self, manifest: Path) -> list[_Sample]:
        samples = []
        for n, row in enumerate(_read_manifest(manifest)):
            image, cap = _first(row, IMAGE_COLUMNS), _first(row, CAPTION_COLUMNS)
            if image is None:
                raise ValueError(f"{manifest} row {n}: no image column (one of {IMAGE_COLUMNS}) in {sorted(row)}")
            path = (manifest.parent / str(image)).resolve()
            if not path.is_file():
                self.skipped.append(Skipped(str(path), "missing image", f"{manifest.name} row {n}"))
            elif not str(cap or "").strip():
                self.skipped.append(Skipped(str(path), "no caption", f"{manifest.name} row {n}"))
            else:
                samples.append(_Sample(str(image), str(path), str(cap).strip()))
        return samples

    def _scan_shard(self, shard: Path) -> list[_Sample]:
        """Group a shard's members by WebDataset key; keep the first image and the ``txt`` of each key.

        A shard cut off partway (an interrupted download or copy) keeps its complete samples; the sample the cut
        runs through is skipped as ``"truncated sample"`` (later ones left no trace to count).
        """
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        captions: dict[str, str] = {}
        bad_captions: dict[str, str] = {}
        compressed = not shard.name.lower().endswith(".tar")
        size = shard.stat().st_size
        last: tuple[str, str, tarfile.TarInfo] | None = None   # (key, ext, info) of the last header read
        cut: str | None = None
        try:
            with tarfile.open(shard, "r:*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, _, base = info.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not dot:
                        continue
                    key, ext = (f"{folder}/{stem}" if folder else stem), ext.lower()
                    groups.setdefault(key, {})[ext] = info
                    last = (key, ext, info)
                    if ext == "txt":
                        raw = tar.extractfile(info).read()
                        try:
                            captions[key] = raw.decode("utf-8").strip()
                        except UnicodeDecodeError as e:
                            bad_captions[key] = _not_utf8(base, e)
                # tarfile ends quietly on a header cut short or missing; a whole archive has an end block there
                if not compressed and size < tar.offset + tarfile.BLOCKSIZE:
                    cut = f"the file ends at byte {size}, inside or before a member header"
        except (tarfile.TarError, OSError, EOFError) as e:
            if not groups:
                self.skipped.append(Skipped(str(shard), "unreadable shard", f"{type(e).__name__}: {e}"))
                return []
            cut = f"{type(e).__name__}: {e}"
        if cut is not None:
            # one lost item per cut: the sample it runs through (named if its header was read); later ones left no trace
            lost = f"after {last[0]}" if last else "at its start"
            if last is not None:
                key, ext, info = last
                # the last member read is whole if its data lies inside the file (a caption: if it was read in full)
                read = key in captions or key in bad_captions
                whole = read if ext == "txt" else not compressed and info.offset_data + info.size <= size
                members = groups[key]
                if not whole or "txt" not in members or not any(e in members for e in IMAGE_EXTENSIONS):
                    del groups[key]
                    bad_captions.pop(key, None)
                    lost = key
            self.skipped.append(Skipped(f"{shard.name}:{lost}", "truncated sample",
                                        f"the shard is cut off here ({cut}); any later samples are lost uncounted"))
        samples = []
        for key, members in groups.items():
            name = f"{shard.name}:{key}"
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            if key in bad_captions:
                self.skipped.append(Skipped(name, "unreadable caption", bad_captions[key]))
            elif image is None:
                self.skipped.append(Skipped(name, "no image", f"members {sorted(members)}"))
            elif not captions.get(key):
                self.skipped.append(Skipped(name, "no caption", f"members {sorted(members)}"))
            else:
                samples.append(_Sample(name, str(shard), captions[key], image.name,
                                       None if compressed else image.offset_data, image.size))
        return samples

    # ---------------------------------------------------------------- reading
    @staticmethod
    def _name(s: _Sample) -> str:
        return s.source if s.member is None else s.key

    def _open(self, s: _Sample) -> Image.Image:
        """The image, opened lazily (header only), refused before decoding when it claims over ``max_pixels``."""
        if s.member is None:
            image = Image.open(s.source)
        else:
            if s.offset is not None:
                with open(s.source, "rb") as f:
                    f.seek(s.offset)
                    data = f.read(s.length)
            else:
                with tarfile.open(s.source, "r:*") as tar:
                    # stop at the member: getmember() would read on to the end, into a truncated shard's cut
                    info = next(i for i in tar if i.name == s.member)
                    data = tar.extractfile(info).read()
            image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w * h > self.max_pixels:
            image.close()
            raise ImageTooLarge(f"{w}x{h} = {w * h:,} pixels is over max_pixels={self.max_pixels:,}")
        return image

    def _check(self, s: _Sample, full: bool = True) -> None:
        with self._open(s) as image:
            if full:
                image.load()
            else:
                image.verify()  # header and, for PNG, checksums; cheap

    def _load(self, s: _Sample) -> Image.Image:
        with self._open(s) as image:
            return image.convert("RGB")

    def skip_summary(self) -> str:
        """"skipped 2 of 10: 1 unreadable image, 1 no caption" (or "nothing skipped")."""
        if not self.skipped:
            return "nothing skipped"
        counts = Counter(s.reason for s in self.skipped)
        return f"skipped {len(self.skipped)} of {self.num_candidates}: " + ", ".join(f"{n} {r}" for r, n in counts.items())

    @property
    def skipped_counts(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.samples)}")
        for attempt in range(len(self.samples)):
            s = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = self._load(s)
                break
            except Exception as e:  # a file changed or broke after the scan: skip it, never crash the run
                self.skipped.append(Skipped(self._name(s), _skip_reason(e), f"{type(e).__name__}: {e}"))
                warnings.warn(f"skipping {self.skipped[-1].reason} {self._name(s)} ({e}); {self.skip_summary()}")
        else:
            raise RuntimeError(f"every image of {self.root} became unreadable: {self.skip_summary()}")
        if self.resolution is None:
            tensor = to_tensor(image)
        else:
            # a random crop draws from torch's RNG, so a seeded loader (and its workers) reproduce it
            rng = random.Random(int(torch.randint(0, 2**62, ()).item())) if self.crop == "random" else None
            tensor = resize_crop(image, self.resolution, self.crop, rng)
        return {"image": tensor, "caption": s.caption, "index": index, "key": s.key}

    def __repr__(self) -> str:
        return (f"FolderDataset({self.root}, {len(self)} items, resolution={self.resolution}, split={self.split!r}, "
                f"{self.skip_summary()})")


def write_shard(path: str | Path, samples: Iterable[tuple[str, Any, str]], image_format: str = "png") -> Path:
    """Write a WebDataset shard: one ``<key>.<png|jpg>`` and ``<key>.txt`` per ``(key, image, caption)``.

    ``image`` is a PIL image, a (3, H, W) tensor in [0, 1], or encoded bytes (written as they are).
    The shard is written atomically.
    """
    ext = {"png": "png", "jpeg": "jpg", "jpg": "jpg"}[image_format.lower()]

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def write(tmp: str) -> None:
        with tarfile.open(tmp, "w") as tar:
            for key, image, caption in samples:
                if isinstance(image, torch.Tensor):
                    image = to_pil(image)
                if isinstance(image, Image.Image):
                    buf = io.BytesIO()
                    image.convert("RGB").save(buf, format="JPEG" if ext == "jpg" else "PNG")
                    image = buf.getvalue()
                add(tar, f"{key}.{ext}", bytes(image))
                add(tar, f"{key}.txt", caption.encode("utf-8"))

    return atomic_write(path, write)


def write_folder(directory: str | Path, samples: Iterable[tuple[str, Any, str]]) -> Path:
    """Write ``<key>.png`` + ``<key>.txt`` per ``(key, image, caption)``: the folder layout this module reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for key, image, caption in samples:
        if isinstance(image, torch.Tensor):
            image = to_pil(image)
        (directory / f"{key}.txt").write_text(caption + "\n", encoding="utf-8")
        image.convert("RGB").save(directory / f"{key}.png")
    return directory


def write_demo_folder(directory: str | Path, n: int = 12, resolution: int = 64, seed: int = 0) -> Path:
    """A folder of ``n`` procedural image-caption pairs plus one corrupt image and one image without caption,
    to show the folder dataset's skip report (notebook 00 and the README)."""
    ds = ProceduralDataset(n + 1, resolution, seed=seed)
    directory = write_folder(directory, [(f"scene{i:03d}", ds[i]["image"], ds[i]["caption"]) for i in range(n)])
    (directory / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this file was cut off")
    (directory / "corrupt.txt").write_text("a caption whose image is broken\n")
    to_pil(ds[n]["image"]).save(directory / "uncaptioned.png")
    return directory
