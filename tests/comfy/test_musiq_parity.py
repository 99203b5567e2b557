"""Our MUSIQ (pipelines/musiq.py, no torchvision, no pyiqa) against pyiqa's own MUSIQ on the same random weights:
pyiqa's network is built with ``pretrained=False``, randomised, and its state dict saved as a release file
(``musiq_koniq_ckpt-e95806b9.pth`` in a temporary pyiqa cache, ``musiq_ava_ckpt-e8d3f067.pth`` given by path); both
score real photos of several sizes and aspect ratios, through pyiqa's ``create_metric`` as users call it. The token
sequences (patches, hashed positions, scale ids, masks) are compared too. Runs in ComfyUI's venv (torch +
torchvision; ``pyiqa`` is installed with ``--no-deps`` by tests/setup_comfyui.sh: its MUSIQ needs nothing more)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _photos():
    data = pytest.importorskip("skimage.data")
    gray = np.repeat(data.camera()[:, :, None], 3, 2)
    return {  # (H, W): square, landscape, portrait, small (upsampled for both scales), sizes off the 32 px grid
        "astronaut 256x256": data.astronaut()[100:356, 100:356],
        "chelsea 300x451": data.chelsea(),
        "camera 330x190": gray[60:390, 150:340],
        "rocket 150x237": data.rocket()[200:350, 100:337],
    }


def _randomise(net: torch.nn.Module) -> None:
    """Norms off identity, embeddings and the CLS token at a scale where a wrong position / scale id shows."""
    with torch.no_grad():
        for k, v in net.named_parameters():
            if "gn" in k or "norm" in k:
                v.copy_(torch.rand_like(v) * 0.5 + 0.75 if k.endswith("weight") else torch.randn_like(v) * 0.1)
            elif k.endswith(("position_emb", "scale_emb", ".cls")):
                v.normal_(0.0, 0.5)


@pytest.mark.parametrize("dataset", ["koniq", "ava"])
def test_scores_equal_pyiqa(dataset, tmp_path, monkeypatch, record_figure):
    pyiqa = pytest.importorskip("pyiqa", reason="pip install --no-deps pyiqa (setup_comfyui.sh)")
    from pyiqa.archs.musiq_arch import MUSIQ as PyiqaMUSIQ
    from pyiqa.data.multiscale_trans_util import get_multiscale_patches

    from comfyui_bfr.pipelines import iqa
    from comfyui_bfr.pipelines.musiq import MUSIQ_FILES, multiscale_patches

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    monkeypatch.delenv(iqa.MUSIQ_ENV, raising=False)
    if torch.hub.get_dir() != str(tmp_path / "hub"):
        pytest.skip(f"torch.hub.set_dir() was called in this process ({torch.hub.get_dir()})")

    torch.manual_seed(0)
    ref = PyiqaMUSIQ(pretrained=False, num_class=10 if dataset == "ava" else 1).eval()
    _randomise(ref)
    cache = iqa.pyiqa_cache()
    cache.mkdir(parents=True)
    path = (cache if dataset == "koniq" else tmp_path) / MUSIQ_FILES[dataset]
    torch.save(ref.state_dict(), path)
    ours = iqa.MUSIQ() if dataset == "koniq" else iqa.MUSIQ(path)  # koniq: found in pyiqa's cache
    assert ours.available, ours.skipped
    # with a path of its own, pyiqa's "musiq-ava" needs num_class=10 said again (its config sets it for a download)
    extra = {"num_class": 10} if dataset == "ava" else {}
    metric = pyiqa.create_metric("musiq" if dataset == "koniq" else "musiq-ava", device="cpu", as_loss=False,
                                 pretrained_model_path=str(path), **extra)

    rows, worst, worst_abs = [], 0.0, 0.0
    for name, im in _photos().items():
        x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            theirs = float(metric(x).flatten()[0])
            tokens = get_multiscale_patches((x - 0.5) * 2, 32, 32, 10, [224, 384], -1)[0]
        mine = ours(im).value
        patches, spatial, scale, mask = multiscale_patches((x - 0.5) * 2)
        assert tokens.shape[0] == patches.shape[1]
        assert torch.equal(tokens[:, :-3], patches[0].flatten(1)), name
        assert torch.equal(tokens[:, -3].long(), spatial[0]) and torch.equal(tokens[:, -2].long(), scale[0])
        assert torch.equal(tokens[:, -1].bool(), mask[0])
        rel = abs(mine - theirs) / max(abs(theirs), 1e-3)
        worst, worst_abs = max(worst, rel), max(worst_abs, abs(mine - theirs))
        rows.append(f"{name} {mine:.6f}/{theirs:.6f}")
        assert mine == pytest.approx(theirs, rel=2e-5, abs=1e-5), name
    record_figure(f"musiq parity pyiqa {dataset}", f"max |diff| {worst_abs:.1e} (rel {worst:.1e}); ours/pyiqa: "
                  + ", ".join(rows))
