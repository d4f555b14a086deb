"""Datasets: determinism, ground truth, caption consistency, folder/manifest/shard loading with bad files, batching."""
from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from wurst_core import data
from wurst_core.data import emoji, procedural, transforms
from wurst_core.data.procedural import BACKGROUNDS, COLORS, HPOS, SHAPES, SIZES, VPOS, ProceduralDataset


def _same(a: dict, b: dict) -> bool:
    return torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"] and a["attributes"] == b["attributes"]


# ----------------------------------------------------------------------------------------- procedural
def test_procedural_is_a_function_of_seed_split_and_index():
    a, b = ProceduralDataset(50, 32, seed=3), ProceduralDataset(50, 32, seed=3)
    assert all(_same(a[i], b[i]) for i in (7, 3, 7, 49))  # any access order
    other_seed, val = ProceduralDataset(50, 32, seed=4), ProceduralDataset(50, 32, seed=3, split="val")
    assert sum(a[i]["caption"] != other_seed[i]["caption"] for i in range(20)) >= 15
    assert sum(a[i]["caption"] != val[i]["caption"] for i in range(20)) >= 15
    # the same scene at another resolution: same attributes and caption
    assert ProceduralDataset(50, 48, seed=3)[7]["caption"] == a[7]["caption"]
    with pytest.raises(IndexError):
        a[50]
    with pytest.raises(ValueError, match="split"):
        ProceduralDataset(10, split="holdout")


def test_procedural_attribute_schema():
    ds = ProceduralDataset(300, 16, seed=0)
    counts = set()
    for i in range(len(ds)):
        attrs = ds.attributes(i)
        assert set(attrs) == {"background", "count", "objects"} and attrs["background"] in BACKGROUNDS
        assert attrs["count"] == len(attrs["objects"]) and 1 <= attrs["count"] <= 3
        counts.add(attrs["count"])
        cells = set()
        for o in attrs["objects"]:
            assert set(o) == {"shape", "color", "size", "cx", "cy", "hpos", "vpos"}
            assert o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in SIZES
            assert o["hpos"] == HPOS[int(o["cx"] * 3)] and o["vpos"] == VPOS[int(o["cy"] * 3)]
            cells.add((o["hpos"], o["vpos"]))
        assert len(cells) == attrs["count"], "objects share a grid cell"
    assert counts == {1, 2, 3}
    assert not set(BACKGROUNDS) & set(COLORS), "a caption word must identify its role"


def test_captions_state_exactly_the_visible_attributes():
    ds = ProceduralDataset(400, 16, seed=1)
    templates: set[str] = set()
    patterns = {t: re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(t))) for t in procedural.TEMPLATES}
    vocab = re.compile(r"\b({})\b".format("|".join([*COLORS, *SHAPES, *SIZES, *BACKGROUNDS])))
    for i in range(len(ds)):
        item = ds[i]
        attrs, text = item["attributes"], item["caption"]
        parsed = procedural.parse_caption(text)
        assert procedural.signature(parsed) == procedural.signature(attrs), text
        # no attribute word beyond those of the scene: one colour, shape and size word per object, one background
        assert len(vocab.findall(text)) == 3 * attrs["count"] + 1, text
        for number, word in procedural.COUNT_WORDS.items():
            if re.search(rf"\b{word} (shape|shapes)\b", text):
                assert number == attrs["count"], text
        templates |= {t for t, pattern in patterns.items() if pattern.fullmatch(text)}
    assert templates == set(procedural.TEMPLATES), "every caption template is used"


def test_render_draws_each_object_in_its_colour_on_the_background():
    ds = ProceduralDataset(40, 64, seed=2)
    for i in range(len(ds)):
        attrs, image = ds.attributes(i), ds[i]["image"]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        outside = torch.ones(64, 64, dtype=torch.bool)
        for o in attrs["objects"]:
            x, y = int(o["cx"] * 64), int(o["cy"] * 64)
            expected = torch.tensor(COLORS[o["color"]]) / 255
            assert torch.allclose(image[:, y, x], expected, atol=2 / 255), (i, o)
            r = procedural.SIZE_FRACTION[o["size"]] * 64 / 2 + 1
            outside[max(0, int(y - r)):int(y + r) + 2, max(0, int(x - r)):int(x + r) + 2] = False
        bg = torch.tensor(BACKGROUNDS[attrs["background"]]) / 255
        assert torch.allclose(image[:, outside], bg[:, None], atol=1 / 255)


@pytest.mark.parametrize("kind", procedural.COUNTERFACTUALS)
def test_counterfactual_changes_exactly_one_attribute(kind):
    ds = ProceduralDataset(60, 64, seed=3)
    rng = random.Random(0)
    cell = lambda o: (o["vpos"], o["hpos"])  # noqa: E731
    for i in range(len(ds)):
        attrs = ds.attributes(i)
        twin = procedural.counterfactual(attrs, kind, rng)
        assert twin["background"] == attrs["background"] and twin["count"] == attrs["count"]
        assert procedural.signature(twin) != procedural.signature(attrs)
        for o, t in zip(attrs["objects"], twin["objects"]):
            for key in ("shape", "color", "size"):
                assert (t[key] != o[key]) == (key == kind), (kind, o, t)
            assert (cell(t) != cell(o)) == (kind == "position"), (kind, o, t)
            # still inside its own grid cell, so the caption's position phrase stays true
            r = procedural.SIZE_FRACTION[t["size"]] / 2
            col, row = procedural.HPOS.index(t["hpos"]), procedural.VPOS.index(t["vpos"])
            assert col / 3 <= t["cx"] - r and t["cx"] + r <= (col + 1) / 3
            assert row / 3 <= t["cy"] - r and t["cy"] + r <= (row + 1) / 3
        assert len({cell(o) for o in twin["objects"]}) == twin["count"]
        assert procedural.signature(procedural.parse_caption(procedural.caption(twin))) == procedural.signature(twin)
    assert attrs == ds.attributes(len(ds) - 1), "the original scene is not modified"
    with pytest.raises(ValueError, match="kind"):
        procedural.counterfactual(attrs, "texture", rng)


def test_render_any_resolution_and_bad_attributes():
    attrs = {"background": "black", "count": 1,
             "objects": [{"shape": "square", "color": "blue", "size": "large", "cx": 0.5, "cy": 0.5,
                          "hpos": "center", "vpos": "middle"}]}
    wide = procedural.render(attrs, (40, 96))
    assert wide.shape == (3, 40, 96)
    assert torch.allclose(wide[:, 20, 48], torch.tensor(COLORS["blue"]) / 255, atol=2 / 255)
    with pytest.raises(ValueError, match="color"):
        procedural.render({**attrs, "objects": [{**attrs["objects"][0], "color": "teal"}]}, 32)
    with pytest.raises(ValueError, match="resolution"):
        procedural.render(attrs, 4)


# ----------------------------------------------------------------------------------------- emoji
def test_emoji_scenes_are_deterministic_captioned_and_drawn():
    ds = emoji.EmojiDataset(30, 64, seed=0)
    again = emoji.EmojiDataset(30, 64, seed=0)
    assert len(ds.emoji) > 1000  # every single-code-point emoji of the font
    for i in range(len(ds)):
        item = ds[i]
        assert _same(item, again[i])
        attrs = item["attributes"]
        assert 1 <= attrs["count"] == len(attrs["objects"]) <= 2
        for o in attrs["objects"]:
            assert o["emoji"] == emoji.emoji_name(o["char"]) and o["emoji"] in item["caption"]
            assert procedural.POSITION_PHRASES[(o["vpos"], o["hpos"])] in item["caption"]
            # the glyph is drawn around its centre: the pixels there are not all background
            x, y, r = int(o["cx"] * 64), int(o["cy"] * 64), 4
            patch = item["image"][:, y - r:y + r, x - r:x + r]
            bg = torch.tensor(BACKGROUNDS[attrs["background"]])[:, None, None] / 255
            assert (patch - bg).abs().amax() > 0.2, (i, o["emoji"])
        assert attrs["background"] in item["caption"]
    assert emoji.emoji_name("\U0001F436") == "dog face"
    sub = emoji.EmojiDataset(5, 32, emoji=["\U0001F436"])
    assert all(o["char"] == "\U0001F436" for i in range(5) for o in sub.attributes(i)["objects"])


def test_missing_emoji_font_names_the_debian_package(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        emoji.EmojiDataset(4, font=tmp_path / "NoSuchFont.ttf")
    monkeypatch.setenv("WURST_EMOJI_FONT", str(tmp_path / "missing.ttf"))
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        emoji.EmojiDataset(4)


# ----------------------------------------------------------------------------------------- folder
def _scene(i: int, size: int = 24) -> tuple[Image.Image, str]:
    item = ProceduralDataset(100, size, seed=9)[i]
    return transforms.to_pil(item["image"]), item["caption"]


def _write_folder(root: Path, n: int) -> None:
    data.write_folder(root, [(f"img{i:02d}", *_scene(i)) for i in range(n)])


def test_folder_skips_corrupt_and_uncaptioned_images_and_reports_them(tmp_path):
    root = tmp_path / "imgs"
    _write_folder(root, 6)
    (root / "garbage.png").write_bytes(b"this is not an image")
    (root / "garbage.txt").write_text("a caption for a broken file")
    good = (root / "img00.png").read_bytes()
    (root / "sub").mkdir()
    (root / "sub" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "sub" / "truncated.txt").write_text("half a file")
    (root / "no_caption.png").write_bytes(good)
    (root / "empty_caption.png").write_bytes(good)
    (root / "empty_caption.txt").write_text("  \n")
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are not data
    (root / ".ipynb_checkpoints" / "img00-checkpoint.png").write_bytes(good)
    (root / ".ipynb_checkpoints" / "img00-checkpoint.txt").write_text("a copy")
    with pytest.warns(UserWarning, match="skipped 4 of 10"):
        ds = data.FolderDataset(root, resolution=16)
    assert len(ds) == 6
    assert ds.skipped_counts == {"unreadable image": 2, "no caption": 2}
    assert {Path(s.item).name for s in ds.skipped} == {"garbage.png", "truncated.png", "no_caption.png",
                                                       "empty_caption.png"}
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["caption"] == _scene(0)[1] and item["key"] == "img00"
    # every remaining item loads
    assert all(ds[i]["image"].shape == (3, 16, 16) for i in range(len(ds)))


def test_folder_image_broken_after_the_scan_is_skipped_not_fatal(tmp_path):
    _write_folder(tmp_path, 3)
    ds = data.FolderDataset(tmp_path, resolution=8)
    (tmp_path / "img01.png").write_bytes(b"broken later")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        item = ds[1]
    assert item["key"] == "img02"  # replaced by the next sample
    assert ds.skipped_counts == {"unreadable image": 1}


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.FolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable image-caption pairs"):
        data.FolderDataset(tmp_path / "empty")
    (tmp_path / "only_bad").mkdir()
    (tmp_path / "only_bad" / "x.png").write_bytes(b"nope")
    (tmp_path / "only_bad" / "x.txt").write_text("caption")
    with pytest.raises(ValueError, match="1 unreadable image"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.FolderDataset(tmp_path / "only_bad")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifest_captions(tmp_path, fmt):
    images = tmp_path / "pics"
    images.mkdir()
    rows = []
    for i in range(4):
        image, text = _scene(i)
        image.save(images / f"p{i}.png")
        rows.append({"file_name": f"pics/p{i}.png", "caption": text})
    rows.append({"file_name": "pics/missing.png", "caption": "gone"})
    rows.append({"file_name": "pics/p0.png", "caption": ""})
    manifest = tmp_path / f"metadata.{fmt}"
    if fmt == "csv":
        manifest.write_text("file_name,caption\n" + "".join(f'{r["file_name"]},"{r["caption"]}"\n' for r in rows))
    else:
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="skipped 2 of 6"):
        ds = data.FolderDataset(tmp_path, resolution=16)  # found as metadata.<fmt> in the folder
    assert len(ds) == 4 and ds.skipped_counts == {"missing image": 1, "no caption": 1}
    assert [ds[i]["caption"] for i in range(4)] == [r["caption"] for r in rows[:4]]


def test_webdataset_shards(tmp_path):
    shards = tmp_path / "shards"
    data.write_shard(shards / "train-000.tar", [(f"s{i}", *_scene(i)) for i in range(5)])
    data.write_shard(shards / "train-001.tar", [(f"t{i}", *_scene(10 + i)) for i in range(3)], image_format="jpg")
    # a shard with a caption-less image, a caption-less key, a corrupt image and nested keys
    import io
    import tarfile

    good = (shards / "train-000.tar")
    with tarfile.open(shards / "bad-002.tar", "w") as tar:
        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        buf = io.BytesIO()
        _scene(20)[0].save(buf, format="PNG")
        add("dir/a.png", buf.getvalue())
        add("dir/a.txt", b"a nested sample")
        add("nocap.png", buf.getvalue())
        add("orphan.txt", b"a caption without image")
        add("broken.png", b"\x89PNG broken")
        add("broken.txt", b"caption of a broken image")
    with pytest.warns(UserWarning, match="skipped 3 of 12"):
        ds = data.FolderDataset(shards, resolution=16)
    assert len(ds) == 9
    assert ds.skipped_counts == {"no caption": 1, "no image": 1, "unreadable image": 1}
    keys = {ds[i]["key"]: ds[i]["caption"] for i in range(len(ds))}
    assert keys["train-000.tar:s2"] == _scene(2)[1]
    assert keys["train-001.tar:t1"] == _scene(11)[1]
    assert keys["bad-002.tar:dir/a"] == "a nested sample"
    # a single shard path and a list of shard paths work too; pixels survive PNG
    single = data.FolderDataset(good, resolution=None)
    assert torch.allclose(single[3]["image"], transforms.to_tensor(_scene(3)[0]))
    assert len(data.FolderDataset([good, shards / "train-001.tar"], resolution=16)) == 8


def test_held_out_split_is_fixed_by_seed_and_stable(tmp_path):
    _write_folder(tmp_path, 40)
    train = data.FolderDataset(tmp_path, resolution=8, split="train", val_fraction=0.25, seed=1)
    val = data.FolderDataset(tmp_path, resolution=8, split="val", val_fraction=0.25, seed=1)
    tk, vk = {s.key for s in train.samples}, {s.key for s in val.samples}
    assert not tk & vk and len(tk | vk) == 40 and 3 <= len(vk) <= 20
    # adding files never moves an existing file across splits
    data.write_folder(tmp_path, [(f"new{i}", *_scene(50 + i)) for i in range(10)])
    val2 = data.FolderDataset(tmp_path, resolution=8, split="val", val_fraction=0.25, seed=1)
    assert vk <= {s.key for s in val2.samples}
    other = data.FolderDataset(tmp_path, resolution=8, split="val", val_fraction=0.25, seed=2)
    assert {s.key for s in other.samples} != {s.key for s in val2.samples}


def test_folder_without_data_dir_is_an_error_not_a_scan_of_the_current_folder(tmp_path, monkeypatch):
    _write_folder(tmp_path, 2)
    monkeypatch.chdir(tmp_path)  # a usable folder here: scanning "" would quietly succeed
    for root in ("", "  ", None, [], [tmp_path, ""]):
        with pytest.raises(ValueError, match="needs data_dir"):
            data.FolderDataset(root, resolution=8)
    with pytest.raises(ValueError, match="needs data_dir"):
        data.make_dataset("folder", resolution=8)
    with pytest.raises(ValueError, match="needs data_dir"):
        data.make_dataset("folder", root="", resolution=8)
    with pytest.raises(FileNotFoundError, match=r"\(data_dir\) does not exist"):
        data.make_dataset("folder", root=tmp_path / "nope", resolution=8)
    assert len(data.make_dataset("folder", root=tmp_path, resolution=8)) == 2


def test_non_utf8_captions_are_skipped_and_counted(tmp_path):
    import io
    import tarfile

    _write_folder(tmp_path, 3)
    (tmp_path / "img01.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, payload in [("a.png", (tmp_path / "img00.png").read_bytes()), ("a.txt", b"\xff\xfe bad")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.warns(UserWarning, match="skipped 2 of 4: 2 unreadable caption"):
        ds = data.FolderDataset(tmp_path, resolution=8)
    assert sorted(s.key for s in ds.samples) == ["img00", "img02"]
    assert ds.skipped_counts == {"unreadable caption": 2}
    assert {Path(s.item).name for s in ds.skipped} == {"img01.png", "s.tar:a"}
    assert "img01.txt is not UTF-8 text" in ds.skipped[0].detail
    assert not any("\ufffd" in ds[i]["caption"] for i in range(len(ds)))


@pytest.mark.parametrize("check", ["decode", "header"])
def test_max_pixels_refuses_large_images_in_every_check_mode(tmp_path, check):
    _write_folder(tmp_path, 2)  # 24x24 = 576 pixels
    big, _ = _scene(5, size=64)
    big.save(tmp_path / "big.png")
    (tmp_path / "big.txt").write_text("a 64x64 image: 4096 pixels")
    data.write_shard(tmp_path / "s.tar", [("huge", big, "a 64x64 image in a shard")])
    with pytest.warns(UserWarning, match="skipped 2 of 4: 2 too large image"):
        ds = data.make_dataset("folder", root=tmp_path, resolution=8, check=check, max_pixels=1000)
    assert sorted(s.key for s in ds.samples) == ["img00", "img01"] and ds.max_pixels == 1000
    assert {Path(s.item).name for s in ds.skipped} == {"big.png", "s.tar:huge"}
    assert all("64x64 = 4,096 pixels is over max_pixels=1,000" in s.detail for s in ds.skipped)
    assert len(data.FolderDataset(tmp_path, resolution=8, check=check)) == 4  # the default limit lets them in
    # loading enforces it too, for an image that grew past the limit after the scan
    big.save(tmp_path / "img00.png")
    with pytest.warns(UserWarning, match="skipping too large image"):
        assert ds[0]["key"] == "img01"
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="max_pixels"):
            data.FolderDataset(tmp_path, max_pixels=bad)
    with pytest.raises(ValueError, match="max_pixels"):
        data.make_dataset("procedural", size=4, max_pixels=0)
    assert len(data.make_dataset("procedural", size=4, resolution=8, max_pixels=1000)) == 4


@pytest.mark.parametrize("suffix, cut_in", [(".tar", "data"), (".tar", "header"), (".tar.gz", None)])
def test_truncated_shard_keeps_its_complete_samples(tmp_path, suffix, cut_in):
    import gzip
    import tarfile

    scenes = [(f"s{i}", *_scene(i)) for i in range(5)]
    tar_path = data.write_shard(tmp_path / "full.tar", scenes)
    raw = tar_path.read_bytes()
    if suffix == ".tar":
        with tarfile.open(tar_path) as tar:
            member = tar.getmember("s3.png")
        # through the middle of s3's image, or of its header: s0-s2 are whole
        end = member.offset_data + member.size // 2 if cut_in == "data" else member.offset + 100
        shard_bytes = raw[:end]
    else:
        packed = gzip.compress(raw)
        shard_bytes = packed[: len(packed) * 7 // 10]
    shard = tmp_path / "shards" / f"cut{suffix}"
    shard.parent.mkdir()
    shard.write_bytes(shard_bytes)
    with pytest.warns(UserWarning, match=r"skipped 1 of \d: 1 truncated sample"):
        ds = data.FolderDataset(shard.parent, resolution=None)
    assert ds.skipped_counts == {"truncated sample": 1}  # counted in items, the shard is not dropped
    keys = [s.key for s in ds.samples]
    n = len(keys)
    assert 1 <= n < 5 and keys == [f"cut{suffix}:s{i}" for i in range(n)]
    if suffix == ".tar":
        assert n == 3 and ds.skipped[0].item == ("cut.tar:s3" if cut_in == "data" else "cut.tar:after s2")
    for i in range(n):  # every kept sample loads, pixels and caption intact
        assert ds[i]["caption"] == scenes[i][2]
        assert torch.allclose(ds[i]["image"], transforms.to_tensor(scenes[i][1]))


# ----------------------------------------------------------------------------------------- transforms, batching
def test_resize_crop_and_normalisation():
    image = Image.new("RGB", (120, 60), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 60))  # a blue left border, cut off by the centre crop
    t = transforms.resize_crop(image, 32)
    assert t.shape == (3, 32, 32)
    assert torch.allclose(t[:, 16, 16], torch.tensor([1.0, 0.0, 0.0]), atol=0.02)
    assert t[2].max() < 0.05, "the centre crop must drop the blue border"
    crops = {tuple(transforms.resize_crop(image, 32, "random", random.Random(s))[2, 0, :].tolist()) for s in range(8)}
    assert len(crops) > 1
    x = torch.rand(2, 3, 8, 8)
    n = transforms.imagenet_normalize(x)
    assert torch.allclose(n[:, 0], (x[:, 0] - 0.485) / 0.229)
    assert torch.allclose(transforms.imagenet_denormalize(n), x, atol=1e-6)


def test_loader_is_seeded_and_collates():
    ds = ProceduralDataset(12, 16)
    first = [b["index"].tolist() for b in data.make_loader(ds, 4, seed=0)]
    assert first == [b["index"].tolist() for b in data.make_loader(ds, 4, seed=0)]
    assert first != [b["index"].tolist() for b in data.make_loader(ds, 4, seed=1)]
    assert sorted(sum(first, [])) == list(range(12))
    batch = next(data.cycle(data.make_loader(ds, 4, seed=0)))
    assert batch["image"].shape == (4, 3, 16, 16) and len(batch["caption"]) == 4 and len(batch["attributes"]) == 4
    stream = data.cycle(data.make_loader(ds, 4, seed=0))
    assert len([next(stream) for _ in range(7)]) == 7  # runs past the end of an epoch
    with pytest.raises(ValueError, match="smaller than batch_size"):
        data.make_loader(ds, 20)


def test_preview_grid_and_save(tmp_path):
    grid = data.preview_grid(ProceduralDataset(6, 32), n=6, cols=3, tile=64)
    assert grid.size[0] == 3 * 64 and grid.size[1] > 2 * 64
    out = data.save_preview("procedural", tmp_path / "p.png", n=4, resolution=32)
    assert Image.open(out).size[0] == 2 * 128
    with pytest.raises(ValueError, match="unknown dataset kind"):
        data.save_preview("imagenet", tmp_path / "x.png")
