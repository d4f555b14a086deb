"""benchmarks/bench_inference.py (the paper's Figure 4) runs end to end on the parity sizes: its table has both
systems and the ratio column, and --out writes the CSV, JSON and plot. Seconds only; nothing about the timings."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_inference.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_inference", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parity_run_prints_both_systems_and_the_ratio(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "bench"
    assert bench.main(["--size", "parity", "--batch", "1", "2", "--repeats", "1", "--prior-steps", "2",
                       "--decoder-steps", "2", "--baseline-steps", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "random" in text and "text encoding: excluded for both" in text
    head = next(line for line in text.splitlines() if line.split()[:1] == ["batch"] and "s/img" in line)
    for column in ("Würstchen s/img", "baseline s/img", "ratio baseline/Würstchen"):
        assert column in head

    rows = list(csv.DictReader((out / "inference.csv").open()))
    assert [int(r["batch"]) for r in rows] == [1, 2]
    for r in rows:
        w, b = float(r["wuerstchen_s_per_image"]), float(r["baseline_s_per_image"])
        assert w > 0 and b > 0
        assert float(r["ratio_baseline_over_wuerstchen"]) == pytest.approx(b / w)
        assert int(r["image_side"]) == 64  # the same output resolution for both systems
    saved = json.loads((out / "inference.json").read_text())
    assert saved["settings"]["size"] == "parity" and len(saved["rows"]) == 2
    assert (out / "inference.png").stat().st_size > 0


def test_cuda_is_refused_cleanly_without_a_gpu(capsys):
    bench = _load_bench()
    if bench.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cuda"])
    assert e.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
