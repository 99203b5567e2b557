"""CLIP-IQA (pipelines/clipiqa.py, pipelines/iqa.py CLIPIQA) on a random CLIP RN50 in OpenAI's key layout: loading,
the score's definition, arbitrary sizes, and the harness report. Parity of the network and the prompt tokens with
open_clip on the same weights: tests/comfy/test_clipiqa_parity.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from comfyui_bfr.pipelines import evaluate, iqa
from comfyui_bfr.pipelines.clipiqa import (CLIP_MEAN, CLIP_STD, PROMPT_SETS, CLIPIQAModel, CLIPRN50, load_clip_rn50,
                                           tokenize)

skimage_data = pytest.importorskip("skimage.data")


def random_clip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """CLIP RN50 weights in OpenAI's layout: random, with BatchNorm statistics and embeddings at natural scales."""
    torch.manual_seed(seed)
    sd = CLIPRN50().state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("running_var"):
            v = torch.rand_like(v) + 0.5
        elif k.endswith("running_mean") or (".bn" in k or "downsample.1" in k) and k.endswith("bias"):
            v = torch.randn_like(v) * 0.1
        elif (".bn" in k or "downsample.1" in k) and k.endswith("weight"):
            v = torch.rand_like(v) * 0.5 + 0.5
        elif k == "logit_scale":
            v = torch.tensor(math.log(100.0))
        elif k in ("positional_embedding", "visual.attnpool.positional_embedding", "token_embedding.weight"):
            v = torch.randn_like(v) * 0.05
        elif k == "text_projection":
            v = torch.randn_like(v) * 512 ** -0.5
        elif "ln_" in k:
            v = torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v)
        else:
            v = v.clone()  # nn defaults (Kaiming-uniform convs / linears, MHA in_proj xavier)
        out[k] = v
    return out


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """Saved in half precision with the JIT archive's int entries, as some exports of OpenAI's RN50.pt are."""
    path = tmp_path_factory.mktemp("clip") / "rn50.safetensors"
    sd = {k: v.half() for k, v in random_clip_state_dict().items()}
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def clip(clip_file):
    return load_clip_rn50(clip_file)


def _face(size=(96, 80)) -> np.ndarray:
    return skimage_data.astronaut()[30:30 + size[0], 170:170 + size[1]]


def test_layout_loads_every_weight(clip, clip_file):
    from safetensors.torch import load_file

    sd = load_file(str(clip_file))
    own = clip.state_dict()
    weights = {k for k in sd if k not in ("input_resolution", "context_length", "vocab_size")}
    assert weights == {k for k in own if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(own[k], sd[k].float()) for k in weights)


def test_wrong_layout_and_missing_file_are_skipped_with_reasons(tmp_path, monkeypatch):
    monkeypatch.delenv(iqa.CLIPIQA_ENV, raising=False)
    none = iqa.CLIPIQA()
    assert not none.available and "--clipiqa-weights" in none.skipped and iqa.CLIPIQA_ENV in none.skipped
    assert none(np.zeros((64, 64, 3), np.uint8)).value is None
    assert "do not exist" in iqa.CLIPIQA(tmp_path / "nope.safetensors").skipped
    sd = random_clip_state_dict()
    del sd["visual.attnpool.c_proj.bias"]
    sd["visual.proj"] = torch.zeros(768, 512)  # a ViT-B file's key
    save_file(sd, str(tmp_path / "vit.safetensors"))
    bad = iqa.CLIPIQA(tmp_path / "vit.safetensors")
    assert "visual.proj" in bad.skipped and "visual.attnpool.c_proj.bias" in bad.skipped


def test_score_is_the_softmax_of_scaled_cosines(clip):
    """Eq. (1) of the paper, computed here from the two towers' outputs."""
    m = CLIPIQAModel(clip, "paper")
    x = torch.from_numpy(_face().copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        f = clip.encode_image((x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1))
        t = clip.encode_text(tokenize(["Good photo.", "Bad photo."]))
        cos = F.cosine_similarity(f, t)  # (2,)
        expected = torch.softmax(100.0 * cos, 0)[0]
        got = m(x)[0]
    assert 0.0 < float(got) < 1.0
    assert float(got) == pytest.approx(float(expected), abs=1e-5)


def test_padding_after_end_of_text_is_ignored(clip):
    """Causal mask + the end-of-text token's feature: tokens after it change nothing."""
    tokens = tokenize(["Good photo."])
    noisy = tokens.clone()
    noisy[0, 6:] = torch.randint(1, 49000, (71,))
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(tokens), clip.encode_text(noisy), rtol=1e-5, atol=1e-5)


def test_any_size_without_positional_embedding(clip):
    m = CLIPIQAModel(clip, "paper")
    with torch.no_grad():
        for h, w in ((64, 64), (96, 80), (224, 224)):
            assert 0.0 < float(m(torch.rand(1, 3, h, w))[0]) < 1.0
        with pytest.raises(ValueError, match="pos_embedding=False"):
            clip.encode_image(torch.rand(1, 3, 96, 96), pos_embedding=True)
        assert clip.encode_image(torch.rand(1, 3, 224, 224), pos_embedding=True).shape == (1, 1024)


def test_prompt_sets(clip):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        paper, pyiqa = CLIPIQAModel(clip, "paper")(x), CLIPIQAModel(clip, "pyiqa")(x)
    assert paper.shape == pyiqa.shape == (2,) and not torch.allclose(paper, pyiqa)
    assert len(PROMPT_SETS["pyiqa"]) == 3
    with pytest.raises(ValueError, match="no token ids"):
        tokenize(["Nice photo."])


def test_scorer_reports_clipiqa_with_its_file(clip_file):
    from comfyui_bfr.pipelines.metrics import file_sha256

    scorer = evaluate.Scorer(evaluate.MetricOptions(metrics=("clipiqa", "musiq"), clipiqa_weights=str(clip_file)))
    assert scorer.weights["clipiqa"] == [{"file": "rn50.safetensors", "sha256": file_sha256(clip_file)}]
    assert "musiq_koniq_ckpt" in scorer.skipped["musiq"] and "clipiqa" not in scorer.skipped
    img = _face()
    values, _ = scorer.score(img, None)
    assert 0.0 < values["clipiqa"] < 1.0
    assert values["clipiqa"] == pytest.approx(iqa.CLIPIQA(clip_file)(img).value, abs=1e-6)
    md = evaluate.markdown_table([("m", evaluate.aggregate([{"status": "ok", "metrics": values}]))],
                                 scorer.skipped, scorer.weights)
    assert "CLIP-IQA↑" in md and "rn50.safetensors (sha256" in md and "MUSIQ is not available" in md
