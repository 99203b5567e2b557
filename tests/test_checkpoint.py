"""The one-file FlipNet checkpoint (design §4): kohya LoRA keys ComfyUI accepts, namespaces, metadata, a save ->
load round trip with identical outputs, loader errors that say exactly what is wrong; the LoRA-only export
(`bfr export-lora`) that ComfyUI's LoRA loader consumes entirely, bf16 exports, and file modes under a known umask."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_bfr.lora import checkpoint as ck
from comfyui_bfr.lora.boosthub import BoostHubState
from comfyui_bfr.lora.face_embedder import AdapterConfig, FaceAdapter, FaceAutoencoderPair, LQFaceEncoder
from comfyui_bfr.lora.lora_targets import kohya_name, lora_target_names
from comfyui_bfr.train.flipnet import prepare_flipnet_unet
from fixtures.flipnet import build_micro_unet, fixture_unet, TINY_FACE



def _trained_unet(seed=0, rank=4, phi=1.0):
    unet = build_micro_unet(0)
    state = prepare_flipnet_unet(unet, rank, None, phi)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return unet, state


def _face_modules(seed=0):
    torch.manual_seed(seed)
    enc = LQFaceEncoder.from_pair(FaceAutoencoderPair(TINY_FACE))
    ada = FaceAdapter(AdapterConfig(in_dim=TINY_FACE.token_dim, out_dim=1024, hidden_dim=64))
    return enc, ada


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    unet, state = _trained_unet()
    enc, ada = _face_modules()
    path = tmp_path_factory.mktemp("ck") / "flipnet_restore.safetensors"
    ck.save_flipnet_checkpoint(path, unet, mode="restore", face_encoder=enc, adapter=ada, face_image_size=32,
                               defaults=ck.FlipNetDefaults(phi=1.25, t_y_policy="fixed", t_y=80),
                               train_config={"lora_rank": 4, "mode": "restore"})
    return path, unet, enc, ada


def test_file_layout_and_metadata(saved):
    path, unet, *_ = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["bfr_format"] == "flipnet/1" and meta["base_model"] == "sd2.1-base" and meta["mode"] == "restore"
    assert meta["lora_rank"] == "4" and float(meta["lora_alpha"]) == 4.0
    assert float(meta["phi"]) == 1.25 and meta["t_y_policy"] == "fixed" and meta["t_y"] == "80"
    assert json.loads(meta["unet"])["cross_attention_dim"] == 1024
    assert len(meta["train_config_hash"]) == 16 and json.loads(meta["train_config"])["lora_rank"] == 4
    prefixes = {k.split(".", 1)[0] if not k.startswith("lora_unet_") else "lora_unet_" for k in keys}
    assert prefixes == {"lora_unet_", "boosthub", "face_embedder", "adapter"}
    n_targets = len(lora_target_names(unet))
    assert sum(k.endswith(".lora_down.weight") for k in keys) == n_targets
    assert sum(k.endswith(".alpha") for k in keys) == n_targets
    assert not any("lora_A" in k or "lora_B" in k or k.startswith("unet.") for k in keys)  # no peft keys


def test_kohya_names_are_what_comfyui_maps_for_sd21():
    """ComfyUI's model_lora_keys_unet maps 'lora_unet_' + <diffusers weight path without .weight, '.' -> '_'> for
    every UNet weight (comfyui-notes §4.2); every FlipNet LoRA name must be one of those, on the real SD2.1 layout."""
    from diffusers import UNet2DConditionModel

    from comfyui_bfr.sd.convert import SD21_BASE_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(SD21_BASE_UNET_CONFIG))
    accepted = {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in unet.state_dict() if
                k.endswith(".weight")}
    names = [kohya_name(p) for p in lora_target_names(unet)]
    assert len(names) == 128  # 16 transformer blocks x (attn1, attn2) x (to_q, to_k, to_v, to_out.0)
    assert set(names) <= accepted
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0" in names


_COMFY_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.lora, comfy.model_detection
from safetensors.torch import load_file
sd = load_file(sys.argv[2])  # the tiny UNet in single-file (ldm) form

class Model:  # what model_lora_keys_unet reads: state_dict() keys and model_config.unet_config
    class model_config:
        unet_config = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")

    def state_dict(self):
        return {"diffusion_model." + k[len("model.diffusion_model."):]: v for k, v in sd.items()}

key_map = comfy.lora.model_lora_keys_unet(Model(), {})
keep = sys.argv[4] if len(sys.argv) > 4 else "lora_unet_"  # "" = the whole file, as LoraLoaderModelOnly reads it
lora = {k: v for k, v in load_file(sys.argv[3]).items() if k.startswith(keep)}
patches = comfy.lora.load_lora(lora, key_map, log_missing=True)
print(json.dumps({"n_targets": sum(k.endswith(".lora_down.weight") for k in lora), "n_patches": len(patches),
                  "n_keys": len(lora), "targets": sorted(patches)}))
"""


def _comfy_load_lora(tmp_path: Path, unet_base_sd: dict, lora_file: Path, keep: str = "lora_unet_"):
    """ComfyUI's own comfy.lora.load_lora + model_lora_keys_unet in ComfyUI's Python: (info, stderr)."""
    from fixtures.tiny_sd import TINY_UNET_CONFIG, unet_diffusers_to_ldm_state_dict

    ldm = unet_diffusers_to_ldm_state_dict(unet_base_sd, TINY_UNET_CONFIG)
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "ldm.safetensors"))  # model.diffusion_model.*
    comfy = Path(os.environ["COMFYUI_PATH"])
    python = comfy / ".venv" / "bin" / "python"
    res = subprocess.run([str(python if python.exists() else sys.executable), "-c", _COMFY_SCRIPT, str(comfy),
                          str(tmp_path / "ldm.safetensors"), str(lora_file), keep], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr



@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to check with ComfyUI's own code")
def test_comfyui_lora_loader_accepts_every_lora_key(tmp_path):
    """ComfyUI's own comfy.lora.load_lora + model_lora_keys_unet on the SD2.1-topology tiny UNet: every kohya pair
    becomes a weight patch and no LoRA key is reported as not loaded."""
    unet = fixture_unet(0)
    base_sd = {k: v.clone() for k, v in unet.state_dict().items()}
    prepare_flipnet_unet(unet, 4, None, 1.0)
    out = ck.save_flipnet_checkpoint(tmp_path / "fixture_flipnet.safetensors", unet, mode="degrade")
    info, stderr = _comfy_load_lora(tmp_path, base_sd, out)
    assert "lora key not loaded" not in stderr, stderr[-2000:]
    assert info["n_targets"] == len(lora_target_names(unet)) == info["n_patches"]
    assert all(t.startswith("diffusion_model.") and ".transformer_blocks.0.attn" in t for t in info["targets"])


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to check with ComfyUI's own code")
def test_comfyui_lora_loader_consumes_every_key_of_the_lora_export(tmp_path):
    """The whole file as LoraLoaderModelOnly reads it: the full FlipNet file leaves its BoostHub / face keys
    unloaded (one "lora key not loaded" line each), the `bfr export-lora` file has nothing ComfyUI does not load."""
    unet = fixture_unet(0)
    base_sd = {k: v.clone() for k, v in unet.state_dict().items()}
    prepare_flipnet_unet(unet, 4, None, 1.0)
    enc, ada = _face_modules()
    full = ck.save_flipnet_checkpoint(tmp_path / "flipnet_restore.safetensors", unet, mode="restore",
                                      face_encoder=enc, adapter=ada, face_image_size=32)
    from comfyui_bfr.cli.main import main as bfr_main

    assert bfr_main(["export-lora", str(full), str(tmp_path / "flipnet_restore_lora.safetensors")]) == 0
    info_full, err_full = _comfy_load_lora(tmp_path, base_sd, full, keep="")
    n_foreign = sum(not k.startswith("lora_unet_") for k in load_file(str(full)))
    assert err_full.count("lora key not loaded") == n_foreign > 0
    info, err = _comfy_load_lora(tmp_path, base_sd, tmp_path / "flipnet_restore_lora.safetensors", keep="")
    assert "lora key not loaded" not in err, err[-2000:]
    assert info["n_keys"] == 3 * info["n_targets"] and info["n_patches"] == info["n_targets"]
    assert info["n_targets"] == len(lora_target_names(unet)) and info["targets"] == info_full["targets"]


def test_round_trip_gives_identical_outputs(saved):
    path, unet, enc, ada = saved
    ckpt = ck.read_flipnet_checkpoint(path)
    assert ckpt.rank == 4 and ckpt.mode == "restore" and ckpt.face_image_size == 32
    fresh = build_micro_unet(0)
    state = ck.apply_flipnet_checkpoint(fresh, ckpt)
    assert isinstance(state, BoostHubState) and state.phi == 1.25
    enc2, ada2 = ck.build_face_modules(ckpt)
    torch.manual_seed(1)
    z = torch.randn(4, 4, 8, 8)
    t = torch.tensor([900, 10, 400, 400])
    ctx = torch.randn(4, 77, 1024)
    img = torch.rand(2, 3, 32, 32)
    unet.eval()
    with torch.no_grad():
        for proc in (p for p in unet.attn_processors.values() if hasattr(p, "state")):
            proc.state.phi = 1.25
        assert torch.equal(unet(z, t, ctx).sample, fresh(z, t, ctx).sample)
        assert torch.equal(ada(enc(img)), ada2(enc2(img)))


def test_face_ae_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    pair = FaceAutoencoderPair(TINY_FACE)
    path = ck.save_face_ae_checkpoint(tmp_path / "face_ae_recon.safetensors", pair, stage="recon", image_size=32)
    pair2, meta = ck.load_face_ae_checkpoint(path)
    assert meta["stage"] == "recon" and meta["bfr_format"] == "flipnet-face-ae/1"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pair.lq.encode(x), pair2.lq.encode(x))
    with pytest.raises(ck.CheckpointError, match="expected 'flipnet/1'.*--face-ae"):
        ck.read_flipnet_checkpoint(path)


# ----------------------------------------------------------------------------------------------------- errors
def _rewrite(src: Path, dst: Path, tensors=None, meta_update=None, drop=()):
    t = load_file(str(src)) if tensors is None else tensors
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_update or {})
    save_file({k: v for k, v in t.items() if k not in drop}, str(dst), metadata=meta)
    return dst


def test_wrong_base_model_and_format(saved, tmp_path):
    path, *_ = saved
    with pytest.raises(ck.CheckpointError, match="base model 'sd1.5'.*sd2.1-base"):
        ck.read_flipnet_checkpoint(_rewrite(path, tmp_path / "a.safetensors", meta_update={"base_model": "sd1.5"}))
    with pytest.raises(ck.CheckpointError, match="bfr_format is 'dr-encoder/1'"):
        ck.read_flipnet_checkpoint(_rewrite(path, tmp_path / "b.safetensors", meta_update={"bfr_format": "dr-encoder/1"}))
    # a UNet that is not SD2.x (context 768) is refused before anything is patched
    from diffusers import UNet2DConditionModel

    from fixtures.flipnet import MICRO_UNET_CONFIG

    sd15 = UNet2DConditionModel(**dict(MICRO_UNET_CONFIG, cross_attention_dim=768))
    with pytest.raises(ValueError, match="cross_attention_dim=768"):
        ck.apply_flipnet_checkpoint(sd15, ck.read_flipnet_checkpoint(path))
    # same width, different topology
    other = UNet2DConditionModel(**dict(MICRO_UNET_CONFIG, block_out_channels=(64, 128), norm_num_groups=16))
    with pytest.raises(ck.CheckpointError, match="different UNet topology.*block_out_channels"):
        ck.apply_flipnet_checkpoint(other, ck.read_flipnet_checkpoint(path))


def test_mismatched_ranks(saved, tmp_path):
    path, *_ = saved
    t = load_file(str(path))
    key = next(k for k in t if k.endswith(".lora_down.weight"))
    t[key] = torch.zeros(8, t[key].shape[1])
    with pytest.raises(ck.CheckpointError, match=r"mixes LoRA ranks \[4, 8\]"):
        ck.read_flipnet_checkpoint(_rewrite(path, tmp_path / "r.safetensors", tensors=t))
    with pytest.raises(ck.CheckpointError, match="metadata says LoRA rank 16 but the weights have rank 4"):
        ck.read_flipnet_checkpoint(_rewrite(path, tmp_path / "m.safetensors", meta_update={"lora_rank": "16"}))
    # a UNet that already carries a FlipNet adapter of another rank
    unet = build_micro_unet(0)
    prepare_flipnet_unet(unet, 8, None, 1.0)
    with pytest.raises(ck.CheckpointError, match="rank 4 but the UNet already carries a FlipNet adapter of rank 8"):
        ck.apply_flipnet_checkpoint(unet, ck.read_flipnet_checkpoint(path))


def test_missing_and_foreign_tensors(saved, tmp_path):
    path, *_ = saved
    t = load_file(str(path))
    boost = next(k for k in t if k.startswith("boosthub.") and k.endswith(".k_proj.weight"))
    with pytest.raises(ck.CheckpointError, match=r"x\.safetensors: BoostHub .*attn1 lacks k_proj\.weight"):
        ck.read_flipnet_checkpoint(_rewrite(path, tmp_path / "x.safetensors", drop=(boost,)))
    layer = boost[: -len("k_proj.weight")]  # a whole layer missing is only seen against the UNet
    with pytest.raises(ck.CheckpointError, match="5 missing"):
        ck.apply_flipnet_checkpoint(build_micro_unet(0), ck.read_flipnet_checkpoint(
            _rewrite(path, tmp_path / "x2.safetensors", drop=tuple(k for k in t if k.startswith(layer)))))
    t["vae.encoder.weight"] = torch.zeros(1)
    with pytest.raises(ck.CheckpointError, match="outside the known namespaces.*vae.encoder.weight"):
        ck.read_flipnet_checkpoint(_rewrite(path, tmp_path / "y.safetensors", tensors=t))
    adapter_keys = [k for k in load_file(str(path)) if k.startswith("adapter.")]
    with pytest.raises(ck.CheckpointError, match="only one of 'face_embedder"):
        ck.read_flipnet_checkpoint(_rewrite(path, tmp_path / "z.safetensors", drop=tuple(adapter_keys)))


def test_corrupt_truncated_and_missing_files(saved, tmp_path):
    path, *_ = saved
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="trunc.safetensors: cannot be read.*corrupt or truncated"):
        ck.read_flipnet_checkpoint(trunc)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ck.CheckpointError, match="corrupt or truncated"):
        ck.read_flipnet_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.read_flipnet_checkpoint(tmp_path / "nope.safetensors")
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"x")
    with pytest.raises(ck.CheckpointError, match="expected a .safetensors file"):
        ck.read_flipnet_checkpoint(pth)


def test_degrade_checkpoint_has_no_face_modules(tmp_path):
    unet, _ = _trained_unet(seed=2)
    path = ck.save_flipnet_checkpoint(tmp_path / "flipnet_degrade.safetensors", unet, mode="degrade")
    ckpt = ck.read_flipnet_checkpoint(path)
    assert ckpt.mode == "degrade" and not ckpt.has_face_embedder
    with pytest.raises(ck.CheckpointError, match="degrade-mode checkpoint without a face embedder"):
        ck.build_face_modules(ckpt)


# ------------------------------------------------------------------------------ doors: bad files, clear messages
# The micro UNet: block_out_channels (32, 64); attention in down block 0 and up block 1 (32 wide) and the middle
# block (64 wide); cross-attention keys/values read the 1024-wide SD2.1 text context.


def _read_bad(saved, tmp_path, name, tensors=None, meta_update=None):
    path, *_ = saved
    return ck.read_flipnet_checkpoint(_rewrite(path, tmp_path / name, tensors=tensors, meta_update=meta_update))


def test_door_lora_for_another_text_width(saved, tmp_path):
    """(a) A LoRA down projection 768 wide (SD1.x's text width) where SD2.1's attn2.to_k reads 1024: ComfyUI's loader
    would only log an error at merge time and leave the layer unpatched; the reader names the key, the layer and both
    widths."""
    t = load_file(str(saved[0]))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert t[key].shape == (4, 1024)
    t[key] = torch.zeros(4, 768)
    with pytest.raises(ck.CheckpointError, match=(
            r"^a768\.safetensors: LoRA down projection lora_unet_down_blocks_0_.*attn2_to_k\.lora_down\.weight is "
            r"4x768, but the layer it targets \(down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\) "
            r"takes 1024-wide inputs \(the SD2\.1 text context, cross_attention_dim 1024\) \(768 is SD1\.x's")):
        _read_bad(saved, tmp_path, "a768.safetensors", tensors=t)
    # an up projection that does not give the block's width, and a layer the UNet does not have
    t = load_file(str(saved[0]))
    up = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    t[up] = torch.zeros(32, 4)
    with pytest.raises(ck.CheckpointError, match=r"LoRA up projection .*mid_block.*is 32x4, but the layer it targets "
                                                 r"\(mid_block\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q\) "
                                                 r"gives 64-wide outputs"):
        _read_bad(saved, tmp_path, "up.safetensors", tensors=t)
    t = load_file(str(saved[0]))
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        src = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" + suffix
        t[src.replace("down_blocks_0", "down_blocks_7")] = t[src].clone()
    with pytest.raises(ck.CheckpointError, match=r"targets a layer this UNet does not have: the UNet has 2 down "
                                                 r"blocks \(block_out_channels \[32, 64\]\), not down_blocks\.7"):
        _read_bad(saved, tmp_path, "level.safetensors", tensors=t)


def test_door_inconsistent_boosthub_shapes(saved, tmp_path):
    """(b) BoostHub to_q 32x32 but to_k 32x64; a whole layer 64 wide in a 32-wide block."""
    t = load_file(str(saved[0]))
    layer = "boosthub.down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    t[layer + "k_proj.weight"] = torch.zeros(32, 64)
    with pytest.raises(ck.CheckpointError, match=r"^kq\.safetensors: BoostHub down_blocks\.0\..*attn1: k_proj\.weight "
                                                 r"is 32x64 but q_proj\.weight is 32x32"):
        _read_bad(saved, tmp_path, "kq.safetensors", tensors=t)
    t = load_file(str(saved[0]))
    for leaf in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight"):
        t[layer + leaf] = torch.zeros(64, 64)
    t[layer + "out_proj.bias"] = torch.zeros(64)
    with pytest.raises(ck.CheckpointError, match=r"BoostHub down_blocks\.0\..*attn1 is 64 wide but that "
                                                 r"self-attention layer is 32 wide"):
        _read_bad(saved, tmp_path, "wide.safetensors", tensors=t)
    t = load_file(str(saved[0]))
    t["boosthub.down_blocks.0.attentions.0.transformer_blocks.0.attn2.q_proj.weight"] = torch.zeros(32, 32)
    with pytest.raises(ck.CheckpointError, match=r"'boosthub\.down_blocks.*attn2\.q_proj\.weight' is not "
                                                 r"'boosthub\.<self-attention \(attn1\) path>"):
        _read_bad(saved, tmp_path, "attn2.safetensors", tensors=t)


def test_door_face_embedder_tensor_of_the_wrong_size(saved, tmp_path):
    """(c) A face-encoder tensor that does not fit face_ae_config: named with both shapes, no state-dict dump."""
    t = load_file(str(saved[0]))
    key = "face_embedder.encoder.conv_in.weight"
    assert t[key].shape == (32, 3, 3, 3)
    t[key] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ck.CheckpointError, match=r"^fe\.safetensors: face_embedder\.encoder\.conv_in\.weight is "
                                                 r"16x3x3x3, but the stored face_ae_config .* needs 32x3x3x3") as info:
        _read_bad(saved, tmp_path, "fe.safetensors", tensors=t)
    assert "state_dict" not in str(info.value) and "size mismatch" not in str(info.value)
    t = load_file(str(saved[0]))
    t["adapter.norm.weight"] = torch.zeros(512)
    with pytest.raises(ck.CheckpointError, match=r"adapter\.norm\.weight is 512, but the stored adapter_config .* "
                                                 r"needs 1024"):
        _read_bad(saved, tmp_path, "ada.safetensors", tensors=t)


@pytest.mark.parametrize("update,match", [
    ({"t_y": "50.5"}, r"metadata t_y is '50\.5', but it must be an integer timestep in \[0, 999\] \(e\.g\. '100'\)"),
    ({"t_y": "fifty"}, r"metadata t_y is 'fifty', but it must be an integer timestep"),
    ({"t_y": "1200"}, r"metadata t_y is 1200, but it must be an integer timestep in \[0, 999\]"),
    ({"phi": "strong"}, r"metadata phi is 'strong', but it must be a finite number >= 0 \(the BoostHub enhance "
                        r"weight"),
    ({"phi": "nan"}, r"metadata phi is 'nan', but it must be a finite number >= 0"),
    ({"lora_rank": "four"}, r"metadata lora_rank is 'four', but it must be an integer"),
    ({"t_y_policy": "sometimes"}, r"metadata: t_y_policy 'sometimes' is not one of \('same', 'fixed'\)"),
])
def test_door_bad_numbers_in_the_metadata(saved, tmp_path, update, match):
    """(d) t_y that is not an integer timestep, phi that is not a number: the key, the value and the rule."""
    with pytest.raises(ck.CheckpointError, match=r"^meta\.safetensors: " + match):
        _read_bad(saved, tmp_path, "meta.safetensors", meta_update=update)


def test_door_unknown_face_ae_config_field(saved, tmp_path):
    """(e) An unknown face_ae_config field was a raw TypeError from the dataclass; now it is named."""
    with safe_open(str(saved[0]), framework="pt") as f:
        cfg = json.loads(f.metadata()["face_ae_config"])
    cfg["patch"] = 2
    with pytest.raises(ck.CheckpointError, match=r"^cfg\.safetensors: metadata 'face_ae_config' has unknown "
                                                 r"field\(s\) \['patch'\]; FaceAEConfig has \['block_out_channels'"):
        _read_bad(saved, tmp_path, "cfg.safetensors", meta_update={"face_ae_config": json.dumps(cfg)})
    with pytest.raises(ck.CheckpointError, match=r"metadata 'adapter_config' must be a JSON object"):
        _read_bad(saved, tmp_path, "cfg2.safetensors", meta_update={"adapter_config": "[64, 1024]"})
    cfg.pop("patch")
    cfg["norm_num_groups"] = 7
    with pytest.raises(ck.CheckpointError, match=r"metadata 'face_ae_config' is not a valid FaceAEConfig: .*multiples "
                                                 r"of norm_num_groups=7"):
        _read_bad(saved, tmp_path, "cfg3.safetensors", meta_update={"face_ae_config": json.dumps(cfg)})


# ------------------------------------------------------------------------------------------- LoRA-only export
def test_export_lora_writes_exactly_the_lora_keys(saved, tmp_path, caplog):
    from comfyui_bfr.cli.main import main as bfr_main

    path, unet, *_ = saved
    out = tmp_path / "loras" / "flipnet_restore_lora.safetensors"
    assert bfr_main(["export-lora", str(path), str(out)]) == 0
    full, lora = load_file(str(path)), load_file(str(out))
    assert set(lora) == {k for k in full if k.startswith("lora_unet_")}
    assert all(k.startswith("lora_unet_") for k in lora) and len(lora) == 3 * len(lora_target_names(unet))
    assert all(torch.equal(lora[k], full[k]) for k in lora)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["bfr_format"] == "flipnet-lora/1" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4" and meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora" and meta["mode"] == "restore"
    assert "train_config" not in meta and out.stat().st_size < path.stat().st_size / 2
    # our own loader says what the export is and where it goes
    with pytest.raises(ck.CheckpointError, match="LoRA part alone.*LoraLoaderModelOnly"):
        ck.read_flipnet_checkpoint(out)


def test_export_lora_refuses_what_is_not_a_flipnet_file(saved, tmp_path, caplog):
    from comfyui_bfr.cli.main import main as bfr_main

    path, *_ = saved
    lora_only = ck.export_lora_only(path, tmp_path / "a_lora.safetensors")
    face_ae = ck.save_face_ae_checkpoint(tmp_path / "face_ae_recon.safetensors", FaceAutoencoderPair(TINY_FACE),
                                         stage="recon", image_size=32)
    plain = tmp_path / "someone_elses_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(plain))
    for src, expected in ((lora_only, "already a LoRA-only export"), (face_ae, "face-autoencoder file"),
                          (plain, "not a FlipNet checkpoint .*loads with LoraLoaderModelOnly as it is")):
        caplog.clear()
        assert bfr_main(["export-lora", str(src), str(tmp_path / "out.safetensors")]) == 2
        assert re.search(expected, caplog.text) and "bfr train flipnet" in caplog.text, caplog.text
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ValueError, match="is the input file"):
        ck.export_lora_only(path, path)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        ck.export_lora_only(path, tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.export_lora_only(tmp_path / "nope.safetensors", tmp_path / "o.safetensors")


# -------------------------------------------------------------------------------------------- dtype and modes
def test_bf16_export_halves_the_file_and_loads_back(saved, tmp_path):
    path, unet, enc, ada = saved
    half = ck.save_flipnet_checkpoint(tmp_path / "flipnet_restore_bf16.safetensors", unet, mode="restore",
                                      face_encoder=enc, adapter=ada, face_image_size=32, dtype=torch.bfloat16)
    tensors = load_file(str(half))
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert {v.dtype for k, v in tensors.items() if k.endswith(".alpha")} == {torch.float32}
    assert half.stat().st_size < 0.55 * path.stat().st_size
    ckpt = ck.read_flipnet_checkpoint(half)
    assert ckpt.metadata["dtype"] == "bf16"
    fresh = build_micro_unet(0)
    ck.apply_flipnet_checkpoint(fresh, ckpt)
    ref = {k: v for k, v in unet.state_dict().items() if "lora_" in k or ".hub." in k}
    got = fresh.state_dict()
    for k, v in ref.items():  # bf16 rounding only (8 bits of mantissa)
        torch.testing.assert_close(got[k].float(), v.float(), rtol=1e-2, atol=1e-3)
    enc2, ada2 = ck.build_face_modules(ckpt)
    assert next(enc2.parameters()).dtype == torch.float32


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_exports_get_the_usual_umask_permissions(saved, tmp_path, umask, mode):
    """safetensors writes 0600; ComfyUI running as another user must be able to read what we export."""
    path, unet, *_ = saved
    old = os.umask(umask)
    try:
        assert ck.current_umask() == umask
        files = [ck.save_flipnet_checkpoint(tmp_path / "f.safetensors", unet, mode="degrade"),
                 ck.save_face_ae_checkpoint(tmp_path / "a.safetensors", FaceAutoencoderPair(TINY_FACE), stage="recon",
                                            image_size=32),
                 ck.export_lora_only(path, tmp_path / "l.safetensors")]
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in files] == [mode] * 3
    assert not list(tmp_path.glob("*.tmp.safetensors"))
