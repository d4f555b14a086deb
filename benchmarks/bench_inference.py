"""Seconds per image against batch size: Würstchen's three stages against a single-U-Net LDM (paper Figure 4).

Both systems run in the same process on random (untrained) weights, at the same output resolution, with the same
DDPM sampler (``wurst_core.diffusion.samplers.sample``; classifier-free guidance as one doubled batch per step
when w > 1) and the same Stage A network for the final decode:

* Würstchen: ``Pipeline.sample_stage_c`` (60 steps) -> ``Pipeline.sample_stage_b`` (12 steps) ->
  ``Pipeline.decode`` (Stage A), the calls ``Pipeline.__call__`` makes, timed one by one for the breakdown;
* baseline LDM (paper §4, ``models.baseline.BaselineUNet``): one text-conditional U-Net sampled for 50 steps (SD's
  default) on a first-stage latent, then the Stage A decode of that latent.

Text encoding is excluded for both: random token tensors of each network's text width stand in for the encoders'
output (so the numbers compare the diffusion and decoding work only). Each batch size gets a warm-up call per
system (2 steps, not timed), then ``--repeats`` interleaved calls of both; the table gives the median per image.

CPU (default): the tiny sizes at the tiny profile's 64 px with the tiny pipeline's own compression ratios (a 4 x 4
Stage C map and a 16 x 16 Stage A latent, as ``Pipeline.from_networks`` derives them), float32, guidance 2 / 2
(the tiny profile's) and 2 for the baseline, whose U-Net runs on the f4 Stage A latent it is trained on here
(``training.tasks.BaselineTask``). GPU (``--device cuda`` or ``--gpu``): the released sizes (Stage C, Stage B and
Stage A 'paper') at 1024 px against the ~1B baseline 'paper' U-Net, bf16 weights in bf16 autocast, guidance 4 / 0
(the released defaults) and 7.5 for the baseline (SD's default; any w > 1 costs the same).

    python benchmarks/bench_inference.py                          # CPU, tiny, batch 1 2 4 8
    python benchmarks/bench_inference.py --device cuda            # CUDA, released sizes, batch 1 ... 16
    python benchmarks/bench_inference.py --out reports/bench      # also inference.csv / .json / .png
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wurst_core.diffusion.samplers import sample  # noqa: E402
from wurst_core.models import SEMANTIC_SIZES, SemanticCompressor, build_model, count_parameters  # noqa: E402
from wurst_core.models.baseline import BASELINE_SIZES, BaselineUNet  # noqa: E402
from wurst_core.models.semantic import tiny_backbone_widths  # noqa: E402
from wurst_core.pipeline import Pipeline  # noqa: E402
from wurst_core.sizes import plan_sizes  # noqa: E402

SIZES = ("parity", "tiny", "paper")  # Würstchen stage sizes; the baseline U-Net takes BASELINE_SIZES[size]
TINY_RESOLUTION = 64   # the tiny profile's images: its 4-stage compressor at 64 px gives the 4 x 4 Stage C map
TINY_COMPRESSOR_STAGES = 4
BASELINE_LATENTS = ("f4", "f8")
BASELINE_LATENT_WHY = {
    "f4": "the f4 Stage A latent, the baseline's first stage here (training.tasks.BaselineTask), decoded as it is",
    "f8": "an f8 latent, the shape of SD 2.1's first stage that the paper's baseline runs on (the f4 latent would "
          "give the U-Net 4x the positions and overstate its cost), upsampled x2 (nearest) into Stage A's decoder as a "
          "stand-in for SD's f8 VAE decoder at the same output size",
}
WARMUP_STEPS = 2
CPU = dict(size="tiny", device="cpu", dtype="float32", px=TINY_RESOLUTION, batch=[1, 2, 4, 8], repeats=3, tokens=48,
           prior_guidance=2.0, decoder_guidance=2.0, baseline_guidance=2.0, baseline_latent="f4")
GPU = dict(size="paper", device="cuda", dtype="bfloat16", px=1024, batch=[1, 2, 4, 8, 16], repeats=3, tokens=77,
           prior_guidance=4.0, decoder_guidance=0.0, baseline_guidance=7.5, baseline_latent="f8")


class SizeError(ValueError):
    """An image size one of the systems cannot produce exactly: reported as one line."""


class Systems(NamedTuple):
    pipe: Pipeline
    unet: BaselineUNet
    autocast: bool


def _fill_zero_tensors(nets: list[nn.Module], seed: int) -> None:
    """The released inits zero the output heads, GRN and timestep mappers: give those tensors N(0, 0.02²) so that
    every input reaches the output (as ``studies.sampling.random_pipeline`` does). Timing does not depend on it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in nets:
            for prm in net.parameters():
                if prm.numel() and prm.abs().max() == 0:
                    prm.copy_(torch.randn(prm.shape, generator=g).to(prm) * 0.02)


def build(size: str, device: str, dtype: torch.dtype, seed: int = 0) -> Systems:
    """Random-weight Würstchen pipeline and baseline U-Net of ``size``. "paper": the released ratios (42.67, 10.67),
    built on ``device`` directly; the small sizes: the tiny pipeline's ratios from its networks."""
    torch.manual_seed(seed)
    if size == "paper":
        nets = [build_model(s, "paper", device=device) for s in ("c", "b", "a")]
        with torch.device(device):
            unet = BaselineUNet(BASELINE_SIZES["paper"])
        pipe = Pipeline(*nets, prior_guidance=GPU["prior_guidance"], decoder_guidance=GPU["decoder_guidance"])
    else:
        nets = [build_model(s, size) for s in ("c", "b", "a")]
        unet = BaselineUNet(BASELINE_SIZES[size])
        comp = SemanticCompressor(dataclasses.replace(SEMANTIC_SIZES["tiny"], image_size=TINY_RESOLUTION,
                                                      tiny_widths=tiny_backbone_widths(TINY_COMPRESSOR_STAGES)))
        pipe = Pipeline.from_networks(stage_c=nets[0], stage_b=nets[1], stage_a=nets[2], text=None,
                                      compressor=comp, resolution=TINY_RESOLUTION,
                                      prior_guidance=CPU["prior_guidance"], decoder_guidance=CPU["decoder_guidance"])
        pipe.semantic_compressor = None  # only its output size was needed (the ratios); text-to-image never runs it
    _fill_zero_tensors([*nets, unet], seed)
    pipe.to(device, dtype)
    unet.to(device=device, dtype=dtype).eval()
    # the pipeline's own rule (Pipeline._amp): bf16 autocast on CUDA and for bf16 weights; the samplers stay float32
    return Systems(pipe, unet, autocast=torch.device(device).type == "cuda" or dtype == torch.bfloat16)


def _clock(device: str) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _tokens(batch: int, length: int, width: int, seed: int, device: str) -> Tensor:
    return torch.randn(batch, length, width, generator=torch.Generator().manual_seed(seed)).to(device)


def make_texts(sys_: Systems, batch: int, length: int, device: str) -> dict[str, Tensor]:
    """Random stand-ins for the encoders' tokens, conditional and unconditional, at each network's text width."""
    widths = {"c": sys_.pipe.stage_c.config.c_cond, "b": sys_.pipe.stage_b.config.clip_embd,
              "u": sys_.unet.config.c_cond}
    out = {}
    for i, (k, w) in enumerate(widths.items()):
        out[k] = _tokens(batch, length, w, 2 * i, device)
        out[k + "_neg"] = _tokens(batch, length, w, 2 * i + 1, device)
    return out


def wuerstchen_call(sys_: Systems, texts: dict[str, Tensor], batch: int, px: int, prior_steps: int,
                    decoder_steps: int, prior_guidance: float, decoder_guidance: float, seed: int,
                    device: str) -> tuple[Tensor, dict[str, float]]:
    """Stage C -> Stage B -> Stage A, as ``Pipeline.__call__`` runs them after text encoding; seconds per stage."""
    pipe, g = sys_.pipe, torch.Generator().manual_seed(seed)
    t0 = _clock(device)
    embeds = pipe.sample_stage_c(texts["c"][:batch], texts["c_neg"][:batch] if prior_guidance > 1 else None,
                                 height=px, width=px, steps=prior_steps, guidance=prior_guidance, generator=g)
    t1 = _clock(device)
    latents = pipe.sample_stage_b(embeds, texts["b"][:batch], texts["b_neg"][:batch] if decoder_guidance > 1 else None,
                                  steps=decoder_steps, guidance=decoder_guidance, generator=g)
    t2 = _clock(device)
    images = pipe.decode(latents)
    t3 = _clock(device)
    return images, {"stage_c": t1 - t0, "stage_b": t2 - t1, "stage_a": t3 - t2}


def baseline_call(sys_: Systems, texts: dict[str, Tensor], batch: int, latent_side: int, upsample: int, steps: int,
                  guidance: float, seed: int, device: str) -> tuple[Tensor, dict[str, float]]:
    """The U-Net sampled on its latent with the same sampler and guidance rule, then the Stage A decode."""
    unet, amp = sys_.unet, sys_.autocast

    def denoise(x: Tensor, r: Tensor, **cond: Tensor) -> Tensor:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            return unet(x, r, **cond).float()

    g = torch.Generator().manual_seed(seed)
    shape = (batch, unet.config.c_in, latent_side, latent_side)
    t0 = _clock(device)
    x = sample(denoise, shape, steps, {"text_tokens": texts["u"][:batch]},
               {"text_tokens": texts["u_neg"][:batch]} if guidance > 1 else None, guidance, "ddpm", generator=g,
               device=device)
    t1 = _clock(device)
    if upsample > 1:
        x = F.interpolate(x, scale_factor=upsample, mode="nearest")
    images = sys_.pipe.decode(x)
    t2 = _clock(device)
    return images, {"unet": t1 - t0, "decode": t2 - t1}


def _params_m(m: nn.Module) -> float:
    return count_parameters(m) / 1e6


def run(opts: dict[str, Any], prior_steps: int, decoder_steps: int, baseline_steps: int, threads: int | None,
        seed: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Build both systems, time every batch size; returns (settings, rows)."""
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    device, dtype, px, size = opts["device"], getattr(torch, opts["dtype"]), opts["px"], opts["size"]
    t0 = time.perf_counter()
    sys_ = build(size, device, dtype, seed)
    pipe = sys_.pipe
    print(f"built {size} networks on {device} ({opts['dtype']}) in {time.perf_counter() - t0:.1f} s", flush=True)
    configs = {"c": pipe.stage_c.config, "b": pipe.stage_b.config, "a": pipe.stage_a.config}
    try:
        plan = plan_sizes(px, px, configs, pipe.resolution_multiple, pipe.latent_dim_scale, exact=True)
    except ValueError as e:
        raise SizeError(f"Würstchen ({size}): {e}") from None
    f_a = pipe.stage_a.config.downscale
    upsample = 2 if opts["baseline_latent"] == "f8" else 1
    f_u = f_a * upsample
    if px % f_u or (px // f_u) % sys_.unet.config.downscale:
        raise SizeError(f"{px} px: the baseline's {opts['baseline_latent']} latent side {px / f_u:g} must be a "
                         f"multiple of the U-Net's {sys_.unet.config.downscale}")
    side_u = px // f_u
    w_c, w_b, w_u = opts["prior_guidance"], opts["decoder_guidance"], opts["baseline_guidance"]
    settings = dict(
        device=device, device_name=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        threads=torch.get_num_threads(), dtype=opts["dtype"], autocast_bf16=sys_.autocast, size=size, px=px,
        batches=opts["batch"], repeats=opts["repeats"], warmup_steps=WARMUP_STEPS, text_tokens=opts["tokens"],
        weights="random (untrained): timings only",
        text_encoding="excluded for both systems (random token tensors of each network's text width)",
        sampler="ddpm", prior_steps=prior_steps, decoder_steps=decoder_steps, baseline_steps=baseline_steps,
        prior_guidance=w_c, decoder_guidance=w_b, baseline_guidance=w_u,
        stage_c_latent=[pipe.stage_c.config.c_in, *plan.stage_c],
        stage_b_latent=[pipe.stage_b.config.c_in, *plan.stage_b], image=list(plan.image),
        baseline_latent=opts["baseline_latent"], baseline_latent_shape=[sys_.unet.config.c_in, side_u, side_u],
        baseline_latent_why=BASELINE_LATENT_WHY[opts["baseline_latent"]],
        params_m={"stage_c": _params_m(pipe.stage_c), "stage_b": _params_m(pipe.stage_b),
                  "stage_a": _params_m(pipe.stage_a), "baseline_unet": _params_m(sys_.unet)})
    print_header(settings)
    texts = make_texts(sys_, max(opts["batch"]), opts["tokens"], device)

    def ours(batch: int, seed_: int, c: int = prior_steps, b: int = decoder_steps) -> tuple[Tensor, dict[str, float]]:
        return wuerstchen_call(sys_, texts, batch, px, c, b, w_c, w_b, seed_, device)

    def base(batch: int, seed_: int, n: int = baseline_steps) -> tuple[Tensor, dict[str, float]]:
        return baseline_call(sys_, texts, batch, side_u, upsample, n, w_u, seed_, device)

    rows = []
    for batch in opts["batch"]:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        # warm-up, not timed: allocator, oneDNN/cuDNN kernel selection at this batch size
        img_w, _ = ours(batch, seed, min(WARMUP_STEPS, prior_steps), min(WARMUP_STEPS, decoder_steps))
        img_u, _ = base(batch, seed, min(WARMUP_STEPS, baseline_steps))
        if img_w.shape != img_u.shape:
            raise RuntimeError(f"the two systems' images differ in shape: {tuple(img_w.shape)} against "
                               f"{tuple(img_u.shape)}")
        parts: dict[str, list[float]] = {k: [] for k in ("wuerstchen", "stage_c", "stage_b", "stage_a",
                                                         "baseline", "unet", "decode")}
        for r in range(opts["repeats"]):  # interleaved, so that drift in machine load hits both alike
            _, tw = ours(batch, seed + 1 + r)
            _, tu = base(batch, seed + 1 + r)
            parts["wuerstchen"].append(sum(tw.values()))
            parts["baseline"].append(sum(tu.values()))
            for k, v in (*tw.items(), *tu.items()):
                parts[k].append(v)
        med = {k: statistics.median(v) / batch for k, v in parts.items()}
        row = dict(batch=batch, wuerstchen_s_per_image=med["wuerstchen"], stage_c_s_per_image=med["stage_c"],
                   stage_b_s_per_image=med["stage_b"], stage_a_s_per_image=med["stage_a"],
                   baseline_s_per_image=med["baseline"], baseline_unet_s_per_image=med["unet"],
                   baseline_decode_s_per_image=med["decode"],
                   ratio_baseline_over_wuerstchen=med["baseline"] / med["wuerstchen"],
                   image_side=int(img_w.shape[-1]))
        if device.startswith("cuda"):
            row["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        print(f"batch {batch}: Würstchen {row['wuerstchen_s_per_image']:.4f} s/image, baseline "
              f"{row['baseline_s_per_image']:.4f} s/image, ratio baseline/Würstchen "
              f"{row['ratio_baseline_over_wuerstchen']:.2f}", flush=True)
    return settings, rows


def print_header(s: dict[str, Any]) -> None:
    p = s["params_m"]
    c, b, u = s["stage_c_latent"], s["stage_b_latent"], s["baseline_latent_shape"]
    print(f"inference cost per image (paper Figure 4): {s['device_name']}, {s['dtype']}"
          f"{' + bf16 autocast' if s['autocast_bf16'] else ''}, threads {s['threads']}, "
          f"{s['image'][0]} x {s['image'][1]} px output for both")
    print(f"weights: {s['weights']}; text encoding: {s['text_encoding']}, {s['text_tokens']} tokens")
    print(f"Würstchen ({s['size']}): Stage C {p['stage_c']:.2f} M, {s['prior_steps']} steps, CFG "
          f"{s['prior_guidance']:g} on {c[1]} x {c[2]} x {c[0]} -> Stage B {p['stage_b']:.2f} M, "
          f"{s['decoder_steps']} steps, CFG "
          f"{s['decoder_guidance']:g} on {b[1]} x {b[2]} x {b[0]} -> Stage A {p['stage_a']:.2f} M decode")
    print(f"baseline LDM ({s['size']}): U-Net {p['baseline_unet']:.2f} M, {s['baseline_steps']} steps, CFG "
          f"{s['baseline_guidance']:g} on {u[1]} x {u[2]} x {u[0]} -> the same Stage A decode")
    print(f"baseline latent {s['baseline_latent']}: {s['baseline_latent_why']}")
    print(f"sampler: {s['sampler']} for all (CFG = one doubled batch per step where w > 1); warm-up "
          f"({s['warmup_steps']} steps) excluded, median of {s['repeats']} repeat(s)", flush=True)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Seconds per image per batch size: Würstchen (Stage C + B + A), baseline (U-Net + decode), their ratio."""
    head = ("batch", "Würstchen s/img", "stage C", "stage B", "stage A", "baseline s/img", "U-Net", "decode",
            "ratio baseline/Würstchen")
    keys = ("wuerstchen_s_per_image", "stage_c_s_per_image", "stage_b_s_per_image", "stage_a_s_per_image",
            "baseline_s_per_image", "baseline_unet_s_per_image", "baseline_decode_s_per_image")
    body = [(str(r["batch"]), *(f"{r[k]:.4f}" for k in keys), f"{r['ratio_baseline_over_wuerstchen']:.2f}")
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells: Any) -> str:
        return "  ".join(x.rjust(w) for x, w in zip(cells, widths))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def write_outputs(out: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> list[Path]:
    """inference.csv (one row per batch size), inference.json (settings + rows), inference.png (the plot)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "inference.csv", out / "inference.json", out / "inference.png"]
    with open(written[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    written[1].write_text(json.dumps({"settings": settings, "rows": rows}, indent=2, ensure_ascii=False))
    plot(settings, rows, written[2])
    return written


def plot(settings: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r["batch"] for r in rows]
    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot(batches, [r["baseline_s_per_image"] for r in rows], "o-", label=f"baseline LDM "
            f"({settings['baseline_steps']} steps, {settings['baseline_latent']})")
    ax.plot(batches, [r["wuerstchen_s_per_image"] for r in rows], "o-",
            label=f"Würstchen (C {settings['prior_steps']} + B {settings['decoder_steps']} steps)")
    ax.set(xscale="log", xlabel="batch size", ylabel="seconds per image", ylim=(0, None),
           title=f"{settings['device_name']}, {settings['image'][0]} px, {settings['size']} sizes")
    ax_r.plot(batches, [r["ratio_baseline_over_wuerstchen"] for r in rows], "o-", color="k")
    ax_r.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_r.set(xscale="log", xlabel="batch size", ylabel="baseline / Würstchen", ylim=(0, None),
             title="time ratio (random weights, text encoding excluded)")
    for a in (ax, ax_r):
        a.set_xticks(batches, [str(b) for b in batches])
        a.minorticks_off()
        a.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="same as --device cuda")
    p.add_argument("--device", default=None, help="cpu (default: tiny sizes, 64 px) or cuda (paper sizes, 1024 px)")
    p.add_argument("--size", choices=SIZES, default=None, help="network sizes (cpu: tiny; cuda: paper)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--px", type=int, default=None, help="image height = width")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (cpu: 1 2 4 8; cuda: 1 ... 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per batch size and system (median)")
    p.add_argument("--prior-steps", type=int, default=60, help="Stage C steps")
    p.add_argument("--decoder-steps", type=int, default=12, help="Stage B steps")
    p.add_argument("--baseline-steps", type=int, default=50, help="baseline U-Net steps (SD's default 50)")
    p.add_argument("--prior-guidance", type=float, default=None, help="Stage C CFG (cpu: 2, the tiny profile's; "
                   "cuda: 4, released)")
    p.add_argument("--decoder-guidance", type=float, default=None, help="Stage B CFG (cpu: 2; cuda: 0, released)")
    p.add_argument("--baseline-guidance", type=float, default=None, help="baseline CFG (cpu: 2; cuda: 7.5, SD's)")
    p.add_argument("--baseline-latent", choices=BASELINE_LATENTS, default=None,
                   help="the baseline U-Net's latent: f4 (Stage A's) or f8 (SD 2.1's shape); cpu: f4, cuda: f8")
    p.add_argument("--tokens", type=int, default=None, help="text tokens per prompt (cpu: 48, the tiny CLIP's; "
                   "cuda: 77)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for inference.csv, inference.json, inference.png")
    a = p.parse_args(argv)
    if a.gpu:
        a.device = a.device or "cuda"
    on_gpu = a.device is not None and torch.device(a.device).type == "cuda"
    defaults = GPU if on_gpu else CPU
    opts = {k: getattr(a, k) if getattr(a, k, None) is not None else v for k, v in defaults.items()}
    if on_gpu and not torch.cuda.is_available():
        p.error(f"--device {opts['device']}: CUDA is not available here (run on CPU with the tiny sizes instead)")
    for name in ("repeats", "prior_steps", "decoder_steps", "baseline_steps", "px", "tokens"):
        value = opts[name] if name in opts else getattr(a, name)
        if value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if min(opts["batch"]) < 1:
        p.error(f"--batch sizes must be >= 1, got {opts['batch']}")
    for name in ("prior_guidance", "decoder_guidance", "baseline_guidance"):
        if opts[name] < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {opts[name]}")
    try:
        settings, rows = run(opts, a.prior_steps, a.decoder_steps, a.baseline_steps, a.threads, a.seed)
    except SizeError as e:  # a size the networks cannot take: one line, as the CLI reports user errors
        p.error(str(e))
    print()
    print(format_table(rows))
    print(f"(seconds per image, median of {settings['repeats']}; random weights; text encoding excluded for both)")
    if a.out:
        for path in write_outputs(a.out, settings, rows):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
