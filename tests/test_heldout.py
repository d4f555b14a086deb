"""Held-out means novel: compositions reserved for the test split never reach training, and 07 can tell seen
test prompts from novel ones."""
import random

import pytest
import torch

from wurst_core.data import ProceduralDataset
from wurst_core.data.procedural import (composition_key, counterfactual, is_novel, parse_caption,
                                        training_counterfactual)
from wurst_core.evaluation.image_metrics import FeatureSet
from wurst_core.studies.heldout import NOVEL, SEEN, composition_groups, group_table, masked, trained_indices
from wurst_core.text.clip import add_twins
from wurst_core.training.loop import batch_indices


def _keys(split: str, n: int, seed: int = 0) -> list[str]:
    ds = ProceduralDataset(n, 16, seed=seed, split=split)
    return [composition_key(ds.attributes(i)) for i in range(n)]


def test_no_test_composition_in_train_or_val():
    train, val, test = _keys("train", 4000), _keys("val", 1000), _keys("test", 400)
    novel = set(test[0::2])
    assert len(novel) > 150  # the novel half is many distinct compositions
    assert novel.isdisjoint(train) and novel.isdisjoint(val)
    # the one-object scenes, most likely to be memorised, are split too
    ds = ProceduralDataset(400, 16, split="test")
    assert any(ds.attributes(i)["count"] == 1 for i in range(0, 400, 2))


def test_split_novelty_is_what_each_item_asks_for():
    for split in ("train", "val"):
        ds = ProceduralDataset(500, 16, seed=3, split=split)
        assert not any(is_novel(ds.attributes(i)) for i in range(500))
    ds = ProceduralDataset(200, 16, seed=3, split="test")
    assert [is_novel(ds.attributes(i)) for i in range(200)] == [i % 2 == 0 for i in range(200)]


def test_novelty_is_a_property_of_the_composition_not_the_render():
    ds = ProceduralDataset(50, 16, split="test")
    for i in range(50):
        item = ds[i]
        # the caption states the composition: its parse hashes alike (jittered centres do not count)
        assert is_novel(parse_caption(item["caption"])) == is_novel(item["attributes"])
    assert not any(is_novel(ProceduralDataset(200, 16, split="test").attributes(i)) for i in range(1, 200, 2))


def test_hard_negatives_for_training_are_never_reserved():
    rng = random.Random(0)
    ds = ProceduralDataset(300, 16, split="train")
    scenes = [ds.attributes(i) for i in range(300)]
    # plain counterfactuals do hit reserved compositions; the training ones never do
    assert any(is_novel(counterfactual(a, "color", random.Random(i))) for i, a in enumerate(scenes))
    assert not any(is_novel(training_counterfactual(a, ("position", "color", "shape", "size"), rng)) for a in scenes)
    batch = {"image": torch.zeros(300, 3, 16, 16), "caption": [""] * 300}
    out = add_twins(batch, scenes, 300, random.Random(1), kinds=("color", "shape"))
    assert not any(is_novel(parse_caption(c)) for c in out["caption"][300:])


def test_trained_indices_replay_the_loop_batches():
    expected = set()
    for step in range(7):
        expected.update(batch_indices(50, 8, step, 5))
    assert trained_indices(50, 8, 7, 5) == expected
    assert len(trained_indices(50, 8, 7, 5)) == 50  # 56 draws cover the first epoch of 50


def test_composition_groups_and_table():
    ds = ProceduralDataset(8, 16, split="test")
    truths = [ds.attributes(i) for i in range(8)]
    groups = composition_groups(truths, {composition_key(truths[1]), composition_key(truths[3])})
    assert groups[NOVEL].tolist() == [True, False] * 4
    assert groups[SEEN].tolist() == [False, True, False, True, False, False, False, False]
    g = torch.Generator().manual_seed(0)
    feats = FeatureSet(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g), "t")
    checks = {"m": {"all_correct": torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])}}
    table = group_table(checks, {"m": feats}, feats, groups, n_boot=10)
    novel = table[table["group"] == NOVEL].loc["m"]
    assert novel["prompts"] == 4 and novel["all_correct"].startswith("75")
    assert masked({"a": {"b": torch.arange(8)}}, groups[SEEN])["a"]["b"].tolist() == [1, 3]


@pytest.mark.parametrize("split", ["train", "test"])
def test_items_stay_deterministic(split):
    a, b = ProceduralDataset(20, 16, split=split), ProceduralDataset(20, 16, split=split)
    assert [a[i]["caption"] for i in range(20)] == [b[i]["caption"] for i in range(20)]
