"""Text-to-image pipeline: parity with diffusers' WuerstchenCombinedPipeline on the same tiny random weights.

Two layers:
- the pipeline logic (text, CFG, RNG order, latent sizes, x*42-1, decode) around diffusers' own networks behind thin
  adapters with our call signatures: differences there can only come from the pipeline;
- our networks (``wurst_core.models``) loaded with the same weights: the end-to-end claim of issue 4.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from wurst_core.models.semantic import LatentScaling
from wurst_core.pipeline import Pipeline
from wurst_core.sizes import stage_b_size, stage_c_size
from wurst_core.diffusion.samplers import DEFAULT_STAGE_C_TIMESTEPS
from wurst_core.text import char_tokenizer

SIZE = 128  # 128 px: Stage C 3x3, Stage B 32x32




def tiny_clip(width: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2,
                                        num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
                                        hidden_act="gelu")).eval()


class TextAdapter:
    """tokenizer + CLIPTextModel behind the text-encoder protocol, computed exactly as diffusers does."""

    def __init__(self, tokenizer, model):
        self.tokenizer, self.model = tokenizer, model

    def __call__(self, prompts):
        ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = self.model(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
        return SimpleNamespace(tokens=out)


class PriorAdapter(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m, self.config = m, SimpleNamespace(c_in=m.config.c_in)

    def forward(self, x, r, text_tokens):
        return self.m(x, r, text_tokens)


class DecoderAdapter(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
        downscale = m.config.patch_size * 2 ** (len(m.config.c_hidden) - 1)
        self.config = SimpleNamespace(c_in=m.config.c_in, downscale=downscale)

    def forward(self, x, r, sc_latent, text_tokens):
        return self.m(x, r, effnet=sc_latent, clip=text_tokens)


class VQAdapter(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m, self.config = m, SimpleNamespace(downscale=4)

    def decode(self, latents):
        return self.m.decode(latents * self.m.config.scale_factor).sample


def _randomize_zeros(module, g):
    """Official inits zero the output convs, GRN and timestep mappers: give every such tensor small random values
    so that every input path changes the output."""
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval()


@pytest.fixture(scope="module")
def ref():
    """diffusers' combined pipeline with seeded random tiny weights (docs/reference.md#parity-sizes)."""
    from diffusers import DDPMWuerstchenScheduler, WuerstchenCombinedPipeline
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    prior = _randomize_zeros(WuerstchenPrior(c_in=16, c=32, c_cond=32, c_r=64, depth=2, nhead=2), g)
    with torch.no_grad():  # the A/B head explodes with random weights: keep B far from 1 (realistic magnitudes)
        prior.out[1].weight.mul_(0.01)
        prior.out[1].bias.zero_()
    decoder = _randomize_zeros(WuerstchenDiffNeXt(c_cond=32, c_hidden=[16, 32, 32, 32], nhead=[-1, 2, 2, 2],
                                                  blocks=[1, 1, 2, 1], clip_embd=24), g)
    vqgan = _randomize_zeros(PaellaVQModel(embed_dim=32, bottleneck_blocks=1, num_vq_embeddings=16), g)
    pipe = WuerstchenCombinedPipeline(
        tokenizer=char_tokenizer(), text_encoder=tiny_clip(24, 1), decoder=decoder,
        scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan, prior_tokenizer=char_tokenizer(),
        prior_text_encoder=tiny_clip(32, 2), prior_prior=prior, prior_scheduler=DDPMWuerstchenScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def adapted(ref):
    """Our Pipeline around diffusers' own networks."""
    return Pipeline(PriorAdapter(ref.prior_prior), DecoderAdapter(ref.decoder), VQAdapter(ref.vqgan),
                    TextAdapter(ref.prior_tokenizer, ref.prior_text_encoder),
                    TextAdapter(ref.tokenizer, ref.text_encoder))


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _ref_images(ref, prompt, seed, **kw):
    return ref(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images


def test_latent_sizes_follow_the_released_rule():
    assert stage_c_size(1024, 1024) == (24, 24) and stage_c_size(1024, 1536) == (24, 36)
    assert stage_c_size(512, 768) == (12, 18) and stage_c_size(SIZE, SIZE) == (3, 3)
    assert stage_b_size((24, 36)) == (256, 384) and stage_b_size((3, 3)) == (32, 32)
    with pytest.raises(ValueError, match="positive"):
        stage_c_size(0, 64)


@pytest.mark.parametrize("case", ["60/12", "custom", "cfg-b"])
def test_pipeline_logic_matches_diffusers_combined(ref, adapted, case):
    kw = dict(height=SIZE, width=SIZE, num_images_per_prompt=2)
    ours_kw, ref_kw = dict(kw), dict(kw)
    if case == "custom":  # the released 20+10 Stage C schedule and a custom Stage B list
        ours_kw.update(prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS, decoder_timesteps=[1.0, 0.5, 0.2, 0.0])
        ref_kw.update(prior_timesteps=list(DEFAULT_STAGE_C_TIMESTEPS), decoder_timesteps=[1.0, 0.5, 0.2, 0.0])
    if case == "cfg-b":  # the paper's Stage B guidance w = 4, a negative prompt, a non-square image
        ours_kw.update(decoder_guidance=4.0, prior_guidance=3.0, negative_prompts="blurry", width=2 * SIZE)
        ref_kw.update(decoder_guidance_scale=4.0, prior_guidance_scale=3.0, negative_prompt="blurry", width=2 * SIZE)
    ours = adapted("a red cat", generator=torch.Generator().manual_seed(3), **ours_kw)
    theirs = _ref_images(ref, "a red cat", 3, **ref_kw)
    assert ours.shape == (2, 3, SIZE, ours_kw["width"])
    assert _max_diff(ours, theirs) <= 1e-5
    assert ours.std() > 0.01, "degenerate test: the images are flat"


def test_stage_c_embeddings_and_batches_of_different_prompts(ref, adapted):
    prompts = ["a red cat", "two blue dogs!"]
    theirs = ref.prior_pipe(prompts, height=SIZE, width=SIZE, guidance_scale=4.0,
                            generator=torch.Generator().manual_seed(5)).image_embeddings
    ours = adapted.sample_stage_c(adapted.encode_text(prompts), adapted.encode_text(["", ""]), height=SIZE,
                                  width=SIZE, generator=torch.Generator().manual_seed(5))
    assert ours.shape == (2, 16, 3, 3) and _max_diff(ours, theirs) <= 1e-5
    # diffusers' combined pipeline fails on this batch (B² text rows in the decoder); ours must not, and each row
    # must depend on its own prompt only: same noise, prompt 2 swapped -> row 0 unchanged, row 1 changed
    a = adapted(prompts, height=SIZE, width=SIZE, prior_steps=8, decoder_steps=4,
                generator=torch.Generator().manual_seed(0))
    b = adapted([prompts[0], "a green tree"], height=SIZE, width=SIZE, prior_steps=8, decoder_steps=4,
                generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(a[0], b[0]) and _max_diff(a[1], b[1]) > 1e-3


def test_precomputed_embeddings_seeds_and_negative_prompts(adapted):
    kw = dict(height=SIZE, width=SIZE, prior_steps=6, decoder_steps=3)
    a = adapted(["a red cat"], generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, adapted("a red cat", generator=torch.Generator().manual_seed(1), **kw))
    assert _max_diff(a, adapted("a red cat", generator=torch.Generator().manual_seed(2), **kw)) > 1e-3
    # embeddings from any encoder instead of prompts: same image (the decoder text must be passed too)
    embeds = dict(prior_text_embeds=adapted.encode_text(["a red cat"], "prior"),
                  prior_negative_text_embeds=adapted.encode_text([""], "prior"),
                  decoder_text_embeds=adapted.encode_text(["a red cat"], "decoder"))
    assert torch.equal(a, adapted(generator=torch.Generator().manual_seed(1), **embeds, **kw))
    # a negative prompt replaces the empty unconditional prompt
    neg = adapted("a red cat", "blurry", generator=torch.Generator().manual_seed(1), **kw)
    assert _max_diff(a, neg) > 1e-4
    # without guidance the negative prompt is unused
    kw0 = dict(kw, prior_guidance=1.0)
    assert torch.equal(adapted("a red cat", generator=torch.Generator().manual_seed(1), **kw0),
                       adapted("a red cat", "blurry", generator=torch.Generator().manual_seed(1), **kw0))


def test_ddim_sampler_option(adapted):
    kw = dict(height=SIZE, width=SIZE, prior_steps=5, decoder_steps=3, sampler="ddim")
    a = adapted("a red cat", generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, adapted("a red cat", generator=torch.Generator().manual_seed(1), **kw))
    ddpm = adapted("a red cat", generator=torch.Generator().manual_seed(1), **{**kw, "sampler": "ddpm"})
    assert _max_diff(a, ddpm) > 1e-4
    with pytest.raises(ValueError, match="sampler must be one of"):
        adapted("a red cat", height=SIZE, width=SIZE, sampler="euler")


def test_callback_and_bad_inputs(adapted):
    seen = []
    adapted("a cat", height=SIZE, width=SIZE, prior_steps=3, decoder_steps=2,
            callback=lambda stage, i, t, x: seen.append((stage, i, tuple(x.shape))))
    assert seen == [("c", 0, (1, 16, 3, 3)), ("c", 1, (1, 16, 3, 3)), ("c", 2, (1, 16, 3, 3)),
                    ("b", 0, (1, 4, 32, 32)), ("b", 1, (1, 4, 32, 32))]
    with pytest.raises(ValueError, match="pass prompts or prior_text_embeds"):
        adapted(height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="negative prompts"):
        adapted(["a", "b", "c"], ["x", "y"], height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        adapted("a cat", height=SIZE, width=170, prior_steps=1, decoder_steps=1)  # 170 px -> 4 -> 42 latents
    with pytest.raises(ValueError, match="decreasing"):
        adapted("a cat", prior_timesteps=[0.0, 1.0])
    with pytest.raises(ValueError, match="batch 2, expected 1"):
        adapted(prior_text_embeds=torch.zeros(1, 77, 32), decoder_text_embeds=torch.zeros(2, 77, 24))
    bare = Pipeline(adapted.stage_c, adapted.stage_b, adapted.stage_a)
    with pytest.raises(ValueError, match="no prior_text_encoder"):
        bare("a cat", height=SIZE, width=SIZE)


@pytest.fixture(scope="module")
def compressor():
    from wurst_core.models.semantic import SEMANTIC_SIZES, SemanticCompressor

    torch.manual_seed(0)
    return SemanticCompressor(SEMANTIC_SIZES["tiny"]).eval()


def test_reconstruct_and_variations(adapted, compressor):
    from wurst_core.models.semantic import SemanticCompressor, preprocess

    pipe = Pipeline(adapted.stage_c, adapted.stage_b, adapted.stage_a, adapted.prior_text_encoder,
                    adapted.decoder_text_encoder, semantic_compressor=compressor)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    rec = pipe.reconstruct(images, decoder_steps=3, generator=torch.Generator().manual_seed(0))
    assert rec.shape == images.shape and 0 <= rec.min() and rec.max() <= 1
    # by hand: compressor map of the image -> Stage B at the image's latent size with the empty prompt -> Stage A
    with torch.no_grad():
        sc = compressor.encode(images)
    latents = pipe.sample_stage_b(sc, pipe.encode_text(["", ""], "decoder"), steps=3, latent_size=(32, 32),
                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(rec, pipe.decode(latents))
    # a compressor with the v2 output scaling (f+1)/42 is unscaled before Stage B: same reconstruction
    v2 = SemanticCompressor(type(compressor.config)(**{**compressor.config.__dict__, "v2_scaling": True})).eval()
    v2.load_state_dict(compressor.state_dict())
    pipe_v2 = Pipeline(pipe.stage_c, pipe.stage_b, pipe.stage_a, None, pipe.decoder_text_encoder,
                       semantic_compressor=v2)
    rec_v2 = pipe_v2.reconstruct(images, decoder_steps=3, generator=torch.Generator().manual_seed(0))
    assert _max_diff(rec, rec_v2) < 1e-5
    # compressor_size: the compressor input as Stage B was trained (here 64 px instead of the config's 96)
    sized = Pipeline(pipe.stage_c, pipe.stage_b, pipe.stage_a, None, pipe.decoder_text_encoder,
                     semantic_compressor=compressor, compressor_size=64)
    with torch.no_grad():
        sc64 = compressor(preprocess(images, (64, 64)))
    latents = pipe.sample_stage_b(sc64, pipe.encode_text(["", ""], "decoder"), steps=3, latent_size=(32, 32),
                                  generator=torch.Generator().manual_seed(0))
    assert sc64.shape[-1] == 2 and torch.equal(
        sized.reconstruct(images, decoder_steps=3, generator=torch.Generator().manual_seed(0)), pipe.decode(latents))
    var = pipe.variations(images, num_variations=2, decoder_steps=3, generator=torch.Generator().manual_seed(1))
    assert var.shape == (4, 3, SIZE, SIZE) and _max_diff(var[0], var[1]) > 1e-4
    with pytest.raises(ValueError, match="no semantic_compressor"):
        adapted.reconstruct(images)
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe.reconstruct(images[..., :126])


def test_resample_starts_from_the_image_map(adapted, compressor):
    """SDEdit in Stage C's space: near strength 0 the prior keeps the image's (scaled) compressor map, at 1 it
    forgets it; same seed, same images; bad strengths and prompt counts are refused."""
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sc = compressor.encode(images)
    pipe = Pipeline(adapted.stage_c, adapted.stage_b, adapted.stage_a, adapted.prior_text_encoder,
                    adapted.decoder_text_encoder, semantic_compressor=compressor, stage_c_scaling="std",
                    stage_c_mean=sc.mean().item(), stage_c_std=sc.std().item(), prior_guidance=2.0)
    x0 = pipe.scale_stage_c(sc)
    assert _max_diff(pipe.unscale_stage_c(x0), sc) < 1e-5 and 0.5 < x0.std() < 2

    def final_c(strength):
        seen = {}
        out = pipe.resample(images, ["a red circle", "a blue square"], strength=strength, prior_steps=4,
                            decoder_steps=2, generator=torch.Generator().manual_seed(0),
                            callback=lambda stage, i, t, x: seen.update({stage: (i, x.clone())}))
        return out, seen["c"]

    out, (steps, kept) = final_c(0.001)
    assert out.shape == images.shape and steps == 0  # at least one prior step
    assert _max_diff(kept, x0) < 0.05
    out1, (steps1, forgot) = final_c(1.0)
    assert steps1 == 3 and (forgot - x0).abs().mean() > 0.3
    assert torch.equal(out1, final_c(1.0)[0])
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="strength"):
            pipe.resample(images, ["a", "b"], strength=bad)
    with pytest.raises(ValueError, match="one prompt per image"):
        pipe.resample(images, ["a"])


# ------------------------------------------------------------------ our networks, loaded from diffusers' folder
@pytest.fixture(scope="module")
def diffusers_folder(ref, tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers_pipeline")
    ref.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(diffusers_folder):
    """Our Pipeline with OUR networks and text encoders, loaded by ``from_pretrained`` from the folder that
    diffusers' ``save_pretrained`` writes for the reference pipeline (weights converted by wurst_core.weights)."""
    return Pipeline.from_pretrained(diffusers_folder)


@pytest.mark.parametrize("case", ["60/12", "custom", "cfg-b"])
def test_our_networks_reproduce_diffusers_images(ref, ours, case):
    from wurst_core.models import StageA, StageB, StageC

    assert isinstance(ours.stage_c, StageC) and isinstance(ours.stage_b, StageB) and isinstance(ours.stage_a, StageA)
    kw = dict(height=SIZE, width=SIZE, num_images_per_prompt=2)
    ours_kw, ref_kw = dict(kw), dict(kw)
    if case == "custom":
        ours_kw.update(prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS, decoder_timesteps=[1.0, 0.5, 0.2, 0.0])
        ref_kw.update(prior_timesteps=list(DEFAULT_STAGE_C_TIMESTEPS), decoder_timesteps=[1.0, 0.5, 0.2, 0.0])
    if case == "cfg-b":
        ours_kw.update(decoder_guidance=4.0, negative_prompts="blurry", width=2 * SIZE)
        ref_kw.update(decoder_guidance_scale=4.0, negative_prompt="blurry", width=2 * SIZE)
    a = ours("a red cat", generator=torch.Generator().manual_seed(11), **ours_kw)
    b = _ref_images(ref, "a red cat", 11, **ref_kw)
    assert _max_diff(a, b) <= 1e-5 and a.std() > 0.01


def test_our_networks_reproduce_diffusers_stage_c_embeddings(ref, ours):
    prompts = ["a red cat", "two blue dogs!"]
    for timesteps in (None, DEFAULT_STAGE_C_TIMESTEPS):
        theirs = ref.prior_pipe(prompts, height=SIZE, width=SIZE, guidance_scale=4.0,
                                timesteps=list(timesteps) if timesteps else None,
                                generator=torch.Generator().manual_seed(9)).image_embeddings
        mine = ours.sample_stage_c(ours.encode_text(prompts), ours.encode_text(["", ""]), height=SIZE, width=SIZE,
                                   timesteps=timesteps, generator=torch.Generator().manual_seed(9))
        # compared in Stage C's own sample space: the final x*42-1 multiplies float32 rounding by 42 (embeddings
        # reach ~50, where one float32 ulp is 3.8e-6); measured: 3.6e-7 here, 1.5e-5 after x*42-1 (20+10 steps)
        assert _max_diff(mine, theirs) / 42 <= 1e-5 and _max_diff(mine, theirs) <= 1e-4 and theirs.std() > 1.0


def test_save_and_reload_our_format(ours, tmp_path):
    ours.save(tmp_path / "ckpt")
    re = Pipeline.from_pretrained(tmp_path / "ckpt", prior_text_encoder=ours.prior_text_encoder,
                                  decoder_text_encoder=ours.decoder_text_encoder)
    kw = dict(height=SIZE, width=SIZE, prior_steps=4, decoder_steps=2)
    # bit-identical weights; the converted (diffusers) and the freshly loaded tensors may differ in memory layout,
    # which picks other CPU kernels: 3.3e-6 measured on one machine, 0 on another
    torch.testing.assert_close(ours("a cat", generator=torch.Generator().manual_seed(0), **kw),
                               re("a cat", generator=torch.Generator().manual_seed(0), **kw), atol=1e-5, rtol=0)
    for stage in ("stage_c", "stage_b", "stage_a"):
        mine, theirs = getattr(ours, stage).state_dict(), getattr(re, stage).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for stage\(s\) \['c', 'b', 'a'\]"):
        Pipeline.from_pretrained(tmp_path)


def test_released_pt_layout(ours, compressor, tmp_path):
    """The original training-checkpoint dicts side by side (docs/reference.md#checkpoint-formats)."""
    torch.save({"ema_state_dict": ours.stage_c.state_dict()}, tmp_path / "model_v2_stage_c.pt")
    torch.save({"state_dict": ours.stage_b.state_dict(), "effnet_state_dict": compressor.state_dict()},
               tmp_path / "model_v2_stage_b.pt")
    torch.save({"state_dict": ours.stage_a.state_dict()}, tmp_path / "vqgan_f4_v1_500k.pt")
    pipe = Pipeline.from_pretrained(tmp_path, prior_text_encoder=ours.prior_text_encoder,
                                    decoder_text_encoder=ours.decoder_text_encoder)
    assert pipe.semantic_compressor is not None and pipe.latent_scaling.kind == "v2"
    kw = dict(height=SIZE, width=SIZE, prior_steps=3, decoder_steps=2)
    assert torch.equal(ours("a cat", generator=torch.Generator().manual_seed(0), **kw),
                       pipe("a cat", generator=torch.Generator().manual_seed(0), **kw))
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    assert pipe.reconstruct(images, decoder_steps=2).shape == images.shape


def test_wurst_generate_cli(diffusers_folder, ours, tmp_path):
    from PIL import Image

    from wurst_core.workbench.cli import main

    args = ["generate", "a red", "cat", "--weights", str(diffusers_folder), "--seed", "4", "--height", str(SIZE),
            "--width", str(2 * SIZE), "--prior-steps", "3", "--decoder-steps", "2"]
    assert main(args + ["--out", str(tmp_path / "a.png")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.png")]) == 0
    a = torch.tensor(list(Image.open(tmp_path / "a.png").getdata()), dtype=torch.float32)
    assert Image.open(tmp_path / "a.png").size == (2 * SIZE, SIZE)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    expect = ours("a red cat", height=SIZE, width=2 * SIZE, prior_steps=3, decoder_steps=2,
                  generator=torch.Generator().manual_seed(4))
    expect = (expect[0].permute(1, 2, 0).reshape(-1, 3) * 255 + 0.5).clamp(0, 255).floor()
    assert (a - expect).abs().max().item() <= 1.0


def test_our_layout_with_text_encoder_and_custom_ratios(compressor, tmp_path):
    """Networks trained here (64 px, 4x4 compressor maps, 16x16 Stage A latents, "std" Stage C scaling) with the
    workbench's open_clip text encoder: ``save(..., text_encoder_dir)`` makes a folder `wurst generate` can use."""
    import dataclasses

    from wurst_core.models import build_model, get_config
    from wurst_core.text import TINY_CLIP_SIZES, TextEncoder, create_tiny_clip, save_tiny_clip

    clip_cfg = TINY_CLIP_SIZES["smoke"]
    save_tiny_clip(create_tiny_clip(clip_cfg, seed=0), clip_cfg, tmp_path / "te")
    text = TextEncoder.from_open_clip(clip_cfg.name, tmp_path / "te" / "model.safetensors")
    w = clip_cfg.text_width
    torch.manual_seed(0)
    stage_c = build_model("c", dataclasses.replace(get_config("c", "parity"), c_cond=w)).eval()
    stage_b = build_model("b", dataclasses.replace(get_config("b", "parity"), clip_embd=w)).eval()
    with torch.no_grad():  # the official init zeroes the output heads, which would make Stage B's guidance a no-op
        for q in stage_b.parameters():
            if not q.any():
                q.normal_(0, 0.02)
    pipe = Pipeline(stage_c, stage_b, build_model("a", "parity").eval(), text, text, semantic_compressor=compressor,
                    stage_c_scaling="std", stage_c_mean=0.3, stage_c_std=2.0, stage_c_shift=2.0,
                    decoder_guidance=2.0, resolution_multiple=16.0, latent_dim_scale=4.0)
    kw = dict(height=64, width=64, prior_steps=3, decoder_steps=2)
    a = pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), **kw)
    assert a.shape == (2, 3, 64, 64)
    pipe.save(tmp_path / "pipe", text_encoder_dir=tmp_path / "te")
    re = Pipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(re.prior_text_encoder, TextEncoder) and re.decoder_text_encoder is re.prior_text_encoder
    assert (re.latent_scaling, re.stage_c_schedule.shift) == (LatentScaling("std", 0.3, 2.0), 2.0)
    assert torch.equal(a, re(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), **kw))
    # the pipeline's own Stage B guidance (pipeline.json) applies unless a call passes one
    assert re.decoder_guidance == 2.0
    for guidance, same in ((2.0, True), (0.0, False)):
        b = re(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), decoder_guidance=guidance, **kw)
        assert torch.equal(a, b) is same
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    rec = {g: re.reconstruct(images, decoder_steps=2, decoder_guidance=g, generator=torch.Generator().manual_seed(0))
           for g in (None, 2.0, 0.0)}
    assert torch.equal(rec[None], rec[2.0]) and not torch.equal(rec[None], rec[0.0])
    # a Stage C trained with a noise shift samples on the shifted schedule: same t grid, noisier alpha_bar
    from wurst_core.diffusion import CosineSchedule
    from wurst_core.diffusion.samplers import sample

    tokens, null = re.encode_text(["a cat"]), re.encode_text([""])
    got = re.sample_stage_c(tokens, null, height=64, width=64, steps=3, generator=torch.Generator().manual_seed(1))
    den = re._denoiser(stage_c)
    want = {shift: re.unscale_stage_c(sample(den, got.shape, 3, {"text_tokens": tokens}, {"text_tokens": null}, 4.0,
                                             generator=torch.Generator().manual_seed(1),
                                             schedule=CosineSchedule(shift=shift)))
            for shift in (1.0, 2.0)}
    assert torch.equal(got, want[2.0]) and not torch.allclose(got, want[1.0])
    # "std" scaling is undone before Stage B: x*std + mean
    x = torch.randn(1, 16, 4, 4)
    assert torch.equal(re.unscale_stage_c(x), x * 2.0 + 0.3)
    with pytest.raises(ValueError, match="latent scaling must be one of"):
        Pipeline(stage_c, stage_b, pipe.stage_a, stage_c_scaling="log")
    with pytest.raises(ValueError, match="stage_c_shift"):
        Pipeline(stage_c, stage_b, pipe.stage_a, stage_c_shift=0.0)
    # Stage C may read another layer of the same text encoder (the tiny profile: penultimate); pipeline.json keeps
    # each stage's layer, and the reloaded encoders share one set of weights
    pipe.prior_text_encoder = TextEncoder(text.text, layer="penultimate", name=text.name)
    a2 = pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), **kw)
    pen_tokens = pipe.prior_text_encoder(["a cat"]).tokens
    assert not torch.allclose(pen_tokens, text(["a cat"]).tokens)
    pipe.save(tmp_path / "pipe2", text_encoder_dir=tmp_path / "te")
    re2 = Pipeline.from_pretrained(tmp_path / "pipe2")
    assert (re2.prior_text_encoder.layer, re2.decoder_text_encoder.layer) == ("penultimate", "last")
    assert re2.prior_text_encoder.text is re2.decoder_text_encoder.text
    assert torch.equal(re2.prior_text_encoder(["a cat"]).tokens, pen_tokens)
    assert torch.equal(a2, re2(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), **kw))


def test_sampling_notebook_helpers():
    from wurst_core.params import build
    from wurst_core.studies.sampling import SamplingParams, load_sampling_pipeline, steps_sweep

    p = build(SamplingParams, {"profile": "smoke"})
    assert p.numbers("guidances") == [1.0, 4.0]
    with pytest.raises(ValueError, match="comma-separated"):
        SamplingParams(guidances="1,x").numbers("guidances")
    pipe, info = load_sampling_pipeline(p)  # no 05_stage_c run in the test's runs folder: random weights, said so
    assert not info["trained"] and "random" in info["weights"] and info["size"] == SIZE
    kw = dict(height=SIZE, width=SIZE, prior_steps=2, decoder_steps=2)
    a = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0), **kw)
    assert _max_diff(a[0], a[1]) > 1e-4, "random weights must still make the images depend on the prompt"
    images, table = steps_sweep(pipe, ["a red circle"], [1, 3], decoder_steps=2, height=SIZE, width=SIZE)
    assert list(table["sampler"]) == ["ddpm", "ddpm", "ddim", "ddim"] and len(images["ddim"]) == 2
    assert table["l1_to_most_steps"].iloc[1] == 0.0 and table["l1_to_most_steps"].iloc[0] > 0
    with pytest.raises(FileNotFoundError, match="weights_dir"):
        load_sampling_pipeline(build(SamplingParams, {"profile": "paper"}))


# ------------------------------------------------------------------ bad input refused early (issue 18)
@pytest.fixture()
def plain():
    """Parity-sized networks of ours, no text encoders (embeddings are passed): a pipeline built in milliseconds."""
    from wurst_core.models import build_model

    torch.manual_seed(0)
    return Pipeline(build_model("c", "parity"), build_model("b", "parity"), build_model("a", "parity"),
                    prior_guidance=0.0)


def _embeds(n=1):
    g = torch.Generator().manual_seed(0)
    return dict(prior_text_embeds=torch.randn(n, 77, 32, generator=g),
                decoder_text_embeds=torch.randn(n, 77, 24, generator=g))


@pytest.mark.parametrize("kw, says", [
    (dict(prior_guidance=float("nan")), "prior_guidance must be a finite number >= 0, got nan"),
    (dict(decoder_guidance=float("inf")), "decoder_guidance must be a finite number >= 0, got inf"),
    (dict(prior_guidance=-1.0), "prior_guidance must be a finite number >= 0, got -1.0"),
    (dict(prior_steps=0), "prior_steps must be between 1 and 1000, got 0"),
    (dict(decoder_steps=1001), "decoder_steps must be between 1 and 1000, got 1001"),
    (dict(prior_steps=2.5), "prior_steps must be an integer, got 2.5"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be >= 1, got 0"),
    (dict(height=-SIZE), f"height must be >= 1, got {-SIZE}"),
    # 64 px: a 21-pixel Stage B latent, which used to fail only after Stage C had been sampled
    (dict(height=64), "height 64 px gives a 21-pixel Stage B latent, not a multiple of 16 as this Stage B needs; "
                      "sizes that work nearby: 128"),
    (dict(height=12672, width=12672, num_images_per_prompt=64), "(estimate), more than the"),
])
def test_call_refuses_bad_input_before_sampling(plain, kw, says):
    args = dict(height=SIZE, width=SIZE, prior_steps=2, decoder_steps=2) | kw
    with pytest.raises(ValueError) as err:
        plain(callback=lambda *a: pytest.fail("sampled"), **_embeds(), **args)
    assert says in str(err.value)


def test_float16_is_refused_at_every_entry(plain, tmp_path):
    from wurst_core.models import build_model

    message = r"float16 is refused: .* use bfloat16 .* or float32"
    with pytest.raises(ValueError, match=message):
        plain.to(torch.float16)
    with pytest.raises(ValueError, match=message):
        plain.to("cpu", dtype="float16")
    with pytest.raises(ValueError, match="networks are float16: " + message):
        Pipeline(plain.stage_c, plain.stage_b, build_model("a", "parity").half())
    with pytest.raises(ValueError, match=message):  # refused before the folder is even looked at
        Pipeline.from_pretrained(tmp_path / "missing", dtype=torch.float16)
    plain.stage_b.half()  # behind the pipeline's back: the call refuses it
    with pytest.raises(ValueError, match="networks are float16"):
        plain(**_embeds(), height=SIZE, width=SIZE, prior_steps=1, decoder_steps=1,
              callback=lambda *a: pytest.fail("sampled"))
    # bfloat16 runs (autocast turns itself on for bfloat16 networks, also on CPU) and gives finite images
    images = plain.to(torch.bfloat16)(**_embeds(), height=SIZE, width=SIZE, prior_steps=2, decoder_steps=2,
                                      generator=torch.Generator().manual_seed(0))
    assert plain.stage_b.clf[1].weight.dtype == torch.bfloat16 and torch.isfinite(images).all()
