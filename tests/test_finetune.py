"""Fine-tuning Stage C (issue 22): LoRA through peft merges to the same outputs, trains only its adapter, resumes
exactly; adapter files load into a Pipeline at a scale; the concept data and its colour judge. Tiny random networks,
seconds."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from wurst_core import runs
from wurst_core import training as train
from wurst_core.data import write_demo_folder
from wurst_core.models.semantic import SEMANTIC_SIZES, SemanticCompressor
from wurst_core.models.stage_c import STAGE_C_SIZES, StageC
from wurst_core.params import ParameterError, build
from wurst_core.studies.finetune import (CONCEPT, ConceptDataset, FinetuneParams, Mixed, _data, color_accuracy, prepare,
                                         read_colors)
from wurst_core.training.finetune import checkpoint_blocks, measure_step
from wurst_core.studies.sampling import random_pipeline
from wurst_core.training.lora import (LoraSpec, inject_lora, is_lora_parameter, load_adapter, lora_state_dict, merge,
                                      merged_copy, parameter_counts, read_adapter, save_adapter, set_scale, unmerge)
from wurst_core.training.tasks import StageCTask, TextCache

ALL = ("kv_mapper", "out_proj", "qkv", "channelwise", "cond_mapper")


class WordText(nn.Module):
    """A stand-in text encoder: each caption's tokens are a fixed function of its characters."""

    width = 32

    def forward(self, prompts):
        out = [torch.randn(8, self.width, generator=torch.Generator().manual_seed(sum(map(ord, p)) + 7 * len(p)))
               for p in prompts]
        return type("T", (), {"tokens": torch.stack(out)})()


def stage_c(seed: int = 0) -> StageC:
    """A parity Stage C whose zero-initialised output conv and timestep mappers are random: every path counts."""
    torch.manual_seed(seed)
    model = StageC(dataclasses.replace(STAGE_C_SIZES["parity"], c_cond=WordText.width, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return model.eval()


def randomize_adapter(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora_parameter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 16, 4, 4, generator=g), torch.rand(3, generator=g), torch.randn(3, 8, 32, generator=g)


def task_of(model: nn.Module) -> StageCTask:
    torch.manual_seed(3)
    comp = SemanticCompressor(dataclasses.replace(SEMANTIC_SIZES["tiny"], image_size=64))
    return StageCTask(model, comp, TextCache(WordText()), sc_size=64, latent_scaling="none")


def data(n: int = 16):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 32, 32, generator=g)
    captions = [f"a {'cyan' if i % 2 else 'red'} circle {i % 3}" for i in range(n)]
    return lambda idx: {"image": images[idx], "caption": [captions[i] for i in idx]}, n


CFG = train.TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, ema_start=1, ema_every=1, ema_beta=0.5,
                        ckpt_every=2, log_every=1, seed=5, lr_schedule="cosine")


@pytest.mark.parametrize("targets", [("kv_mapper", "out_proj"), ALL])
def test_a_merged_adapter_gives_the_outputs_of_the_unmerged_one(targets):
    base = stage_c()
    model = inject_lora(copy.deepcopy(base), LoraSpec(rank=4, alpha=8.0, targets=targets))
    randomize_adapter(model)
    x, r, tokens = inputs()
    with torch.no_grad():
        y_base, y_lora = base(x, r, tokens), model(x, r, tokens)
        assert (y_lora - y_base).abs().max() > 1e-3, "the adapter must change the output for this test to mean much"
        merge(model)
        y_merged = model(x, r, tokens)
        torch.testing.assert_close(y_merged, y_lora, rtol=1e-4, atol=1e-5)
        set_scale(model, 0.0)  # rescaling a merged adapter unmerges, rescales and merges again
        torch.testing.assert_close(model(x, r, tokens), y_base, rtol=1e-4, atol=1e-5)
        set_scale(model, 1.0)
        unmerge(model)
        torch.testing.assert_close(model(x, r, tokens), y_lora, rtol=1e-4, atol=1e-5)
        restored = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if not is_lora_parameter(k)}
        for k, v in base.state_dict().items():
            torch.testing.assert_close(restored[k], v, rtol=0, atol=1e-6)
        plain = merged_copy(model)  # the base network's keys again, the adapter folded in
        assert set(plain.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(plain(x, r, tokens), y_lora, rtol=1e-4, atol=1e-5)


def test_lora_training_changes_only_the_adapter_parameters(tmp_path):
    model = inject_lora(stage_c(), LoraSpec(rank=2, alpha=2.0, targets=ALL))
    counts = parameter_counts(model)
    assert 0 < counts["trainable"] < counts["total"] / 4
    task = task_of(model)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    get_batch, n = data()
    train.fit(task, CFG, get_batch, n, tmp_path, progress=False)
    after = task.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(is_lora_parameter(k) for k in changed), changed[:5]
    assert any(".lora_B." in k for k in changed)  # B starts at zero: it must have moved


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_resumed_finetune_continues_exactly_as_an_uninterrupted_one(tmp_path, method):
    p = build(FinetuneParams, {"profile": "smoke", "lora_targets": "kv_mapper,out_proj", "lora_dropout": 0.1,
                               "gradient_checkpointing": True})
    base = stage_c()
    get_batch, n = data()
    straight = task_of(prepare(base, method, p))
    train.fit(straight, CFG, get_batch, n, tmp_path / "straight", progress=False)

    calls = []

    def dies_in_step_three(idx):
        calls.append(idx)
        if len(calls) == 3:
            raise Killed
        return get_batch(idx)

    killed = task_of(prepare(base, method, p))
    with pytest.raises(Killed):
        train.fit(killed, CFG, dies_in_step_three, n, tmp_path / "killed", progress=False)
    assert train.load_training_state(tmp_path / "killed" / "train_state.pt")["step"] == 2
    resumed = task_of(prepare(base, method, p))  # a fresh process: the same preparation, then the checkpoint
    train.fit(resumed, CFG, get_batch, n, tmp_path / "killed", resume=True, progress=False)
    a = train.load_training_state(tmp_path / "straight" / "train_state.pt")
    b = train.load_training_state(tmp_path / "killed" / "train_state.pt")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["step"] == b["step"] == CFG.steps


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    x, r, tokens = inputs()
    grads = []
    for ckpt in (False, True):
        model = stage_c().train()
        if ckpt:
            checkpoint_blocks(model)
        model(x, r, tokens).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-7)


def test_adapter_files_load_at_a_scale_into_a_network_and_a_pipeline(tmp_path):
    spec = LoraSpec(rank=2, alpha=4.0, targets=("kv_mapper", "out_proj", "qkv"))
    model = inject_lora(stage_c(), spec)
    randomize_adapter(model)
    save_adapter(model, spec, tmp_path / "adapter", {"note": "test"})
    read_spec, state, meta = read_adapter(tmp_path / "adapter")
    assert read_spec == spec and meta["metadata"] == {"note": "test"} and state.keys() == lora_state_dict(model).keys()
    x, r, tokens = inputs()
    fresh = load_adapter(stage_c(), tmp_path / "adapter", scale=0.5)
    set_scale(model, 0.5)
    with torch.no_grad():
        assert torch.equal(fresh(x, r, tokens), model(x, r, tokens))
    other = StageC(dataclasses.replace(STAGE_C_SIZES["parity"], c_cond=WordText.width, depth=3))
    with pytest.raises(ValueError, match="trained on another network"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(ValueError, match="already carries"):
        inject_lora(fresh, spec)
    with pytest.raises(FileNotFoundError, match="12_finetune"):
        read_adapter(tmp_path)

    pipe = random_pipeline("smoke", seed=0)
    lora_c = inject_lora(copy.deepcopy(pipe.stage_c), spec)
    randomize_adapter(lora_c)
    save_adapter(lora_c, spec, tmp_path / "pipe_adapter")

    def images(p):
        return p(["a red circle"], height=128, width=128, prior_steps=2, decoder_steps=2,
                  generator=torch.Generator().manual_seed(0))

    plain = images(pipe)
    pipe.load_adapter(tmp_path / "pipe_adapter", scale=1.0)
    tuned = images(pipe)
    assert (tuned - plain).abs().max() > 1e-3
    pipe.merge_adapter()
    torch.testing.assert_close(images(pipe), tuned, rtol=0, atol=1e-4)
    pipe.set_adapter_scale(0.0)
    torch.testing.assert_close(images(pipe), plain, rtol=0, atol=1e-4)
    pipe.merge_adapter(False)
    torch.testing.assert_close(images(pipe), plain, rtol=0, atol=1e-4)


def test_measuring_a_step_reports_time_and_memory_and_leaves_the_task_alone():
    task = task_of(inject_lora(stage_c(), LoraSpec(rank=2, alpha=2.0)))
    before = {k: v.clone() for k, v in task.state_dict().items()}
    get_batch, n = data()
    out = measure_step(task, dataclasses.replace(CFG, steps=2), get_batch, n)
    assert out["measured_seconds_per_step"] > 0 and out["peak_memory_mb"] >= 0
    assert all(torch.equal(before[k], v) for k, v in task.state_dict().items())


def test_the_concept_data_and_its_colour_judge():
    ds = ConceptDataset(12, 64, seed=0, split="val")
    a, b = ds[3], ConceptDataset(12, 64, seed=0, split="val")[3]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert all(it["attributes"]["objects"][0]["color"] == CONCEPT and CONCEPT in it["caption"] for it in ds)
    assert ConceptDataset(12, 64, seed=0, split="train")[3]["caption"] != a["caption"]
    images = torch.stack([it["image"] for it in ds])
    attrs = [it["attributes"] for it in ds]
    assert color_accuracy(images, attrs, only=CONCEPT) == 1.0 and color_accuracy(images, attrs) == 1.0
    blank = images.flatten(2).median(2).values[:, :, None, None].expand_as(images)  # the background alone
    assert all(c is None for found in read_colors(blank, attrs) for c in found)
    assert color_accuracy(blank, attrs, only=CONCEPT) == 0.0


def test_the_finetuning_data_comes_from_a_folder_and_mixes_in_original_images(tmp_path):
    run = runs.start_run("12_finetune", "smoke", run_id="t")
    p = build(FinetuneParams, {"profile": "smoke", "n_regular": 4})
    stream, held = _data(p, run)
    assert isinstance(stream, Mixed) and len(stream) == len(stream.new) + 4
    assert (run.dir / "data" / "concept").is_dir() and stream.new.dataset.__class__.__name__ == "FolderDataset"
    batch = stream([0, len(stream) - 1])
    assert batch["image"].shape == (2, 3, 64, 64) and CONCEPT in batch["caption"][0]
    assert CONCEPT not in batch["caption"][1]  # the last item is an original procedural scene
    assert held["image"].shape[0] == p.n_val and all(a["objects"][0]["color"] == CONCEPT for a in held["attributes"])

    folder = write_demo_folder(tmp_path / "mine", n=12)
    own = build(FinetuneParams, {"profile": "smoke", "dataset": "folder", "data_dir": str(folder)})
    stream, held = _data(own, run)
    assert len(stream) >= 8 and held["image"].shape[1:] == (3, 64, 64)
    with pytest.raises(ParameterError, match="data_dir"):
        build(FinetuneParams, {"profile": "smoke", "dataset": "folder"})
    with pytest.raises(ParameterError, match="not one of"):
        build(FinetuneParams, {"profile": "smoke", "lora_targets": "kv_mapper,everything"})
    with pytest.raises(ParameterError, match="dropout"):
        build(FinetuneParams, {"profile": "smoke", "lora_targets": "qkv", "lora_dropout": 0.1})
