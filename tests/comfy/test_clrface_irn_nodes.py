"""CLR-Face IRN nodes inside a real ComfyUI (in-process): BFR Load CLR-Face IRN reads a clrface-irn/1 file from the
registered models/bfr folder (through a ModelPatcher, under torch.inference_mode as the server runs prompts) and
refuses other files with the loader to use; BFR CLR-Face IRN runs it on a batch of an odd size in chunks, equal to
the network itself, with the node's progress bar, and its output feeds VAEEncode like any IMAGE."""

from __future__ import annotations

import pytest
import torch

from comfyui_bfr.lora.id_mask import IdentityMask, save_mask_checkpoint
from comfyui_bfr.lora.irn import IRN, IRNConfig, save_irn_checkpoint
from comfyui_bfr.nodes import clrface_irn as nodes
from comfyui_bfr.nodes.helpers import NodeInputError

pytestmark = pytest.mark.comfy


@pytest.fixture()
def bfr_folder(tmp_path):
    import folder_paths

    folder = tmp_path / "bfr"
    torch.manual_seed(0)
    net = IRN(IRNConfig(widths=(8, 16, 32), blocks=1, mid_blocks=1))
    with torch.no_grad():
        net.tail.weight.normal_(0, 0.05)
    save_irn_checkpoint(folder / "irn.safetensors", net, alpha=1.0, identity_model={"arch": "r18"})
    save_mask_checkpoint(folder / "mask.safetensors", IdentityMask(), guidance_scale=1.0)
    folder_paths.add_model_folder_path("bfr", str(folder))
    return folder, net


def test_load_and_run_the_irn(bfr_folder):
    import comfy.utils

    _, net = bfr_folder
    names = nodes.BFRLoadCLRFaceIRN.INPUT_TYPES()["required"]["irn_name"][0]
    assert "irn.safetensors" in names
    with torch.inference_mode():  # as in a prompt
        (handle,) = nodes.BFRLoadCLRFaceIRN().load("irn.safetensors")
        assert handle.patcher is not None and handle.net.cfg.widths == (8, 16, 32)
        image = torch.rand(5, 45, 39, 3)  # (B, H, W, C), neither side a multiple of 4 (the net's) or 8
        updates = []
        hook = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append(
            (value, total)))
        try:
            (x_id,) = nodes.BFRCLRFaceIRN().run(handle, image, batch_size=2)
        finally:
            comfy.utils.set_progress_bar_global_hook(hook)
    assert x_id.shape == image.shape and float(x_id.min()) >= 0 and float(x_id.max()) <= 1
    with torch.no_grad():
        expected = net(image.movedim(-1, 1)).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(x_id, expected, atol=1e-5, rtol=1e-5)
    assert updates[-1] == (5, 5) and len(updates) == 3
    gray = image[..., :1]  # 1-channel IMAGEs are replicated to RGB
    (from_gray,) = nodes.BFRCLRFaceIRN().run(handle, gray)
    assert from_gray.shape == (5, 45, 39, 3)


def test_loader_refuses_other_files_with_the_fix(bfr_folder):
    with pytest.raises(NodeInputError, match=r"\[BFR Load CLR-Face IRN\] mask.safetensors: bfr_format is "
                                             r"'clrface-mask/1'.*BFR Load CLR-Face Mask"):
        nodes.BFRLoadCLRFaceIRN().load("mask.safetensors")
    with pytest.raises(NodeInputError, match="not in models/bfr"):
        nodes.BFRLoadCLRFaceIRN().load("missing.safetensors")
    with pytest.raises(NodeInputError, match=r"\[BFR CLR-Face IRN\] irn must come from BFR Load CLR-Face IRN"):
        nodes.BFRCLRFaceIRN().run(object(), torch.rand(1, 8, 8, 3))
    (handle,) = nodes.BFRLoadCLRFaceIRN().load("irn.safetensors")
    with pytest.raises(NodeInputError, match="looks 0-255 scaled"):
        nodes.BFRCLRFaceIRN().run(handle, torch.full((1, 8, 8, 3), 200.0))
    with pytest.raises(NodeInputError, match="above max_megapixels"):
        nodes.BFRCLRFaceIRN().run(handle, torch.rand(1, 64, 64, 3), max_megapixels=0.001)


def test_x_id_feeds_vae_encode(bfr_folder, comfy_models):
    _, vae = comfy_models
    (handle,) = nodes.BFRLoadCLRFaceIRN().load("irn.safetensors")
    (x_id,) = nodes.BFRCLRFaceIRN().run(handle, torch.rand(2, 64, 64, 3))
    latent = vae.encode(x_id)
    assert latent.shape == (2, 4, 8, 8)
