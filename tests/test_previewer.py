"""The Previewer (issue 22): the network, its files and objective, and sampling with live previews, which calls back
with previews of the right shape and leaves the images exactly as sampling without them. Tiny random networks."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from wurst_core import training as train
from wurst_core.models.previewer import PREVIEWER_SIZES, Previewer, PreviewerConfig, load_previewer, save_previewer
from wurst_core.models.semantic import SEMANTIC_SIZES, SemanticCompressor
from wurst_core.pipeline import Pipeline
from wurst_core.studies.sampling import random_pipeline
from wurst_core.training.previewer import PreviewerTask

SIZE = 128  # random_pipeline's ratios: Stage C 3 x 3, Stage B 32 x 32


def previewer(upscale: int = 4, seed: int = 0) -> Previewer:
    torch.manual_seed(seed)
    return Previewer(dataclasses.replace(PREVIEWER_SIZES["parity"], upscale=upscale)).eval()


def test_the_previewer_maps_latents_to_an_image_and_reloads_from_its_folder(tmp_path):
    model = previewer(upscale=8)
    latents = torch.randn(2, 16, 3, 5)
    out = model(latents)
    assert out.shape == (2, 3, 24, 40)
    shown = model.preview(latents)
    assert shown.min() >= 0 and shown.max() <= 1 and shown.dtype == torch.float32
    save_previewer(model, tmp_path / "p")
    again = load_previewer(tmp_path / "p")
    assert again.config == model.config and torch.equal(again(latents), out)
    with pytest.raises(FileNotFoundError, match="13_previewer"):
        load_previewer(tmp_path)
    with pytest.raises(ValueError, match="power of two"):
        PreviewerConfig(upscale=6)
    with pytest.raises(ValueError, match="16 channels"):
        model(torch.randn(1, 4, 3, 3))


def test_the_previewer_task_learns_the_images_behind_the_latents(tmp_path):
    torch.manual_seed(0)
    comp = SemanticCompressor(dataclasses.replace(SEMANTIC_SIZES["tiny"], image_size=64))  # 64 px -> 2 x 2
    task = PreviewerTask(previewer(upscale=8), comp)
    colours = torch.rand(24, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    images = colours.expand(-1, -1, 64, 64).contiguous()  # flat colours: learnable in a few dozen steps
    batch = {"image": images[:4]}
    assert task.target(images[:4], task.latents(images[:4])).shape == (4, 3, 16, 16)
    loss0, logs = task(batch, [])
    cfg = train.TrainConfig(steps=60, batch_size=8, lr=3e-3, warmup_steps=2, ema_start=1000, ema_every=1,
                            ckpt_every=60, log_every=10, seed=0)
    history = train.fit(task, cfg, lambda idx: {"image": images[idx]}, 24, tmp_path, progress=False)
    assert history["loss"].iloc[-1] < 0.5 * loss0.item() and "psnr" in history
    assert all(not p.requires_grad for p in task.compressor.parameters())


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("with_previewer", [True, False])
def test_sampling_with_previews_calls_back_and_leaves_the_images_unchanged(guidance, with_previewer):
    pipe = random_pipeline("smoke", seed=0)
    if with_previewer:
        pipe.previewer = previewer(upscale=4)
    kw = dict(height=SIZE, width=SIZE, prior_steps=5, decoder_steps=2, prior_guidance=guidance)
    prompts = ["a red circle", "a blue square"]
    plain = pipe(prompts, generator=torch.Generator().manual_seed(3), **kw)
    shots, steps = [], []
    watched = pipe(prompts, generator=torch.Generator().manual_seed(3), preview_every=2,
                   preview=lambda i, images: shots.append((i, images.clone())),
                   callback=lambda stage, i, t, x: steps.append((stage, i, x.clone())), **kw)
    assert torch.equal(watched, plain)
    assert [i for i, _ in shots] == [1, 3, 4]  # every 2nd step and the last
    shape = (2, 3, 12, 12) if with_previewer else (2, 16, 3, 3)
    assert all(s.shape == shape for _, s in shots)
    last_c = [x for stage, _, x in steps if stage == "c"][-1]
    final = pipe.unscale_stage_c(last_c)  # the last preview shows Stage C's sample itself
    torch.testing.assert_close(shots[-1][1], pipe.previewer.preview(final) if with_previewer else final)
    if with_previewer:
        assert all(s.min() >= 0 and s.max() <= 1 for _, s in shots)
    with pytest.raises(ValueError, match="preview_every"):
        pipe(prompts, preview=lambda i, x: None, preview_every=0, **kw)


def test_previews_show_stage_c_prediction_of_the_clean_latent():
    """With a denoiser that knows the answer (eps from a fixed x0), every preview is that x0."""
    pipe = random_pipeline("smoke", seed=0)
    x0 = torch.randn(1, 16, 3, 3, generator=torch.Generator().manual_seed(9))
    schedule = dataclasses.replace(pipe.stage_c_schedule, shift=1.0)

    class Oracle(torch.nn.Module):
        config = pipe.stage_c.config

        def forward(self, x, r, text_tokens):
            ab = schedule.alpha_bar(r).view(-1, 1, 1, 1)
            return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    pipe.stage_c = Oracle()
    shots = []
    pipe.sample_stage_c(torch.zeros(1, 77, pipe.stage_c.config.c_cond), height=SIZE, width=SIZE, steps=4,
                        guidance=1.0, generator=torch.Generator().manual_seed(0),
                        preview=lambda i, latents: shots.append(latents))
    for latents in shots[:-1]:
        torch.testing.assert_close(latents, pipe.unscale_stage_c(x0), rtol=1e-3, atol=1e-3)


def test_a_saved_pipeline_carries_its_previewer(tmp_path):
    pipe = random_pipeline("smoke", seed=0)
    pipe.previewer = previewer(upscale=4)
    pipe.save(tmp_path / "pipe")
    again = Pipeline.from_pretrained(tmp_path / "pipe", prior_text_encoder=pipe.prior_text_encoder,
                                     decoder_text_encoder=pipe.decoder_text_encoder)
    assert isinstance(again.previewer, Previewer)
    latents = torch.randn(1, 16, 3, 3)
    assert torch.equal(again.previewer(latents), pipe.previewer(latents))
