"""The interactive explorer (issue 22), driven from Python as a browser would drive it: build the widget, press
Generate, read what it shows. The JupyterLab screenshot (a browser) is the slow test at the end."""
from __future__ import annotations

import copy
import dataclasses
import io
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from wurst_core.models.previewer import PREVIEWER_SIZES, Previewer
from wurst_core.params import build
from wurst_core.studies.explorer import Explorer, ExplorerParams, explorer_metrics, grid_png, load_explorer_pipeline
from wurst_core.studies.sampling import random_pipeline
from wurst_core.training.lora import LoraSpec, inject_lora, save_adapter

ROOT = Path(__file__).resolve().parents[1]


def params(**kw) -> ExplorerParams:
    return build(ExplorerParams, {"profile": "smoke", "size": 128, **kw})


def pipeline(with_previewer: bool = True):
    pipe = random_pipeline("smoke", seed=0)
    if with_previewer:
        torch.manual_seed(0)
        pipe.previewer = Previewer(dataclasses.replace(PREVIEWER_SIZES["parity"], upscale=4)).eval()
    return pipe


def png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_the_generate_button_shows_previews_then_one_image_per_seed():
    explorer = Explorer(pipeline(), params(n_seeds=3, prior_steps=4, preview_every=2),
                        {"weights": "random", "previewer": "test"})
    assert explorer.final.value == b"" and "weights: random" in explorer.status.value
    explorer.prompt.value, explorer.seed.value = "a red circle in the center", 5
    explorer.button.click()  # what a click in the browser runs
    assert explorer.images.shape == (3, 3, 128, 128)
    assert [i for i, _ in explorer.previews] == [1, 3] and explorer.previews[0][1].shape == (3, 3, 12, 12)
    assert png(explorer.preview.value).size == (3 * 128, 128) and png(explorer.final.value).size == (3 * 128, 128)
    assert "seeds 5-7" in explorer.status.value and not explorer.button.disabled
    metrics = explorer_metrics(explorer)
    assert metrics["images"] == 3 and metrics["previews"] == 2 and metrics["settings"]["seed"] == 5
    alone = Explorer(explorer.pipe, params(n_seeds=1, prior_steps=4, seed=6, prompt="a red circle in the center"))
    torch.testing.assert_close(alone.generate()[0], explorer.images[1], rtol=0, atol=1e-5)  # alone as in a batch


def test_the_explorer_without_a_previewer_still_generates_and_reports_errors_in_the_widget():
    explorer = Explorer(pipeline(with_previewer=False), params(n_seeds=1, prior_steps=2))
    assert explorer.preview_every.disabled and explorer.adapter_scale.disabled
    images = explorer.generate()
    assert images.shape == (1, 3, 128, 128) and explorer.previews == [] and explorer.preview.value == b""
    explorer.prior_steps.value = 1
    explorer.size = 3  # too small for any image
    with pytest.raises(ValueError):
        explorer.generate()
    assert "error" in explorer.status.value and not explorer.button.disabled


def test_the_lora_scale_slider_sets_the_adapter_weight(tmp_path):
    pipe = pipeline()
    spec = LoraSpec(rank=2, alpha=2.0)
    tuned = inject_lora(copy.deepcopy(pipe.stage_c), spec)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)
    save_adapter(tuned, spec, tmp_path / "adapter")
    plain = Explorer(pipeline(), params(n_seeds=1, prior_steps=2)).generate()
    pipe.load_adapter(tmp_path / "adapter", scale=1.0)
    explorer = Explorer(pipe, params(n_seeds=1, prior_steps=2, adapter_scale=1.0), {"adapter": "test"})
    assert not explorer.adapter_scale.disabled
    with_adapter = explorer.generate()
    explorer.adapter_scale.value = 0.0
    without = explorer.generate()
    assert (with_adapter - plain).abs().max() > 1e-3
    torch.testing.assert_close(without, plain, rtol=0, atol=1e-4)


def test_loading_names_the_notebook_to_run_when_nothing_is_trained():
    with pytest.raises(FileNotFoundError, match="05_stage_c"):
        load_explorer_pipeline(params())


def test_grid_png_puts_the_images_side_by_side():
    assert png(grid_png(torch.rand(2, 3, 16, 8), tile=32)).size == (2 * 16, 32)


@pytest.mark.slow
def test_a_screenshot_of_the_explorer_in_jupyterlab(tmp_path):
    """JupyterLab headless with the explorer notebook run in it over freshly trained smoke networks, photographed by
    Chromium (benchmarks/explorer_screenshot.py); minutes."""
    import subprocess
    import sys

    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WURST_PROFILE", None)
    for name in ("01_text_encoder", "03_stage_a", "04_stage_b", "05_stage_c"):
        done = subprocess.run([sys.executable, "-m", "wurst_core", "run", name, "--profile", "smoke"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "explorer.png"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "explorer_screenshot.py"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert Image.open(out).size == (1500, 950)
