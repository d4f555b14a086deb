"""Notebook 09's objective ablation: the spike rule, the claims' decision rules, the arms' shared start, the sampler
wrapper of a v-trained Stage C, the loss-by-noise-level log and the schema. (The targets' round trips and the
oracle denoiser for eps / v / x0 are in test_objectives.py.)"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from wurst_core import params
from wurst_core.diffusion import CosineSchedule, Diffusion, diffuse, training_target
from wurst_core.evaluation.claims import INCONCLUSIVE, NOT_MEASURED, REFUTED, SUPPORTED, verdict
from wurst_core.models.stage_c import STAGE_C_SIZES, StageC
from wurst_core.studies import objective as obj
from wurst_core.training import TrainConfig
from wurst_core.training.tasks import loss_by_noise_level

CFG = dataclasses.replace(STAGE_C_SIZES["parity"], dropout=0.0)


# ------------------------------------------------------------------------------------------ the spike rule


def test_spike_rule_on_a_constructed_series():
    g = np.ones(80)
    g[3] = 100.0    # in the first 10 steps: not judged (and the median shrugs it off later)
    g[20] = 3.5     # above 3x the median of the steps before: a spike
    g[30] = 2.9     # below it: none
    g[40] = np.nan  # a non-finite norm is a spike (and is left out of later medians)
    g[60:] = 2.0    # a step up of 2x: never a spike
    assert obj.grad_spikes(g).nonzero()[0].tolist() == [20, 40]
    assert obj.grad_spikes(g, factor=1.5).nonzero()[0].tolist() == [20, 30, 40, 60, 61, 62, 63, 64, 65, 66, 67, 68,
                                                                    69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79]


def test_running_median_follows_the_level():
    g = np.concatenate([np.ones(60), np.full(60, 10.0)])
    spikes = obj.grad_spikes(g)
    # the jump spikes until 25 of the 50 steps before are at the new level (the median is then 5.5: 10 < 16.5)
    assert spikes[60:85].all() and not spikes[85:].any() and not spikes[:60].any()


def test_unstable_steps_count_the_steps_a_diverged_run_never_reached():
    logged = np.ones(15)
    logged[12] = 4.0
    u = obj.unstable_steps(logged, planned=20)
    assert len(u) == 20 - obj.SPIKE_MIN_HISTORY
    assert u.tolist() == [0, 0, 1, 0, 0, 1, 1, 1, 1, 1]
    assert obj.unstable_steps([], planned=5).tolist() == []
    with pytest.raises(ValueError, match="exceed"):
        obj.unstable_steps(np.ones(6), planned=5)


class _Toy(torch.nn.Module):
    """A one-weight task whose loss turns NaN at step ``nan_at`` (1-based)."""

    def __init__(self, nan_at: int):
        super().__init__()
        self.w, self.calls, self.nan_at = torch.nn.Parameter(torch.ones(1)), 0, nan_at

    def forward(self, batch, gens):
        self.calls += 1
        loss = (self.w ** 2).sum() * (math.nan if self.calls == self.nan_at else 1.0)
        return loss, {"loss": loss.item()}


class _Data:
    def __len__(self) -> int:
        return 4

    def __call__(self, rows):
        return {}


@pytest.mark.parametrize("nan_at", [5, 1])
def test_a_diverged_run_keeps_its_log_and_why(tmp_path, nan_at):
    cfg = TrainConfig(steps=8, batch_size=2, lr=0.1, warmup_steps=0, log_every=1, ckpt_every=3, ema_start=0)
    history, why = obj._fit_logged(_Toy(nan_at), cfg, _Data(), tmp_path, 1, False, False)
    assert "loss is nan" in why
    assert history["step"].tolist() == list(range(1, nan_at)) and "grad_norm" in history
    assert obj.unstable_steps(history["grad_norm"], 12).tolist() == [1.0, 1.0]  # judged steps 11, 12: never reached
    finished, none = obj._fit_logged(_Toy(99), cfg, _Data(), tmp_path / "ok", 1, False, False)
    assert none is None and finished["step"].tolist() == list(range(1, 9))


# ------------------------------------------------------------------------------------------ the claims


def _series(rate: float, n: int = 400, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < rate).astype(float)


def test_stability_claim_rule():
    names = [c.name for c in obj.objective_claims()]
    assert names == ["The A/B objective stabilises training", "p2 loss weighting helps"]
    assert all(c.direction == "higher" and c.reference == 0 and c.measured is None for c in obj.objective_claims())
    stable_ab = {"ab_p2": np.zeros(400), "eps_p2": _series(0.3, seed=1), "v_p2": _series(0.2, seed=2)}
    est = obj.stability_difference(stable_ab, n_boot=1000)
    assert est.value == pytest.approx(100 * stable_ab["v_p2"].mean())  # the better plain head: v
    assert est.low > 0 and est.n == 400
    claims = obj.measured_objective_claims(stable_ab, None)
    assert verdict(claims[0]) == SUPPORTED and verdict(claims[1]) == NOT_MEASURED
    # one plain head as stable as A/B: the better plain head decides, so no support
    assert verdict(obj.measured_objective_claims({**stable_ab, "eps_p2": np.zeros(400)}, None)[0]) == REFUTED
    unstable_ab = {"ab_p2": _series(0.4, seed=3), "eps_p2": _series(0.05, seed=4), "v_p2": _series(0.3, seed=5)}
    assert verdict(obj.measured_objective_claims(unstable_ab, None)[0]) == REFUTED
    close = {"ab_p2": _series(0.1, seed=6), "eps_p2": _series(0.12, seed=7), "v_p2": _series(0.5, seed=8)}
    assert verdict(obj.measured_objective_claims(close, None)[0]) == INCONCLUSIVE
    empty = {k: np.zeros(0) for k in obj.HEADS}
    none = obj.measured_objective_claims(empty, None)[0]
    assert none.measured is None and verdict(none) == NOT_MEASURED and "not measured" in none.measure


def _p2(ab: torch.Tensor, constant: torch.Tensor, chance: float = 0.2):
    floor = {k: torch.full_like(ab, chance) for k in ("ab_p2", "ab_constant")}
    return obj.measured_objective_claims(None, {"ab_p2": ab, "ab_constant": constant}, floor)[1]


def test_p2_claim_rule_is_paired_on_prompts():
    base = torch.tensor([1.0, 0.4, 1, 0.4] * 25, dtype=torch.float64)  # attribute shares
    better = base.clone()
    better[1::4] = 1.0  # p2 reads more attributes right on a quarter of the prompts, and fewer on none
    claim = _p2(better, base)
    assert claim.measured.value == pytest.approx(15.0) and verdict(claim) == SUPPORTED
    assert claim.precondition_met and "above chance" in claim.measure
    assert verdict(_p2(base, better)) == REFUTED
    assert verdict(_p2(base, base)) == REFUTED
    noisy = base.clone()
    noisy[1], noisy[0] = 1.0, 0.4  # one prompt won, one lost: no difference to speak of
    assert verdict(_p2(noisy, base)) == INCONCLUSIVE


def test_p2_claim_is_not_judged_at_chance_level():
    # the first tiny run's trouble, restated: a measure no arm has left the floor of says nothing about p2
    base = torch.full((100,), 0.22, dtype=torch.float64)
    better = base.clone()
    better[::2] = 0.26
    claim = _p2(better, base, chance=0.2)  # both arms within 5 points of chance
    assert claim.measured.low > 0 and claim.precondition_met is False and verdict(claim) == INCONCLUSIVE
    assert "judged only if" in claim.rule
    with pytest.raises(ValueError, match="chance"):
        obj.measured_objective_claims(None, {"ab_p2": base, "ab_constant": base})


# ------------------------------------------------------------------------------------------ the arms


def test_every_arm_starts_from_the_same_weights():
    init = obj.initial_weights(CFG, seed=3)
    ab, plain = obj.build_stage_c(CFG, "ab", init), obj.build_stage_c(CFG, "plain", init)
    for (k, a), (k2, b) in zip(ab.state_dict().items(), plain.state_dict().items()):
        assert k == k2
        if k.startswith("out.1."):  # the output conv: its width differs, both start at zero
            assert not a.any() and not b.any()
        else:
            assert torch.equal(a, b), k
    assert torch.equal(ab.state_dict()["projection.weight"], obj.initial_weights(CFG, seed=3)["projection.weight"])


@pytest.mark.parametrize("target", ["eps", "v"])
@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_eps_output_of_a_plain_head_that_outputs_the_true_target(target, shift):
    # the wrapper the pipeline samples: a plain Stage C whose output is the true target returns the true noise
    schedule = CosineSchedule(shift=shift)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, CFG.c_in, 2, 2, generator=g), torch.randn(3, CFG.c_in, 2, 2, generator=g)
    t = torch.tensor([0.2, 0.6, 0.95])
    x_t = diffuse(x0, t, noise, schedule)
    net = StageC(CFG, head="plain")
    net.forward = lambda x, r, text_tokens: training_target(x0, noise, t, target, schedule)
    eps = obj.EpsOutput(net, target, schedule)(x_t, schedule.noise_cond(t), torch.zeros(3, 4, CFG.c_cond))
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=1e-4)
    assert obj.EpsOutput(net, target, schedule).config is net.config


@pytest.mark.parametrize("target,weight", [("eps", "p2"), ("v", "p2"), ("eps", "constant"), ("x0", "p2_paper")])
def test_loss_by_noise_level_is_the_eps_error_in_every_target(target, weight):
    d = Diffusion(schedule=CosineSchedule(shift=2.0), weight=weight, target=target)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    t = torch.tensor([0.05, 0.1, 0.3, 0.5, 0.75, 1.0])
    eps_hat = noise + 0.2 * torch.randn(noise.shape, generator=g)
    x_t = d.diffuse(x0, t, noise)
    ab = d.schedule.alpha_bar(t).view(-1, 1, 1, 1)
    # the same eps estimate expressed in the arm's target
    out = {"eps": eps_hat, "v": (eps_hat - (1 - ab).sqrt() * x_t) / ab.sqrt(),
           "x0": (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()}[target]
    per_sample = d.loss(lambda x, r: out, x0, t=t, noise=noise)
    logs = loss_by_noise_level(d, per_sample, t, 5)
    eps_mse = (eps_hat - noise).pow(2).flatten(1).mean(1)
    assert [logs[f"tbin{b}_n"] for b in range(5)] == [2, 1, 1, 1, 1]
    torch.testing.assert_close(torch.tensor([logs[f"tbin{b}_eps"] for b in range(5)]),
                               torch.stack([eps_mse[:2].sum(), *eps_mse[2:]]).float(), rtol=2e-4, atol=1e-6)
    assert sum(logs[f"tbin{b}_loss"] for b in range(5)) == pytest.approx(per_sample.sum().item(), rel=1e-5)


# ------------------------------------------------------------------------------------------ the schema


@pytest.mark.parametrize("profile", params.PROFILES)
def test_schema_resolves_on_every_profile(profile):
    p = params.build(obj.ObjectiveParams, {"profile": profile})
    assert p.steps >= 1 and p.stress_steps >= 1 and p.n_prompts >= 2 and p.stress_lr_factor == 10.0
    if profile == "smoke":
        assert p.workers == 1 and p.size == "parity" and p.stress_steps > obj.SPIKE_MIN_HISTORY
    if profile == "tiny":
        assert p.workers == 2 and p.size == "tiny"


def test_schema_refuses_a_dataset_without_ground_truth():
    with pytest.raises(params.ParameterError, match="procedural or emoji"):
        params.build(obj.ObjectiveParams, {"profile": "smoke", "dataset": "folder", "data_dir": "/x"})
