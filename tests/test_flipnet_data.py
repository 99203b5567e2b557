"""Training data (FlipNet §4.2, §5.1): face folders with off-shelf / on-the-fly LQ, paired real-world layouts,
captions, and clear errors for empty, unpaired and corrupt inputs."""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_bfr.pipelines.image_io import ImageFolderError
from comfyui_bfr.train import data
from comfyui_bfr.train.data import DatasetError
from fixtures.flipnet import stub_degrade, write_faces


def test_face_folder_items_captions_and_offshelf_mix(tmp_path):
    write_faces(tmp_path / "hq", 6, size=48)
    write_faces(tmp_path / "lq", 2, size=32, seed=50, names=["00000_0.png", "00000_1.png"])
    write_faces(tmp_path / "lq", 1, size=32, seed=60, names=["00001.png"])
    (tmp_path / "caps.json").write_text(json.dumps({"00000.png": "a photo of a face", "00002": "old man"}))
    ds = data.FaceFolderDataset(tmp_path / "hq", size=32, captions=tmp_path / "caps.json",
                                offshelf_dir=tmp_path / "lq", offshelf_prob=1.0)
    assert len(ds) == 6 and set(ds.offshelf) == {"00000", "00001"} and len(ds.offshelf["00000"]) == 2
    item = ds[0]
    assert item["hq"].shape == (3, 32, 32) and 0 <= item["hq"].min() and item["hq"].max() <= 1
    assert item["has_lq"] and item["caption"] == "a photo of a face"
    assert ds[2]["caption"] == "old man" and ds[3]["caption"] == ""
    assert not ds[2]["has_lq"] and torch.count_nonzero(ds[2]["lq"]) == 0  # no off-shelf variant: on the fly
    mixed = data.FaceFolderDataset(tmp_path / "hq", size=32, offshelf_dir=tmp_path / "lq", offshelf_prob=0.5)
    picks = []
    for epoch in range(40):
        mixed.set_epoch(epoch)
        picks.append(mixed[0]["has_lq"])
    assert 8 < sum(picks) < 32  # p = 0.5 per sample, varies with the epoch
    mixed.set_epoch(3)
    assert torch.equal(mixed[0]["lq"], mixed[0]["lq"])  # deterministic for (seed, epoch, index)
    sub = data.FaceFolderDataset(tmp_path / "hq", size=32, max_images=4, seed=1)
    assert len(sub) == 4


def test_caption_sidecar_formats(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"file": "a.png", "caption": "x"}\n\n{"file": "b.png", "text": "y"}\n')
    (tmp_path / "c.tsv").write_text("a.png\tx y\nb\tz\n")
    assert data.load_captions(tmp_path / "c.jsonl") == {"a.png": "x", "b.png": "y"}
    assert data.load_captions(tmp_path / "c.tsv") == {"a.png": "x y", "b": "z"}
    (tmp_path / "bad.tsv").write_text("no tab here\n")
    with pytest.raises(DatasetError, match="line 1 has no TAB"):
        data.load_captions(tmp_path / "bad.tsv")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="JSON object"):
        data.load_captions(tmp_path / "bad.json")
    with pytest.raises(DatasetError, match="does not exist"):
        data.load_captions(tmp_path / "missing.json")


def _layout(root, lq_dir, hq_dir, lq_names, hq_names, size=40):
    write_faces(root / lq_dir, len(lq_names), size=size, seed=1, names=lq_names)
    write_faces(root / hq_dir, len(hq_names), size=size, seed=100, names=hq_names)
    return root


def test_paired_layouts_are_detected_and_paired(tmp_path):
    lol = _layout(tmp_path / "LOL", "low", "high", ["1.png", "22.png"], ["1.png", "22.png"])
    haze = _layout(tmp_path / "DenseHaze", "hazy", "GT", ["01_hazy.png", "02_hazy.png"], ["01_GT.png", "02_GT.png"])
    sidd = tmp_path / "SIDD" / "Data"
    for scene in ("0001_001_S6", "0002_001_S6"):
        _layout(sidd / scene, ".", ".", ["NOISY_SRGB_010.PNG"], ["GT_SRGB_010.PNG"])
    blur = tmp_path / "RealBlur_J"
    for scene in ("scene001", "scene002"):
        _layout(blur / scene, "blur", "gt", ["blur_1.png", "blur_2.png"], ["gt_1.png", "gt_2.png"])
    generic = _layout(tmp_path / "generic", "lq", "hq", ["a.png"], ["a.png"])
    expected = {lol: ("lol", 2), haze: ("dense-haze", 2), tmp_path / "SIDD": ("sidd", 2), blur: ("realblur", 4),
                generic: ("hq-lq", 1)}
    for root, (layout, n) in expected.items():
        assert data.detect_layout(root) == layout
        pairs = data.find_pairs(root)
        assert len(pairs) == n
        for lq, hq in pairs:  # partners share the id
            assert lq.parent.parent == hq.parent.parent or lq.parent == hq.parent
    pairs = dict((lq.name, hq.name) for lq, hq in data.find_pairs(haze))
    assert pairs == {"01_hazy.png": "01_GT.png", "02_hazy.png": "02_GT.png"}
    ds = data.PairedFolderDataset(blur, "realblur", size=32, max_pairs=3, seed=0)
    item = ds[0]
    assert len(ds) == 3 and item["hq"].shape == item["lq"].shape == (3, 32, 32) and item["has_lq"]
    small = data.PairedFolderDataset(lol, size=64)  # smaller than the crop: resized up, still aligned
    assert small[0]["hq"].shape == (3, 64, 64)
    assert data.parse_paired_spec("/d/SIDD:sidd:1000") == ("/d/SIDD", "sidd", 1000)
    assert data.parse_paired_spec("/d/LOL") == ("/d/LOL", "auto", None)
    with pytest.raises(DatasetError, match="layout 'foo'"):
        data.parse_paired_spec("/d:foo")


def test_empty_unpaired_and_unknown_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderError, match="holds no images"):
        data.FaceFolderDataset(tmp_path / "empty")
    with pytest.raises(ImageFolderError, match="does not exist"):
        data.FaceFolderDataset(tmp_path / "nope")
    unpaired = _layout(tmp_path / "LOL", "low", "high", ["1.png", "2.png", "3.png"], ["1.png"])
    with pytest.raises(DatasetError, match=r"2 LQ files .* have no HQ partner.*low/2.png"):
        data.find_pairs(unpaired)
    (tmp_path / "odd" / "stuff").mkdir(parents=True)
    with pytest.raises(DatasetError, match="Cannot recognise the layout"):
        data.find_pairs(tmp_path / "odd")
    (tmp_path / "half" / "low").mkdir(parents=True)
    (tmp_path / "half" / "high").mkdir(parents=True)
    with pytest.raises(ImageFolderError, match="holds no images"):
        data.find_pairs(tmp_path / "half")
    write_faces(tmp_path / "hq", 2, size=32)
    write_faces(tmp_path / "other_lq", 2, size=32, names=["zzz_0.png", "yyy.png"])
    with pytest.raises(DatasetError, match="No file in off-shelf LQ folder .* matches an HQ image"):
        data.FaceFolderDataset(tmp_path / "hq", offshelf_dir=tmp_path / "other_lq")
    with pytest.raises(DatasetError, match="multiple of 8"):
        data.FaceFolderDataset(tmp_path / "hq", size=30)


def test_corrupt_image_names_the_file(tmp_path):
    write_faces(tmp_path / "hq", 2, size=32)
    (tmp_path / "hq" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = data.FaceFolderDataset(tmp_path / "hq", size=32)
    assert ds[0]["hq"].shape == (3, 32, 32)
    with pytest.raises(ImageFolderError, match=r"Cannot read image .*00001.png.*corrupt"):
        ds[1]


def test_fill_lq_on_the_fly_keeps_offshelf_rows(tmp_path):
    hq = torch.rand(3, 3, 32, 32)
    lq = torch.rand(3, 3, 32, 32)
    batch = {"hq": hq, "lq": lq, "has_lq": torch.tensor([True, False, True])}
    out = data.fill_lq_on_the_fly(batch, seed=3, degrade_fn=stub_degrade)
    assert torch.equal(out[0], lq[0]) and torch.equal(out[2], lq[2])
    assert torch.equal(out[1], stub_degrade(hq[1:2], 3)[0])
    all_given = data.fill_lq_on_the_fly({"hq": hq, "lq": lq, "has_lq": torch.ones(3, dtype=torch.bool)}, 0,
                                        degrade_fn=stub_degrade)
    assert all_given is lq


def test_on_the_fly_uses_the_flipnet_preset_deterministically():
    hq = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = data.degrade_on_the_fly(hq, seed=5)
    b = data.degrade_on_the_fly(hq, seed=5)
    c = data.degrade_on_the_fly(hq, seed=6)
    assert a.shape == hq.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert (a - hq).abs().mean() > 0.01 and 0 <= a.min() and a.max() <= 1
