"""What fine-tuning a network needs beside the loop: gradient checkpointing, and the seconds per step and peak memory
of a few training steps, measured without disturbing the caller (``studies.finetune``, notebook 12).

Memory on CPU is the anonymous resident memory (``RssAnon``: tensors, gradients, optimizer states, activations,
the data) of a forked process, sampled every millisecond, above what it held when it started; shared libraries'
code pages are left out (a forked process maps them anew as it first runs them, which plain RSS would count), and
the free heap inherited from the parent is handed back first (glibc ``malloc_trim``). Differences of a few MB are
the allocator's noise. On GPU: ``torch.cuda.max_memory_allocated`` above what was allocated, on a copy of the task.
"""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import multiprocessing as mp
import tempfile
import threading
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .loop import TrainConfig, fit


def checkpoint_blocks(stage_c: nn.Module) -> nn.Module:
    """Gradient checkpointing: every block of Stage C recomputes its activations in the backward pass (the state
    dict is unchanged; non-reentrant checkpoints keep dropout's random draws, so resume stays exact)."""
    def checkpointed(forward, *args: Any) -> Tensor:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)

    for block in stage_c.blocks:
        block.forward = functools.partial(checkpointed, block.forward)
    return stage_c


def _anon_rss() -> int:
    """This process's anonymous resident memory (heap: tensors, gradients, optimizer states), in bytes. Shared
    libraries' code pages are left out: a forked process maps them anew as it first runs them."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class _PeakRss:
    """The highest :func:`_anon_rss` seen while the ``with`` block runs, sampled every millisecond by a thread."""

    def __enter__(self) -> "_PeakRss":
        self.base = self.peak = _anon_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _anon_rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_rss())


def _measure(task: nn.Module, cfg: TrainConfig, data: Any, n_data: int, device: torch.device) -> dict[str, float]:
    cfg = dataclasses.replace(cfg, ckpt_every=cfg.steps, log_every=cfg.steps)  # the rate is logged before the save
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            history = fit(task, cfg, data, n_data, tmp, progress=False)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            with _PeakRss() as rss:
                history = fit(task, cfg, data, n_data, tmp, progress=False)
            peak = rss.peak - rss.base
    rate = float(history["samples_per_s"].iloc[-1])
    return {"measured_seconds_per_step": cfg.batch_size / rate, "peak_memory_mb": peak / 2**20}


def _child(conn: Any, task: nn.Module, cfg: TrainConfig, data: Any, n_data: int) -> None:
    try:
        torch.set_num_threads(1)
        try:  # glibc: hand the free heap inherited from the parent back, so that new allocations show in the RSS
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
        conn.send(_measure(task, cfg, data, n_data, torch.device("cpu")))
    except BaseException as e:  # reported to the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _warm_up(task: nn.Module, data: Any) -> None:
    """One forward and backward pass on two items, gradients dropped and the global RNG restored: the kernels'
    code and the thread pools are then resident before a measuring process forks, so they do not count as its
    training memory."""
    rng = torch.get_rng_state()
    try:
        loss, _ = task(data([0, 1]), [torch.Generator().manual_seed(i) for i in range(2)])
        loss.backward()
    finally:
        for q in task.parameters():
            q.grad = None
        torch.set_rng_state(rng)


def measure_step(task: nn.Module, cfg: TrainConfig, data: Any, n_data: int) -> dict[str, float]:
    """Seconds per step and the peak memory of ``cfg.steps`` training steps of ``task`` in one process, without
    touching ``task``: on CPU in a forked process (the peak anonymous RSS above the one it started with:
    gradients, optimizer states, activations, the data; sampled every millisecond), on GPU on a copy
    (``max_memory_allocated`` above what was allocated)."""
    device = next(task.parameters()).device
    if device.type == "cuda":
        return _measure(copy.deepcopy(task), cfg, data, n_data, device)
    _warm_up(task, data)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, task, cfg, data, n_data), daemon=True)
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {"error": f"the measuring process died (exit code {proc.join() or proc.exitcode})"}
    proc.join()
    if "error" in result:
        raise RuntimeError(f"measuring a training step failed: {result['error']}")
    return result
