"""Notebook 10's study (compression-ratio ablation): the compressor gives each requested latent side, the claim's
rule judges constructed measurements as stated, and the schema resolves on every profile."""
from __future__ import annotations

import pytest
import torch

from wurst_core import params
from wurst_core.evaluation.claims import (
    INCONCLUSIVE,
    NOT_MEASURED,
    REFUTED,
    SUPPORTED,
    verdict,
)
from wurst_core.evaluation.stats import Estimate, paired_difference
from wurst_core.models.semantic import SemanticCompressor, preprocess
from wurst_core.params import ParameterError
from wurst_core.studies import compression
from wurst_core.studies.claims import claims_records
from wurst_core.studies.compression import (
    CLAIM_NAME,
    CompressionParams,
    compressor_config,
    semantics_claim,
)
from wurst_core.studies.stage_b import StageBParams


@pytest.mark.parametrize("side", [8, 4, 2])
def test_the_compressor_yields_each_requested_latent_side(side):
    cfg = compressor_config("tiny", 64, side)
    assert cfg.latent_size == side
    compressor = SemanticCompressor(cfg).eval()
    with torch.no_grad():
        out = compressor(preprocess(torch.rand(2, 3, 64, 64), cfg.image_size))
    assert tuple(out.shape) == (2, cfg.c_latent, side, side)


def test_the_efficientnet_compressor_takes_32_pixels_per_latent_side():
    assert compressor_config("paper", 1024, 24).image_size == 768  # the released 768 px -> 24 x 24


@pytest.mark.parametrize("side", [3, 64, 0])
def test_a_side_the_tiny_backbone_cannot_give_is_refused(side):
    with pytest.raises(ValueError, match="power of two"):
        compressor_config("tiny", 64, side)


def _claim(low: float, high: float) -> str:
    return verdict(semantics_claim(Estimate((low + high) / 2, low, high, n=128), real_accuracy=99.0,
                                   captioned_accuracy=80.0))


def test_the_claim_rule_is_fixed_before_any_result():
    assert compression.SEMANTICS.name == CLAIM_NAME == "The strongly compressed latent keeps the image's semantics"
    assert compression.SEMANTICS.measured is None and compression.SEMANTICS.direction == "higher"
    assert compression.SEMANTICS.bound == -compression.TOLERANCE == -10.0
    assert "> -10" in compression.SEMANTICS.rule


def test_the_claims_verdict_on_constructed_measurements():
    assert _claim(-6.0, 2.0) == SUPPORTED        # loses less than 10 points for sure
    assert _claim(-30.0, -12.0) == REFUTED       # loses more than 10 points for sure
    assert _claim(-14.0, -2.0) == INCONCLUSIVE   # the interval straddles the bound
    assert _claim(-20.0, -10.0) == REFUTED       # touching the bound is not "less than 10"


def test_a_paired_measurement_from_per_image_checks_and_its_record():
    real = torch.ones(200)  # the probe reads every real image right
    recon = torch.ones(200)
    recon[:10] = 0          # the reconstructions lose 5 % of the scenes
    lost = paired_difference(100 * recon, 100 * real, n_boot=1000)
    assert lost.value == pytest.approx(-5.0) and -10 < lost.low <= lost.high <= 0
    claim = semantics_claim(lost, 100.0, 95.0, "4x4 (16:1), 200 held-out images")
    record = claims_records([claim])[0]
    assert record["claim"] == CLAIM_NAME and record["verdict"] == SUPPORTED
    assert record["measured"]["value"] == pytest.approx(-5.0) and "200 held-out images" in record["measurement"]


def test_no_verdict_where_the_probe_cannot_read_the_real_images():
    # both arms at 0 %: a difference of 0 that says nothing about the map
    claim = semantics_claim(Estimate(0.0, 0.0, 0.0, n=16), real_accuracy=0.0, captioned_accuracy=0.0)
    assert claim.measured is None and verdict(claim) == NOT_MEASURED and "not measured" in claim.measure
    assert verdict(semantics_claim(Estimate(0.0, -1.0, 1.0), real_accuracy=compression.MIN_REAL,
                                   captioned_accuracy=compression.MIN_CAPTIONED)) == SUPPORTED


def test_no_verdict_where_the_decoder_cannot_reconstruct_even_with_the_caption():
    # the first tiny run: every reconstruction at 0 %, so "refuted" by the interval, yet an untrained decoder
    lost = Estimate(-98.0, -100.0, -95.0, n=96)
    claim = semantics_claim(lost, real_accuracy=98.0, captioned_accuracy=0.0)
    assert claim.precondition_met is False and verdict(claim) == INCONCLUSIVE
    assert "judged only if" in claim.rule and "with the caption 0 %" in claim.measure
    record = claims_records([claim])[0]
    assert record["precondition_met"] is False and record["verdict"] == INCONCLUSIVE
    assert verdict(semantics_claim(lost, real_accuracy=98.0, captioned_accuracy=60.0)) == REFUTED


def test_smoke_defaults_resolve(monkeypatch):
    monkeypatch.delenv("WURST_PROFILE", raising=False)
    cfg = params.build(CompressionParams, {"profile": "smoke"})
    assert cfg.sides() == [8, 4, 2] and cfg.default_size == 4
    assert cfg.steps == cfg.stage_b_steps  # every ratio and stage: the same few steps on smoke
    tiny = params.build(CompressionParams, {"profile": "tiny"})
    stage_b = params.build(StageBParams, {"profile": "tiny"})
    # Stage B as trained as 04's (at 400 steps no ratio reconstructed anything), Stage C the budget's 300 steps
    assert (tiny.stage_b_steps, tiny.steps, tiny.workers) == (stage_b.steps, 300, 2)


@pytest.mark.parametrize("values,message", [
    ({"latent_sizes": "8,8"}, "at least two distinct"),
    ({"latent_sizes": "8,x"}, "comma-separated"),
    ({"latent_sizes": "8,2", "default_size": 4}, "must be one of latent_sizes"),
    ({"latent_sizes": "8,6,4"}, "power of two"),
])
def test_bad_latent_sizes_fail_before_a_run(values, message, monkeypatch):
    monkeypatch.delenv("WURST_PROFILE", raising=False)
    with pytest.raises(ParameterError, match=message):
        params.build(CompressionParams, {"profile": "smoke", **values})
