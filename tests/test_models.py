"""The networks: exact released sizes and key layouts, the behaviours the paper and the official code define,
and clear errors on bad input. Parity with diffusers and checkpoint formats are in test_weights.py."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from wurst_core.models import (NETWORKS, SEMANTIC_SIZES, STAGE_A_SIZES, STAGE_B_SIZES, STAGE_C_SIZES, SemanticCompressor,
                               StageA, StageB, StageBConfig, StageC, StageCConfig, build_model, count_parameters,
                               preprocess, stage_of, v2_scale, v2_unscale)
from wurst_core.models.blocks import AttnBlock, MultiheadAttention, r_embedding
from wurst_core.paths import REPO_ROOT

# every key and shape of the official v2 modules, from the official module code (docs/reference.md#checkpoint-formats)
SHAPES = REPO_ROOT / "tests" / "fixtures" / "official_v2_state_dict_shapes.json"


@pytest.fixture(scope="module")
def official_shapes() -> dict:
    return json.loads(SHAPES.read_text())


# ---------------------------------------------------------------------------- released sizes (meta device)

@pytest.mark.parametrize("stage,size,params,key", [
    ("a", "paper", 18_406_894, "v2_vqgan"),
    ("semantic", "paper", 20_198_000, "v2_effnet_s"),
    ("semantic", "v1", 117_254_784, "v1_effnet_l"),
    ("b", "paper", 1_055_365_280, "v2_diffnext"),
    ("c", "paper", 993_636_896, "v2_prior"),
])
def test_paper_sizes_match_the_official_modules(official_shapes, stage, size, params, key):
    model = build_model(stage, size, device="meta")
    assert count_parameters(model) == params
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_shapes[key]  # same keys, same shapes: the released .pt loads without renaming


def test_stage_c_paper_variants():
    # v1 prior: c_cond 1024 for CLIP-H (docs/reference.md#stage-c-prior)
    assert count_parameters(build_model("c", "v1", device="meta")) == 993_243_680
    # the paper's 16-block text == diffusers' WuerstchenPrior defaults
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
    with torch.device("meta"):
        reference = WuerstchenPrior()
    assert count_parameters(build_model("c", "paper-16", device="meta")) == count_parameters(reference)
    assert STAGE_C_SIZES["paper-16"].depth == 16


def test_tiny_sizes_fit_the_cpu_budget():
    assert 200_000 <= count_parameters(build_model("a", "tiny")) <= 1_000_000
    for stage in ("b", "c"):
        assert 1_000_000 <= count_parameters(build_model(stage, "tiny")) <= 5_000_000
    for stage, net in NETWORKS.items():
        assert {"tiny", "paper"} <= set(net.sizes), stage


# ------------------------------------------------------------------------------------------------ blocks

def test_r_embedding_is_the_official_sinusoid():
    r = torch.tensor([0.0, 0.25, 1.0])
    emb = r_embedding(r, 64)
    arg = r.double()[:, None] * 10000 * torch.exp(-torch.arange(32).double() * math.log(10000) / 31)
    assert emb.shape == (3, 64) and emb.dtype == torch.float32
    # float32 sin/cos of arguments up to 1e4 are accurate to ~1e-3
    torch.testing.assert_close(emb.double(), torch.cat([arg.sin(), arg.cos()], 1), atol=2e-3, rtol=0)
    assert r_embedding(r, 7).shape == (3, 7) and (r_embedding(r, 7)[:, -1] == 0).all()  # odd width: zero pad


def test_packed_attention_equals_nn_multihead_attention():
    torch.manual_seed(0)
    ours = MultiheadAttention(32, 4).eval()
    ref = torch.nn.MultiheadAttention(32, 4, bias=True, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())  # identical parameter names and shapes
    q, kv = torch.randn(2, 9, 32), torch.randn(2, 20, 32)
    torch.testing.assert_close(ours(q, kv), ref(q, kv, kv, need_weights=False)[0], atol=1e-6, rtol=1e-5)


def test_attn_block_attends_to_the_feature_map_and_the_text():
    torch.manual_seed(0)
    block = AttnBlock(16, 8, nhead=2, self_attn=True).eval()
    with torch.no_grad():
        block.attention["attn"].out_proj.weight.normal_()
    x, cond = torch.randn(1, 16, 3, 3), torch.randn(1, 5, 8)
    x2 = x.clone()
    x2[0, :, 0, 0] += torch.randn(16)  # not a constant: the LayerNorm over channels would remove it
    out = block(x, cond)
    # self-attention: changing one position changes the output at the others
    assert (block(x2, cond)[..., 2, 2] - out[..., 2, 2]).abs().max() > 1e-4
    assert (block(x, cond + 1)[..., 2, 2] - out[..., 2, 2]).abs().max() > 1e-4
    no_self = AttnBlock(16, 8, nhead=2, self_attn=False).eval()
    no_self.load_state_dict(block.state_dict())
    assert (no_self(x, cond) - out).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------- Stage A

@pytest.fixture(scope="module")
def stage_a() -> StageA:
    torch.manual_seed(0)
    return build_model("a", "tiny").eval()


def test_stage_a_shapes_and_scale_factor(stage_a):
    images = torch.rand(2, 3, 64, 64)
    latents = stage_a.encode(images)
    assert latents.shape == (2, 4, 16, 16)  # f4
    raw = stage_a.down_blocks(stage_a.in_block(images))
    torch.testing.assert_close(latents, raw / 0.3764)  # encode divides ...
    torch.testing.assert_close(stage_a.decode(latents), stage_a.out_block(stage_a.up_blocks(raw)))  # decode multiplies
    assert stage_a.decode(latents).shape == images.shape


def test_stage_a_quantisation(stage_a):
    images = torch.rand(2, 3, 32, 32)
    q, z, indices, loss = stage_a.encode_full(images)
    codebook = stage_a.vquantizer.codebook.weight
    s = stage_a.config.scale_factor
    # every quantised vector is its nearest codebook entry
    flat = (z * s).permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(indices.view(-1), torch.cdist(flat, codebook).argmin(1))
    torch.testing.assert_close(q * s, codebook[indices].permute(0, 3, 1, 2))
    torch.testing.assert_close(stage_a.encode(images, quantize=True), q)
    torch.testing.assert_close(loss, 1.25 * F.mse_loss(q * s, z * s))  # codebook + 0.25 commitment terms
    torch.testing.assert_close(stage_a.decode_indices(indices), stage_a.decode(q), atol=1e-5, rtol=1e-4)
    recon, vq_loss, idx = stage_a(images)
    torch.testing.assert_close(recon, stage_a.decode(q), atol=1e-5, rtol=1e-4)
    assert torch.equal(idx, indices) and torch.isclose(vq_loss, loss)


def test_stage_a_straight_through_gradient():
    torch.manual_seed(0)
    model = build_model("a", "parity").train()
    recon, loss, _ = model(torch.rand(2, 3, 16, 16))
    (recon.square().mean() + loss).backward()
    assert model.in_block[1].weight.grad.abs().sum() > 0  # the reconstruction loss reaches the encoder
    assert model.vquantizer.codebook.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ Semantic Compressor

def test_semantic_latent_sizes():
    # paper §3.1: 24 x 24 latents; 768 px gives them with EfficientNetV2-S, "786" px gives 25 x 25
    model = build_model("semantic", "paper", device="meta")
    for size, side in ((768, 24), (786, 25), (1024, 32)):
        assert model(torch.empty(1, 3, size, size, device="meta")).shape == (1, 16, side, side)
    assert SEMANTIC_SIZES["paper"].latent_size == 24 and SEMANTIC_SIZES["v1"].latent_size == 12
    tiny = build_model("semantic", "tiny")
    assert tiny(torch.rand(2, 3, 96, 96)).shape == (2, 16, SEMANTIC_SIZES["tiny"].latent_size, 3)


def test_tiny_compressor_stages_set_the_latent_side_and_survive_save_and_load(tmp_path):
    from wurst_core.weights import load_model, save_model

    for widths, side in (((32, 64, 128), 8), ((32, 64, 128, 128), 4), ((8, 8, 8, 8, 16), 2)):
        cfg = dataclasses.replace(SEMANTIC_SIZES["tiny"], tiny_widths=widths, image_size=64)
        model = SemanticCompressor(cfg).eval()
        x = torch.rand(2, 3, 64, 64)
        assert cfg.latent_size == side and model(x).shape == (2, 16, side, side)
        save_model(model, tmp_path / str(side))
        # the bare weights file has no stored config: the widths are inferred from the shapes
        loaded = load_model(tmp_path / str(side) / "model.safetensors", "semantic").eval()
        assert loaded.config.tiny_widths == widths and torch.equal(loaded(x), model(x))


def test_semantic_normalisation_and_v2_scaling():
    torch.manual_seed(0)
    model = build_model("semantic", "tiny").eval()
    images = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = model.mapper(model.backbone((images - mean[:, None, None]) / std[:, None, None]))
    torch.testing.assert_close(model(images), expected)
    assert not any(k in model.state_dict() for k in ("mean", "std"))  # not in the official effnet_state_dict
    scaled = SemanticCompressor(dataclasses.replace(model.config, v2_scaling=True)).eval()
    scaled.load_state_dict(model.state_dict())
    torch.testing.assert_close(scaled(images), (expected + 1) / 42)
    torch.testing.assert_close(v2_unscale(v2_scale(expected)), expected, atol=1e-5, rtol=1e-5)


def test_preprocess_resizes_bicubically():
    images = torch.rand(2, 3, 128, 128)
    out = preprocess(images, 96)
    assert out.shape == (2, 3, 96, 96) and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out, F.interpolate(images, size=(96, 96), mode="bicubic", antialias=True).clamp(0, 1))
    assert preprocess(images, (64, 32)).shape == (2, 3, 64, 32)
    model = build_model("semantic", "tiny").eval()
    assert model.encode(torch.rand(1, 3, 128, 256)).shape == (1, 16, 2, 3)  # longer side -> 96 px, aspect kept


# ------------------------------------------------------------------------------------------ Stages B, C

def _randomise(model: torch.nn.Module, std: float = 0.05) -> None:
    """Perturb every parameter: the official init zeroes the timestep mappers, GRN and output convs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)


def test_stage_c_forward_and_a_b_head():
    torch.manual_seed(0)
    model = build_model("c", "tiny").eval()
    x, r, text = torch.randn(2, 16, 3, 3), torch.rand(2), torch.randn(2, 77, 128)
    # the official init zeroes the output conv: A = B = 0, so the head returns the input (paper §3.2)
    torch.testing.assert_close(model(x, r, text), x / (1 + 1e-5))
    _randomise(model)
    eps = model(x, r, text)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert (model(x, r * 0.5, text) - eps).abs().max() > 0  # depends on r ...
    assert (model(x, r, text + 1) - eps).abs().max() > 0   # ... and on the text


def test_stage_b_forward_and_conditioning():
    torch.manual_seed(0)
    model = build_model("b", "tiny").eval()
    cfg = model.config
    x, r = torch.randn(2, 4, 16, 16), torch.rand(2)
    sc, text = torch.randn(2, 16, 3, 3), torch.randn(2, 77, cfg.clip_embd)
    # zero output conv at init: a = 0, b = sigmoid(0) * (1 - 2e-3) + 1e-3 = 0.5
    torch.testing.assert_close(model(x, r, sc, text), x / 0.5)
    _randomise(model)
    eps = model(x, r, sc, text)
    assert eps.shape == x.shape
    assert (model(x, r, sc + 1, text) - eps).abs().max() > 0  # the Semantic Compressor map is injected
    assert (model(x, r, sc, text + 1) - eps).abs().max() > 0
    assert (model(x, 0.3, sc, text) - model(x, torch.full((2,), 0.3), sc, text)).abs().max() == 0  # scalar r


def test_stage_b_injects_into_every_resblock_of_the_injected_levels():
    model = build_model("b", "paper", device="meta")
    cfg = model.config
    for blocks, inject, c, level in zip(model.down_blocks, cfg.inject_effnet, cfg.c_hidden, range(4)):
        for block in blocks:
            if type(block).__name__ == "ResBlockStageB":
                assert block.channelwise[0].in_features == c + (cfg.c_cond if inject else 0), level
    assert [i for i, m in enumerate(model.effnet_mappers) if m is not None] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("call,message", [
    (lambda: build_model("c", "parity")(torch.randn(1, 4, 3, 3), torch.rand(1), torch.randn(1, 77, 32)), "16 channels"),
    (lambda: build_model("c", "parity")(torch.randn(2, 16, 3, 3), torch.rand(2), torch.randn(1, 77, 32)), "batch"),
    (lambda: build_model("c", "parity")(torch.randn(2, 16, 3, 3), torch.rand(3), torch.randn(2, 77, 32)), "r must"),
    (lambda: build_model("c", "parity")(torch.randn(2, 16, 3, 3), torch.rand(2), torch.randn(2, 77, 31)), "32 features"),
    (lambda: build_model("b", "parity")(torch.randn(1, 4, 12, 12), torch.rand(1), torch.randn(1, 16, 3, 3),
                                        torch.randn(1, 77, 24)), "multiples of 16"),
    (lambda: build_model("a", "parity").encode(torch.rand(1, 3, 30, 30)), "multiples of 4"),
    (lambda: build_model("a", "parity").encode(torch.rand(3, 30, 30)), "4 dimensions"),
    (lambda: StageCConfig(c=30, nhead=4), "divisible"),
    (lambda: StageBConfig(blocks=(1, 1)), "entries"),
    (lambda: StageBConfig(level_config=("CT", "CTX", "CTA", "CTA")), "letters"),
    (lambda: build_model("d", "tiny"), "unknown stage"),
    (lambda: build_model("c", "huge"), "unknown size"),
])
def test_bad_input_gives_a_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_registry_and_stage_names():
    for stage, net in NETWORKS.items():
        for size, config in net.sizes.items():
            assert isinstance(config, net.config) and dataclasses.is_dataclass(config), (stage, size)
    assert stage_of(StageC(STAGE_C_SIZES["parity"])) == "c" and stage_of(StageB(STAGE_B_SIZES["parity"])) == "b"
    assert stage_of(StageA(STAGE_A_SIZES["parity"])) == "a"
    with pytest.raises(dataclasses.FrozenInstanceError):
        STAGE_C_SIZES["tiny"].depth = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------------ architecture facts

def test_latent_shapes_and_compression_ratios():
    from wurst_core.studies import architecture as arch

    assert arch.latent_sides(1024) == {"image": 1024, "stage_a": 256, "semantic_input": 768, "stage_c": 24}
    shapes = arch.pipeline_shapes("tiny", 128).set_index("step")
    assert shapes.loc["Stage A encode -> X_q latent", "shape (C, H, W)"] == "(4, 32, 32)"
    assert shapes.loc["Semantic Compressor -> C_sc", "shape (C, H, W)"] == "(16, 3, 3)"  # measured, 96 px input
    assert shapes.loc["Stage A decode -> image", "shape (C, H, W)"] == "(3, 128, 128)"
    ratios = arch.compression_ratios(128, "tiny")
    assert ratios["stage_a_spatial"] == 4 and ratios["stage_c_spatial"] == round(128 / 3, 2)


def test_flops_match_the_diffusers_reference_count():
    from wurst_core.studies import architecture as arch

    # docs/reference.md#parameter-counts-and-flops: Paella VQ decode 256² -> 1024² = 2.172 TFLOP
    assert round(arch.forward_flops("a", "paper", 1024)["decode"] / 1e12, 3) == 2.172
    table = arch.flops_table(["parity"], 128)
    assert set(table["network"]) == {"Stage A (VQGAN)", "Stage B (DiffNeXt)", "Stage C (prior)"}
    assert (table["GFLOP"] > 0).all()
    # prior at 24² 1.154 TFLOP, decoder at 256² 2.858 TFLOP (meta device: a few seconds, no memory)
    assert round(arch.forward_flops("c", "paper", 1024)["forward"] / 1e12, 3) == 1.154
    assert round(arch.forward_flops("b", "paper", 1024)["forward"] / 1e12, 3) == 2.858
