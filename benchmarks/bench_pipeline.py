"""Time wurst_core.Pipeline against diffusers' WuerstchenCombinedPipeline on the same random weights.

CPU (default): the parity sizes (docs/reference.md#parity-sizes), float32, 128 px, in the same process, and a parity
check of the two images. GPU (``--gpu``): the released sizes (prior 993.6 M, decoder 1,055.4 M, VQGAN, CLIP-bigG
and CLIP-H text towers, all random), bf16, 1024 px, batch 1 and 4 (one prompt, ``num_images_per_prompt``: diffusers'
combined pipeline fails on lists of different prompts). Both pipelines run 60 Stage C steps with CFG 4 and 12
Stage B steps without CFG (the released defaults) and get the same weights: diffusers' modules are built first, our
networks receive their state dicts converted by ``wurst_core.weights``.

    python benchmarks/bench_pipeline.py                 # CPU, tiny
    python benchmarks/bench_pipeline.py --gpu           # CUDA, released sizes, bf16
    python benchmarks/bench_pipeline.py --json out.json # also write the numbers
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wurst_core.models import NETWORKS  # noqa: E402
from wurst_core.pipeline import Pipeline  # noqa: E402
from wurst_core.text import HFCLIPTextEncoder, char_tokenizer  # noqa: E402
from wurst_core.weights import config_from_diffusers, official_from_diffusers  # noqa: E402

# diffusers constructor arguments; "paper" = the released configs
# (docs/reference.md#stage-b-diffnext, docs/reference.md#stage-c-prior)
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "prior": dict(c_in=16, c=32, c_cond=32, c_r=64, depth=2, nhead=2),
        "decoder": dict(c_cond=32, c_hidden=[16, 32, 32, 32], nhead=[-1, 2, 2, 2], blocks=[1, 1, 2, 1], clip_embd=24),
        "vqgan": dict(embed_dim=32, bottleneck_blocks=1, num_vq_embeddings=16),
        "prior_text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2),
        "decoder_text": dict(hidden_size=24, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2),
    },
    "paper": {
        "prior": dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24),
        "decoder": dict(),
        "vqgan": dict(),
        "prior_text": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32),
        "decoder_text": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24),
    },
}




def build(size: str, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[Any, Pipeline]:
    """diffusers' combined pipeline with random weights, and our Pipeline holding the same weights."""
    from diffusers import DDPMWuerstchenScheduler, WuerstchenCombinedPipeline
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = SIZES[size]
    torch.manual_seed(seed)
    with torch.device(device):
        prior = WuerstchenPrior(**cfg["prior"])
        decoder = WuerstchenDiffNeXt(**cfg["decoder"])
        vqgan = PaellaVQModel(**cfg["vqgan"])
        texts = [CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="gelu",
                                              **cfg[k])) for k in ("prior_text", "decoder_text")]
    with torch.no_grad():
        # the official inits zero the decoder's output conv, GRN and timestep mappers: fill them so that every input
        # matters (and the image comparison below means something)
        for m in (prior, decoder, vqgan):
            for p in m.parameters():
                if p.abs().max() == 0:
                    p.normal_(0, 0.02)
        prior.out[1].weight.mul_(0.01)  # random weights: keep the A/B head's B far from 1 (else inf in bf16)
    ref = WuerstchenCombinedPipeline(tokenizer=char_tokenizer(), text_encoder=texts[1], decoder=decoder,
                                     scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan,
                                     prior_tokenizer=char_tokenizer(), prior_text_encoder=texts[0], prior_prior=prior,
                                     prior_scheduler=DDPMWuerstchenScheduler())
    ref.to(device=device) if dtype == torch.float32 else ref.to(device=device, dtype=dtype)
    for m in (prior, decoder, vqgan, *texts):
        m.eval()
    ref.set_progress_bar_config(disable=True)

    nets = {}
    for stage, m in (("c", prior), ("b", decoder), ("a", vqgan)):
        _, config = config_from_diffusers({"_class_name": type(m).__name__, **m.config})
        with torch.device("meta"):
            net = NETWORKS[stage].model(config)
        net.load_state_dict(official_from_diffusers(stage, m.state_dict()), strict=True, assign=True)
        nets[stage] = net.to(device=device, dtype=dtype).eval()
    ours = Pipeline(nets["c"], nets["b"], nets["a"], HFCLIPTextEncoder(ref.prior_tokenizer, texts[0]),
                    HFCLIPTextEncoder(ref.tokenizer, texts[1]), autocast=dtype != torch.float32)
    return ref, ours


def timed(fn: Callable[[], torch.Tensor], device: str, repeats: int) -> tuple[list[float], torch.Tensor]:
    out, times = None, []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, out


def run(size: str, device: str, dtype: torch.dtype, px: int, batches: list[int], repeats: int, prior_steps: int,
        decoder_steps: int, threads: int | None) -> list[dict[str, Any]]:
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    ref, ours = build(size, device, dtype)
    print(f"built {size} networks on {device} ({dtype}) in {time.perf_counter() - t0:.1f} s", flush=True)
    prompt = "a photograph of a red cat sitting on a wooden table"
    rows = []
    for batch in batches:
        common = dict(height=px, width=px, num_images_per_prompt=batch)

        def diffusers_call(seed: int = 0, p: int = prior_steps, d: int = decoder_steps) -> torch.Tensor:
            return ref(prompt, prior_num_inference_steps=p, num_inference_steps=d, prior_guidance_scale=4.0,
                       decoder_guidance_scale=0.0, generator=torch.Generator().manual_seed(seed), output_type="pt",
                       **common).images

        def ours_call(seed: int = 0, p: int = prior_steps, d: int = decoder_steps) -> torch.Tensor:
            return ours(prompt, prior_steps=p, decoder_steps=d, prior_guidance=4.0, decoder_guidance=0.0,
                        generator=torch.Generator().manual_seed(seed), **common)

        for fn in (diffusers_call, ours_call):  # warm-up: allocator, cuDNN/oneDNN kernel selection
            fn(p=2, d=2)
        # interleave the two so that machine-load drift hits both alike
        t_ref, t_ours = [], []
        for _ in range(repeats):
            t, img_ref = timed(diffusers_call, device, 1)
            t_ref += t
            t, img_ours = timed(ours_call, device, 1)
            t_ours += t
        ref_s, ours_s = statistics.median(t_ref) / batch, statistics.median(t_ours) / batch
        diff = (img_ours.float().cpu() - img_ref.float().cpu()).abs().max().item()
        row = dict(size=size, device=device, dtype=str(dtype).replace("torch.", ""), px=px, batch=batch,
                   prior_steps=prior_steps, decoder_steps=decoder_steps, repeats=repeats,
                   diffusers_s_per_image=ref_s, ours_s_per_image=ours_s, ratio_ours_over_diffusers=ours_s / ref_s,
                   max_abs_image_diff=diff)
        if device == "cuda":
            row["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        print(f"batch {batch}: diffusers {ref_s:.4f} s/image, ours {ours_s:.4f} s/image, ratio ours/diffusers "
              f"{ours_s / ref_s:.3f}, max |image diff| {diff:.2e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="released sizes, CUDA, bf16, 1024 px, batch 1 and 4")
    p.add_argument("--size", choices=sorted(SIZES), default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--px", type=int, default=None, help="image height = width")
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--prior-steps", type=int, default=60)
    p.add_argument("--decoder-steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="write the result rows here")
    a = p.parse_args(argv)
    gpu = dict(size="paper", device="cuda", dtype="bfloat16", px=1024, batch=[1, 4], repeats=2)
    cpu = dict(size="tiny", device="cpu", dtype="float32", px=128, batch=[1, 4], repeats=5)
    d = gpu if a.gpu else cpu
    opts = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in d.items()}
    if opts["device"] == "cuda" and not torch.cuda.is_available():
        p.error("--gpu / --device cuda: no CUDA device here")
    rows = run(opts["size"], opts["device"], getattr(torch, opts["dtype"]), opts["px"], opts["batch"],
               opts["repeats"], a.prior_steps, a.decoder_steps, a.threads)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
