"""Evaluation on known cases: FID/KID/IS, the PickScore procedure, the compositional probe, tables, carbon, loaders."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn

from wurst_core import evaluation as E
from wurst_core import params
from wurst_core.data.procedural import ProceduralDataset
from wurst_core.evaluation import probe as P


def render(split: str, n: int, resolution: int = 48, seed: int = 0):
    ds = ProceduralDataset(size=n, resolution=resolution, seed=seed, split=split)
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), [it["attributes"] for it in items], [it["caption"] for it in items]


# ----------------------------------------------------------------------------------------------- carbon, tables
def test_carbon_reproduces_the_paper():
    assert E.carbon_kg(24_602, watts=250, kg_per_kwh=0.37) == 2275.68  # the calculator's rounding (toFixed(2))
    assert round(E.carbon_kg(24_602, 250, 0.37)) == 2276  # Table 2: Würstchen 2,276 kg
    assert E.carbon_kg(200_000, 250, 0.30) == 15_000  # SD 2.1 model card
    assert E.carbon_kg(150_000, 250, 0.30) == 11_250  # SD 1.4 model card
    with pytest.raises(ValueError, match="gpu_hours"):
        E.carbon_kg(-1)


def test_table2_estimates_missing_carbon_and_keeps_given():
    rows = [E.Table2Row("ours", params=1e6, sampling_steps=60, fid=E.Estimate(3.0, 2.0, 4.0), inception_score=2.5,
                        gpu_hours=24_602),
            E.Table2Row("given", gpu_hours=1.0, carbon_kg=7.0), E.Table2Row("unknown")]
    df = E.table2(rows, "FID_tiny", "IS_tiny")
    assert df.loc["ours", "Est. carbon [kg CO2eq]"] == 2275.68
    assert df.loc["given", "Est. carbon [kg CO2eq]"] == 7.0
    assert math.isnan(df.loc["unknown", "Est. carbon [kg CO2eq]"])
    assert df.loc["ours", "FID_tiny"] == 3.0 and df.loc["ours", "FID_tiny 95% CI"] == "[2, 4]"
    paper = E.table2(E.PAPER_TABLE2)
    assert paper.loc["Würstchen (paper)", "GPU hours (paper)"] == 24_602
    assert paper.loc["Würstchen (paper)", "Est. carbon [kg CO2eq]"] == 2_276  # as printed
    assert paper["CPU core-hours (here)"].isna().all()


def test_table2_keeps_cpu_core_hours_out_of_the_gpu_column():
    # 0.5 core-hours at 10 W per core = 0.005 kWh; at 0.37 kg/kWh 1.85 g, unrounded (the calculator would say 0)
    rows = [E.Table2Row("ours", cpu_core_hours=0.5), E.Table2Row("paper", gpu_hours=24_602)]
    df = E.table2(rows, watts_per_core=10.0)
    assert df.loc["ours", "CPU core-hours (here)"] == 0.5 and math.isnan(df.loc["ours", "GPU hours (paper)"])
    assert df.loc["ours", "Est. carbon [kg CO2eq]"] == pytest.approx(0.00185)
    assert df.loc["paper", "Est. carbon [kg CO2eq]"] == 2275.68 and math.isnan(df.loc["paper", "CPU core-hours (here)"])
    with pytest.raises(ValueError, match="not both"):
        E.table2([E.Table2Row("mixed", gpu_hours=1.0, cpu_core_hours=1.0)])


def test_training_cost_counts_cpu_core_hours_of_every_phase(tmp_path):
    from wurst_core import paths
    from wurst_core.studies import evaluation as study
    # (notebook, train seconds, workers in config.json; 01 records none: one process)
    for nb, seconds, workers in (("01_text_encoder", 360.0, None), ("03_stage_a", 900.0, 2),
                                 ("04_stage_b", 1800.0, 2), ("05_stage_c", 3600.0, 2)):
        run = paths.runs_dir() / nb / "tiny" / "20260101-000000"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"train_seconds": seconds, "steps": 10}))
        (run / "config.json").write_text(json.dumps({"batch_size": 4, **({"workers": workers} if workers else {})}))
    p = study.EvaluationParams(profile="tiny", watts_per_core=10.0, kg_per_kwh=0.5)
    phases = study._training_costs(p)
    assert phases["05_stage_c"]["core_hours"] == 2.0 and phases["01_text_encoder"]["core_hours"] == 0.1
    table, numbers = study._cost_table(phases, p)
    assert numbers["core_hours"]["total"] == pytest.approx(0.1 + 0.5 + 1.0 + 2.0)
    assert numbers["energy_kwh"] == pytest.approx(3.6 * 10 / 1000) and numbers["carbon_kg"] == pytest.approx(0.018)
    assert table.loc["total", "CPU core-hours"] == pytest.approx(3.6)
    assert list(table.index) == ["text encoder (tiny CLIP)", "Stage A", "Stage B + compressor", "Stage C", "total"]
    # weights trained elsewhere cost nothing we can count; a missing phase leaves the total unknown
    assert all(c is None for c in study._training_costs(dataclasses.replace(p, weights_dir="x")).values())
    assert study._cost_table({**phases, "03_stage_a": None}, p)[1]["core_hours"]["total"] is None


def test_table1_pairwise_preference():
    scores = {"A": torch.tensor([5.0, 5.0, 5.0, 5.0]), "B": torch.tensor([1.0, 1.0, 9.0, 5.0]),
              "C": torch.zeros(4)}
    one_row = E.table1(scores, reference="A", n_boot=50)
    assert list(one_row.index) == ["A"] and list(one_row.columns) == ["B", "C"]
    assert one_row.loc["A", "B"].startswith("62.5 [")  # 2 wins, 1 loss, 1 tie (half) of 4
    assert one_row.loc["A", "C"].startswith("100.0 [100.0, 100.0]")
    full = E.table1(scores, n_boot=50)
    assert full.shape == (3, 3) and full.loc["C", "A"].startswith("0.0")
    with pytest.raises(ValueError, match="reference"):
        E.table1(scores, reference="Z")


# ----------------------------------------------------------------------------------------------------- stats
def test_bootstrap_is_seeded_and_leaves_the_global_rng_alone():
    values = torch.tensor([0.0, 1.0] * 20)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = E.mean_ci(values, seed=7)
    after = torch.rand(1)
    assert torch.equal(before, after), "bootstrap must not consume the global RNG"
    assert a == E.mean_ci(values, seed=7) and a != E.mean_ci(values, seed=8)
    assert a.value == 0.5 and a.low < 0.5 < a.high and a.n == 40
    assert E.mean_ci(torch.ones(10)).as_dict()["low"] == 1.0


# ------------------------------------------------------------------------------------------- FID / KID / IS
def test_fid_kid_of_a_set_against_itself_is_zero_and_grow_with_a_shift():
    torch.manual_seed(0)
    probe = E.AttributeProbe(E.ProbeSpec.procedural(), E.PROBE_SIZES["tiny"]).eval()  # random-weight features
    x = E.ProbeExtractor(probe)
    images, _, _ = render("val", 96)
    real = E.extract(x, images)
    assert real.features.shape == (96, probe.num_features) and real.label == "_tiny"
    fids, kids = [], []
    for shift in (0.0, 0.05, 0.15, 0.3):
        fake = E.extract(x, (images + shift).clamp(0, 1))
        fids.append(E.fid(real, fake, n_boot=5).value)
        kids.append(E.kid(real, fake, subsets=5, subset_size=50, n_boot=5).value)
    assert abs(fids[0]) < 1e-3 and abs(kids[0]) < 1e-3
    assert fids[0] < fids[1] < fids[2] < fids[3] and kids[1] < kids[2] < kids[3]

    # the precomputed-features path equals torchmetrics driven by the network itself
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Features(nn.Module):
        num_features = probe.num_features

        def forward(self, imgs):
            return probe.features(imgs)

    fake = (images + 0.15).clamp(0, 1)
    direct = FrechetInceptionDistance(feature=Features())
    direct.update(images, real=True)
    direct.update(fake, real=False)
    assert float(direct.compute()) == pytest.approx(fids[2], rel=1e-4)


def test_inception_score_known_cases():
    c = 6
    uniform = E.FeatureSet(torch.zeros(60, 2), torch.zeros(60, c), "_t")  # no information: IS = 1
    assert E.inception_score(uniform, splits=3, n_boot=5).value == pytest.approx(1.0, abs=1e-5)
    confident = E.FeatureSet(torch.zeros(60, 2), 50 * torch.eye(c).repeat(10, 1), "_t")  # sure and diverse: IS = C
    est = E.inception_score(confident, splits=1, n_boot=20)  # one split: the marginal is exactly uniform
    assert est.value == pytest.approx(c, rel=1e-3) and est.low <= c * 1.001
    assert 1 < E.inception_score(confident, splits=3, n_boot=5).value < c  # splits see uneven class counts
    collapsed = E.FeatureSet(torch.zeros(60, 2), 50 * torch.eye(c)[[0] * 60], "_t")  # sure, one class: IS = 1
    assert E.inception_score(collapsed, splits=3, n_boot=5).value == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="different extractors"):
        E.fid(uniform, E.FeatureSet(torch.zeros(60, 3), torch.zeros(60, c), "_t"))


def _fidelity_random_state_dict():
    """A random state dict of torch-fidelity's InceptionV3 (the format of its released weights file)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    captured = {}
    original = (fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict)
    fe.load_state_dict_from_url = lambda *a, **k: {}
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, strict=True: captured.update(self.state_dict())
    try:
        torch.manual_seed(0)
        fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict = original
    g = torch.Generator().manual_seed(0)
    for k, v in captured.items():  # He-scaled conv weights, so that the features are not degenerate (~1e-7)
        if k.endswith(".weight") and v.dim() == 4:
            captured[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel())
        elif k.endswith("running_var"):
            captured[k] = torch.ones_like(v)
    return captured


@pytest.mark.slow
def test_standard_inception_path_from_a_weights_file(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(_fidelity_random_state_dict(), path)
    x = E.InceptionExtractor(path)
    images, _, _ = render("val", 6, resolution=64)
    fake = (images + 0.3).clamp(0, 1)
    real_set, fake_set = E.extract(x, images), E.extract(x, fake)
    assert real_set.features.shape == (6, 2048) and real_set.logits.shape == (6, 1008) and real_set.label == ""
    assert real_set.features.std(0).mean() > 1e-4, "features must not be degenerate"
    ours = E.fid(real_set, fake_set, n_boot=2).value
    assert E.fid(real_set, real_set, n_boot=2).value == pytest.approx(0.0, abs=1e-3 * ours) and ours > 0
    # the same number as torchmetrics' own Inception FID on the images resized to 256 px (paper §4)
    ref = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(path))
    ref.update(torch.nn.functional.interpolate(images, size=256, mode="bicubic", antialias=True).clamp(0, 1), real=True)
    ref.update(torch.nn.functional.interpolate(fake, size=256, mode="bicubic", antialias=True).clamp(0, 1), real=False)
    assert float(ref.compute()) == pytest.approx(ours, rel=1e-3)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        E.InceptionExtractor(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------- PickScore and CLIP score
def _constant_images(colors: list[list[float]], size: int = 8) -> torch.Tensor:
    return torch.tensor(colors).view(-1, 3, 1, 1).expand(-1, 3, size, size).clone()


def _lookup_judge(text_table: dict[str, list[float]], logit_scale: float = 100.0) -> E.ClipJudge:
    """Images embed as their (constant) colour; prompts as a table entry: every score is known in closed form."""
    return E.ClipJudge(encode_image=lambda x: x.mean((2, 3)), encode_text=lambda t: torch.tensor([text_table[s] for s in t]),
                       logit_scale=logit_scale, image_size=8, mean=(0, 0, 0), std=(1, 1, 1), name="lookup")


def test_pickscore_procedure_on_constructed_embeddings():
    judge = _lookup_judge({"p0": [1, 0, 0], "p1": [0, 1, 0], "p2": [0, 0, 1], "p3": [1, 1, 0]})
    prompts = ["p0", "p1", "p2", "p3"]
    a = _constant_images([[0.9, 0, 0], [0, 0.2, 0], [0, 0, 1], [0.5, 0.5, 0]])  # aligned (norm is irrelevant)
    b = _constant_images([[0, 1, 0], [0, 0.5, 0.5], [0, 0, 0.3], [1, 0, 0]])  # cos 0, 1/sqrt2, 1, 1/sqrt2
    scores = E.pick_scores(judge, prompts, {"A": a, "B": b})
    expected_b = 100 * torch.tensor([0.0, 1 / math.sqrt(2), 1.0, 1 / math.sqrt(2)])
    assert torch.allclose(scores["A"], torch.full((4,), 100.0, dtype=scores["A"].dtype), atol=1e-4)
    assert torch.allclose(scores["B"], expected_b.to(scores["B"].dtype), atol=1e-4)
    probs = E.preference_probs(torch.stack([scores["A"], scores["B"]], -1))
    assert torch.allclose(probs.sum(-1), torch.ones(4, dtype=probs.dtype))
    assert probs[0, 0] > 0.999 and probs[2, 0] == pytest.approx(0.5, abs=1e-4)
    outcomes = E.pairwise_outcomes(scores["A"], scores["B"], tie_tol=1e-3)  # prompt 2: equal scores -> tie
    assert outcomes.tolist() == [1.0, 1.0, 0.5, 1.0]
    assert E.win_rate(scores["A"], scores["B"], tie_tol=1e-3, n_boot=50).value == 87.5
    assert E.win_rate(scores["B"], scores["A"], tie_tol=1e-3, n_boot=50).value == 12.5
    # CLIP score = max(100 * mean cos, 0), the clamp on the mean (torchmetrics)
    assert E.clip_score(judge, prompts, b, n_boot=20).value == pytest.approx(100 * expected_b.mean().item() / 100, abs=1e-3)
    assert E.clip_score(judge, ["p0"] * 2, _constant_images([[0, 1, 0], [-1, 0.2, 0]]), n_boot=5).value == 0.0
    with pytest.raises(ValueError, match="one image per prompt"):
        judge.scores(prompts, a[:3])


def test_open_clip_and_transformers_judges_and_local_pickscore(tmp_path):
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    oc = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
                        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()
    images, _, captions = render("val", 3, resolution=40)
    judge = E.ClipJudge.from_open_clip(oc)
    with torch.no_grad():
        x = E.clip_preprocess(images, 32)
        want = torch.nn.functional.cosine_similarity(oc.encode_image(x), oc.encode_text(open_clip.tokenize(captions)))
    assert judge.image_size == 32 and torch.allclose(judge.cosine(captions, images), want, atol=1e-5)
    assert torch.allclose(judge.scores(captions, images), oc.logit_scale.exp().item() * want, atol=1e-4)

    cfg = CLIPConfig(projection_dim=16, text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=1, num_attention_heads=2),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8))
    hf = CLIPModel(cfg).eval()
    hf.save_pretrained(tmp_path / "PickScore_v1")
    ps = E.load_pickscore(tmp_path / "PickScore_v1")
    ids = open_clip.tokenize(captions)
    mask = (torch.arange(77) <= ids.argmax(-1, keepdim=True)).long()
    with torch.no_grad():  # transformers 5 returns BaseModelOutputWithPooling: the embedding is pooler_output
        img = hf.get_image_features(pixel_values=E.clip_preprocess(images, 32)).pooler_output
        txt = hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    want = torch.nn.functional.cosine_similarity(img, txt)
    assert ps.name == "PickScore_v1" and torch.allclose(ps.cosine(captions, images), want, atol=1e-5)
    assert ps.logit_scale == pytest.approx(hf.logit_scale.exp().item())
    with pytest.raises(FileNotFoundError, match="PickScore"):
        E.load_pickscore(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------------ probe
def test_scene_checks_define_all_correct_exactly():
    spec = E.ProbeSpec.procedural()
    red_circle = {"shape": "circle", "color": "red", "size": "small", "hpos": "left", "vpos": "top"}
    blue_square = {"shape": "square", "color": "blue", "size": "large", "hpos": "right", "vpos": "bottom"}
    truth = {"background": "white", "count": 2, "objects": [red_circle, blue_square]}
    assert all(E.scene_checks(truth, truth, spec).values())
    swapped = {"background": "white", "objects": [{**red_circle, "color": "blue"}, {**blue_square, "color": "red"}]}
    c = E.scene_checks(swapped, truth, spec)  # a binding error: right colours, wrong objects
    assert c["color"] and c["shape"] and c["position"] and c["count"] and not c["all_correct"]
    moved = {"background": "white", "objects": [{**red_circle, "hpos": "center"}, blue_square]}
    c = E.scene_checks(moved, truth, spec)
    assert not c["position"] and c["shape"] and not c["all_correct"] and c["cell_iou"] == pytest.approx(1 / 3)
    c = E.scene_checks({"background": "black", "objects": [red_circle]}, truth, spec)
    assert not c["count"] and not c["background"] and not c["all_correct"] and c["cell_iou"] == 0.5
    extra = {"background": "white", "objects": [red_circle, blue_square, {**red_circle, "hpos": "center"}]}
    c = E.scene_checks(extra, truth, spec)  # partial credit: both prompt cells are filled, and one more
    assert not c["position"] and c["cell_iou"] == pytest.approx(2 / 3)
    everywhere = {"background": "white", "objects": [{**red_circle, "hpos": h, "vpos": v}
                                                     for h in ("left", "center", "right")
                                                     for v in ("top", "middle", "bottom")]}
    assert E.scene_checks(everywhere, truth, spec)["cell_iou"] == pytest.approx(2 / 9)  # no credit for filling
    assert E.scene_checks({"background": "white", "objects": []}, truth, spec)["cell_iou"] == 0.0
    with pytest.raises(ValueError, match="unknown color"):
        P.encode_targets(spec, [{"background": "white", "objects": [{**red_circle, "color": "teal"}]}])


def test_probe_reads_held_out_real_images():
    spec = E.ProbeSpec.procedural()
    cfg = E.PROBE_SIZES["tiny"]
    train_x, train_a, _ = render("train", 3000, cfg.resolution)
    probe = E.train_probe(train_x, train_a, spec, cfg, E.ProbeTraining(steps=800))
    test_x, test_a, captions = render("test", 300, resolution=64)  # other size: the probe resizes
    ceiling = E.compositional_accuracy(probe, test_x, test_a, n_boot=100)
    assert ceiling.accuracy["all_correct"].value >= 95.0, ceiling.accuracy
    for attr in ("count", "position", "background", "shape", "color", "size"):
        assert ceiling.accuracy[attr].value >= ceiling.accuracy["all_correct"].value
    # truths from the captions alone (what a prompt states) give the same scores
    from wurst_core.data.procedural import parse_caption

    assert E.compositional_accuracy(probe, test_x, [parse_caption(c) for c in captions]).as_dict() == ceiling.as_dict()
    floor = E.compositional_accuracy(probe, test_x, E.chance_truths(test_a), n_boot=20)
    noise = E.compositional_accuracy(probe, torch.rand(50, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
                                     test_a[:50], n_boot=20)
    assert floor.accuracy["all_correct"].value < 5 and noise.accuracy["all_correct"].value < 5
    out = probe(test_x[:8])  # IS logits: a log-distribution over (shape x colour of the first object) + "none"
    assert out["is"].shape == (8, 3 * 6 + 1)
    assert torch.allclose(out["is"].logsumexp(-1), torch.zeros(8), atol=1e-4)
    first = [min(scene["objects"], key=P.cell_index) for scene in probe.predict(test_x[:8])]
    assert out["is"].argmax(-1).tolist() == [spec.fields["shape"].index(o["shape"]) * 6
                                             + spec.fields["color"].index(o["color"]) for o in first]


# ------------------------------------------------------------------------------------------ generators, prompts
def test_generators_and_generate():
    imgs = torch.rand(4, 3, 16, 16)
    prompts = ["a", "b", "c", "d"]
    assert torch.equal(E.generate(E.lookup_generator(prompts, imgs), ["c", "a"]), imgs[[2, 0]])
    assert torch.equal(E.generate(E.lookup_generator(prompts, imgs), prompts, batch_size=3), imgs)
    shuffled = E.generate(E.shuffled_generator(prompts, imgs, seed=3), prompts, batch_size=3)
    assert all(not torch.equal(shuffled[i], imgs[i]) for i in range(4))
    assert sorted(shuffled.sum((1, 2, 3)).tolist()) == sorted(imgs.sum((1, 2, 3)).tolist())
    noise = E.generate(E.noise_generator(8, seed=1), prompts, size=12)
    assert noise.shape == (4, 3, 12, 12) and 0 <= noise.min() and noise.max() <= 1
    with pytest.raises(ValueError, match="must return"):
        E.generate(lambda p: torch.rand(len(p), 1, 8, 8), prompts)


def test_per_prompt_seeds_follow_the_position_not_the_batch():
    def draw(prompts, generators):  # a sampler: one noise image per prompt, each from its own generator
        return torch.stack([torch.rand(3, 4, 4, generator=g) for g in generators])

    prompts = ["a", "b", "a", "c", "d"]
    a = E.generate(E.per_prompt_generator(draw, seed=5), prompts, batch_size=2)
    assert torch.equal(a, E.generate(E.per_prompt_generator(draw, seed=5), prompts, batch_size=16))
    assert not torch.equal(a[0], a[2])  # equal prompts, other positions: other seeds
    assert not torch.equal(a, E.generate(E.per_prompt_generator(draw, seed=6), prompts))
    first = E.prompt_generators(5, [3])[0]  # the seed of a position is the same in any system
    assert torch.equal(a[3], torch.rand(3, 4, 4, generator=first))
    with pytest.raises(ValueError, match="position"):
        E.per_prompt_generator(draw)(["a"])  # called outside generate(): no positions

    class Pipe:  # the pipeline's call signature; records the generators it is given
        def __call__(self, batch, generator=None, **kw):
            self.generator = generator
            return torch.rand(len(batch), 3, 4, 4)

    pipe = Pipe()
    E.generate(E.pipeline_generator(pipe, 4, per_prompt=True), prompts, batch_size=2)
    assert isinstance(pipe.generator, list) and len(pipe.generator) == 1  # the last batch: one prompt
    E.generate(E.pipeline_generator(pipe, 4), prompts, batch_size=2)
    assert isinstance(pipe.generator, torch.Generator)  # without per_prompt: one stream, as before


def test_evaluation_skips_the_baseline_cleanly_without_an_08_run():
    from wurst_core import paths
    from wurst_core.studies import evaluation as study
    from wurst_core.studies.claims import EQUAL_COMPUTE, measured_claims

    p = study.EvaluationParams(profile="smoke")
    assert study.baseline_run_for(p, trained=True) == (None, "no 08_baseline run yet")  # no run folder at all
    result = study.EvaluationResult([], {}, {}, {}, {}, claims=measured_claims(None, study.NO_BASELINE))
    metrics = result.metrics()
    assert metrics["baseline"] == "no 08_baseline run yet"
    assert metrics["claims"][0]["claim"] == EQUAL_COMPUTE.name and metrics["claims"][0]["measured"] is None
    assert {c["verdict"] for c in metrics["claims"]} == {"not measured yet"}
    # an 08 run is used only when it was budgeted on the Stage C run evaluated, and only for weights trained here
    for nb, run_id, metrics_ in (("05_stage_c", "20260101-000000", {}),
                                 ("08_baseline", "20260101-000001", {"upstream": {"stage_c": "05_stage_c/old"}})):
        folder = paths.runs_dir() / nb / "smoke" / run_id
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(metrics_))
    run, why = study.baseline_run_for(p, trained=True)
    assert run is None and "budgeted on 05_stage_c/old" in why and "05_stage_c/20260101-000000" in why
    assert study.baseline_run_for(p, trained=False)[0] is None
    assert "weights_dir" in study.baseline_run_for(dataclasses.replace(p, weights_dir="x"), trained=True)[1]
    (paths.runs_dir() / "08_baseline/smoke/20260101-000001/metrics.json").write_text(
        json.dumps({"upstream": {"stage_c": "05_stage_c/20260101-000000"}}))
    run, name = study.baseline_run_for(p, trained=True)
    assert run.run_id == "20260101-000001" and name == "08_baseline/20260101-000001"
    # a later run at Stage B + C's budget is the second row's, never the first's
    folder = paths.runs_dir() / "08_baseline/smoke/20260101-000002"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"upstream": {"stage_c": "05_stage_c/20260101-000000"},
                                                     "budget": "stage_bc"}))
    assert study.baseline_run_for(p, trained=True)[0].run_id == "20260101-000001"
    assert study.baseline_run_for(p, trained=True, budget="stage_bc")[0].run_id == "20260101-000002"
    (folder / "metrics.json").unlink()
    assert study.baseline_run_for(p, trained=True, budget="stage_bc") == (None, "no 08_baseline run at budget stage_bc")


def test_duplicate_prompts_keep_their_own_images():
    imgs = torch.stack([torch.full((3, 4, 4), v) for v in (0.1, 0.2, 0.3, 0.4, 0.5)])
    prompts = ["a", "b", "a", "c", "a"]  # three equal prompts, each with its own render
    lookup = E.lookup_generator(prompts, imgs)
    for batch_size in (1, 2, 16):  # positions survive the batching
        assert torch.equal(E.generate(lookup, prompts, batch_size=batch_size), imgs)
    assert torch.equal(lookup(["c", "b"]), imgs[[3, 1]])  # a prompt stored once is still found by its text
    with pytest.raises(KeyError, match="positions \\[0, 2, 4\\]"):
        lookup(["a"])  # text alone cannot tell the three apart
    with pytest.raises(KeyError, match="no stored image"):
        lookup(["z"])
    # the shuffled rows stay a permutation of the stored images, one per position
    shuffled = E.generate(E.shuffled_generator(prompts, imgs, seed=3), prompts, batch_size=2)
    assert sorted(shuffled[:, 0, 0, 0].tolist()) == sorted(imgs[:, 0, 0, 0].tolist())
    assert all(not torch.equal(shuffled[i], imgs[i]) for i in range(5))


def test_prompt_loaders(tmp_path):
    coco = {"images": [], "annotations": [{"image_id": i // 2, "id": i, "caption": f"  caption {i}\n"} for i in range(10)]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    assert E.load_coco_captions(tmp_path / "captions_val2014.json", n=None) == [f"caption {i}" for i in range(0, 10, 2)]
    drawn = E.load_coco_captions(tmp_path / "captions_val2014.json", n=3, seed=1)
    assert len(drawn) == 3 and drawn == E.load_coco_captions(tmp_path / "captions_val2014.json", n=3, seed=1)
    assert len(E.load_coco_captions(tmp_path / "captions_val2014.json", n=None, one_per_image=False)) == 10
    lines = [json.dumps({"dataset_id": "mscoco_val2017", "image_id": str(i), "caption": f"narrative {i}"}) for i in range(4)]
    (tmp_path / "ln.jsonl").write_text("\n".join(lines) + "\n")
    assert E.load_localized_narratives(tmp_path / "ln.jsonl", n=None) == [f"narrative {i}" for i in range(4)]
    (tmp_path / "PartiPrompts.tsv").write_text("Prompt\tCategory\tChallenge\tNote\nA cat\tAnimals\tBasic\t\n"
                                               "A red car\tVehicles\tColors\t\nA dog\tAnimals\tBasic\t\n")
    assert E.load_parti_prompts(tmp_path / "PartiPrompts.tsv") == ["A cat", "A red car", "A dog"]
    assert E.load_parti_prompts(tmp_path / "PartiPrompts.tsv", category="Animals") == ["A cat", "A dog"]
    with pytest.raises(FileNotFoundError, match="never downloads"):
        E.load_parti_prompts(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="COCO"):
        E.load_coco_captions(tmp_path / "ln.jsonl")


# ----------------------------------------------------------------------------------------- caption sensitivity
def test_counterfactual_captions_change_only_their_attribute():
    from wurst_core.data import ProceduralDataset
    from wurst_core.data.procedural import parse_caption

    attrs = [ProceduralDataset(12, 64, seed=0, split="val").attributes(i) for i in range(12)]
    caps = E.counterfactual_captions(attrs, seed=0)
    assert set(caps) == {"true", "empty", "position", "shape", "size", "color"}
    assert caps["empty"] == [""] * 12
    for i, a in enumerate(attrs):
        true = parse_caption(caps["true"][i])
        moved = parse_caption(caps["position"][i])
        key = lambda o: sorted((k, v) for k, v in o.items() if k not in ("hpos", "vpos"))  # noqa: E731
        assert sorted(map(key, true["objects"])) == sorted(map(key, moved["objects"]))
        assert true != moved and parse_caption(caps["color"][i]) != true
    assert E.counterfactual_captions(attrs, seed=0) == caps  # reproducible


def test_caption_sensitivity_is_zero_for_ignored_tokens_and_positive_for_read_ones():
    x0 = torch.randn(10, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    tokens = {"true": torch.zeros(10, 3, 8), "same": torch.zeros(10, 3, 8), "other": torch.ones(10, 3, 8)}

    def reads_text(x, r, tok):  # a denoiser whose output depends on the tokens
        return 0.9 * x + tok.mean(dim=(1, 2))[:, None, None, None]

    gaps = E.caption_sensitivity(reads_text, x0, tokens, ts=(0.5, 0.9), batch_size=4)
    assert list(gaps.index) == [0.5, 0.9] and list(gaps.columns) == ["same", "other"]
    assert (gaps["same"] == 0).all() and (gaps["other"] > 0.1).all()
    blind = E.caption_sensitivity(lambda x, r, tok: 0.9 * x, x0, tokens, ts=(0.5,))
    assert (blind == 0).all().all()
    with pytest.raises(ValueError, match="true"):
        E.caption_sensitivity(reads_text, x0, {"other": tokens["other"]})


def test_layout_probe_reads_informative_features_and_not_noise():
    from wurst_core.evaluation.text_layout import N_CELLS, layout_probe, layout_targets

    scene = {"objects": [{"color": "red", "hpos": "left", "vpos": "top"}, {"color": "blue", "hpos": "center",
                                                                          "vpos": "bottom"}]}
    assert layout_targets([scene]).tolist() == [[1, 0, 0, 0, 0, 0, 0, 5, 0]]
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 7, (600, N_CELLS), generator=g) * (torch.rand(600, N_CELLS, generator=g) < 0.3)
    # informative: token k one-hot encodes (cell k, its content), in shuffled token order
    tokens = torch.zeros(600, N_CELLS, 2 * N_CELLS + 7 + 3)
    for i in range(600):
        for slot, k in enumerate(torch.randperm(N_CELLS, generator=g).tolist()):
            tokens[i, slot, k] = 1.0
            tokens[i, slot, N_CELLS + 7 + int(targets[i, k])] = 1.0
    tr, va = slice(0, 500), slice(500, 600)
    good = layout_probe(tokens[tr], targets[tr], tokens[va], targets[va], steps=400, lr=3e-3, eval_at=(400,), heads=2)
    noise = torch.randn(tokens.shape, generator=g)
    bad = layout_probe(noise[tr], targets[tr], noise[va], targets[va], steps=400, lr=3e-3, eval_at=(400,), heads=2)
    assert list(good.columns) == ["step", "occupied", "cells", "scenes"] and good["step"].tolist() == [400]
    assert good["occupied"].iloc[-1] > 0.8 and bad["occupied"].iloc[-1] < 0.4
    with pytest.raises(ValueError, match="train_tokens"):
        layout_probe(tokens[0], targets[:1], tokens[va], targets[va], steps=1)


def test_extra_stage_c_seeds_are_sampled_at_the_main_pipelines_size(monkeypatch, tmp_path):
    # a weights folder alone is sampled at the released 1024 px: 07 must pass its own size (the tiny run stalled)
    from types import SimpleNamespace

    from wurst_core.studies import evaluation as ev

    asked = []

    def fake_load(sp):
        asked.append(sp)
        return object(), {"size": sp.size or 1024}

    monkeypatch.setattr(ev, "load_sampling_pipeline", fake_load)
    monkeypatch.setattr(ev.gens, "pipeline_generator", lambda pipe, size, *a, **k: size)
    p = params.build(ev.EvaluationParams, {"profile": "smoke"})
    out = ev._stage_c_seed_generators(SimpleNamespace(stage_c_pipelines={1: tmp_path}), p, 64)
    assert [sp.size for sp in asked] == [64] and list(out.values()) == [64]


def test_training_curve_reads_each_snapshot_with_the_noise_of_its_prompts_position(monkeypatch):
    from types import SimpleNamespace

    from wurst_core.evaluation.generators import prompt_generators
    from wurst_core.studies import training_cost as tc

    drawn = []

    class FakeBaseline:  # every image's value is its weights' attribute share
        unets, steps, flops_per_step, stage_c_flops, stage_bc_flops = {0: None, 1: None}, 8, 10, 40, 60
        snapshots = {(s, t): None for s in (0, 1) for t in (2, 4)}
        run = SimpleNamespace(notebook="08_baseline", run_id="r")

        def sample(self, seed, prompts, generators, step=None):
            drawn.append((seed, step, [g.initial_seed() for g in generators]))
            return torch.full((len(prompts), 3, 8, 8), {2: 0.2, 4: 0.6}[step])

    monkeypatch.setattr(tc, "compositional_accuracy", lambda probe, imgs, truths, n_boot, seed: SimpleNamespace(
        checks={"count": imgs.mean((1, 2, 3)).double(), "all_correct": torch.zeros(len(imgs))}))
    checks = {name: {"count": torch.full((4,), share, dtype=torch.float64), "all_correct": torch.zeros(4)}
              for name, share in (("W0", 0.5), ("W1", 0.5), ("b0", 0.8), ("b1", 0.8))}
    curve = tc.training_curve(FakeBaseline(), checks, ["W0", "W1"], ["b0", "b1"], [1, 3], list("abcd"),
                              [None] * 4, None, 8, 7, 50, lambda msg: None)
    assert curve.steps == [2, 4, 8] and curve.fractions == pytest.approx([0.5, 1.0, 2.0])
    assert curve.baseline[0] == pytest.approx([20.0, 60.0, 80.0]) and curve.model["W0"] == pytest.approx(50.0)
    assert curve.matched.value == pytest.approx(0.875)  # 20 % at 0.5x, 60 % at 1x: 50 % three quarters between
    assert curve.stage_bc_over_c == 1.5 and list(curve.table().index) == [2, 4, 8]
    want = [g.initial_seed() for g in prompt_generators(7, [1, 3])]  # the subset keeps the whole list's seeds
    assert all(seeds == want for _, _, seeds in drawn) and len(drawn) == 4
    assert "0.5833" in tc.curve_detail(curve, FakeBaseline(), 2)  # over Stage B + C's FLOPs: 0.875 / 1.5
    tc.training_curve_figure(curve)
    empty = FakeBaseline()
    empty.snapshots = {}
    assert tc.training_curve(empty, checks, ["W0", "W1"], ["b0", "b1"], [1, 3], list("abcd"), [None] * 4, None, 8,
                             7, 50, lambda msg: None) is None
