"""The ``wurst`` command refuses bad input early (issue 18): one ``wurst: error:`` line and exit code 2 for user
errors, ``--debug`` for the traceback; ``wurst generate`` checks its numbers, sizes, output path, precision and
memory before it loads any weights, on a tiny pipeline written to disk."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest
import torch

from wurst_core import generate, pipeline, sizes
from wurst_core.workbench import cli
from wurst_core.workbench.cli import main
from wurst_core.params import ParameterError
from wurst_core.weights import CheckpointError

SIDE = 64  # with ratios 16 and 4: Stage C 4 x 4, Stage B 16 x 16 (the parity Stage B needs multiples of 16)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the device generate picks


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A complete ``wurst generate --weights`` folder: parity-sized networks and the smoke tiny CLIP."""
    from wurst_core.models import build_model, get_config
    from wurst_core.text import TINY_CLIP_SIZES, TextEncoder, create_tiny_clip, save_tiny_clip

    root = tmp_path_factory.mktemp("weights")
    clip_cfg = TINY_CLIP_SIZES["smoke"]
    save_tiny_clip(create_tiny_clip(clip_cfg, seed=0), clip_cfg, root / "te")
    text = TextEncoder.from_open_clip(clip_cfg.name, root / "te" / "model.safetensors")
    torch.manual_seed(0)
    nets = [build_model("c", dataclasses.replace(get_config("c", "parity"), c_cond=text.width)),
            build_model("b", dataclasses.replace(get_config("b", "parity"), clip_embd=text.width)),
            build_model("a", "parity")]
    pipe = pipeline.Pipeline(*nets, text, text, decoder_guidance=2.0, resolution_multiple=16.0, latent_dim_scale=4.0)
    return pipe.save(root / "pipe", text_encoder_dir=root / "te")


def _generate(weights, out, *extra):
    return ["generate", "a", "red cat", "--weights", str(weights), "--out", str(out), "--height", str(SIDE),
            "--width", str(SIDE), "--prior-steps", "2", "--decoder-steps", "2", *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("wurst: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err


def test_generate_writes_the_image(weights, tmp_path):
    from PIL import Image

    assert main(_generate(weights, tmp_path / "sub" / "a.png")) == 0
    assert Image.open(tmp_path / "sub" / "a.png").size == (SIDE, SIDE)
    assert main(_generate(weights, tmp_path / "b.png", "--dtype", "bfloat16")) == 0  # autocast on CPU too


@pytest.mark.parametrize("extra, says", [
    (["--prior-guidance", "nan"], "prior_guidance must be a finite number >= 0, got nan"),
    (["--prior-guidance", "inf"], "prior_guidance must be a finite number >= 0, got inf"),
    (["--prior-guidance", "-1"], "prior_guidance must be a finite number >= 0, got -1.0"),
    (["--decoder-guidance=-inf"], "decoder_guidance must be a finite number >= 0, got -inf"),
    (["--prior-steps", "0"], "prior_steps must be between 1 and 1000, got 0"),
    (["--decoder-steps", "100000"], "decoder_steps must be between 1 and 1000, got 100000"),
    (["--seed", "-1"], "seed must be in [0, 2**64), got -1"),
    (["--height", "0"], "height must be >= 1, got 0"),
    (["--width", "60"], "width 60 px comes out as 64 px with these networks; sizes that work nearby: 64"),
    (["--width", "72"], "width 72 px gives a 20-pixel Stage B latent, not a multiple of 16 as this Stage B needs; "
                        "sizes that work nearby: 64 or 128"),
    (["--dtype", "float16"], "float16 is refused"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
])
def test_generate_refuses_bad_numbers_before_loading(weights, tmp_path, monkeypatch, capsys, extra, says):
    def never(*args, **kwargs):
        raise AssertionError("loaded the weights")

    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", never)
    assert main(_generate(weights, tmp_path / "x.png", *extra)) == 2
    assert says in _error(capsys)
    assert not (tmp_path / "x.png").exists()


def test_float16_message_names_the_alternatives(weights, tmp_path, capsys):
    assert main(_generate(weights, tmp_path / "x.png", "--dtype", "float16")) == 2
    err = _error(capsys)
    assert "bfloat16" in err and "float32" in err and "NaN" in err


@pytest.mark.parametrize("side, says", [
    ("100000", "height 100000 px gives a 25000-pixel Stage B latent, not a multiple of 16 as this Stage B needs; "
               "sizes that work nearby: 99968 or 100032"),
    ("99968", "99968 x 99968 px, 1 image(s) (weights "),  # a size that works: the memory estimate refuses it
])
def test_huge_sizes_are_refused_quickly(weights, tmp_path, monkeypatch, capsys, side, says):
    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded the weights"))
    t0 = time.perf_counter()
    assert main(_generate(weights, tmp_path / "x.png", "--height", side, "--width", side)) == 2
    assert time.perf_counter() - t0 < 5
    err = _error(capsys)
    assert says in err and not (tmp_path / "x.png").exists()
    if side == "99968":
        assert "GiB of memory (estimate), more than the" in err and f"available on {DEVICE}" in err


def test_the_memory_limit_is_the_machine_s(weights, tmp_path, monkeypatch, capsys):
    # a machine with 1 MiB free refuses the 64 px run before loading; with plenty, the loaded pipeline checks again
    monkeypatch.setattr(sizes, "available_memory", lambda device: 2 ** 20)
    assert main(_generate(weights, tmp_path / "x.png")) == 2
    assert f"more than the 870.4 KiB a run may use (85% of the 1.0 MiB available on {DEVICE})" in _error(capsys)
    pipe = pipeline.Pipeline.from_pretrained(weights)
    monkeypatch.setattr(sizes, "available_memory", lambda device: 2 ** 14)
    with pytest.raises(ValueError, match=r"64 x 64 px, 2 image\(s\): needs about .* \(estimate\)"):
        pipe(["a", "b"], height=SIDE, width=SIDE, prior_steps=1, decoder_steps=1,
             callback=lambda *a: pytest.fail("sampled"))


@pytest.mark.parametrize("files, room", [
    ({"memory.max": "max", "memory.current": "5"}, None),                       # v2, no limit
    ({"memory.max": "1000", "memory.current": "900", "memory.stat": "anon 800\ninactive_file 300\n"}, 400),
    ({"memory/memory.limit_in_bytes": "9223372036854771712"}, None),              # v1, no limit
    ({"memory/memory.limit_in_bytes": "1000", "memory/memory.usage_in_bytes": "1200",
      "memory/memory.stat": "total_inactive_file 100\n"}, 0),
])
def test_a_container_s_memory_limit_counts(tmp_path, files, room):
    # the OOM killer of a container acts at its cgroup's limit, below the host's MemAvailable
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sizes._cgroup_headroom(tmp_path) == room


def test_generate_refuses_unknown_keywords_before_loading(weights):
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['generator', 'steps'\]"):
        generate.generate("a cat", weights, steps=3, generator=None)


@pytest.mark.parametrize("out, says", [("x.unknown", "unknown image suffix '.unknown'"),
                                       ("folder", "is a folder")])
def test_generate_refuses_an_output_it_cannot_write(weights, tmp_path, capsys, out, says):
    (tmp_path / "folder").mkdir()
    assert main(_generate(weights, tmp_path / out)) == 2
    assert says in _error(capsys)


@pytest.mark.parametrize("error, code, says", [
    (FileNotFoundError("/x is not a folder of Würstchen checkpoints"), 2, "/x is not a folder"),
    (ParameterError("parameter 'steps' must be int"), 2, "parameter 'steps' must be int"),
    (CheckpointError("m.pt holds a Stage C (prior), not a Stage B"), 2, "m.pt holds a Stage C"),
    (ValueError("bad size"), 2, "bad size"),
    (KeyError("weight_map"), 2, "missing key 'weight_map'"),
    (RuntimeError("boom\nsecond line"), 1, "unexpected RuntimeError: boom (rerun as `wurst --debug ...`"),
])
def test_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys, error, code, says):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, "generate", fail)
    assert main(["generate", "a cat", "--weights", "w"]) == code
    assert says in _error(capsys)
    with pytest.raises(type(error)):
        main(["--debug", "generate", "a cat", "--weights", "w"])


def test_missing_weights_through_python_m(tmp_path):
    run = subprocess.run([sys.executable, "-m", "wurst_core", "generate", "a cat", "--weights",
                          str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"wurst: error: {tmp_path / 'missing'} is not a folder of Würstchen checkpoints\n"


def test_argparse_errors_return_their_code(capsys):
    assert main(["generate", "a cat"]) == 2  # --weights is required
    assert "the following arguments are required: --weights" in capsys.readouterr().err
    assert main(["--help"]) == 0
