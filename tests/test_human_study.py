"""The human preference study without a server: design, store, service, simulation, Bradley–Terry, analysis, CLI."""
from __future__ import annotations

import json
from collections import Counter
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from wurst_core.human import bradley_terry as bt
from wurst_core.human import simulate as sim
from wurst_core.human.analysis import AnalysisSpec, analyse, krippendorff_alpha, load, truth_gap
from wurst_core.human.build import Prompt, SystemImages, build_study
from wurst_core.human.design import ATTENTION_NOISE, ATTENTION_TRUTH, DesignSpec, make_design
from wurst_core.human.figures import write_report
from wurst_core.human.service import Conflict, NotFound, StudyError, StudyService, Unauthorised, Unprocessable
from wurst_core.human.store import Store
from wurst_core.workbench.cli import main

SYSTEMS = ["A", "B", "C"]


def synthetic_study(path, n_prompts=20, systems=SYSTEMS, pairs=3, seed=0, judge=None, attributes=None):
    """A study of random images (no model, no rendering): enough for everything but the pictures."""
    rng = np.random.default_rng(seed)
    prompts = [Prompt(f"prompt number {i}", "novel" if i % 2 == 0 else "seen") for i in range(n_prompts)]
    images = [SystemImages(s, rng.random((n_prompts, 3, 8, 8)), f"system {s}",
                           judge_scores=None if judge is None else judge[s],
                           attribute_scores=None if attributes is None else attributes[s]) for s in systems]
    attention = (SystemImages("t", rng.random((n_prompts, 3, 8, 8))),
                 SystemImages("n", rng.random((n_prompts, 3, 8, 8))))
    return build_study(path, prompts, images, DesignSpec(pairs, 0.1, 0.1, seed), attention)


def test_design_is_balanced_with_attention_checks_and_repeats():
    items = make_design(list(range(30)), ["w", "x", "y", "z"], DesignSpec(pairs_per_prompt=2, attention_share=0.1,
                                                                            repeat_share=0.2, seed=3))
    pairs = [i for i in items if i.kind == "pair"]
    assert len(pairs) == 60
    counts = Counter(frozenset((i.system_a, i.system_b)) for i in pairs)
    assert len(counts) == 6 and max(counts.values()) - min(counts.values()) <= 1
    assert Counter(i.prompt_id for i in pairs) == Counter({p: 2 for p in range(30)})
    attention = [i for i in items if i.kind == "attention"]
    assert len(attention) == 6
    assert all((i.system_a, i.system_b) == (ATTENTION_TRUTH, ATTENTION_NOISE) for i in attention)
    repeats = [i for i in items if i.kind == "repeat"]
    by_id = {i.item_id: i for i in items}
    assert len(repeats) == 12 and all((by_id[r.repeat_of].system_a, by_id[r.repeat_of].prompt_id) ==
                                      (r.system_a, r.prompt_id) for r in repeats)
    assert len(by_id) == len(items) and sorted(i.position for i in items) == list(range(len(items)))
    assert all(len(i.item_id) == 16 and not {"w", "x", "y", "z"} & set(i.item_id.split()) for i in items)


def test_store_service_votes_once_and_refuses_bad_input_without_writing(tmp_path):
    store = synthetic_study(tmp_path / "s.sqlite")
    assert store.meta()["format"].startswith("wurst-human-study") and store.integrity() == "ok"
    with store.read() as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    service = StudyService(store)
    alice = service.register("alice")
    assert service.register("alice") == alice  # coming back under the same name resumes
    showing = service.next(alice.rater_id)
    assert service.next(alice.rater_id) == showing  # a reload shows the same pair
    public = json.dumps(showing.public())
    assert not any(f'"{s}"' in public or f"system {s}" in public for s in SYSTEMS)
    before = store.counts()
    for call, error in [(lambda: service.vote(alice.rater_id, showing.showing_id, "up"), Unprocessable),
                        (lambda: service.vote(alice.rater_id, "nope", "left"), NotFound),
                        (lambda: service.vote(alice.rater_id, "../x", "left"), Unprocessable),
                        (lambda: service.vote(None, showing.showing_id, "left"), Unauthorised),
                        (lambda: service.vote("unknown", showing.showing_id, "left"), Unauthorised),
                        (lambda: service.register("x" * 65), Unprocessable),
                        (lambda: service.image("../s.sqlite"), NotFound),
                        (lambda: service.image("0" * 64 + ".png"), NotFound)]:
        with pytest.raises(error):
            call()
    bob = service.register("bob")
    with pytest.raises(NotFound):  # another rater's showing
        service.vote(bob.rater_id, showing.showing_id, "left")
    assert {k: v for k, v in store.counts().items() if k != "raters"} == \
           {k: v for k, v in before.items() if k != "raters"}
    first = service.vote(alice.rater_id, showing.showing_id, "left")
    again = service.vote(alice.rater_id, showing.showing_id, "left")
    assert not first.duplicate and again.duplicate and store.counts()["judgments"] == 1
    with pytest.raises(Conflict):
        service.vote(alice.rater_id, showing.showing_id, "right")
    row = store.table("judgments").iloc[0]
    assert row["choice"] == "left" and row["answered_at"] >= row["shown_at"]
    assert {row["left_system"], row["right_system"]} <= set(SYSTEMS) | {ATTENTION_TRUTH, ATTENTION_NOISE}
    assert isinstance(StudyError("x"), ValueError)
    # a rater walks every item once, then is done
    while (s := service.next(alice.rater_id)) is not None:
        service.vote(alice.rater_id, s.showing_id, "neither")
    assert service.progress(alice.rater_id) == (store.counts()["items"],) * 2
    written = store.export_csv(tmp_path / "csv")
    joined = pd.read_csv(tmp_path / "csv" / "judgments_joined.csv")
    assert len(joined) == store.counts()["items"] and {p.name for p in written} >= {"judgments.csv", "raters.csv"}


def test_sides_are_balanced_and_every_rater_has_an_own_order(tmp_path):
    store = Store(synthetic_study(tmp_path / "s.sqlite").path, durable=False)
    service = StudyService(store)
    firsts = set()
    for k in range(8):
        r = service.register(f"r{k}")
        s = service.next(r.rater_id)
        firsts.add(s.left + s.right)
        while s is not None:
            service.vote(r.rater_id, s.showing_id, "left")
            s = service.next(r.rater_id)
    j = store.table("judgments").merge(store.table("items"), on="item_id")
    share = (j["left_system"] == j["system_a"]).mean()
    assert 0.4 < share < 0.6 and len(firsts) > 4


def test_bradley_terry_vectorised_fit_equals_choix_and_davidson_nu():
    rng = np.random.default_rng(1)
    for s in (2, 3, 5):
        wins = rng.integers(0, 40, (s, s)).astype(float)
        np.fill_diagonal(wins, 0)
        assert np.abs(bt.fit(wins) - bt.fit_many(wins[None])[0]).max() < 1e-7
    # two systems: the maximum-likelihood gap is the log of the win ratio (prior included)
    wins = np.array([[0.0, 30.0], [10.0, 0.0]])
    theta = bt.fit(wins, prior=0.0)
    assert theta[0] - theta[1] == pytest.approx(np.log(3.0), abs=1e-6)
    # Davidson: ties between equal systems at rate nu / (2 + nu)
    nu = bt.davidson_nu(np.zeros(2), np.array([[0.0, 40.0], [40.0, 0.0]]), np.array([[0.0, 20.0], [20.0, 0.0]]))
    assert nu / (2 + nu) == pytest.approx(0.2, abs=1e-4)


def test_rater_bootstrap_intervals_cover_the_truth_in_most_of_300_simulated_studies():
    model = sim.RaterModel({"A": 0.5, "B": 0.0, "C": -0.5})
    truth = sim.population_strengths(model)
    wins, _ = sim.simulate_counts(model, n_studies=300, n_raters=30, votes=30, seed=2)
    draws = bt.bootstrap_strengths(wins, n_boot=200, seed=0)
    low, high = bt.percentile(draws[..., 0] - draws[..., 2], axis=-1)
    gap = truth["A"] - truth["C"]
    coverage = float(np.mean((low <= gap) & (gap <= high)))
    estimates = bt.fit_many(wins.sum(1))
    print(f"coverage of the A-C gap {gap:.3f} by 95% rater-bootstrap intervals over 300 studies: {coverage:.3f}")
    assert coverage >= 0.88
    assert abs(np.mean(estimates[:, 0] - estimates[:, 2]) - gap) < 0.05


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A seeded simulated study through the service layer, with judges that agree with the raters' truth."""
    path = tmp_path_factory.mktemp("sim") / "study.sqlite"
    n = 40
    rng = np.random.default_rng(5)
    judge = {s: list(rng.normal(2.0 - k, 0.5, n)) for k, s in enumerate(SYSTEMS)}
    attributes = {s: [float(4 - k)] * n for k, s in enumerate(SYSTEMS)}
    store = synthetic_study(path, n_prompts=n, judge=judge, attributes=attributes)
    model = sim.RaterModel({"A": 0.6, "B": 0.0, "C": -0.6}, careless=0.1)
    out = sim.simulate_service(store, model, n_raters=40, votes=50, spread=0.6, seed=4)
    return store, out, analyse(load(store), AnalysisSpec(n_boot=500, seed=0))


def test_simulated_study_recovers_the_known_bradley_terry_gap(simulated):
    store, out, analysis = simulated
    assert analysis.label == "simulated" and store.meta()["simulated"] is True
    assert store.table("raters")["simulated"].all() and store.table("judgments")["simulated"].all()
    covered = {}
    for a, b in combinations(SYSTEMS, 2):
        gap, low, high = analysis.bt.gap(a, b)
        truth = truth_gap(analysis, a, b)
        covered[a, b] = low <= truth <= high
        print(f"BT gap {a}-{b}: estimate {gap:.3f} [{low:.3f}, {high:.3f}], truth {truth:.3f}")
    assert covered["A", "C"]  # the known gap between the strongest and the weakest system, within its interval
    assert sum(covered.values()) >= 2
    assert 0.1 < analysis.bt.nu < 1.0


def test_analysis_reads_quality_figure5_and_judges(simulated, tmp_path):
    store, out, analysis = simulated
    q = analysis.quality.set_index("metric")["value"]
    assert q["raters excluded"] >= 1  # the careless raters fail their attention checks
    assert q["left image chosen, decisive judgments (%)"] > 50  # the simulated position bias
    assert q["repeated pairs judged the same (%)"] > 40  # chance: 33 %
    assert 0 < q["Krippendorff's alpha, ordinal"] < 1
    o = analysis.overall
    assert set(o["prompt_set"]) == {"novel", "seen", "all prompt sets"}
    assert np.allclose(o[["prefer_reference", "neither", "prefer_other"]].sum(1), 100)
    assert (o[o["prompt_set"] == "all prompt sets"]["prefer_reference"] > 50).all()  # A is the strongest
    p = analysis.per_rater
    assert set(p["raters"].str.split(" ").str[0]) == {">=", "all"}
    assert set(analysis.cutoffs) == {"novel", "seen"}
    j = analysis.judges.set_index("judge")
    assert j.loc["PickScore procedure (judge CLIP)", "agreement"] > 55
    assert j.loc["exact compositional judge", "agreement"] > 55
    written = write_report(analysis, tmp_path / "report")
    assert (tmp_path / "report" / "figures" / "figure5.png").stat().st_size > 10_000
    for name in ("fig5a_overall_preference", "bradley_terry", "data_quality", "judge_agreement"):
        assert written[f"table:{name}"].read_text().count("simulated") >= 2


def test_krippendorff_alpha_is_one_for_raters_who_always_agree():
    rows = [{"item_id": f"i{k}", "kind": "pair", "chose": ["a", "b", "neither"][k % 3], "rater_id": r}
            for k in range(9) for r in ("x", "y", "z")]
    alpha = krippendorff_alpha(pd.DataFrame(rows))
    assert alpha["units"] == 9 and alpha["ordinal"] == pytest.approx(1.0) and alpha["nominal"] == pytest.approx(1.0)


def test_widget_rates_into_the_same_database(tmp_path):
    from wurst_core.human.widget import RatingWidget

    store = synthetic_study(tmp_path / "s.sqlite")
    w = RatingWidget(store.path, name="researcher")
    assert w.left.value[:4] == b"\x89PNG" and "prompt number" in w.prompt.value
    for choice in ("left", "neither", "right"):
        w.choose(choice)
    j = store.table("judgments")
    assert list(j["choice"]) == ["left", "neither", "right"] and w.progress.value.startswith("3 of ")


def test_cli_creates_simulates_and_analyses_a_smoke_study(tmp_path, capsys):
    db = tmp_path / "study.sqlite"
    assert main(["study", "create", "--db", str(db), "--profile", "smoke", "--n-prompts", "3"]) == 0
    assert main(["study", "create", "--db", str(db), "--profile", "smoke"]) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err
    assert main(["study", "simulate", "--db", str(db), "--raters", "6", "--votes", "10"]) == 0
    assert main(["study", "analyse", "--db", str(db), "--out", str(tmp_path / "out"), "--n-boot", "50"]) == 0
    out = capsys.readouterr().out
    assert "simulated data: 60 judgments of 6 raters" in out
    assert (tmp_path / "out" / "figures" / "figure5.png").is_file()
    assert (tmp_path / "out" / "csv" / "judgments.csv").is_file()
    bad = ["study", "create", "--db", str(tmp_path / "x.sqlite"), "--profile", "smoke", "--systems", "truth"]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wurst: error: parameter 'systems' must list at least two systems") and "\n" not in err
    assert main(["study", "analyse", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path)]) == 2
    assert main(["study", "serve", "--db", str(tmp_path / "none.sqlite"), "--port", "1"]) == 2  # before any port
    assert "no study database" in capsys.readouterr().err
