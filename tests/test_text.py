"""Text encoders: offline tokenizer, shapes, layers, parity with transformers, local weights, the tiny CLIP."""
from __future__ import annotations

import dataclasses
import shutil
import socket

import pytest
import torch
from torch import nn

from wurst_core import text as T
from wurst_core.studies.phases import text_encoder
from wurst_core.text import encoder

SMOKE = T.TINY_CLIP_SIZES["smoke"]
PROMPTS = ["a large red circle in the top left on a white background", "hi", "word " * 100]


@pytest.fixture(scope="module")
def clip():
    """A randomly initialised smoke-size CLIP with perturbed weights (non-trivial norms and biases)."""
    model = T.create_tiny_clip(SMOKE, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_tokenizer_works_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    encoder._simple_tokenizer.cache_clear()
    encoder._bpe_vocab_merges.cache_clear()
    ids = T.tokenize(PROMPTS)
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert (ids[:, 0] == T.SOT_ID).all()
    assert ids[1, :3].tolist() == [T.SOT_ID, ids[1, 1].item(), T.EOT_ID] and (ids[1, 3:] == 0).all()
    assert ids[2, -1] == T.EOT_ID, "a truncated prompt still ends with <|endoftext|>"
    hf = T.hf_tokenizer()(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    eot = ids.argmax(-1)
    for b in range(3):  # same ids up to the end token; HF pads with <|endoftext|>
        assert torch.equal(hf["input_ids"][b, : eot[b] + 1], ids[b, : eot[b] + 1])
    with pytest.raises(ValueError, match="list of strings"):
        T.tokenize([])


def test_text_encoder_shapes_and_open_clip_parity(clip):
    enc = T.TextEncoder.from_clip(clip, SMOKE.name, hf_padding=False)
    assert enc.width == SMOKE.text_width and enc.embed_dim == SMOKE.embed_dim and enc.context_length == 77
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    out = enc(PROMPTS)
    assert out.tokens.shape == (3, 77, SMOKE.text_width) and out.pooled.shape == (3, SMOKE.embed_dim)
    ids = T.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.allclose(out.pooled, clip.encode_text(ids), atol=1e-5)
        x = clip.transformer(clip.token_embedding(ids) + clip.positional_embedding, attn_mask=clip.attn_mask)
        assert torch.allclose(out.tokens, clip.ln_final(x), atol=1e-5)
        assert torch.allclose(T.TextEncoder.from_clip(clip, SMOKE.name, layer="pre_norm", hf_padding=False)(PROMPTS).tokens,
                              x, atol=1e-5)
    # HF-style padding changes only the positions after the end token; the pooled embedding is unchanged
    hf = T.TextEncoder.from_clip(clip, SMOKE.name)(PROMPTS)
    eot = ids.argmax(-1)
    for b in range(2):
        assert torch.equal(hf.tokens[b, : eot[b] + 1], out.tokens[b, : eot[b] + 1])
        assert not torch.allclose(hf.tokens[b, eot[b] + 1:], out.tokens[b, eot[b] + 1:])
    assert torch.equal(hf.pooled, out.pooled)
    with pytest.raises(ValueError, match="layer"):
        T.TextEncoder(enc.text, layer="middle")


def test_shorter_context_only_drops_padding_positions(clip):
    """The tiny profile's 48-position CLIP: with the causal mask its outputs equal the first 48 of the 77-position
    tower with the same weights, for every caption that fits; the ids and every consumer follow the model's context."""
    short_cfg = dataclasses.replace(SMOKE, context_length=48)
    short = T.create_tiny_clip(short_cfg, seed=0)
    init77 = T.create_tiny_clip(SMOKE, seed=0).state_dict()  # same initialisation, first 48 positions
    for k, v in short.state_dict().items():
        assert torch.equal(v, init77[k][:48] if k == "positional_embedding" else init77[k]), k
    sd = {k: v[:48] if k == "positional_embedding" else v for k, v in clip.state_dict().items()}
    short.load_state_dict(sd)
    prompts = PROMPTS[:2]
    for hf_padding in (False, True):
        long_out = T.TextEncoder.from_clip(clip, SMOKE.name, hf_padding=hf_padding)(prompts)
        enc = T.TextEncoder.from_clip(short, short_cfg.name, hf_padding=hf_padding)
        out = enc(prompts)
        assert enc.context_length == 48 and out.tokens.shape == (2, 48, SMOKE.text_width)
        assert torch.allclose(out.tokens, long_out.tokens[:, :48], atol=1e-5)
        assert torch.allclose(out.pooled, long_out.pooled, atol=1e-5)
    from wurst_core.evaluation.preference import ClipJudge

    judge = ClipJudge.from_open_clip(short)  # tokenises to the model's 48 positions
    with torch.no_grad():
        assert torch.allclose(judge.encode_text(prompts), short.encode_text(T.tokenize(prompts, 48)), atol=1e-6)


@pytest.mark.parametrize("layer", T.LAYERS)
def test_matches_transformers_clip_text_model_as_diffusers_calls_it(clip, layer):
    enc = T.TextEncoder.from_clip(clip, SMOKE.name, layer=layer)
    tokenizer, model = T.to_hf(enc, with_projection=True)
    ours, theirs = enc(PROMPTS), T.HFCLIPTextEncoder(tokenizer, model, layer=layer)(PROMPTS)
    assert theirs.tokens.shape == (3, 77, SMOKE.text_width)
    assert torch.allclose(ours.tokens, theirs.tokens, atol=1e-4)
    assert torch.allclose(ours.pooled, theirs.pooled, atol=1e-4)
    if layer == "last":  # the plain CLIPTextModel (diffusers' Würstchen pipelines) gives the same tokens
        _, plain = T.to_hf(enc)
        assert torch.allclose(T.HFCLIPTextEncoder(tokenizer, plain)(PROMPTS).tokens, ours.tokens, atol=1e-4)


def test_from_open_clip_with_local_weights(clip, tmp_path):
    from safetensors.torch import save_file

    ref = T.TextEncoder.from_clip(clip, SMOKE.name)(PROMPTS)
    full = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(full, str(tmp_path / "clip.safetensors"))
    # an open_clip training checkpoint: {"state_dict": {"module.<key>": ...}}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in full.items()}}, tmp_path / "clip.pt")
    for file in ("clip.safetensors", "clip.pt"):
        enc = T.TextEncoder.from_open_clip(SMOKE.name, tmp_path / file)
        out = enc(PROMPTS)
        assert torch.allclose(out.tokens, ref.tokens, atol=1e-6) and torch.allclose(out.pooled, ref.pooled, atol=1e-6)
        assert not any(p.requires_grad for p in enc.parameters())
    bigger = dataclasses.replace(SMOKE, text_layers=2)
    with pytest.raises(ValueError, match="does not match"):
        T.TextEncoder.from_open_clip(T.register_tiny_clip(bigger), tmp_path / "clip.safetensors")
    with pytest.raises(FileNotFoundError):
        T.TextEncoder.from_open_clip(SMOKE.name, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        T.TextEncoder.from_open_clip("ViT-Nonexistent-1")


@pytest.mark.parametrize("name,width,params", [("ViT-H-14", 1024, 354_032_640), ("ViT-bigG-14", 1280, 694_659_840)])
def test_real_architectures_by_name(name, width, params):
    # built on the meta device: shapes and parameter counts without allocating the weights
    enc = T.TextEncoder.from_open_clip(name, device="meta")
    assert enc.width == width and sum(p.numel() for p in enc.parameters()) == params
    out = enc(["a photo of a cat", "a dog"])
    assert out.tokens.shape == (2, 77, width) and out.pooled.shape == (2, width)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The smoke tiny CLIP, trained and saved once for the tests below."""
    directory = tmp_path_factory.mktemp("tiny_clip")
    training = T.ClipTraining(steps=60, batch_size=32, pool=512, eval_size=64, warmup=5, filip=1.0)  # ~17 s, one core
    model, info = T.train_and_save_tiny_clip("smoke", seed=0, progress=False, directory=directory, training=training)
    return model, info, directory


def test_tiny_clip_retrieval_well_above_chance(trained):
    _, info, _ = trained
    m = info["retrieval"]
    assert info["losses"][-1] < 0.8 * info["losses"][0]
    assert m["n"] == 64
    assert m["t2i_top1"] >= 4 * m["chance_top1"], m
    assert m["t2i_top5"] >= 3 * m["chance_top5"], m
    assert m["t2i_background"] >= 0.6, m  # chance 1/4


def test_twins_are_hard_negatives_and_measured(trained):
    import random

    from wurst_core.data import ProceduralDataset
    from wurst_core.data.procedural import COUNTERFACTUALS, parse_caption, signature

    ds = ProceduralDataset(6, 64, seed=0)
    items = [ds[i] for i in range(4)]
    batch = {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}
    out = T.add_twins(batch, [it["attributes"] for it in items], 2, random.Random(0))
    assert out["image"].shape == (6, 3, 64, 64) and len(out["caption"]) == 6
    for original, twin in zip(items[:2], out["caption"][4:]):
        a, b = parse_caption(original["caption"]), parse_caption(twin)
        assert a["background"] == b["background"] and a["count"] == b["count"] and signature(a) != signature(b)
    # measured on held-out scenes: one rate per kind of change, chance 0.5
    model, _, _ = trained
    held_out = ProceduralDataset(32, 64, seed=0, split="val")
    acc = T.twin_accuracy(model, held_out, n=32)
    assert set(acc) == set(COUNTERFACTUALS) and all(0.0 <= v <= 1.0 for v in acc.values())

    class TextBlind(nn.Module):  # sees images, gives every caption the same feature
        visual = type("V", (), {"image_size": (64, 64)})
        logit_scale = torch.zeros(())
        proj = torch.randn(3 * 64 * 64, 16, generator=torch.Generator().manual_seed(0))

        def encode_image(self, x):
            return x.flatten(1) @ self.proj

        def encode_text(self, ids):
            return torch.ones(ids.shape[0], 16)

    # a caption cannot prefer its own image when text carries nothing: exactly one direction of each pair wins
    assert T.twin_accuracy(TextBlind(), held_out, n=32) == {k: 0.5 for k in COUNTERFACTUALS}
    with pytest.raises(ValueError, match="attributes"):
        T.twin_accuracy(model, [{"image": torch.zeros(3, 64, 64), "caption": "x"}])
    with pytest.raises(ValueError, match="twins"):
        T.ClipTraining(steps=1, batch_size=8, twins=0.75)
    with pytest.raises(ValueError, match="twin_kinds"):
        T.ClipTraining(steps=1, batch_size=8, twin_kinds=("texture",))


def test_tiny_clip_saved_reloaded_frozen_and_cached(trained, monkeypatch):
    model, info, directory = trained
    reloaded, cfg, meta = T.load_tiny_clip(directory)
    assert cfg == SMOKE and meta["retrieval"] == info["retrieval"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    # the notebooks' entry point: the profile's cached encoder, frozen, equal to the trained text tower
    shutil.copytree(directory, T.text_encoder_dir("smoke"))
    enc = T.load_tiny_text_encoder("smoke")
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    out = enc(PROMPTS)
    with torch.no_grad():
        assert torch.allclose(out.pooled, model.encode_text(T.tokenize(PROMPTS)), atol=1e-5)
    (T.text_encoder_dir("smoke") / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no tiny-CLIP checkpoint"):
        T.load_tiny_text_encoder("smoke")


def test_a_missing_text_encoder_is_an_error_naming_notebook_01_not_a_silent_training(monkeypatch):
    monkeypatch.setattr(T.clip, "train_tiny_clip", lambda *a, **k: pytest.fail("trained an encoder unasked"))
    assert not (T.text_encoder_dir("smoke") / "model.json").exists()
    for load in (lambda: T.load_tiny_text_encoder("smoke"), lambda: text_encoder("smoke", "penultimate")):
        with pytest.raises(T.MissingTextEncoder, match=r"notebooks/01_text_encoder\.ipynb.*wurst run 01_text_encoder"):
            load()
    assert not T.text_encoder_dir("smoke").exists()


def test_filip_loss_trains_every_caption_token_and_rewards_grounding():
    g = torch.Generator().manual_seed(0)
    b, n, p, d = 4, 7, 9, 16
    patches = nn.functional.normalize(torch.randn(b, p, d, generator=g), dim=-1)
    valid = torch.zeros(b, n, dtype=torch.bool)
    valid[:, 1:5] = True  # words and end token at 1..4; start token and padding excluded
    # grounded captions: each token equals a patch of its own image; shuffled: of the next image
    grounded = patches[:, [0, 2, 4, 6, 8, 1, 3]].clone()
    shuffled = grounded.roll(1, dims=0)
    scale = torch.tensor(10.0)
    assert T.filip_loss(grounded, valid, patches, scale) < 0.1 * T.filip_loss(shuffled, valid, patches, scale)
    tokens = nn.functional.normalize(torch.randn(b, n, d, generator=g), dim=-1).requires_grad_(True)
    T.filip_loss(tokens, valid, patches, scale).backward()
    per_position = tokens.grad.abs().sum(dim=(0, 2))
    assert (per_position[1:5] > 0).all() and (per_position[[0, 5, 6]] == 0).all()  # every caption token, nothing else
    with pytest.raises(ValueError, match="filip"):
        T.ClipTraining(steps=1, batch_size=8, filip=-1.0)
