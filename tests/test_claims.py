"""Building blocks for testing the paper's claims (issue 20): FLOP counts, paired and seed-pooled intervals, verdicts,
and the oracle judge, each on constructed cases with known answers."""
from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn as nn

from wurst_core import evaluation as E
from wurst_core import paths
from wurst_core.evaluation import compute as C
from wurst_core.evaluation.probe import ProbeSpec
from wurst_core.studies.claims import (EQUAL_COMPUTE, EQUAL_COMPUTE_BC, LATER, MEASURED, compare_with_baseline,
                                      measured_claims, stated_claims)


# ----------------------------------------------------------------------------------------------- compute
def test_linear_training_flops_are_forward_plus_twice_forward():
    n, a, b = 4, 3, 5
    lin = nn.Linear(a, b)
    x = torch.randn(n, a, requires_grad=True)
    flops = E.step_flops(lambda: lin(x).sum())
    assert flops.forward == 2 * n * a * b  # one (n,a)x(a,b) product; the bias add is not counted
    assert flops.backward == 4 * n * a * b  # grad of the weight and grad of the input, one product each
    assert flops.total == 6 * n * a * b
    assert lin.weight.grad is not None  # the step really ran backward

    lin.zero_grad()
    x_const = torch.randn(n, a)  # data needs no grad: only the weight's product in the backward pass
    assert E.training_flops(lambda: lin(x_const).sum()) == 2 * n * a * b + 2 * n * a * b


def test_mlp_counts_and_forward_only():
    n, a, h, b = 8, 6, 7, 2
    mlp = nn.Sequential(nn.Linear(a, h), nn.GELU(), nn.Linear(h, b))
    x = torch.randn(n, a)
    fwd = 2 * n * (a * h + h * b)
    # backward: first layer only its weight (x needs no grad), second layer weight and input
    assert E.training_flops(lambda: mlp(x).pow(2).mean()) == fwd + 2 * n * a * h + 4 * n * h * b
    mlp.zero_grad(set_to_none=True)
    assert E.forward_flops(lambda: mlp(x)) == fwd
    assert all(p.grad is None for p in mlp.parameters())  # inference builds no graph


def test_step_flops_refuses_a_non_scalar_or_detached_loss():
    lin = nn.Linear(2, 3)
    with pytest.raises(ValueError, match="scalar loss"):
        E.step_flops(lambda: lin(torch.randn(4, 2)))
    with pytest.raises(ValueError, match="scalar loss"):
        E.step_flops(lambda: lin(torch.randn(4, 2)).sum().detach())


def test_core_hours_energy_and_carbon_units():
    assert E.core_hours(3600, 2) == 2.0  # two CPU cores for one hour
    assert E.core_hours(90, 4) == pytest.approx(0.1)
    assert E.energy_kwh(2.0, 15.0) == pytest.approx(0.03)  # 2 core-hours at 15 W per core
    assert E.carbon_kg_from_kwh(0.03, 0.37) == pytest.approx(0.0111)
    assert C.carbon_kg is E.carbon_kg_from_kwh
    assert E.carbon_kg(24_602, 250, 0.37) == 2275.68  # the tables' GPU-hours formula is untouched
    for bad in (lambda: E.core_hours(-1, 2), lambda: E.energy_kwh(1, math.nan), lambda: E.carbon_kg_from_kwh(1, -0.1)):
        with pytest.raises(ValueError, match=">= 0"):
            bad()


# ----------------------------------------------------------------------------------------------- paired intervals
def test_paired_difference_sees_a_shift_that_unpaired_intervals_miss():
    gen = torch.Generator().manual_seed(0)
    base = 10 * torch.randn(200, generator=gen, dtype=torch.float64)  # prompt difficulty dominates
    a, b = base + 0.5 + 0.1 * torch.randn(200, generator=gen, dtype=torch.float64), base
    d = E.paired_difference(a, b)
    assert d.value == pytest.approx((a - b).mean().item()) and d.n == 200
    assert 0 < d.low < d.value < d.high  # the interval excludes 0
    ea, eb = E.mean_ci(a), E.mean_ci(b)
    assert ea.low < eb.high  # unpaired, the two arms' intervals overlap
    assert inspect.signature(E.paired_difference).parameters["n_boot"].default >= 1000
    assert E.paired_difference(a, b) == d  # fixed seed, same interval


def test_paired_difference_of_a_constant_shift_and_of_identical_arms():
    b = torch.linspace(0, 1, 50)
    shift = E.paired_difference(b + 2, b)
    assert shift.low == pytest.approx(2) and shift.high == pytest.approx(2) and shift.low > 0
    same = E.paired_difference(b, b)
    assert same.low <= 0 <= same.high and same.value == 0
    signs = torch.tensor([1.0, -1.0]).repeat(50)
    symmetric = E.paired_difference(b.repeat(2) + signs, b.repeat(2))  # differences without a systematic sign
    assert symmetric.value == pytest.approx(0, abs=1e-6) and symmetric.low < 0 < symmetric.high


def test_paired_difference_refusals():
    with pytest.raises(ValueError, match="equal length"):
        E.paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="equal length"):
        E.paired_difference(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="finite"):
        E.paired_difference([1.0, math.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        E.paired_difference([], [])


def test_pooled_interval_carries_the_seed_spread():
    seeds, prompts = 5, 40
    offsets = torch.tensor([-1.0, 1.0, -0.5, 0.5, 0.0], dtype=torch.float64)  # seed-to-seed spread only
    values = offsets[:, None] + 0.01 * torch.arange(prompts, dtype=torch.float64)[None, :]
    pooled = E.pooled_over_seeds(values)
    assert pooled.value == pytest.approx(values.mean().item()) and pooled.n == seeds * prompts
    prompt_only = E.mean_ci(values.mean(0))  # averaging seeds first hides their spread
    assert pooled.high - pooled.low > 5 * (prompt_only.high - prompt_only.low)
    assert pooled.low < values.mean().item() < pooled.high

    a = values + 0.3
    shifted = E.pooled_paired_difference(a, values)  # the same noise per seed: the seed spread cancels
    assert shifted.low == pytest.approx(0.3) and shifted.high == pytest.approx(0.3)
    noisy = E.pooled_paired_difference(values + offsets[:, None], values)  # a seed-dependent difference
    assert noisy.low < 0 < noisy.high


def test_pooled_refusals():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        E.pooled_over_seeds(torch.ones(1, 10))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        E.pooled_over_seeds(torch.ones(10))
    with pytest.raises(ValueError, match="equal"):
        E.pooled_paired_difference(torch.ones(2, 10), torch.ones(2, 9))


# ----------------------------------------------------------------------------------------------- verdicts
def test_verdict_gives_each_outcome_by_the_stated_rule():
    def win(low: float, high: float) -> E.Claim:
        return E.Claim("preferred over baseline", "paper: 64.4%", E.Estimate((low + high) / 2, low, high),
                       direction="higher", reference=50.0, margin=5.0)

    assert win(60, 70).bound == 55
    assert E.verdict(win(60, 70)) == E.SUPPORTED == "supported"
    assert E.verdict(win(40, 50)) == E.REFUTED == "refuted"
    assert E.verdict(win(52, 58)) == E.INCONCLUSIVE == "inconclusive at this scale"
    assert E.verdict(win(55, 65)) == E.INCONCLUSIVE  # touching the bound is not wholly beyond it
    assert E.verdict(win(50, 55)) == E.REFUTED  # no value in the interval exceeds the bound
    assert E.verdict(E.Claim("x", "y", E.Estimate(1.0, math.nan, math.nan))) == E.INCONCLUSIVE

    def fid_gap(low: float, high: float) -> E.Claim:  # ours - baseline; lower is better
        return E.Claim("lower FID", "paper: 23.6 vs 43.5", E.Estimate((low + high) / 2, low, high), direction="lower")

    assert E.verdict(fid_gap(-5, -1)) == E.SUPPORTED
    assert E.verdict(fid_gap(1, 3)) == E.REFUTED
    assert E.verdict(fid_gap(-1, 1)) == E.INCONCLUSIVE


def test_claims_table_columns_and_rule_text():
    claims = [E.Claim("preferred", "64.4%", E.Estimate(65.0, 60.0, 70.0), reference=50.0, margin=5.0),
              E.Claim("lower FID", "23.6 vs 43.5", E.Estimate(2.0, 1.0, 3.0), direction="lower"),
              E.Claim("cheaper", "8x", E.Estimate(0.5, -1.0, 2.0))]
    df = E.claims_table(claims)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["claim", "paper", "measurement", "measured", "rule", "verdict"]
    assert list(df["verdict"]) == ["supported", "refuted", "inconclusive at this scale"]
    assert df.loc[0, "rule"] == claims[0].rule and "> 55" in df.loc[0, "rule"] and "95% CI" in df.loc[0, "rule"]
    assert "< 0" in df.loc[1, "rule"]
    assert df.loc[0, "measured"] == "65 [60, 70]" and df.loc[1, "paper"] == "23.6 vs 43.5"
    with pytest.raises(ValueError, match="at least one"):
        E.claims_table([])


def test_claim_refuses_an_unclear_rule():
    with pytest.raises(ValueError, match="direction"):
        E.Claim("x", "y", E.Estimate(0, 0, 0), direction="better")
    with pytest.raises(ValueError, match="margin"):
        E.Claim("x", "y", E.Estimate(0, 0, 0), margin=-1.0)
    with pytest.raises(TypeError, match="Estimate"):
        E.Claim("x", "y", 3.0)
    with pytest.raises(ValueError, match="no rule"):
        E.Claim("x", "y", E.Estimate(1, 0, 2), direction=None)  # a measurement needs a rule to be judged by
    with pytest.raises(ValueError, match="level"):
        E.Claim("x", "y", E.Estimate(1, 0, 2, level=0.9))  # the rule reads a 95% interval


def test_claim_not_measured_yet():
    planned = E.Claim("faster inference", "Figure 4: over twice as fast", direction=None,
                      measure="seconds per image against batch size, same run")
    assert planned.measured is None and E.verdict(planned) == E.NOT_MEASURED == "not measured yet"
    assert planned.rule == E.claims.NO_RULE
    stated = E.Claim("beats the baseline", "Table 1", measure="paired difference, points")  # rule fixed, no value yet
    assert E.verdict(stated) == E.NOT_MEASURED and "> 0" in stated.rule
    measured = dataclasses.replace(stated, measured=E.Estimate(3.0, 1.0, 5.0))
    assert measured.rule == stated.rule and E.verdict(measured) == E.SUPPORTED  # measuring leaves the rule alone
    df = E.claims_table([measured, planned])
    assert list(df["verdict"]) == ["supported", "not measured yet"]
    assert list(df["measured"]) == ["3 [1, 5]", "-"]
    assert df.loc[1, "measurement"] == planned.measure and df.loc[1, "rule"] == E.claims.NO_RULE
    with pytest.raises(ValueError, match="what will measure it"):
        E.Claim("x", "y")  # an unmeasured claim must say what will measure it


def test_a_claim_whose_precondition_failed_is_inconclusive_whatever_its_interval(tmp_path):
    from wurst_core.runs import Run
    from wurst_core.studies.claims import claim_from_run, claims_records

    stated = E.Claim("keeps semantics", "§3.1", measure="points", precondition="the decoder reconstructs")
    assert "judged only if the decoder reconstructs, else inconclusive" in stated.rule
    assert E.verdict(stated) == E.NOT_MEASURED
    with pytest.raises(ValueError, match="precondition"):
        dataclasses.replace(stated, measured=E.Estimate(3.0, 1.0, 5.0))  # measured, but did it hold?
    held = dataclasses.replace(stated, measured=E.Estimate(3.0, 1.0, 5.0), precondition_met=True)
    failed = dataclasses.replace(held, precondition_met=False)
    assert E.verdict(held) == E.SUPPORTED and E.verdict(failed) == E.INCONCLUSIVE
    assert E.verdict(dataclasses.replace(failed, measured=E.Estimate(-3.0, -5.0, -1.0))) == E.INCONCLUSIVE
    # the flag travels through a run's metrics; a run recorded before the precondition existed is not judged
    run = Run("10_compression", "smoke", "r1", tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"claims": claims_records([failed])}))
    read = claim_from_run(stated, "10_compression", run)
    assert read.precondition_met is False and E.verdict(read) == E.INCONCLUSIVE
    (tmp_path / "metrics.json").write_text(json.dumps({"claims": [
        {"claim": stated.name, "measured": {"value": 3.0, "ci": [1.0, 5.0]}}]}))
    old = claim_from_run(stated, "10_compression", run)
    assert old.measured is None and "predates" in old.measure


def test_the_notebook_states_the_measured_rule_before_its_results():
    cells = json.loads((paths.NOTEBOOKS / "07_evaluation.ipynb").read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells]
    stated = next(i for i, t in enumerate(sources) if EQUAL_COMPUTE.rule in t)  # the rule verbatim, in markdown
    assert cells[stated]["cell_type"] == "markdown"
    printed = next(i for i, t in enumerate(sources) if "stated_claims()" in t and ".rule" in t)
    results = next(i for i, t in enumerate(sources) if "run_evaluation(" in t and cells[i]["cell_type"] == "code")
    assert stated < printed < results
    assert stated_claims()[0] is EQUAL_COMPUTE and all(E.verdict(c) == E.NOT_MEASURED for c in LATER)


# ----------------------------------------------------------------------------------------------- oracle judge
def obj(shape: str, color: str, hpos: str, vpos: str, size: str = "small") -> dict:
    return {"shape": shape, "color": color, "size": size, "hpos": hpos, "vpos": vpos}


TRUTH = {"background": "white", "count": 2,
         "objects": [obj("circle", "red", "left", "top"), obj("square", "green", "right", "bottom")]}


def test_oracle_prefers_the_image_with_more_correct_attributes():
    spec = ProbeSpec.procedural()
    exact = TRUTH
    wrong_color = {**TRUTH, "objects": [obj("circle", "blue", "left", "top"), TRUTH["objects"][1]]}
    checks_exact, checks_wrong = E.scene_checks(exact, TRUTH, spec), E.scene_checks(wrong_color, TRUTH, spec)
    assert E.attribute_scores([checks_exact]).item() == 7  # count, position, background, 3 fields, all_correct
    assert E.attribute_scores([checks_wrong]).item() == 5  # colour and all_correct fail
    out = E.oracle_scene_outcomes([exact, wrong_color, exact], [wrong_color, exact, exact], [TRUTH] * 3, spec)
    assert out.tolist() == [1.0, 0.0, 0.5]  # ties split
    as_columns = {k: torch.tensor([checks_exact[k], checks_wrong[k]]) for k in checks_exact}  # CompositionalResult form
    assert E.oracle_outcomes(as_columns, [checks_wrong, checks_exact]).tolist() == [1.0, 0.0]


def test_oracle_default_ignores_partial_cell_credit():
    spec = ProbeSpec.procedural()
    one_moved = {**TRUTH, "objects": [TRUTH["objects"][0], obj("square", "green", "center", "middle")]}
    both_moved = {**TRUTH, "objects": [obj("circle", "red", "center", "top"),
                                       obj("square", "green", "center", "middle")]}
    a, b = E.scene_checks(one_moved, TRUTH, spec), E.scene_checks(both_moved, TRUTH, spec)
    assert a["cell_iou"] > b["cell_iou"]
    assert E.oracle_outcomes([a], [b]).item() == 0.5  # the same binary checks pass
    assert E.oracle_outcomes([a], [b], keys=["position", "cell_iou"]).item() == 1.0
    with pytest.raises(ValueError, match="missing"):
        E.oracle_outcomes([a], [b], keys=["nonexistent"])
    with pytest.raises(ValueError, match="same prompts"):
        E.oracle_outcomes([a, a], [b])


def test_judge_agreement_counts_ties_half():
    oracle = torch.tensor([1.0, 0.5, 0.0, 1.0])
    pick = E.pairwise_outcomes(torch.tensor([2.0, 1.0, 3.0, 1.0]), torch.tensor([1.0, 3.0, 1.0, 1.0]))
    assert pick.tolist() == [1.0, 0.0, 1.0, 0.5]
    assert E.pairwise_agreement(oracle, pick).tolist() == [1.0, 0.5, 0.0, 0.5]
    agree = E.judge_agreement(oracle, pick)
    assert agree.value == pytest.approx(50.0) and agree.low <= 50.0 <= agree.high and agree.n == 4
    same = E.judge_agreement(oracle, oracle)
    assert (same.value, same.low, same.high) == (100.0, 100.0, 100.0)
    assert E.pairwise_agreement(torch.tensor([0.5]), torch.tensor([0.5])).item() == 1.0  # both call a tie
    with pytest.raises(ValueError, match="outcome vectors"):
        E.judge_agreement(oracle, oracle[:3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        E.judge_agreement(oracle, oracle + 1)


# ----------------------------------------------------------------------------------------------- against the baseline
def _checks(all_correct: list[float], cell_iou: list[float]) -> dict[str, torch.Tensor]:
    ok = torch.tensor(all_correct, dtype=torch.float64)
    return {"count": ok, "position": ok, "all_correct": ok, "cell_iou": torch.tensor(cell_iou, dtype=torch.float64)}


def test_comparison_with_the_baseline_pairs_each_seed_and_pools():
    p = 40
    model = _checks([1.0] * 30 + [0.0] * 10, [1.0] * 40)
    seeds = {"b0": _checks([1.0] * 10 + [0.0] * 30, [0.5] * 40), "b1": _checks([1.0] * 20 + [0.0] * 20, [0.5] * 40)}
    scores = {"W": torch.ones(p), "b0": torch.zeros(p), "b1": torch.zeros(p)}
    cmp = compare_with_baseline({"W": model, **seeds}, scores, "W", ["b0", "b1"], n_boot=50)
    b0 = cmp.per_seed["b0"]
    assert b0["all_correct_diff"].value == pytest.approx(50.0)  # 75 % against 25 %, in points
    assert b0["cell_iou_diff"].value == pytest.approx(50.0) and b0["cell_iou_diff"].low == pytest.approx(50.0)
    assert b0["judge_win"].value == 100.0  # the judge always prefers W here
    assert b0["oracle_win"].value == pytest.approx(100 * (20 + 0.5 * 20) / 40)  # W passes more on 20, ties on 20
    assert b0["judges_agree"].value == pytest.approx(100 * (20 + 0.5 * 20) / 40)
    assert b0["all_correct_diff"].n == p and inspect.signature(compare_with_baseline).parameters["n_boot"].default >= 1000
    pooled = cmp.pooled
    assert pooled["all_correct_diff"].value == pytest.approx(37.5) and pooled["all_correct_diff"].n == 2 * p
    assert cmp.headline() is pooled["all_correct_diff"]
    assert list(cmp.table().index) == ["b0", "b1", "pooled over 2 seeds"]
    assert cmp.numbers()["pooled"]["all_correct_diff"] == pytest.approx(37.5)
    claims = measured_claims(cmp, "08_baseline/x")
    assert claims[0].measured is cmp.headline() and E.verdict(claims[0]) == E.SUPPORTED
    assert claims[0].rule == EQUAL_COMPUTE.rule and "08_baseline/x" in claims[0].measure
    assert claims[1].measured is cmp.headline("judge_win") and E.verdict(claims[1]) == E.SUPPORTED  # judge: 100 %
    assert E.verdict(claims[2]) == E.NOT_MEASURED and "not measured" in claims[2].measure  # no KID passed
    cheaper = next(c for c in claims if c.name == "Training is several times cheaper")
    assert E.verdict(cheaper) == E.NOT_MEASURED and cheaper.measure.endswith("not measured: 08_baseline/x")
    assert claims[3].name == EQUAL_COMPUTE_BC.name and E.verdict(claims[3]) == E.NOT_MEASURED
    assert [c for c in claims[4:] if c is not cheaper] == [c for c in LATER if c.name != cheaper.name]
    against_bc = compare_with_baseline({"W": model, **seeds}, scores, "W", ["b1"], n_boot=100)
    second = measured_claims(cmp, "08_baseline/x", comparison_bc=against_bc, detail_bc="08_baseline/bc")[3]
    assert E.verdict(second) == E.SUPPORTED and second.rule == EQUAL_COMPUTE.rule  # Stage B + C's FLOPs, same rule
    assert "08_baseline/bc" in second.measure

    single = compare_with_baseline({"W": model, **seeds}, scores, "W", ["b1"])
    assert single.pooled is None and single.headline() is single.per_seed["b1"]["all_correct_diff"]
    assert "one seed" in measured_claims(single, "x")[0].measure
    with pytest.raises(ValueError, match="at least one baseline"):
        compare_with_baseline({"W": model}, scores, "W", [])


def test_claims_without_a_baseline_run_are_not_measured():
    claims = measured_claims(None, "no 08_baseline run yet")
    assert [E.verdict(c) for c in claims] == [E.NOT_MEASURED] * len(stated_claims())
    assert "no 08_baseline run yet" in claims[0].measure and claims[0].rule == EQUAL_COMPUTE.rule


def test_paired_kid_difference_is_zero_for_the_same_images_and_positive_for_worse_ones():
    from wurst_core.evaluation.image_metrics import FeatureSet, paired_kid_difference

    g = torch.Generator().manual_seed(0)
    real = FeatureSet(torch.randn(64, 8, generator=g), torch.zeros(64, 2), "_tiny")
    close = FeatureSet(torch.randn(64, 8, generator=g), torch.zeros(64, 2), "_tiny")
    far = FeatureSet(torch.randn(64, 8, generator=g) * 3 + 2, torch.zeros(64, 2), "_tiny")
    same, pooled = paired_kid_difference(real, close, [close], n_boot=200)
    assert pooled is None and same[0].value == pytest.approx(0.0) and same[0].low <= 0 <= same[0].high
    per_seed, pooled = paired_kid_difference(real, close, [far, far], n_boot=200)
    assert all(e.low > 0 for e in per_seed) and pooled.low > 0  # the baseline is farther from the real images
    cmp = compare_with_baseline({"W": _checks([1.0] * 4, [1.0] * 4), "b": _checks([0.0] * 4, [0.0] * 4)},
                                {"W": torch.ones(4), "b": torch.zeros(4)}, "W", ["b"], n_boot=50,
                                kid=(per_seed[:1], None))
    claims = measured_claims(cmp, "x")
    assert [c.name for c in claims[:3]] == [c.name for c in MEASURED]
    assert claims[2].measured is per_seed[0] and E.verdict(claims[2]) == E.SUPPORTED
    with pytest.raises(ValueError, match="one image per prompt"):
        paired_kid_difference(real, close, [FeatureSet(torch.randn(10, 8), torch.zeros(10, 2), "_tiny")])


def test_wurstchen_seeds_pair_with_the_baseline_seeds_in_order():
    from wurst_core.evaluation.image_metrics import FeatureSet, paired_kid_difference

    good, bad = _checks([1.0] * 8, [1.0] * 8), _checks([0.0] * 8, [0.0] * 8)
    checks = {"W0": good, "W1": bad, "b0": bad, "b1": bad}
    scores = {k: torch.zeros(8) for k in checks}
    cmp = compare_with_baseline(checks, scores, ["W0", "W1"], ["b0", "b1"], n_boot=50)
    assert list(cmp.per_seed) == ["W0 / b0", "W1 / b1"]
    assert cmp.per_seed["W0 / b0"]["all_correct_diff"].value == 100 and cmp.per_seed["W1 / b1"]["all_correct_diff"].value == 0
    pooled = cmp.pooled["all_correct_diff"]
    assert pooled.value == pytest.approx(50) and pooled.low < 50 < pooled.high  # the Würstchen seed spread shows
    with pytest.raises(ValueError, match="one model per baseline seed"):
        compare_with_baseline(checks, scores, ["W0"] * 3, ["b0", "b1"])
    g = torch.Generator().manual_seed(1)
    real = FeatureSet(torch.randn(32, 4, generator=g), torch.zeros(32, 2), "_tiny")
    near = FeatureSet(torch.randn(32, 4, generator=g), torch.zeros(32, 2), "_tiny")
    far = FeatureSet(torch.randn(32, 4, generator=g) * 3 + 2, torch.zeros(32, 2), "_tiny")
    per_pair, pooled_kid = paired_kid_difference(real, [near, far], [far, far], n_boot=100)
    assert per_pair[0].low > 0 and per_pair[1].value == pytest.approx(0.0)  # the second pair: the same far images


def test_inference_speed_ratio_and_claims_read_from_other_runs(tmp_path):
    from wurst_core.runs import Run
    from wurst_core.studies.claims import INFERENCE, claim_from_run, speed_ratio

    ratio = speed_ratio([1.0, 1.1, 0.9, 1.0], [2.0, 2.2, 1.8, 2.1])
    assert ratio.value == pytest.approx(8.1 / 4.0) and ratio.low > 1  # the baseline takes twice as long
    claims = measured_claims(None, "none", ratio, "4 batches")
    inference = next(c for c in claims if c.name == INFERENCE.name)
    assert E.verdict(inference) == E.SUPPORTED and "4 batches" in inference.measure
    assert E.verdict(dataclasses.replace(inference, measured=speed_ratio([2.0] * 3, [1.0] * 3))) == E.REFUTED
    with pytest.raises(ValueError, match="positive"):
        speed_ratio([0.0], [1.0])

    rule = E.Claim("p2 loss weighting helps", paper="§3.2", direction="higher", measure="Δ all-correct")
    assert E.verdict(claim_from_run(rule, "09_objective", None)) == E.NOT_MEASURED
    run = Run("09_objective", "smoke", "r1", tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"claims": [
        {"claim": rule.name, "measured": {"value": 3.0, "ci": [1.0, 5.0]}, "measurement": "Δ all-correct, 64"}]}))
    read = claim_from_run(rule, "09_objective", run)
    assert read.measured.value == 3.0 and E.verdict(read) == E.SUPPORTED and "09_objective/r1" in read.measure
    later = measured_claims(None, "none", others=[read])
    assert next(c for c in later if c.name == rule.name) is read


def test_first_match_interpolates_in_flops_and_marks_what_never_matches():
    from wurst_core.studies.claims import first_match

    assert first_match(50.0, [40.0, 60.0, 70.0], [0.25, 0.5, 1.0]) == pytest.approx(0.375)
    assert first_match(30.0, [40.0, 60.0], [0.25, 0.5]) == 0.25  # matched already: the first point, an upper bound
    assert first_match(80.0, [40.0, 60.0, 70.0], [0.25, 0.5, 1.0]) == math.inf
    assert first_match(60.0, [40.0, 60.0, 55.0], [0.25, 0.5, 1.0]) == 0.5  # the first match, not a later dip


def test_matching_budget_gives_each_verdict_of_the_training_cost_rule():
    from wurst_core.studies.claims import CHEAPER, matching_budget

    g = torch.Generator().manual_seed(0)
    noise = 0.5 * torch.randn(2, 64, generator=g, dtype=torch.float64)  # (seeds, prompts)
    model = 50.0 + noise

    def judged(levels, fractions):
        curve = torch.stack([torch.full((2, 64), lv, dtype=torch.float64) + noise for lv in levels])
        est = matching_budget(model, curve, fractions)
        return est, E.verdict(dataclasses.replace(CHEAPER, measured=est))

    assert CHEAPER.bound == 2.0  # "several": at least twice Stage C's FLOPs
    est, v = judged([45.0, 55.0, 60.0], [0.25, 0.5, 1.0])  # the baseline matches at 0.375x: far cheaper than 2x
    assert est.value == pytest.approx(0.375) and est.high < 2 and v == E.REFUTED
    est, v = judged([30.0, 40.0, 45.0], [0.25, 0.5, 1.0])  # never matched within 1x: only "> 1" is known
    assert est.value == math.inf and v == E.INCONCLUSIVE
    est, v = judged([30.0, 40.0, 45.0, 49.0, 60.0], [0.25, 0.5, 1.0, 2.5, 4.0])  # a longer baseline matches at ~3x
    assert 2.5 < est.value < 4.0 and est.low > 2 and v == E.SUPPORTED
    with pytest.raises(ValueError, match="increasing"):
        matching_budget(model, torch.zeros(2, 2, 64), [0.5, 0.25])
    with pytest.raises(ValueError, match="fractions"):
        matching_budget(model, torch.zeros(3, 2, 64), [0.25, 0.5])
