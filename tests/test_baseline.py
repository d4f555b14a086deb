"""The Baseline LDM (paper §4, "Baselines"): the single-stage text-conditional U-Net and its training task. Shapes,
the paper size's ~1B parameters, a tiny size on the tiny Stage C's budget, training, frozen parts, determinism; the
equal-compute arithmetic of notebook 08 (budget, steps, rounding, the FLOPs table)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from wurst_core import params
from wurst_core import training as train
from wurst_core.evaluation.compute import training_flops
from wurst_core.layouts import CheckpointError
from wurst_core.models import count_parameters
from wurst_core.models.baseline import BASELINE_SIZES, BaselineConfig, BaselineUNet, load_baseline, save_baseline
from wurst_core.models.semantic import SEMANTIC_SIZES, SemanticCompressor, tiny_backbone_widths
from wurst_core.models.stage_a import STAGE_A_SIZES, StageA
from wurst_core.models.stage_c import STAGE_C_SIZES, StageC
from wurst_core.studies.baseline import (Arm, BaselineParams, budget_flops, flops_table, scaled_flops, steps_for_budget,
                                        train_baseline)
from wurst_core.training.tasks import BaselineTask, StageCTask, TextCache
from wurst_core.weights import load_model


class HashText(nn.Module):
    """A stand-in text encoder: tokens from a caption hash through a linear map (a parameter that must stay frozen)."""

    def __init__(self, width: int = 32, length: int = 48) -> None:
        super().__init__()
        self.width, self.length = width, length
        self.proj = nn.Linear(width, width)

    def forward(self, prompts):
        noise = torch.stack([torch.randn(self.length, self.width,
                                         generator=torch.Generator().manual_seed(sum(map(ord, p)) + 7 * len(p)))
                             for p in prompts])
        return type("T", (), {"tokens": self.proj(noise)})()


def make_task(seed: int = 0, size: str = "parity", stage_a: str = "parity") -> BaselineTask:
    torch.manual_seed(seed)
    cfg = BASELINE_SIZES[size]
    return BaselineTask(BaselineUNet(cfg), StageA(STAGE_A_SIZES[stage_a]), TextCache(HashText(cfg.c_cond)))


def make_data(n: int = 16, side: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, side, side, generator=g)
    captions = [f"caption {i % 5}" for i in range(n)]
    return (lambda idx: {"image": images[idx], "caption": [captions[i] for i in idx]}), n


CFG = train.TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, ema_start=1, ema_every=1, ckpt_every=2,
                        log_every=1, seed=5)


# ------------------------------------------------------------------------------------------------ network

@pytest.mark.parametrize("side", [16, 8])
def test_parity_forward_shapes(side):
    cfg = BASELINE_SIZES["parity"]
    model = BaselineUNet(cfg)
    x = torch.randn(2, cfg.c_in, side, side)
    out = model(x, torch.rand(2), torch.randn(2, 7, cfg.c_cond))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # zero output conv: the U-Net starts at a zero prediction
    assert model(x, 0.5, torch.randn(2, 7, cfg.c_cond)).shape == x.shape  # a scalar r, as Stage C takes it


def test_text_and_time_reach_the_output():
    cfg = BASELINE_SIZES["parity"]
    torch.manual_seed(0)
    model = BaselineUNet(cfg).eval()
    for p in model.parameters():  # move off the zero/identity init so that every input matters
        p.data.add_(0.05 * torch.randn_like(p))
    x, text = torch.randn(1, cfg.c_in, 8, 8), torch.randn(1, 5, cfg.c_cond)
    ref = model(x, torch.tensor([0.3]), text)
    assert not torch.allclose(ref, model(x, torch.tensor([0.7]), text))
    assert not torch.allclose(ref, model(x, torch.tensor([0.3]), torch.randn(1, 5, cfg.c_cond)))


def test_paper_size_is_about_one_billion_parameters():
    with torch.device("meta"):  # shapes only: no memory
        model = BaselineUNet(BASELINE_SIZES["paper"])
    n = count_parameters(model)
    print(f"baseline paper: {n:,} parameters")
    assert 0.8e9 <= n <= 1.3e9  # paper Table 1: Baseline LDM 0.99B


@pytest.mark.parametrize("kwargs,message", [
    (dict(widths=()), "positive"),
    (dict(attn_levels=(3,)), "attn_levels"),
    (dict(widths=(16, 30), nhead=4, attn_levels=(0,)), "divisible"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_config_gives_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BASELINE_SIZES["parity"], **kwargs)


def test_bad_input_gives_a_clear_error():
    cfg = BASELINE_SIZES["parity"]
    model = BaselineUNet(cfg)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(1, cfg.c_in, 7, 8), torch.rand(1), torch.randn(1, 3, cfg.c_cond))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, cfg.c_in + 1, 8, 8), torch.rand(1), torch.randn(1, 3, cfg.c_cond))
    with pytest.raises(ValueError, match="batch"):
        model(torch.randn(2, cfg.c_in, 8, 8), torch.rand(2), torch.randn(1, 3, cfg.c_cond))


def test_config_and_weights_round_trip(tmp_path):
    for cfg in BASELINE_SIZES.values():
        assert BaselineConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="no field"):
        BaselineConfig.from_dict({"depth": 3})
    model = BaselineUNet(BASELINE_SIZES["parity"])
    save_baseline(model, tmp_path / "baseline")
    loaded = load_baseline(tmp_path / "baseline")
    assert loaded.config == model.config and not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    # not one of the Würstchen networks: their loader names the stage instead of guessing an architecture
    with pytest.raises(CheckpointError, match="baseline"):
        load_model(tmp_path / "baseline")


# ----------------------------------------------------------------------------------- budget: tiny size

def test_tiny_size_is_on_the_tiny_stage_c_budget():
    """Parameters and training FLOPs per step (batch 2 of 64 px images, frozen encoders included) against the tiny
    Stage C task as the tiny profile builds it (4-stage tiny compressor at 64 px: a 4 x 4 map)."""
    torch.manual_seed(0)
    batch = {"image": torch.rand(2, 3, 64, 64), "caption": ["a red circle", "two blue squares"]}
    gens = lambda: train.sample_generators(0, 0, [0, 1])  # fresh generators for each count
    text_width = STAGE_C_SIZES["tiny"].c_cond  # the tiny CLIP's width
    comp = SemanticCompressor(dataclasses.replace(SEMANTIC_SIZES["tiny"], image_size=64,
                                                  tiny_widths=tiny_backbone_widths(4)))
    stage_c = StageC(STAGE_C_SIZES["tiny"])
    c_task = StageCTask(stage_c, comp, TextCache(HashText(text_width)), sc_size=64, latent_scaling="none")
    c_flops = training_flops(lambda: c_task(batch, gens())[0])
    unet = BaselineUNet(BASELINE_SIZES["tiny"])
    b_task = BaselineTask(unet, StageA(STAGE_A_SIZES["tiny"]), TextCache(HashText(text_width)))
    b_flops = training_flops(lambda: b_task(batch, gens())[0])
    c_params, b_params = count_parameters(stage_c), count_parameters(unet)
    print(f"tiny Stage C: {c_params:,} parameters, {c_flops / 1e6:.1f} MFLOP per step; "
          f"tiny baseline: {b_params:,} parameters, {b_flops / 1e6:.1f} MFLOP per step "
          f"(x{b_params / c_params:.2f} parameters, x{b_flops / c_flops:.2f} FLOPs)")
    assert 0.5 <= b_flops / c_flops <= 2.0
    assert 0.5 <= b_params / c_params <= 2.0


# --------------------------------------------------------------------------------------------- training

def test_fit_gives_a_finite_loss_and_trains_only_the_unet(tmp_path):
    task = make_task()
    get_batch, n = make_data()
    frozen = {k: v.clone() for k, v in task.stage_a.state_dict().items()}  # BN running statistics included
    hist = train.fit(task, CFG, get_batch, n, tmp_path, progress=False)
    assert len(hist) == 2 and torch.isfinite(torch.tensor(hist["loss"].values)).all()
    unet_grads = {k: p.grad for k, p in task.unet.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in unet_grads.values())
    # step 1 moved the zero output conv, so step 2's gradient reaches the first conv
    assert unet_grads["conv_in.weight"].abs().sum() > 0
    for frozen_part in (task.stage_a, task.text):
        assert all(not p.requires_grad and p.grad is None for p in frozen_part.parameters())
    assert all(torch.equal(v, task.stage_a.state_dict()[k]) for k, v in frozen.items())
    assert not task.stage_a.training and task.unet.training


def test_draws_are_per_row():
    """Each row's caption dropout, t and noise come from its own generator: a batch's loss is the mean of its
    rows' losses computed alone, so a batch split across processes draws the same numbers."""
    task = make_task().eval()
    get_batch, _ = make_data()
    batch = get_batch([0, 1, 2])
    gens = lambda rows: train.sample_generators(3, 7, rows)
    whole, _ = task(batch, gens([0, 1, 2]))
    alone = [task(get_batch([i]), gens([i]))[0] for i in range(3)]
    assert torch.allclose(whole, torch.stack(alone).mean(), rtol=1e-5, atol=1e-7)


def test_same_seed_gives_the_same_weights(tmp_path):
    get_batch, n = make_data()
    runs = []
    for name in ("one", "two"):
        task = make_task(seed=1)
        train.fit(task, CFG, get_batch, n, tmp_path / name, progress=False)
        runs.append(task.unet.state_dict())
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())
    other = make_task(seed=1)
    train.fit(other, dataclasses.replace(CFG, seed=6), get_batch, n, tmp_path / "other", progress=False)
    assert not all(torch.equal(v, other.unet.state_dict()[k]) for k, v in runs[0].items())



def test_a_snapshot_keeps_the_ema_weights_of_its_step(tmp_path):
    # a constant lr after warm-up: the 3-step run and the first 3 steps of the 5-step run are the same updates
    get_batch, n = make_data()
    longer = make_task(seed=2)
    train.fit(longer, dataclasses.replace(CFG, steps=5, snapshot_steps=(3,)), get_batch, n, tmp_path / "five",
              progress=False)
    shorter = make_task(seed=2)
    train.fit(shorter, dataclasses.replace(CFG, steps=3), get_batch, n, tmp_path / "three", progress=False)
    snap = train.load_training_state(train.snapshot_path(tmp_path / "five", 3))
    ema = train.load_training_state(tmp_path / "three" / "train_state.pt")["ema"]
    assert snap["step"] == 3 and set(snap["ema"]) == set(ema)
    assert all(torch.equal(v, ema[k]) for k, v in snap["ema"].items())
    final = train.load_training_state(tmp_path / "five" / "train_state.pt")["ema"]
    assert not all(torch.equal(v, final[k]) for k, v in snap["ema"].items())  # two more steps moved it
    assert not train.snapshot_path(tmp_path / "five", 4).exists()
    with pytest.raises(ValueError, match="snapshot_steps"):
        dataclasses.replace(CFG, snapshot_steps=(3,))  # beyond the run's 2 steps


def test_snapshot_steps_are_distinct_steps_before_the_end():
    p = params.build(BaselineParams, {"profile": "smoke", "snapshots": "0.125,0.25,0.5"})
    assert p.snapshot_steps(3) == (1, 2) and p.snapshot_steps(3326) == (416, 832, 1663)
    assert p.snapshot_steps(1) == ()  # a one-step run has no earlier weights
    with pytest.raises(ValueError, match="snapshots"):
        params.build(BaselineParams, {"profile": "smoke", "snapshots": "0.5,1"})


# ------------------------------------------------------------------------------ budget arithmetic (08)

def _arms(c_flops: int = 300, c_steps: int = 10, b_flops: int = 500, b_steps: int = 4):
    return {"stage_c": Arm("Stage C", c_flops, c_steps, 8, train_seconds=2.0, workers=2),
            "stage_b": Arm("Stage B", b_flops, b_steps, 8, train_seconds=3.0, workers=1)}


def test_budget_is_stage_c_or_stage_b_plus_c():
    arms = _arms()
    assert budget_flops(arms, "stage_c") == 300 * 10
    assert budget_flops(arms, "stage_bc") == 300 * 10 + 500 * 4
    with pytest.raises(ValueError, match="budget must be one of"):
        budget_flops(arms, "stage_a")


@pytest.mark.parametrize("budget,per_step,steps", [
    (3000, 300, 10),    # exact
    (3000, 280, 11),    # 10.71 rounds up
    (3000, 320, 9),     # 9.375 rounds down
    (3000, 240, 13),    # 12.5: half rounds up, not to the even 12
    (100, 300, 1),      # less than one step's worth still trains one step
    (0, 300, 1),
    (10**18, 3, 333333333333333333),  # integers: no float rounding at large budgets
])
def test_steps_for_budget_rounds_to_the_nearest_step_and_at_least_one(budget, per_step, steps):
    assert steps_for_budget(budget, per_step) == steps


def test_steps_for_budget_refuses_impossible_counts():
    with pytest.raises(ValueError, match="flops_per_step"):
        steps_for_budget(3000, 0)
    with pytest.raises(ValueError, match="budget"):
        steps_for_budget(-1, 300)


def test_counted_flops_scale_linearly_to_the_batch():
    assert scaled_flops(1000, 8, 8) == 1000       # counted on the whole batch: unchanged
    assert scaled_flops(1000, 32, 1280) == 40_000
    assert scaled_flops(10, 3, 4) == 13           # 13.33
    assert scaled_flops(5, 2, 1) == 3             # 2.5 rounds up
    with pytest.raises(ValueError):
        scaled_flops(1000, 0, 8)


def test_flops_table_rows_totals_and_core_seconds():
    arms = _arms()
    budget = budget_flops(arms, "stage_c")
    steps = steps_for_budget(budget, 400)  # 7.5 -> 8
    base = [Arm(f"baseline, seed {s}", 400, steps, 8, train_seconds=1.5, workers=2) for s in (0, 1)]
    table = flops_table([arms["stage_c"], arms["stage_b"], *base], budget).set_index("arm")
    assert list(table.index) == ["Stage C", "Stage B", "Stage B + C", "baseline, seed 0", "baseline, seed 1"]
    assert table.loc["Stage C", "total_flops"] == 3000 and table.loc["Stage C", "of_budget"] == 1.0
    assert table.loc["Stage B + C", "total_flops"] == 5000
    assert table.loc["Stage B + C", "core_seconds"] == 2.0 * 2 + 3.0 * 1   # seconds x workers, summed
    assert table.loc["baseline, seed 0", "steps"] == 8
    assert table.loc["baseline, seed 1", "of_budget"] == pytest.approx(3200 / 3000)
    alone = flops_table([Arm("Stage C", 300, 10, 8)], 3000)  # no Stage B, no seconds recorded
    assert list(alone["arm"]) == ["Stage C"] and alone.iloc[0]["core_seconds"] is None


def test_paper_size_is_built_but_its_training_refused():
    cfg = params.build(BaselineParams, {"profile": "paper"})
    assert cfg.size == "paper" and cfg.steps == 0 and cfg.seed_list() == [0, 1]
    with pytest.raises(RuntimeError, match=r"\(\d\.\d\dB parameters\) is built but not trained"):
        train_baseline(cfg, run=None, progress=False)  # refused before any run folder or upstream is read
