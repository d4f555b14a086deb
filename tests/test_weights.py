"""Checkpoints: parity with diffusers (the numerical reference) through every released format, export to
diffusers, our own format, and loud failures for checkpoints that do not fit.

Parity recipe (issue 3): build the diffusers model with random weights, write it as a diffusers folder and in the
original ``.pt`` layout (official key names, packed ``in_proj`` attention), load it with ``load_model`` and compare
outputs in float32, eval mode: max |ours - diffusers| <= 1e-5 * max(1, max |diffusers|).
"""
from __future__ import annotations

import argparse
import dataclasses
import pickle

import pytest
import torch

from wurst_core.models import STAGE_A_SIZES, STAGE_B_SIZES, STAGE_C_SIZES, build_model
from wurst_core.weights import (CheckpointError, config_to_diffusers, diffusers_from_official, export_diffusers,
                                load_model, save_model)

import diffusers.pipelines.deprecated.wuerstchen as dw  # noqa: E402  (diffusers: the numerical reference)

DIFFUSERS = {"a": dw.PaellaVQModel, "b": dw.WuerstchenDiffNeXt, "c": dw.WuerstchenPrior}
SIZES = {"a": STAGE_A_SIZES, "b": STAGE_B_SIZES, "c": STAGE_C_SIZES}
MAX_DIFF: dict[str, float] = {}  # filled by the parity tests; printed with -s


@pytest.fixture(scope="module", autouse=True)
def _print_max_differences():
    yield
    for what, diff in sorted(MAX_DIFF.items()):
        print(f"\n  max |ours - diffusers| {what:36s} {diff:.3g}", end="")


def close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    diff = (ours - ref).abs().max().item()
    MAX_DIFF[what] = max(MAX_DIFF.get(what, 0.0), diff)
    assert ours.shape == ref.shape
    assert diff <= 1e-5 * max(1.0, ref.abs().max().item()), f"{what}: max abs diff {diff:.3g}"


@pytest.fixture(autouse=True)
def _fast_diffusers_init(monkeypatch):
    # WuerstchenDiffNeXt._init_weights walks every block for every module (quadratic: ~20 s for the tiny size);
    # these tests overwrite every weight anyway
    monkeypatch.setattr(dw.WuerstchenDiffNeXt, "_init_weights", lambda self, m: None)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for every tensor (the inits zero many, which would hide layout errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        out = getattr(model, "out", None)
        if out is not None:  # the prior's (x - A) / |1 - B| explodes where B ~ 1: keep B small
            out[1].weight.mul_(0.05)
    return model.eval()


def diffusers_model(stage: str, config, seed: int = 0) -> torch.nn.Module:
    kwargs = {k: v for k, v in config_to_diffusers(config).items() if not k.startswith("_")}
    return randomise(DIFFUSERS[stage](**kwargs), seed)


def official_layout(sd: dict) -> dict:
    """diffusers keys -> the original ``.pt`` keys, written here independently of wurst_core.weights:
    q/k/v packed the way nn.MultiheadAttention stores them; the VQ codebook under its torchtools name."""
    out = {}
    for k, v in sd.items():
        if ".attention.to_q." in k:
            base, kind = k.split(".to_q.")
            out[f"{base}.attn.in_proj_{kind}"] = torch.cat([sd[f"{base}.to_{p}.{kind}"] for p in "qkv"])
        elif ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        elif ".attention.to_out.0." in k:
            out[k.replace("to_out.0", "attn.out_proj")] = v
        elif k == "vquantizer.embedding.weight":
            out["vquantizer.codebook.weight"] = v
        else:
            out[k] = v
    return out


def compare(stage: str, ours: torch.nn.Module, ref: torch.nn.Module, config, what: str) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        if stage == "c":
            x, r, text = torch.randn(2, config.c_in, 4, 4), torch.rand(2), torch.randn(2, 77, config.c_cond)
            close(ours(x, r, text), ref(x, r, text), what)
        elif stage == "b":
            x, r = torch.randn(2, config.c_in, 32, 32), torch.rand(2)
            sc, text = torch.randn(2, config.effnet_embd, 3, 3), torch.randn(2, 77, config.clip_embd)
            close(ours(x, r, sc, text), ref(x, r, sc, text), what)
        else:
            images, s = torch.rand(2, 3, 32, 32), config.scale_factor
            h = ref.encode(images).latents
            close(ours.encode(images) * s, h, what + " encode")
            close(ours.decode(h / s), ref.decode(h).sample, what + " decode")  # the pipeline decodes latents * s
            z_q, loss, (_, _, indices) = ref.vquantizer(h)
            ours_q, ours_idx, ours_loss = ours.quantize(h)
            assert torch.equal(ours_idx.view(-1), indices.view(-1))
            close(ours_q, z_q, what + " quantize")
            close(ours_loss, loss, what + " vq loss")


# ------------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("size", ["tiny", "parity"])
@pytest.mark.parametrize("stage", ["a", "b", "c"])
def test_parity_through_the_diffusers_folder(tmp_path, stage, size):
    config = SIZES[stage][size]
    ref = diffusers_model(stage, config)
    ref.save_pretrained(tmp_path / "model")
    ours = load_model(tmp_path / "model")
    assert ours.config == config and not ours.training
    compare(stage, ours, ref, config, f"{stage}/{size}/diffusers")


@pytest.mark.parametrize("size", ["tiny", "parity"])
@pytest.mark.parametrize("stage", ["a", "b", "c"])
def test_parity_through_the_original_pt_layout(tmp_path, stage, size):
    config = SIZES[stage][size]
    ref = diffusers_model(stage, config)
    sd = official_layout(ref.state_dict())
    path = tmp_path / "model.pt"
    if stage == "a":
        torch.save({"state_dict": sd}, path)  # vqgan_f4_v1_500k.pt
    elif stage == "b":  # model_v2_stage_b.pt also carries the Semantic Compressor
        effnet = build_model("semantic", "tiny")
        randomise(effnet, seed=3)
        torch.save({"state_dict": sd, "effnet_state_dict": effnet.state_dict(), "iter": 1}, path)
    else:  # model_v2_stage_c.pt: the EMA weights are the release; the raw ones must not be picked
        other = official_layout(diffusers_model(stage, config, seed=7).state_dict())
        torch.save({"state_dict": other, "ema_state_dict": sd, "iter": 1}, path)
    ours = load_model(path)  # the configuration is inferred from the shapes (+ the size registry for the heads)
    assert ours.config == config
    compare(stage, ours, ref, config, f"{stage}/{size}/pt")
    if stage == "b":
        sc = load_model(path, stage="semantic")
        assert sc.config.backbone == "tiny"
        torch.testing.assert_close(sc.state_dict(), effnet.state_dict(), atol=0, rtol=0)


def test_parity_with_the_diffusers_unit_test_prior(tmp_path):
    # a config outside the registry (c_in 2, c_r 8): the diffusers folder carries it, the .pt needs config=
    config = dataclasses.replace(STAGE_C_SIZES["parity"], c_in=2, c=8, c_r=8, c_cond=32, nhead=2)
    ref = diffusers_model("c", config)
    ref.save_pretrained(tmp_path / "prior")
    compare("c", load_model(tmp_path / "prior"), ref, config, "c/diffusers-unit-test/diffusers")
    torch.save({"ema_state_dict": official_layout(ref.state_dict())}, tmp_path / "prior.pt")
    inferred = load_model(tmp_path / "prior.pt")
    assert inferred.config.nhead == 1  # shapes cannot tell the heads: 8 is not a multiple of 64 -> 1 head
    compare("c", load_model(tmp_path / "prior.pt", config=config), ref, config, "c/diffusers-unit-test/pt")


@pytest.mark.parametrize("stage", ["a", "b", "c"])
def test_export_to_diffusers(tmp_path, stage):
    config = SIZES[stage]["parity"]
    ours = randomise(build_model(stage, "parity"), seed=5)
    export_diffusers(ours, tmp_path / "export")
    ref = DIFFUSERS[stage].from_pretrained(tmp_path / "export").eval()
    compare(stage, ours, ref, config, f"{stage}/parity/export")
    assert load_model(tmp_path / "export").config == config  # and back


def test_paper_layouts_convert_to_the_diffusers_keys():
    # the converters on the full released layouts (meta device: no memory)
    for stage, size in (("a", "paper"), ("b", "paper"), ("c", "paper")):
        ours = build_model(stage, size, device="meta")
        with torch.device("meta"):
            kwargs = {k: v for k, v in config_to_diffusers(ours.config).items() if not k.startswith("_")}
            ref = DIFFUSERS[stage](**kwargs)
        converted = {k: tuple(v.shape) for k, v in diffusers_from_official(stage, ours.state_dict()).items()}
        assert converted == {k: tuple(v.shape) for k, v in ref.state_dict().items()}, stage


def test_pipeline_folder_needs_the_stage(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    for stage, sub in (("a", "vqgan"), ("b", "decoder")):
        diffusers_model(stage, SIZES[stage]["parity"]).save_pretrained(tmp_path / sub)
    assert type(load_model(tmp_path, stage="a")).__name__ == "StageA"
    assert type(load_model(tmp_path, stage="b")).__name__ == "StageB"
    with pytest.raises(CheckpointError, match="pass stage="):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="pass stage="):
        load_model(tmp_path, stage="c")


# ------------------------------------------------------------------------------------------ our format

def test_save_and_load_our_format(tmp_path):
    model = randomise(build_model("b", "tiny"), seed=2)
    save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), atol=0, rtol=0)
    half = load_model(tmp_path / "ckpt" / "model.safetensors", dtype=torch.bfloat16)
    assert half.clf[1].weight.dtype == torch.bfloat16
    sc = randomise(build_model("semantic", "tiny"), seed=4)
    save_model(sc, tmp_path / "sc")
    assert torch.equal(load_model(tmp_path / "sc", stage="semantic").mapper[1].running_var, sc.mapper[1].running_var)
    with pytest.raises(ValueError, match="no diffusers counterpart"):
        export_diffusers(sc, tmp_path / "nope")


# ------------------------------------------------------------------------------------- loud failures

def test_a_checkpoint_of_another_size_lists_the_bad_keys(tmp_path):
    tiny, parity = build_model("c", "tiny"), build_model("c", "parity")
    save_model(tiny, tmp_path / "tiny")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "tiny", config="parity")
    text = str(err.value)
    extra = len(set(tiny.state_dict()) - set(parity.state_dict()))  # tiny has 8 triplets, parity 2
    assert "missing keys" not in text and f"unexpected keys ({extra}):\n    blocks.6.channelwise.0.bias" in text
    assert "projection.weight: checkpoint (128, 16, 1, 1) vs model (32, 16, 1, 1)" in text


def test_bare_state_dicts_in_either_layout(tmp_path):
    from safetensors.torch import save_file

    config = STAGE_C_SIZES["parity"]
    ref = diffusers_model("c", config)
    save_file(ref.state_dict(), tmp_path / "diffusers_keys.safetensors")
    torch.save(official_layout(ref.state_dict()), tmp_path / "official_keys.pt")
    for name in ("diffusers_keys.safetensors", "official_keys.pt"):
        compare("c", load_model(tmp_path / name), ref, config, f"c/parity/bare-{name.split('.')[-1]}")


def test_wrong_stage_truncated_file_and_unsafe_pickle(tmp_path):
    save_model(build_model("c", "parity"), tmp_path / "c")
    with pytest.raises(CheckpointError, match="holds a Stage C .prior., not a Stage B"):
        load_model(tmp_path / "c", stage="b")
    sd = build_model("a", "parity").state_dict()
    torch.save({"state_dict": sd}, tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "cut.pt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "cut.safetensors")
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "evil.pt")  # arbitrary object
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "evil.pt")
    # our own message: torch's advises an unrestricted load, which would run the file's code
    assert str(err.value) == (f"{tmp_path / 'evil.pt'} is not a plain tensor checkpoint: it holds pickled Python "
                              f"objects (argparse.Namespace), refused for safety (unpickling can run arbitrary code); "
                              f"keep only tensors in it, or use .safetensors")
    assert err.value.__cause__ is None and err.value.__suppress_context__  # not even in a --debug traceback
    with open(tmp_path / "plain.pkl", "wb") as f:  # a plain (non-zip) pickle of an object
        pickle.dump({"state_dict": sd, "args": argparse.Namespace(lr=1e-4)}, f)
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint") as err:
        load_model(tmp_path / "plain.pkl")
    assert "weights_only" not in str(err.value)
    with pytest.raises(CheckpointError, match="Semantic Compressor is saved with Stage B"):
        load_model(tmp_path / "a.pt", stage="semantic")


@pytest.mark.parametrize("stage, key, shape, closest", [
    # Stage C's width is read off projection.weight: damaged, it made all 38 other tensors look mis-shaped
    ("c", "projection.weight", (64, 16, 1, 1), "size 'parity' with c_cond=24"),
    # Stage B's output channels are read off clf.1.weight: damaged, the correct clf.1.bias was the one named
    ("b", "clf.1.weight", (8, 16, 1, 1), "size 'parity'"),
    # Stage B's patch size is read off embedding.1.weight
    ("b", "embedding.1.weight", (16, 36, 1, 1), "size 'parity'"),
])
def test_a_damaged_tensor_that_the_architecture_is_read_from_is_named(tmp_path, stage, key, shape, closest):
    config = dataclasses.replace(SIZES[stage]["parity"], **({"c_cond": 24} if stage == "c" else {}))
    sd = build_model(stage, config).state_dict()
    expected = tuple(sd[key].shape)
    sd[key] = torch.zeros(shape)
    torch.save({"state_dict": sd}, tmp_path / "m.pt")  # a .pt stores no config: it is inferred from the shapes
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "m.pt")
    text = str(err.value)
    assert f"closest architecture: {closest} (" in text and f"Keys that do not fit it (1 of {len(sd)}):" in text
    assert text.endswith(f"\n    {key}: expected {expected}, got {shape}") and text.count("\n") == 1
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_model(tmp_path / "m.pt", config=config)  # the architecture given: the one bad key, as before


def test_a_checkpoint_far_from_every_size_keeps_the_full_listing(tmp_path):
    # a custom size with one bad key inference does not read: the registry is no closer, the listing stays
    config = dataclasses.replace(STAGE_C_SIZES["parity"], c_in=2, c=8, c_r=8, nhead=1)
    sd = build_model("c", config).state_dict()
    sd["out.1.bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "m.pt")
    text = str(err.value)
    assert "mis-shaped keys (1):\n    out.1.bias: checkpoint (3,) vs model (4,)" in text
    assert "architecture read off projection.weight, cond_mapper.0.weight, blocks.1.mapper.weight" in text


def test_float16_is_refused(tmp_path):
    save_model(build_model("c", "parity"), tmp_path / "c")
    for dtype in (torch.float16, "float16", "half"):
        with pytest.raises(ValueError, match="float16 is refused.*NaN.*use bfloat16 .* or float32"):
            load_model(tmp_path / "c", dtype=dtype)
    assert load_model(tmp_path / "c", dtype="bfloat16").projection.weight.dtype == torch.bfloat16


def test_a_missing_key_is_not_a_partial_load(tmp_path):
    sd = build_model("b", "parity").state_dict()
    del sd["clf.1.bias"]
    torch.save({"state_dict": sd}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n    clf.1.bias"):
        load_model(tmp_path / "b.pt")


def test_hub_id_offline_says_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub

    def not_cached(*args, local_files_only=False, **kwargs):
        assert local_files_only, "tried the network while offline"
        raise FileNotFoundError("not in the cache")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_cached)
    with pytest.raises(CheckpointError) as err:
        load_model("warp-ai/wuerstchen-prior")
    assert "offline" in str(err.value) and "hf download warp-ai/wuerstchen-prior" in str(err.value)
    assert "--include 'prior/*'" in str(err.value)
    with pytest.raises(CheckpointError, match="hf download dome272/wuerstchen model_v2_stage_c.pt"):
        load_model("dome272/wuerstchen/model_v2_stage_c.pt", stage="c")
    with pytest.raises(CheckpointError, match="holds stages"):
        load_model("warp-ai/wuerstchen-prior", stage="b")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


def test_hub_id_uses_the_cache(tmp_path, monkeypatch):
    import huggingface_hub

    ref = diffusers_model("c", STAGE_C_SIZES["parity"])
    ref.save_pretrained(tmp_path / "snapshot" / "prior")
    (tmp_path / "snapshot" / "model_index.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns=None, local_files_only=False: str(tmp_path / "snapshot"))
    ours = load_model("warp-ai/wuerstchen-prior")
    compare("c", ours, ref, STAGE_C_SIZES["parity"], "c/parity/hub-cache")


def test_combined_pipeline_folder(tmp_path):
    # WuerstchenCombinedPipeline.save_pretrained names the prior folder prior_prior/
    (tmp_path / "model_index.json").write_text("{}")
    ref = diffusers_model("c", STAGE_C_SIZES["parity"])
    ref.save_pretrained(tmp_path / "prior_prior")
    diffusers_model("a", STAGE_A_SIZES["parity"]).save_pretrained(tmp_path / "vqgan")
    compare("c", load_model(tmp_path, stage="c"), ref, STAGE_C_SIZES["parity"], "c/parity/combined-pipeline")
