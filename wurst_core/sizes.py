"""Sizes and memory of a sampling run, checked before it runs: image -> Stage C -> Stage B latent sides (the
released ratios 42.67 and 10.67, or a trained pipeline's own), the sides that work, the numbers' domains, and an
estimate of the largest activations against the memory the machine has."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESOLUTION_MULTIPLE = 42.67  # image pixels per Stage C latent pixel (diffusers prior `resolution_multiple`)
LATENT_DIM_SCALE = 10.67     # Stage B latent pixels per Stage C latent pixel (diffusers decoder `latent_dim_scale`)


def stage_c_size(height: int, width: int, multiple: float = RESOLUTION_MULTIPLE) -> tuple[int, int]:
    """Stage C latent size for an image size (diffusers prior: ``ceil(H/42.67)``)."""
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    return math.ceil(height / multiple), math.ceil(width / multiple)


def stage_b_size(c_size: tuple[int, int], scale: float = LATENT_DIM_SCALE) -> tuple[int, int]:
    """Stage B latent size for a Stage C latent size (diffusers decoder: ``int(h*10.67)``)."""
    return int(c_size[0] * scale), int(c_size[1] * scale)


MAX_STEPS = 1000        # per stage; the released schedules use 60 and 12, and a step costs one network call
MEMORY_FRACTION = 0.85  # of the available memory a run may plan to use: the estimate is rough, the rest is margin
TEXT_TOKENS = 77        # CLIP's context: the keys/values every attention block adds


def check_sampling_args(*, height: Any = None, width: Any = None, prior_steps: Any = None, decoder_steps: Any = None,
                        prior_guidance: Any = None, decoder_guidance: Any = None, num_images_per_prompt: Any = None,
                        seed: Any = None) -> None:
    """Raise ``ValueError`` for an argument out of its domain (the ones passed; None is not checked)."""
    def integer(name: str, value: Any) -> None:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")

    for name, value in (("height", height), ("width", width), ("num_images_per_prompt", num_images_per_prompt)):
        if value is not None:
            integer(name, value)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
    for name, value in (("prior_steps", prior_steps), ("decoder_steps", decoder_steps)):
        if value is not None:
            integer(name, value)
            if not 1 <= value <= MAX_STEPS:
                raise ValueError(f"{name} must be between 1 and {MAX_STEPS}, got {value}")
    for name, value in (("prior_guidance", prior_guidance), ("decoder_guidance", decoder_guidance)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if seed is not None:
        integer("seed", seed)
        if not 0 <= seed < 2 ** 64:  # torch.Generator.manual_seed's range
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")


@dataclass(frozen=True)
class SizePlan:
    """The latent and image sizes of one request: Stage C, Stage B (Stage A's latents) and the output image."""

    stage_c: tuple[int, int]
    stage_b: tuple[int, int]
    image: tuple[int, int]


def plan_sizes(height: int, width: int, configs: dict[str, Any], resolution_multiple: float = RESOLUTION_MULTIPLE,
               latent_dim_scale: float = LATENT_DIM_SCALE, exact: bool = False) -> SizePlan:
    """The sizes ``__call__`` samples at for ``height`` x ``width`` (``configs``: the "b" and "a" networks' configs,
    for Stage B's size multiple and Stage A's upscale). Raises ``ValueError``, naming the nearest sizes that work,
    where Stage B cannot take the latent or, with ``exact``, where the image would not come out at the size asked."""
    b_multiple = getattr(configs.get("b"), "downscale", 1)
    upscale = getattr(configs.get("a"), "downscale", 4)
    c_size = stage_c_size(height, width, resolution_multiple)
    b_size = stage_b_size(c_size, latent_dim_scale)
    image = (b_size[0] * upscale, b_size[1] * upscale)
    for name, side, b, out in (("height", height, b_size[0], image[0]), ("width", width, b_size[1], image[1])):
        if b % b_multiple == 0 and (out == side or not exact):
            continue
        below, above = _sides_that_work(side, resolution_multiple, latent_dim_scale, b_multiple, upscale)
        nearby = " or ".join(str(x) for x in (below, above) if x) or "none"
        why = (f"comes out as {out} px with these networks" if b % b_multiple == 0 else
               f"gives a {b}-pixel Stage B latent, not a multiple of {b_multiple} as this Stage B needs")
        raise ValueError(f"{name} {side} px {why}; sizes that work nearby: {nearby}")
    return SizePlan(c_size, b_size, image)


def _sides_that_work(side: int, resolution_multiple: float, latent_dim_scale: float, b_multiple: int,
                     upscale: int) -> tuple[int | None, int | None]:
    """The nearest image sides at or below and above ``side`` that Stage B takes and that come out as asked."""
    below = None
    for c in range(1, math.ceil(side / resolution_multiple) + 64 * b_multiple):
        b = int(c * latent_dim_scale)
        out = b * upscale
        # out must map back onto this Stage C size, else asking for it gives another image size
        if b < 1 or b % b_multiple or math.ceil(out / resolution_multiple) != c:
            continue
        if out > side:
            return below, out
        below = out
    return below, None


def estimate_memory(plan: SizePlan, configs: dict[str, Any], batch: int, prior_guidance: float,
                    decoder_guidance: float) -> int:
    """Bytes of float32 activations at the peak of one ``__call__`` (the stages run one after another, so the
    largest stage). Per pixel of a ConvNeXt block: 16 x its width (the 4x inverted bottleneck keeps about four
    such tensors alive); attention: q, k, v, out over the pixels + 77 text tokens (``scaled_dot_product_attention``
    kernels do not keep the full score matrix). Deliberately generous; networks without a config are skipped."""
    peaks = [2 * batch * 3 * plan.image[0] * plan.image[1]]  # the output image and its clamped copy
    c = configs.get("c")
    if all(hasattr(c, f) for f in ("c", "c_cond")):
        n = plan.stage_c[0] * plan.stage_c[1]
        peaks.append(batch * (2 if prior_guidance > 1 else 1) * (16 * n * c.c + 4 * (n + TEXT_TOKENS) * c.c))
    b = configs.get("b")
    if all(hasattr(b, f) for f in ("c_hidden", "patch_size", "c_cond")):
        worst = skips = 0
        for i, width in enumerate(b.c_hidden):
            f = b.patch_size * 2 ** i
            n = max(1, plan.stage_b[0] // f) * max(1, plan.stage_b[1] // f)
            worst = max(worst, n * (16 * width + 2 * b.c_cond) + 4 * (n + TEXT_TOKENS) * width)
            skips += n * width  # the U-Net keeps every level's output for the up path
        peaks.append(batch * (2 if decoder_guidance > 1 else 1) * (worst + skips))
    a = configs.get("a")
    if all(hasattr(a, f) for f in ("c_hidden", "levels")):
        # the decoder's levels: c_hidden at the latent size, halving the width per doubling of the side
        peaks.append(batch * max(12 * (a.c_hidden // 2 ** j) * plan.stage_b[0] * plan.stage_b[1] * 4 ** j
                                 for j in range(a.levels)))
    return 4 * max(peaks)


def available_memory(device: str | torch.device) -> int | None:
    """Free bytes on ``device``: the GPU's free memory, or the machine's MemAvailable (psutil, else /proc/meminfo);
    None where neither can be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024  # the file says kB and means KiB
        except (OSError, ValueError, IndexError):
            pass
    # in a container the OOM killer acts at the cgroup's limit, which MemAvailable (the host's) does not show
    room = _cgroup_headroom()
    return room if free is None or (room is not None and room < free) else free


def _cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process's memory cgroup may still take (its limit minus what it holds, page cache that can be
    dropped excepted); None without a limit. cgroup v2 (``memory.max``), else v1 (``memory/memory.limit_in_bytes``)."""
    for limit, usage, stat, cache in (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                                      ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                       "memory/memory.stat", "total_inactive_file")):
        try:
            text = (root / limit).read_text().strip()
            if text == "max" or int(text) >= 2 ** 60:  # v1 writes "no limit" as a huge number
                return None
            used = int((root / usage).read_text())
            fields = dict(line.split() for line in (root / stat).read_text().splitlines() if line.count(" ") == 1)
            return max(0, int(text) - used + int(fields.get(cache, 0)))
        except (OSError, ValueError):
            continue
    return None


def check_memory(needed: int, device: str | torch.device, what: str) -> None:
    """Raise ``ValueError`` (one line: the estimate and the limit) when ``needed`` bytes exceed the share of the
    available memory a run may use; an unreadable amount is not checked."""
    free = available_memory(device)
    if free is None:
        return
    limit = int(free * MEMORY_FRACTION)
    if needed > limit:
        raise ValueError(f"{what}: needs about {format_bytes(needed)} of memory (estimate), more than the "
                          f"{format_bytes(limit)} a run may use ({MEMORY_FRACTION:.0%} of the {format_bytes(free)} available on "
                          f"{torch.device(device).type}); ask for a smaller image or fewer images")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
