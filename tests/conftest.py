"""Shared test setup: deterministic CPU float32, denormals flushed, runs written to a temporary folder."""
from __future__ import annotations


import pytest
import torch

torch.set_flush_denormal(True)  # random-weight CNNs on CPU hit denormals and run 2-5x slower
# Tiny models: one intra-op thread avoids oversubscription on a 2-core machine (tens of times faster under load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path, monkeypatch):
    """Never write into the repository's reports/ from a test."""
    monkeypatch.setenv("WURST_REPORTS_DIR", str(tmp_path / "reports"))
    monkeypatch.setenv("WURST_RUNS_DIR", str(tmp_path / "reports" / "runs"))
    monkeypatch.setenv("WURST_CACHE_DIR", str(tmp_path / "cache"))
    yield

