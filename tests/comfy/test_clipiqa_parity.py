"""Our CLIP RN50 + CLIP-IQA (pipelines/clipiqa.py) against open_clip's ``RN50-quickgelu`` (the architecture of
OpenAI's RN50 release) on the same random weights, and our prompt token ids against open_clip's tokenizer. Runs in
ComfyUI's venv (torch + torchvision; ``open_clip_torch`` is in tests/setup_comfyui.sh)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def test_towers_tokens_and_score_equal_open_clip(tmp_path, record_figure):
    open_clip = pytest.importorskip("open_clip", reason="pip install open_clip_torch (setup_comfyui.sh)")
    from safetensors.torch import save_file

    from comfyui_bfr.pipelines import iqa
    from comfyui_bfr.pipelines.clipiqa import CLIP_MEAN, CLIP_STD, PROMPT_TOKENS, load_clip_rn50, tokenize

    torch.manual_seed(0)
    ref = open_clip.create_model("RN50-quickgelu", pretrained=None).eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # open_clip zero-inits bn3; make every branch count
                m.weight.uniform_(0.5, 1.0)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        ref.logit_scale.fill_(torch.log(torch.tensor(100.0)))
    sd = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "attn_mask"}
    save_file(sd, str(tmp_path / "rn50.safetensors"))
    ours = load_clip_rn50(tmp_path / "rn50.safetensors")

    tok = open_clip.get_tokenizer("RN50-quickgelu")
    words = sorted(PROMPT_TOKENS)
    assert torch.equal(tokenize(words), tok(words))

    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        t_ref, t_ours = ref.encode_text(tok(words)), ours.encode_text(tokenize(words))
        i_ref, i_ours = ref.encode_image(x), ours.encode_image(x, pos_embedding=True)
        ref.visual.attnpool.positional_embedding.zero_()  # CLIP-IQA: no positional embedding
        i0_ref, i0_ours = ref.encode_image(x), ours.encode_image(x, pos_embedding=False)
    rel = {name: float((a - b).abs().max() / b.abs().max()) for name, a, b in
           (("text", t_ours, t_ref), ("image", i_ours, i_ref), ("image no-pos", i0_ours, i0_ref))}
    record_figure("clip parity open_clip", ", ".join(f"{k} {v:.1e}" for k, v in rel.items()))
    assert all(v < 1e-5 for v in rel.values()), rel

    img = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    got = iqa.CLIPIQA(tmp_path / "rn50.safetensors")(img).value
    xi = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        f = ref.encode_image((xi - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1))
        t = ref.encode_text(tok(["Good photo.", "Bad photo."]))
        expected = float(torch.softmax(100.0 * F.cosine_similarity(f, t), 0)[0])
    record_figure("clipiqa vs open_clip formula", f"ours {got:.6f}, open_clip {expected:.6f}")
    assert got == pytest.approx(expected, abs=1e-5)
