"""Our FID Inception (pipelines/fid_inception.py, no torchvision) against pytorch-fid's own ``InceptionV3`` on the
same random weights, saved under the release file's name in a temporary torch hub cache (pytorch-fid finds it there
and downloads nothing). Runs in ComfyUI's venv (torch + torchvision; ``pytorch-fid`` is in tests/setup_comfyui.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_bfr.pipelines import iqa


def test_features_and_fid_equal_pytorch_fid(tmp_path, monkeypatch, record_figure):
    inception = pytest.importorskip("pytorch_fid.inception", reason="pip install pytorch-fid (setup_comfyui.sh)")
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    skimage_data = pytest.importorskip("skimage.data")
    from tests.test_fid import random_fid_state_dict

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    if torch.hub.get_dir() != str(tmp_path / "hub"):
        pytest.skip(f"torch.hub.set_dir() was called in this process ({torch.hub.get_dir()})")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(random_fid_state_dict(), cache / iqa.FID_WEIGHTS)

    ref = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                normalize_input=True, use_fid_inception=True).eval()
    ours = iqa.FID()  # the default place: <torch hub>/checkpoints/pt_inception-2015-12-05-6726825d.pth
    assert ours.available, ours.skipped

    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee(), skimage_data.rocket()]
    images = [p[y:y + 160, x:x + 160] for p in photos for y, x in ((0, 0), (100, 140))]
    x = torch.stack([torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255 for im in images])
    with torch.inference_mode():
        theirs = ref(x)[0].flatten(1).double().numpy()
    mine = ours.features(images)
    err = np.abs(mine - theirs).max() / np.abs(theirs).max()
    fid_theirs = fid_score.calculate_frechet_distance(theirs[0::2].mean(0), np.cov(theirs[0::2], rowvar=False),
                                                      theirs[1::2].mean(0), np.cov(theirs[1::2], rowvar=False))
    fid_ours = ours(images[0::2], images[1::2]).value
    record_figure("fid parity pytorch-fid", f"max|feat diff|/max|feat| {err:.1e}; FID ours {fid_ours:.5f}, "
                                            f"pytorch-fid {fid_theirs:.5f}")
    assert mine.shape == theirs.shape == (8, 2048)
    assert err < 1e-5
    assert fid_ours == pytest.approx(fid_theirs, rel=1e-4)
