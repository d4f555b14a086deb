"""The training stream and held-out loading: what the training phases and the studies read from a dataset."""
from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from . import MAX_PIXELS, make_dataset


class Stream:
    """Training items rendered (or read) on demand: ``stream(indices) -> {"image", "caption"}``.

    Fresh renders cost little beside a step and leave no small pool to memorise, which the compositional held-out
    prompts would expose (docs/findings.md#tiny-profile-streamed-data).
    """

    def __init__(self, kind: str, n: int, resolution: int, seed: int, split: str = "train", data_dir: str = "",
                 max_pixels: int = MAX_PIXELS):
        kw: dict[str, Any] = {"size": n, "resolution": resolution, "seed": seed, "split": split}
        if kind == "folder":
            kw = {"root": data_dir, "resolution": resolution, "seed": seed, "split": split}
        self.dataset = make_dataset(kind, max_pixels=max_pixels, **kw)
        self.n = min(n, len(self.dataset))

    def __len__(self) -> int:
        return self.n

    def __call__(self, idx: list[int]) -> dict[str, Any]:
        items = [self.dataset[i] for i in idx]
        return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}

    def head(self, n: int) -> torch.Tensor:
        """The images of the first ``n`` items (statistics such as latent scales)."""
        return self(list(range(min(n, self.n))))["image"]


def load_images(kind: str, n: int, resolution: int, seed: int, split: str, data_dir: str = "",
                progress: bool = True, max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    """Materialise ``n`` items of a dataset in memory: {"image": (n,3,H,W), "caption": [...], "attributes": [...]}
    (held-out sets, evaluated several times)."""
    stream = Stream(kind, n, resolution, seed, split, data_dir, max_pixels)
    items = [stream.dataset[i] for i in tqdm(range(len(stream)), desc=f"render {kind}/{split}", disable=not progress,
                                             mininterval=1.0)]
    return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
            "attributes": [it.get("attributes") for it in items]}
