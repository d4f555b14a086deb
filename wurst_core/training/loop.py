"""Training: one short loop shared by the three stages (paper Fig. 3: Stage A, then B, then C).

A *task* is an ``nn.Module`` whose ``forward(batch, rngs)`` returns ``(loss, logs)``; it owns the networks of its
stage, frozen ones included (:mod:`wurst_core.training.tasks`). The loop here is stage-agnostic: AdamW with linear warm-up,
gradient accumulation, clipping at 1.0, EMA, bf16 autocast on GPU, atomic checkpoints, exact resume, NaN guard, and
DistributedDataParallel when ``torch.distributed`` is initialised (``torchrun``).

Determinism, and why resume is exact: every random draw of a step is a pure function of ``(seed, step, sample index)``
(:func:`sample_generators`), the batch of a step is a pure function of ``(seed, step)`` (:func:`batch_indices`) and the
global RNG (dropout) is re-seeded from ``(seed, step, rank)`` at every step. A checkpoint therefore needs only the
model, EMA and optimizer states and the step; a run killed at any point and resumed ends with the same weights as an
uninterrupted run. Under DDP each rank takes its rows of the same global batch with the same per-sample draws, so
2 processes compute what 1 process computes on the global batch (up to float summation order).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..io import save_torch
from ..models.blocks import AttnBlock, ResBlock, ResBlockStageB, TimestepBlock


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf, or blew up; the last good checkpoint is kept."""


class ResumeMismatch(ValueError):
    """A resumed run was asked for other hyper-parameters than its checkpoint was trained with."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every stage. Defaults are the released recipe
    (docs/reference.md#training-recipe)."""

    steps: int = 1_500_000            # 1.5M updates
    batch_size: int = 1280            # global batch (Stage C: 20*8*8)
    lr: float = 1e-4                  # AdamW lr 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01        # torch AdamW default, as released
    warmup_steps: int = 10_000        # GradualWarmupScheduler(total_epoch=10000): linear, then constant
    lr_schedule: str = "constant"     # "constant" (released) | "cosine" (decay to min_lr_ratio after warm-up)
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_beta: float = 0.9             # start 5000, every 100 steps, beta 0.9
    ema_every: int = 100
    ema_start: int = 5000
    ckpt_every: int = 1000
    log_every: int = 50
    seed: int = 0
    precision: str = "auto"           # "auto": bf16 autocast on CUDA, float32 on CPU | "fp32" | "bf16"
    strategy: str = "ddp"             # several processes: "ddp" (replicated) | "fsdp" (FSDP2 sharding, paper sizes)
    diverge_factor: float = 100.0     # stop when the smoothed loss rises this many times above its best (0: never)
    snapshot_steps: tuple[int, ...] = ()  # also keep the EMA weights after these steps (learning curves)

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto|fp32|bf16, got {self.precision!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.diverge_factor and not self.diverge_factor > 1:
            raise ValueError(f"diverge_factor must be > 1 (or 0: never stop), got {self.diverge_factor}")
        if any(not 1 <= s <= self.steps for s in self.snapshot_steps):
            raise ValueError(f"snapshot_steps must lie in [1, steps={self.steps}], got {self.snapshot_steps}")

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """What differs from a ``recorded`` config (a checkpoint's), except a grown step count and settings that
        do not change the result's maths (logging, checkpointing, divergence threshold)."""
        free = {"steps", "ckpt_every", "log_every", "diverge_factor", "strategy", "snapshot_steps"}
        now = dataclasses.asdict(self)
        out = [f"{k}: {recorded[k]!r} -> {now[k]!r}" for k in now
               if k in recorded and k not in free and _plain(recorded[k]) != _plain(now[k])]
        if "steps" in recorded and self.steps < recorded["steps"]:
            out.append(f"steps: {recorded['steps']!r} -> {self.steps!r} (only a larger step count can resume)")
        return out


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


class DivergenceGuard:
    """Stops training on a non-finite loss, or on a finite blow-up: an EMA of the loss rising ``factor`` times above
    the lowest it reached (after a short burn-in, so that the first noisy steps set no record)."""

    def __init__(self, factor: float, beta: float = 0.9, burn_in: int = 10):
        self.factor, self.beta, self.burn_in = factor, beta, burn_in
        self.smooth: float | None = None
        self.best = math.inf
        self.seen = 0

    def __call__(self, loss: float, step: int) -> str | None:
        """A message if ``loss`` at ``step`` means divergence, else None."""
        if not math.isfinite(loss):
            return f"loss is {loss} at step {step}"
        self.smooth = loss if self.smooth is None else self.beta * self.smooth + (1 - self.beta) * loss
        self.seen += 1
        if self.seen < self.burn_in or not self.factor:
            return None
        if self.best > 0 and self.smooth > self.factor * self.best:
            return (f"the loss diverged at step {step}: its running mean {self.smooth:.4g} is over {self.factor:g} "
                    f"times its best {self.best:.4g} (diverge_factor)")
        self.best = min(self.best, self.smooth)
        return None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0 to ``lr``, then constant or cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _mix(*xs: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps): independent streams per (seed, step, index)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    # cached: a streamed training set is large (tiny: 200k), and every step of an epoch takes its slice of this
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch, 1)))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Dataset indices of the global batch at ``step``: epochs are seeded permutations of ``range(n)``."""
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        perm = _epoch_permutation(n, seed, epoch)
        take = min(batch_size - len(out), n - pos)
        out += perm[pos:pos + take].tolist()
    return out


def sample_generators(seed: int, step: int, rows: list[int]) -> list[torch.Generator]:
    """One generator per sample of the global batch: draws depend on (seed, step, row), not on the process."""
    return [torch.Generator().manual_seed(_mix(seed, step, row, 2)) for row in rows]


class EMA:
    """Exponential moving average of a module's trainable parameters (released: beta 0.9 every 100 steps)."""

    def __init__(self, module: nn.Module):
        self.shadow = {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module, beta: float) -> None:
        for k, p in module.named_parameters():
            if k in self.shadow:
                self.shadow[k].lerp_(p.detach(), 1 - beta)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        for k, p in module.named_parameters():
            if k in self.shadow:
                p.copy_(self.shadow[k])
        return module

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors (under FSDP every rank must call this: the shards are gathered)."""
        return {k: (v.full_tensor() if _is_dtensor(v) else v).cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for k, v in self.shadow.items():
            if _is_dtensor(v):
                from torch.distributed.tensor import distribute_tensor

                v.copy_(distribute_tensor(state[k].to(v.dtype), v.device_mesh, v.placements))
            else:
                self.shadow[k] = state[k].clone().to(v)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


# FSDP2 wrapping units: the repeated blocks of every stage (each its own all-gather), then the root.
def _shard(task: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for m in task.modules():
        if isinstance(m, (ResBlock, ResBlockStageB, AttnBlock, TimestepBlock)) and \
                any(p.requires_grad for p in m.parameters()):
            fully_shard(m)
    fully_shard(task)


def _full_state(task: nn.Module, opt: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    if not fsdp:
        return task.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(task, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_full_state(task: nn.Module, opt: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        task.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(task, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))


def _autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_training_state(path: Path) -> dict[str, Any]:
    """A training checkpoint; tensors and plain values only (a pickled object is refused, never executed)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is not a training checkpoint of this workbench: it holds pickled objects, "
                         "which are refused for safety") from None


def fit(task: nn.Module, cfg: TrainConfig, get_batch: Callable[[list[int]], dict[str, Any]], n_data: int,
        ckpt_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
        on_log: Callable[[int, dict[str, float]], None] | None = None) -> pd.DataFrame:
    """Train ``task`` for ``cfg.steps`` updates and return the log as a DataFrame.

    ``get_batch(indices)`` loads the dataset items; ``ckpt_dir/train_state.pt`` holds model, EMA, optimizer and step
    (written atomically every ``cfg.ckpt_every`` steps and at the end); after each of ``cfg.snapshot_steps`` the EMA
    weights are also kept (:func:`snapshot_path`). With ``resume=True`` the run continues
    from that file exactly. A non-finite loss raises :class:`TrainingDiverged` and leaves the last checkpoint intact.
    Under ``torchrun`` the task is wrapped in DistributedDataParallel, or sharded with FSDP2 when
    ``cfg.strategy == "fsdp"`` (checkpoints then hold full, gathered tensors; optimizer states keyed by name).
    """
    ckpt_dir = Path(ckpt_dir)
    state_path = ckpt_dir / "train_state.pt"
    rank, world = _world()
    device = next(task.parameters()).device
    fsdp = world > 1 and cfg.strategy == "fsdp"
    if fsdp:
        _shard(task)  # before the optimizer is built: its parameters become sharded DTensors
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = EMA(task)
    history: list[dict[str, float]] = []
    guard = DivergenceGuard(cfg.diverge_factor)
    start = 0
    if resume and state_path.exists():
        state = load_training_state(state_path)
        changed = cfg.differences(state.get("config", {}))
        if changed:
            raise ResumeMismatch(f"cannot resume {state_path} with other hyper-parameters: " + "; ".join(changed))
        _load_full_state(task, opt, state, fsdp)
        ema.load_state_dict(state["ema"])
        history = list(state.get("history", []))
        guard.__dict__.update(state.get("guard", {}))  # the resumed run keeps the running mean and its record
        start = int(state["step"])
    model: nn.Module = task
    if world > 1 and not fsdp:
        model = nn.parallel.DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None)

    def save(step: int) -> None:
        model_state, optim_state = _full_state(task, opt, fsdp)  # collective under FSDP: every rank calls it
        ema_state = ema.state_dict()
        if rank == 0:
            save_torch(state_path, {"model": model_state, "ema": ema_state, "optimizer": optim_state,
                                    "step": step, "history": history, "config": dataclasses.asdict(cfg),
                                    "guard": {"smooth": guard.smooth, "best": guard.best, "seen": guard.seen}})

    micro = cfg.batch_size // cfg.grad_accum
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress or rank != 0,
               desc="train", dynamic_ncols=True, mininterval=1.0)
    t0, n_seen = time.time(), 0
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        torch.manual_seed(_mix(cfg.seed, step, rank, 3))  # dropout: a function of the step, so resume is exact
        rows = batch_indices(n_data, cfg.batch_size, step, cfg.seed)
        gens = sample_generators(cfg.seed, step, list(range(cfg.batch_size)))
        opt.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        step_loss = 0.0
        for m in range(cfg.grad_accum):
            sl = slice(m * micro, (m + 1) * micro)
            local = list(range(sl.start, sl.stop))[rank::world]  # this rank's rows of this micro-batch
            batch = get_batch([rows[i] for i in local])
            with _autocast(cfg, device):
                loss, parts = model(batch, [gens[i] for i in local])
            if not torch.isfinite(loss).all():
                _diverged(f"loss is {loss.item()} at step {step}", state_path)
            # the per-rank mean over its rows, weighted so that DDP's gradient average equals the global-batch mean
            (loss * len(local) * world / cfg.batch_size).backward()
            step_loss += loss.item() / cfg.grad_accum
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + float(v) / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if _is_dtensor(grad_norm):
            grad_norm = grad_norm.full_tensor()
        opt.step()
        if step + 1 >= cfg.ema_start and (step + 1) % cfg.ema_every == 0:
            ema.update(task, cfg.ema_beta)
        elif step + 1 < cfg.ema_start:
            ema.update(task, 0.0)  # official: the EMA copies the weights until ema_start
        n_seen += cfg.batch_size
        problem = guard(step_loss, step + 1)
        if problem:
            _diverged(problem, state_path)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            if world > 1:  # the logged values of the global batch, not of rank 0's rows
                keys = sorted(logs)
                vals = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=device)
                dist.all_reduce(vals)
                logs = {k: float(v) / world for k, v in zip(keys, vals)}
            rec = {"step": step + 1, "lr": opt.param_groups[0]["lr"], "grad_norm": float(grad_norm), **logs,
                   "samples_per_s": n_seen / max(time.time() - t0, 1e-9)}
            history.append(rec)
            bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k in ("loss", "lr", "samples_per_s")})
            if on_log is not None and rank == 0:
                on_log(step + 1, rec)
        if step + 1 in cfg.snapshot_steps:
            ema_state = ema.state_dict()  # collective under FSDP
            if rank == 0:
                save_torch(snapshot_path(ckpt_dir, step + 1), {"ema": ema_state, "step": step + 1})
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            save(step + 1)
    bar.close()
    if world > 1:
        dist.barrier()
    return pd.DataFrame(history)


def snapshot_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """Where :func:`fit` keeps the EMA weights after ``step`` when ``step`` is one of ``cfg.snapshot_steps``."""
    return Path(ckpt_dir) / f"ema_step{step:08d}.pt"


def _diverged(problem: str, state_path: Path) -> None:
    last = f"step {load_training_state(state_path)['step']} in {state_path}" if state_path.exists() else "none written yet"
    raise TrainingDiverged(f"{problem}; stopped. Last good checkpoint: {last}")


def fit_processes(task: nn.Module, cfg: TrainConfig, get_batch: Callable[[list[int]], dict[str, Any]], n_data: int,
                  ckpt_dir: str | os.PathLike, workers: int = 2, resume: bool = False, progress: bool = True,
                  on_log: Callable[[int, dict[str, float]], None] | None = None) -> pd.DataFrame:
    """:func:`fit` in ``workers`` forked CPU processes of one thread each, joined by gloo DDP; ``task`` ends with
    the trained weights and the log is returned, as with :func:`fit` (the same result on the same global batch, up
    to float summation order).

    Why: the tiny networks are too small for intra-op threads to pay. On the 2-core machine 2 threads made a
    Stage C step 1.4x faster alone and 2.5x slower when another job shared the cores, while 2 processes split the
    batch, the data rendering and the encoders. ``fork`` start (Linux): the children inherit the built task, its
    frozen encoders and the dataset, so nothing is pickled and a notebook can call this directly.
    """
    if workers <= 1 or (dist.is_available() and dist.is_initialized()):
        return fit(task, cfg, get_batch, n_data, ckpt_dir, resume=resume, progress=progress, on_log=on_log)
    if next(task.parameters()).device.type != "cpu":
        raise ValueError("fit_processes runs CPU workers; on a GPU use torchrun (one process per device)")
    ctx = mp.get_context("fork")
    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    messages = ctx.Queue()
    procs = [ctx.Process(target=_fit_worker, daemon=True, name=f"fit-rank{r}",
                         args=(r, workers, port, messages, task, cfg, get_batch, n_data, ckpt_dir, resume))
             for r in range(workers)]
    state_path = Path(ckpt_dir) / "train_state.pt"
    start = int(load_training_state(state_path)["step"]) if resume and state_path.exists() else 0
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"train ({workers} processes)",
               dynamic_ncols=True, mininterval=1.0)
    done: set[int] = set()
    try:
        for p in procs:
            p.start()
        while len(done) < workers:
            try:
                kind, rank, *rest = messages.get(timeout=2.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"training worker {dead[0].name} died (exit code {dead[0].exitcode}); "
                                       f"the last good checkpoint is kept in {state_path}")
                continue
            if kind == "log":
                step, rec = rest
                bar.update(step - bar.n)
                bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k in ("loss", "lr", "samples_per_s")})
                if on_log is not None:
                    on_log(step, rec)
            elif kind == "error":
                error_type, message = rest
                known = {"TrainingDiverged": TrainingDiverged, "ResumeMismatch": ResumeMismatch}
                raise known.get(error_type, RuntimeError)(f"rank {rank}: {message}")
            else:
                done.add(rank)
    finally:
        bar.close()
        for p in procs:
            if p.is_alive() and len(done) < workers:
                p.terminate()
            p.join()
    state = load_training_state(state_path)
    task.load_state_dict(state["model"])
    return pd.DataFrame(state["history"])


def _fit_worker(rank: int, world: int, port: int, messages: Any, task: nn.Module, cfg: TrainConfig,
                get_batch: Callable[[list[int]], dict[str, Any]], n_data: int, ckpt_dir: str | os.PathLike,
                resume: bool) -> None:
    try:
        if os.path.exists("/proc/self"):  # Linux: die with the parent (a killed kernel leaves no orphan training)
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        torch.set_num_threads(1)
        # DDP warns when a conv weight's gradient is not laid out as its bucket (a copy of a few KB per step)
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        log = (lambda step, rec: messages.put(("log", rank, step, rec))) if rank == 0 else None
        fit(task, cfg, get_batch, n_data, ckpt_dir, resume=resume, progress=False, on_log=log)
        dist.destroy_process_group()
        messages.put(("done", rank))
    except BaseException as e:  # reported to the parent, which stops the other workers
        messages.put(("error", rank, type(e).__name__, str(e)))
        raise
