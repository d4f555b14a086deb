"""The training loop: exact resume after SIGKILL, DDP (2 gloo processes, torchrun or forked workers) == 1 process, NaN
stops the run."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from wurst_core import training as train
from wurst_core.models.semantic import SEMANTIC_SIZES, SemanticCompressor
from wurst_core.models.stage_a import STAGE_A_SIZES, StageA
from wurst_core.models.stage_c import STAGE_C_SIZES, StageC
from wurst_core.training.tasks import StageATask, StageCTask, TextCache, drop_captions

ROOT = Path(__file__).resolve().parents[1]


class HashText(nn.Module):
    """A stand-in text encoder: deterministic tokens from a caption hash (the tests do not need CLIP)."""

    width = 32

    def forward(self, prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, p)) + 7 * len(p))
            out.append(torch.randn(77, self.width, generator=g))
        return type("T", (), {"tokens": torch.stack(out)})()


def make_stage_c_task(seed: int = 0) -> StageCTask:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(STAGE_C_SIZES["parity"], c_cond=HashText.width, dropout=0.0)
    comp = SemanticCompressor(dataclasses.replace(SEMANTIC_SIZES["tiny"], image_size=64))
    return StageCTask(StageC(cfg), comp, TextCache(HashText()), sc_size=64, latent_scaling="none")


def make_data(n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g)
    captions = [f"caption {i % 5}" for i in range(n)]

    def get_batch(idx):
        return {"image": images[idx], "caption": [captions[i] for i in idx]}

    return get_batch, n


CFG = train.TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, ema_start=2, ema_every=1, ema_beta=0.5,
                        ckpt_every=2, log_every=1, seed=3)


def final_weights(task: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.state_dict().items()}


def test_batches_and_draws_depend_only_on_seed_step_and_row():
    assert train.batch_indices(10, 4, 0, 1) == train.batch_indices(10, 4, 0, 1)
    assert train.batch_indices(10, 4, 0, 1) != train.batch_indices(10, 4, 0, 2)
    epoch = train.batch_indices(10, 10, 0, 1)
    assert sorted(epoch) == list(range(10))
    a = [torch.rand(3, generator=g) for g in train.sample_generators(1, 5, [0, 1, 2])]
    b = [torch.rand(3, generator=g) for g in train.sample_generators(1, 5, [2])]
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])


def test_lr_warmup_then_constant_or_cosine():
    cfg = train.TrainConfig(steps=100, warmup_steps=10, lr=1.0, batch_size=1)
    assert train.lr_at(0, cfg) == pytest.approx(0.1) and train.lr_at(50, cfg) == 1.0
    cos = dataclasses.replace(cfg, lr_schedule="cosine", min_lr_ratio=0.0)
    assert train.lr_at(10, cos) == pytest.approx(1.0) and train.lr_at(99, cos) < 0.01


def test_caption_dropout_rate():
    gens = train.sample_generators(0, 0, list(range(4000)))
    dropped = drop_captions(["x"] * 4000, gens, 0.05).count("")
    assert 150 < dropped < 250


def test_stage_a_task_trains_and_resume_is_exact(tmp_path):
    get_batch, n = make_data()
    torch.manual_seed(0)
    a = StageATask(StageA(STAGE_A_SIZES["parity"]), reset_every=2)
    init = final_weights(a)
    hist = train.fit(a, CFG, get_batch, n, tmp_path / "full", progress=False)
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
    full = final_weights(a)

    b = StageATask(StageA(STAGE_A_SIZES["parity"]), reset_every=2)
    b.load_state_dict(init)
    train.fit(b, dataclasses.replace(CFG, steps=3), get_batch, n, tmp_path / "part", progress=False)
    c = StageATask(StageA(STAGE_A_SIZES["parity"]), reset_every=2)
    c.load_state_dict(init)
    # steps=3 wrote a checkpoint at step 2 and at step 3; resume from it and finish
    train.fit(c, CFG, get_batch, n, tmp_path / "part", resume=True, progress=False)
    for k in full:
        assert torch.equal(full[k], final_weights(c)[k]), k


def test_random_crops_are_aligned_to_latent_cells_and_reproducible():
    from wurst_core.training.tasks import random_crops

    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    crops = random_crops(x, 8, gens())
    assert crops.shape == (2, 3, 8, 8) and torch.equal(crops, random_crops(x, 8, gens()))
    for img, crop in zip(x, crops):
        oy, ox = [int(v) for v in torch.nonzero(img[0] == crop[0, 0, 0])[0]]
        assert oy % 4 == 0 and ox % 4 == 0 and torch.equal(img[:, oy:oy + 8, ox:ox + 8], crop)


def test_stage_a_task_on_crops_sees_crops_and_still_decodes_whole_images():
    torch.manual_seed(0)
    model = StageA(STAGE_A_SIZES["parity"])
    task = StageATask(model, reset_every=0, crop=16)
    seen = []
    model.in_block.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    loss, logs = task({"image": torch.rand(2, 3, 32, 32)}, [torch.Generator().manual_seed(i) for i in range(2)])
    assert seen == [(2, 3, 16, 16)] and torch.isfinite(loss)
    assert model.decode(model.encode(torch.rand(1, 3, 32, 32))).shape == (1, 3, 32, 32)


def _script(body: str) -> str:
    return textwrap.dedent(f"""
        import sys, torch, dataclasses
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        torch.set_flush_denormal(True)
        torch.set_num_threads(1)  # as the test process (conftest): same float summation order
        from test_train import make_stage_c_task, make_data, CFG, final_weights
        from wurst_core import training as train
    """) + textwrap.dedent(body)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL mid-training and resumed ends with the same weights as an uninterrupted one."""
    cfg = dataclasses.replace(CFG, steps=40, ckpt_every=3)
    get_batch, n = make_data()
    ref = make_stage_c_task()
    train.fit(ref, cfg, get_batch, n, tmp_path / "ref", progress=False)

    body = f"""
        import time
        cfg = dataclasses.replace(CFG, steps=40, ckpt_every=3)
        get_batch, n = make_data()
        task = make_stage_c_task()
        def slow(step, rec):
            print("step", step, flush=True); time.sleep(0.05)
        resume = sys.argv[1] == "resume"
        train.fit(task, cfg, get_batch, n, {str(tmp_path / 'killed')!r}, resume=resume, progress=False, on_log=slow)
        torch.save(final_weights(task), {str(tmp_path / 'resumed.pt')!r})
    """
    proc = subprocess.Popen([sys.executable, "-c", _script(body), "first"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("step") and int(line.split()[1]) >= 17:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = train.load_training_state(tmp_path / "killed" / "train_state.pt")
    assert 0 < state["step"] < 40, "the kill must land mid-run"
    out = subprocess.run([sys.executable, "-c", _script(body), "resume"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for k, v in final_weights(ref).items():
        assert torch.equal(v, resumed[k]), k


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_single_process(tmp_path, strategy):
    """DistributedDataParallel (and FSDP2 sharding) over 2 CPU processes == 1 process on the same global batch."""
    cfg = dataclasses.replace(CFG, steps=4)
    get_batch, n = make_data()
    single = make_stage_c_task()
    train.fit(single, cfg, get_batch, n, tmp_path / "single", progress=False)

    body = f"""
        import os
        import torch.distributed as dist
        dist.init_process_group("gloo")
        cfg = dataclasses.replace(CFG, steps=4, strategy={strategy!r})
        get_batch, n = make_data()
        task = make_stage_c_task()
        train.fit(task, cfg, get_batch, n, {str(tmp_path / 'dist')!r}, progress=False)
        dist.destroy_process_group()
    """
    script = tmp_path / "dist_script.py"
    script.write_text(_script(body))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = {"ddp": 29533, "fsdp": 29534}[strategy]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          str(script)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # the final checkpoint holds full (gathered) tensors whichever the strategy
    dist_state = train.load_training_state(tmp_path / "dist" / "train_state.pt")
    assert dist_state["step"] == 4
    ref = final_weights(single)
    worst = max((v - dist_state["model"][k]).abs().max().item() for k, v in ref.items() if v.is_floating_point())
    assert worst < 1e-5, worst
    ema_ref = train.load_training_state(tmp_path / "single" / "train_state.pt")["ema"]
    assert max((v - dist_state["ema"][k]).abs().max().item() for k, v in ema_ref.items()) < 1e-5


def poisoned_at(get_batch, call: int):
    """``get_batch`` whose ``call``-th call (0-based: one per step and process) returns NaN images."""
    calls = [0]

    def poisoned(idx):
        batch = get_batch(idx)
        if calls[0] == call:
            batch["image"] = batch["image"] * float("nan")
        calls[0] += 1
        return batch

    return poisoned


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    get_batch, n = make_data()
    task = make_stage_c_task()
    cfg = dataclasses.replace(CFG, steps=10, ckpt_every=2)
    with pytest.raises(train.TrainingDiverged, match=r"loss is nan at step 5.*Last good checkpoint: step 4"):
        train.fit(task, cfg, poisoned_at(get_batch, 5), n, tmp_path, progress=False)
    state = train.load_training_state(tmp_path / "train_state.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_forked_worker_processes_equal_single_process(tmp_path):
    """`fit_processes` (2 forked CPU workers, gloo DDP): the weights, EMA and log of 1 process on the same global
    batch, and the caller's task ends with the trained weights."""
    cfg = dataclasses.replace(CFG, steps=4)
    get_batch, n = make_data()
    single = make_stage_c_task()
    ref_hist = train.fit(single, cfg, get_batch, n, tmp_path / "single", progress=False)
    task = make_stage_c_task()
    hist = train.fit_processes(task, cfg, get_batch, n, tmp_path / "workers", workers=2, progress=False)
    assert list(hist["step"]) == list(ref_hist["step"])
    assert (hist["loss"] - ref_hist["loss"]).abs().max() < 1e-5  # the logged loss is the global batch's
    ref, got = final_weights(single), final_weights(task)
    assert max((v - got[k]).abs().max().item() for k, v in ref.items() if v.is_floating_point()) < 1e-5
    ema_ref = train.load_training_state(tmp_path / "single" / "train_state.pt")["ema"]
    ema = train.load_training_state(tmp_path / "workers" / "train_state.pt")["ema"]
    assert max((v - ema[k]).abs().max().item() for k, v in ema_ref.items()) < 1e-5


def test_forked_workers_reset_dead_codes_together(tmp_path):
    """Stage A's dead-code resets under 2 workers: every rank sees the global usage and takes rank 0's codebook,
    so the collective calls match (a mismatch would hang) and training finishes."""
    get_batch, n = make_data()
    torch.manual_seed(0)
    task = StageATask(StageA(STAGE_A_SIZES["parity"]), reset_every=2)
    before = task.stage_a.vquantizer.codebook.weight.detach().clone()
    hist = train.fit_processes(task, CFG, get_batch, n, tmp_path, workers=2, progress=False)
    assert len(hist) == CFG.steps and torch.isfinite(torch.tensor(hist["loss"].values)).all()
    assert not torch.equal(before, task.stage_a.vquantizer.codebook.weight)


def test_nan_in_a_worker_stops_every_worker_and_keeps_last_good_checkpoint(tmp_path):
    get_batch, n = make_data()
    cfg = dataclasses.replace(CFG, steps=10, ckpt_every=2)
    poisoned = poisoned_at(get_batch, 5)  # each worker calls it once per step: step 5 is poisoned on both
    with pytest.raises(train.TrainingDiverged, match=r"loss is nan at step 5.*Last good checkpoint: step 4"):
        train.fit_processes(make_stage_c_task(), cfg, poisoned, n, tmp_path, workers=2, progress=False)
    assert train.load_training_state(tmp_path / "train_state.pt")["step"] == 4
