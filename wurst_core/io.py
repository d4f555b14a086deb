"""Atomic file writes and checkpoints (safetensors + a JSON config).

Every write goes to a temporary file in the same folder, is fsync'ed, then renamed over the target:
a process killed mid-write leaves the previous file intact (POSIX ``rename`` is atomic).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions open() would
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    def _w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")

    return atomic_write(path, _w)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    # safetensors refuses shared storage and non-contiguous tensors: clone into plain contiguous CPU tensors.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=dict(metadata or {})))


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


class UnsafePickleError(ValueError):
    """A torch pickle holding more than tensors and plain containers: refused, since unpickling can run code."""


_PICKLED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_torch(path: str | os.PathLike) -> Any:
    """``torch.load`` of tensors and plain containers only (``weights_only=True``), memory-mapped where the file
    allows it (zip format); anything else raises ``UnsafePickleError`` with a message of our own."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # old (non-zip) pickles cannot be memory-mapped
                raise
            with warnings.catch_warnings():  # torch warns about the protocol of pickles it then refuses anyway
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _PICKLED_GLOBAL.search(str(e))
        what = f" ({found[1]})" if found else ""
        # `from None`: torch's own message advises an unrestricted load, which would run the file's code
        raise UnsafePickleError(f"{path} is not a plain tensor checkpoint: it holds pickled Python objects{what}, "
                                f"refused for safety (unpickling can run arbitrary code); keep only tensors in it, "
                                f"or use .safetensors") from None


def save_model_checkpoint(directory: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                          config: Mapping[str, Any], name: str = "model") -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` (the architecture config) atomically.

    The JSON is written last, so a folder whose JSON exists always holds a complete weights file.
    """
    directory = Path(directory)
    save_safetensors(directory / f"{name}.safetensors", state_dict)
    write_json(directory / f"{name}.json", dict(config))
    return directory / f"{name}.safetensors"
