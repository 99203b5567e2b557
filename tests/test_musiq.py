"""MUSIQ (pipelines/musiq.py, pipelines/iqa.py MUSIQ) on random weights in pyiqa's key layout: loading, refusals,
the multi-scale token rules, where the file is looked for, and the harness report. Parity of the scores with pyiqa's
own network on the same weights: tests/comfy/test_musiq_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_bfr.pipelines import iqa, testset
from comfyui_bfr.pipelines.musiq import (MUSIQ_FILES, MUSIQNet, MUSIQWeightsError, hashed_positions, load_musiq,
                                         multiscale_patches)

skimage_data = pytest.importorskip("skimage.data")


def random_musiq_state_dict(classes: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """MUSIQ weights in pyiqa's layout: nn defaults for convs / linears, random norms, embeddings and CLS token at
    a scale where the hashed position and the scale of a token change the score."""
    torch.manual_seed(seed)
    out = {}
    for k, v in MUSIQNet(classes).state_dict().items():
        if ("gn" in k or "norm" in k) and k.endswith("weight"):
            v = torch.rand_like(v) * 0.5 + 0.75
        elif ("gn" in k or "norm" in k) and k.endswith("bias"):
            v = torch.randn_like(v) * 0.1
        elif k.endswith(("position_emb", "scale_emb", ".cls")):
            v = torch.randn_like(v) * 0.5
        out[k] = v.clone()
    return out


@pytest.fixture(scope="module")
def musiq_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("musiq") / MUSIQ_FILES["koniq"]
    torch.save(random_musiq_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def musiq(musiq_file):
    return iqa.MUSIQ(musiq_file)


@pytest.fixture(autouse=True)
def _no_user_files(tmp_path, monkeypatch):
    """Neither $BFR_MUSIQ nor a real pyiqa cache of this machine may leak into the tests."""
    monkeypatch.delenv(iqa.MUSIQ_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("TORCH_HUB", raising=False)


def _photo(name: str, h: int, w: int) -> np.ndarray:
    im = getattr(skimage_data, name)()
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, 2)
    return np.ascontiguousarray(im[:h, :w])


def test_layout_loads_every_weight(musiq_file):
    sd = torch.load(musiq_file, weights_only=True)
    own = load_musiq(musiq_file).state_dict()
    assert set(sd) == set(own)
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    assert own["transformer_encoder.posembed_input.position_emb"].shape == (1, 100, 384)
    assert own["transformer_encoder.scaleembed_input.scale_emb"].shape == (3, 384)
    assert own["embedding.weight"].shape == (384, 8 * 8 * 256) and own["head.weight"].shape == (1, 384)
    assert sum(k.endswith("attention.query.weight") for k in own) == 14


def test_ava_file_gives_the_mean_of_its_10_bins(tmp_path):
    path = tmp_path / MUSIQ_FILES["ava"]
    torch.save(random_musiq_state_dict(classes=10), path)
    net = load_musiq(path)
    assert net.classes == 10 and "head.0.weight" in net.state_dict()
    x = torch.from_numpy(_photo("chelsea", 120, 160)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        p = net.distribution(x)
        score = net(x)
    assert p.shape == (1, 10) and float(p.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(score) == pytest.approx(float((p * torch.arange(1, 11)).sum()), abs=1e-5)
    assert 1.0 < float(score) < 10.0


def test_wrong_shape_missing_key_and_pickled_code_are_refused(tmp_path):
    sd = random_musiq_state_dict()
    sd["embedding.weight"] = torch.zeros(384, 1024)
    del sd["transformer_encoder.transformer.encoderblock_13.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(MUSIQWeightsError) as err:
        load_musiq(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "bad.pth" in msg and "embedding.weight (384, 1024) (expected (384, 16384))" in msg
    assert "missing keys: transformer_encoder.transformer.encoderblock_13.mlp.fc2.bias" in msg
    bad = iqa.MUSIQ(tmp_path / "bad.pth")
    assert not bad.available and "bad.pth" in bad.skipped and "pyiqa's MUSIQ layout" in bad.skipped
    assert bad(np.zeros((32, 32, 3), np.uint8)).value is None

    torch.save({**random_musiq_state_dict(), "fn": print}, tmp_path / "evil.pth")
    evil = iqa.MUSIQ(tmp_path / "evil.pth")
    assert not evil.available and "evil.pth" in evil.skipped and "refused unread" in evil.skipped


def test_missing_file_is_skipped_naming_it_and_where_it_is_looked_for(tmp_path):
    none = iqa.MUSIQ()
    assert not none.available
    for part in (MUSIQ_FILES["koniq"], "--musiq-weights", "$" + iqa.MUSIQ_ENV, str(iqa.pyiqa_cache())):
        assert part in none.skipped
    assert str(tmp_path / "torch" / "hub" / "pyiqa") in none.skipped  # $TORCH_HOME/hub/pyiqa
    assert MUSIQ_FILES["ava"] in iqa.MUSIQ(dataset="ava").skipped
    assert "do not exist" in iqa.MUSIQ(tmp_path / "nope.pth").skipped
    with pytest.raises(ValueError, match="koniq"):
        iqa.MUSIQ(dataset="kadid")


def test_env_var_and_pyiqa_cache_are_found(musiq_file, monkeypatch):
    cache = iqa.pyiqa_cache()
    cache.mkdir(parents=True)
    (cache / MUSIQ_FILES["koniq"]).write_bytes(musiq_file.read_bytes())
    found = iqa.MUSIQ()
    assert found.available and found.weights[0]["file"] == MUSIQ_FILES["koniq"]
    monkeypatch.setenv(iqa.MUSIQ_ENV, str(musiq_file))
    assert iqa.MUSIQ(dataset="ava").available  # $BFR_MUSIQ comes before the cache
    monkeypatch.setenv(iqa.MUSIQ_ENV, str(musiq_file.parent / "gone.pth"))
    assert "gone.pth" in iqa.MUSIQ().skipped and iqa.MUSIQ_ENV in iqa.MUSIQ().skipped


def test_hashed_positions():
    """Sec. 3.2: a patch grid of any size is hashed onto the 10x10 embedding grid, row-major."""
    assert torch.equal(hashed_positions(10, 10), torch.arange(100))
    pos = hashed_positions(5, 20).view(5, 20)
    assert torch.equal(pos[:, 0], torch.tensor([0, 20, 40, 60, 80]))
    assert torch.equal(pos[0], torch.arange(20) // 2)
    assert int(hashed_positions(16, 16).max()) == 99


def test_multiscale_tokens():
    """A 200x300 image: 224 px (149x224, 5x7 patches, padded to 49), 384 px (256x384, 8x12, padded to 144), and its
    own 7x10 patches (SAME-padded to 224x320)."""
    x = torch.rand(1, 3, 200, 300) * 2 - 1
    patches, spatial, scale, mask = multiscale_patches(x)
    assert patches.shape == (1, 49 + 144 + 70, 3, 32, 32)
    assert mask.sum() == 35 + 96 + 70
    assert mask[0, :35].all() and not mask[0, 35:49].any() and mask[0, 49:145].all() and not mask[0, 145:193].any()
    assert torch.equal(scale[0, mask[0]], torch.tensor([0] * 35 + [1] * 96 + [2] * 70))
    assert torch.equal(spatial[0, 193:], hashed_positions(7, 10))
    # the full-size patches: 12 px of zero padding on top and bottom, 10 left and right
    assert torch.equal(patches[0, 193, :, 12:, 10:], x[0, :, :20, :22])
    assert float(patches[0, 193, :, :12].abs().sum()) == 0.0
    assert torch.equal(patches[0, 194, :, 12:, :], x[0, :, :20, 22:54])
    cut = multiscale_patches(x, full_size_patches=16)[3]  # pyiqa's max_seq_len_from_original_res
    assert cut.shape == (1, 49 + 144 + 16) and cut[0, 193:].all()
    assert multiscale_patches(x, full_size_patches=None)[2].max() == 1  # resized scales only


def test_score_is_deterministic_and_depends_on_the_image(musiq):
    a, b = _photo("astronaut", 160, 120), _photo("camera", 160, 120)
    sa = musiq(a).value
    assert sa == musiq(a).value and np.isfinite(sa)
    assert abs(sa - musiq(b).value) > 1e-4
    assert musiq(a).weights == musiq.weights and musiq.weights[0]["file"] == MUSIQ_FILES["koniq"]


def test_eval_scores_musiq_or_skips_it_and_runs_the_rest(musiq_file, tmp_path):
    from PIL import Image

    from comfyui_bfr.cli.main import main
    from comfyui_bfr.pipelines.image_io import read_rgb
    from comfyui_bfr.pipelines.metrics import file_sha256

    hq = tmp_path / "hq"
    hq.mkdir()
    for name in ("astronaut", "chelsea"):
        Image.fromarray(_photo(name, 256, 256)).resize((64, 64)).save(hq / f"{name}.png")
    ts = testset.make_testset(hq, tmp_path / "set", "dr2-medium-x4", seed=0, size=64)

    out = tmp_path / "skip"
    rc = main(["eval", str(ts.root), "--out", str(out), "--method", "lq", "--metrics", "psnr", "musiq",
               "--musiq-weights", str(tmp_path / "missing.pth")])
    assert rc == 0
    summary = (out / "summary.md").read_text()
    assert "PSNR↑" in summary and "MUSIQ↑" not in summary and "- musiq: MUSIQ: the weights" in summary
    assert "missing.pth" in summary

    out = tmp_path / "run"
    rc = main(["eval", str(ts.root), "--out", str(out), "--method", "lq", "--metrics", "psnr", "musiq",
               "--musiq-weights", str(musiq_file)])
    assert rc == 0
    summary = (out / "summary.md").read_text()
    assert "MUSIQ↑" in summary and f"musiq: {MUSIQ_FILES['koniq']} (sha256 {file_sha256(musiq_file)[:12]})" in summary
    header = next(line for line in summary.splitlines() if line.startswith("| Method"))
    row = next(line for line in summary.splitlines() if line.startswith("| lq |"))
    cells = dict(zip(header.strip("|").split("|"), row.strip("|").split("|")))
    got = float(cells[" MUSIQ↑ "])
    expected = np.mean([iqa.MUSIQ(musiq_file)(read_rgb(out / "lq" / "images" / f"{p.name}.png")).value
                        for p in ts.pairs])
    assert got == pytest.approx(expected, abs=1e-3)
