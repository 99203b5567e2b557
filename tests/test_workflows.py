"""Shipped workflows: UI format loads, API twin in step, every node type exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfyui_bfr import NODE_CLASS_MAPPINGS
from comfyui_bfr.cli.workflow_format import (WorkflowFormatError, comparable, is_ui_format, schema_from_node_class,
                                         ui_to_api)

ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
CORE = json.loads((Path(__file__).parent / "data" / "core_object_info.json").read_text())


def object_info() -> dict:
    info = {k: v for k, v in CORE.items() if not k.startswith("_")}
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        info[node_id] = schema_from_node_class(cls)
    return info


def test_there_are_workflows():
    assert UI_FILES, "workflows/ must ship example workflows"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_has_api_twin_in_step(path):
    ui = json.loads(path.read_text())
    assert is_ui_format(ui), f"{path.name} must be a UI-format (canvas) workflow"
    twin = ROOT / "workflows" / "api" / path.name
    assert twin.is_file(), f"missing API twin workflows/api/{path.name}"
    api = json.loads(twin.read_text())
    assert comparable(ui_to_api(ui, object_info())) == comparable(api)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_every_node_type_exists_and_links_are_consistent(path):
    ui = json.loads(path.read_text())
    known = object_info()
    ids = {n["id"] for n in ui["nodes"]}
    for node in ui["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):  # frontend-only annotation nodes
            continue
        assert node["type"] in known, f"{path.name}: unknown node type {node['type']}"
    for link_id, src, _src_slot, dst, _dst_slot, _type in ui["links"]:
        assert src in ids and dst in ids, f"{path.name}: link {link_id} references a missing node"
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        assert any(i.get("link") == link_id for i in dst_node["inputs"]), f"link {link_id} not on its target input"
    assert ui["last_link_id"] >= max([row[0] for row in ui["links"]] or [0])
    assert ui["last_node_id"] >= max(ids)


def test_api_workflows_only_use_declared_inputs():
    known = object_info()
    for path in sorted((ROOT / "workflows" / "api").glob("*.json")):
        for node_id, node in json.loads(path.read_text()).items():
            schema = known[node["class_type"]]["input"]
            declared = set(schema.get("required", {})) | set(schema.get("optional", {}))
            extra = set(node["inputs"]) - declared
            assert not extra, f"{path.name} node {node_id}: undeclared inputs {extra}"
            missing = set(schema.get("required", {})) - set(node["inputs"])
            assert not missing, f"{path.name} node {node_id}: missing required inputs {missing}"


def test_converter_rejects_a_stale_widget_list():
    ui = json.loads((ROOT / "workflows" / "degrade_classical.json").read_text())
    node = next(n for n in ui["nodes"] if n["type"] == "BFRDegradeClassical")
    node["widgets_values"] = node["widgets_values"][:-2]
    with pytest.raises(WorkflowFormatError, match="widget values"):
        ui_to_api(ui, object_info())


def test_converter_rejects_unknown_node_type():
    ui = json.loads((ROOT / "workflows" / "degrade_classical.json").read_text())
    ui["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(WorkflowFormatError, match="unknown type"):
        ui_to_api(ui, object_info())


# ------------------------------------------------------------------------------------------- FlipNet workflows
FLIPNET_WORKFLOWS = {"restore_flipnet": "restore", "degrade_flipnet": "degrade", "restore_dr2_then_flipnet": "restore",
                     "restore_photo_flipnet": "restore"}


def _api(stem: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / f"{stem}.json").read_text())


def _one(prompt: dict, class_type: str) -> tuple[str, dict]:
    found = [(nid, n) for nid, n in prompt.items() if n["class_type"] == class_type]
    assert len(found) == 1, f"expected one {class_type}, found {len(found)}"
    return found[0]


def _text_of(prompt: dict, link) -> str:
    src = prompt[link[0]]
    assert src["class_type"] == "CLIPTextEncode", f"prompt input comes from {src['class_type']}, not CLIPTextEncode"
    return src["inputs"]["text"]


def test_flipnet_workflows_ship_and_every_flipnet_workflow_is_checked_here():
    shipped = {p.stem for p in UI_FILES if any(n["type"] == "BFRApplyFlipNet"
                                                for n in json.loads(p.read_text())["nodes"])}
    assert shipped == set(FLIPNET_WORKFLOWS), shipped


@pytest.mark.parametrize("stem,mode", sorted(FLIPNET_WORKFLOWS.items()))
def test_flipnet_workflow_is_wired_as_the_paper_samples(stem, mode):
    """Load FlipNet -> Apply FlipNet (MODEL/VAE/CLIP of one checkpoint) -> KSampler on Apply's MODEL, prompts and
    LATENT (denoise 1) -> VAEDecode -> SaveImage; restore: CFG 1.5 and the paper's negative prompt; degrade: the null
    prompt on both sides. The FlipNet file is the one `bfr train flipnet` writes for that mode."""
    from comfyui_bfr.pipelines.flipnet import DEFAULT_NEGATIVE_PROMPT

    prompt = _api(stem)
    ckpt_id, _ = _one(prompt, "CheckpointLoaderSimple")
    load_id, load = _one(prompt, "BFRLoadFlipNet")
    assert load["inputs"]["flipnet_name"] == f"flipnet_{mode}.safetensors"
    apply_id, apply = _one(prompt, "BFRApplyFlipNet")
    a = apply["inputs"]
    assert (a["model"], a["vae"], a["flipnet"]) == ([ckpt_id, 0], [ckpt_id, 2], [load_id, 0])
    assert a["t_y_policy"] == "checkpoint" and a["phi"] == 1.0, "ship the checkpoint's t_y policy and phi 1 (paper)"
    for side in ("positive", "negative"):
        assert prompt[a[side][0]]["inputs"]["clip"] == [ckpt_id, 1]
    ks_id, ks = _one(prompt, "KSampler")
    k = ks["inputs"]
    assert (k["model"], k["positive"], k["negative"], k["latent_image"]) == \
        ([apply_id, 0], [apply_id, 1], [apply_id, 2], [apply_id, 3])
    assert k["denoise"] == 1.0
    _, dec = _one(prompt, "VAEDecode")
    assert dec["inputs"] == {"samples": [ks_id, 0], "vae": [ckpt_id, 2]}
    _, save = _one(prompt, "SaveImage")
    saved = prompt[save["inputs"]["images"][0]]
    if saved["class_type"] == "BFRPasteFaces":  # whole-photo twin: the decoded crops are pasted back, then saved
        saved = prompt[saved["inputs"]["restored"][0]]
    assert saved["class_type"] == "VAEDecode"
    if mode == "restore":
        assert k["cfg"] == 1.5
        assert _text_of(prompt, a["negative"]) == DEFAULT_NEGATIVE_PROMPT
        assert _text_of(prompt, a["positive"]) != DEFAULT_NEGATIVE_PROMPT
    else:  # null prompt on both sides: CFG would only double the work
        assert _text_of(prompt, a["positive"]) == _text_of(prompt, a["negative"]) == ""


def test_dr2_then_flipnet_feeds_the_dr2_image_into_flipnet():
    prompt = _api("restore_dr2_then_flipnet")
    ckpt_id, _ = _one(prompt, "CheckpointLoaderSimple")
    image_id, _ = _one(prompt, "LoadImage")
    dr2_id, dr2 = _one(prompt, "BFRDR2Restore")
    _, apply = _one(prompt, "BFRApplyFlipNet")
    assert dr2["inputs"]["image"] == [image_id, 0]
    assert (dr2["inputs"]["model"], dr2["inputs"]["vae"]) == ([ckpt_id, 0], [ckpt_id, 2])
    assert apply["inputs"]["image"] == [dr2_id, 0], "FlipNet must enhance the DR2 output, not the raw input"
    # the DR2 stage keeps the settings of the shipped DR2 workflow
    alone = _one(_api("restore_dr2"), "BFRDR2Restore")[1]["inputs"]
    assert {k: v for k, v in dr2["inputs"].items() if not isinstance(v, list)} == \
        {k: v for k, v in alone.items() if not isinstance(v, list)}


def test_workflow_ids_follow_the_naming_rule_and_are_unique():
    import uuid

    ids = {}
    for path in UI_FILES:
        wf_id = json.loads(path.read_text())["id"]
        assert wf_id == str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-bfr/{path.stem}")), path.name
        ids[wf_id] = path.name
    assert len(ids) == len(UI_FILES)


# ------------------------------------------------------------------------------------------- whole-photo workflows
PHOTO_WORKFLOWS = {"restore_photo_dr2": "BFRDR2Restore", "restore_photo_flipnet": "BFRApplyFlipNet",
                   "restore_photo_drbfr": "BFRApplyDRBFR", "restore_photo_clrface": "BFRApplyCLRFace"}
DRBFR_WORKFLOWS = ("restore_drbfr", "restore_photo_drbfr")


def test_every_drbfr_workflow_is_checked_here():
    shipped = {p.stem for p in UI_FILES if any(n["type"] == "BFRApplyDRBFR" for n in json.loads(p.read_text())["nodes"])}
    assert shipped == set(DRBFR_WORKFLOWS), shipped


@pytest.mark.parametrize("stem", DRBFR_WORKFLOWS)
def test_drbfr_workflow_samples_the_patched_model_with_its_prompts(stem):
    """The sampler (KSampler, or SamplerCustomAdvanced through CFGGuider + BasicScheduler) takes Apply DR-BFR's MODEL,
    BOTH prompts it returns (they carry the LQ latent) and its latent, at denoise 1; the DR prompt is on; the VAE that
    encodes the LQ image is the checkpoint's."""
    prompt = _api(stem)
    apply_id, apply = _one(prompt, "BFRApplyDRBFR")
    ckpt_id, _ = _one(prompt, "CheckpointLoaderSimple")
    load_id, load = _one(prompt, "BFRLoadDRBFR")
    assert apply["inputs"]["model"] == [ckpt_id, 0] and apply["inputs"]["vae"] == [ckpt_id, 2]
    assert apply["inputs"]["drbfr"] == [load_id, 0] and load["inputs"]["drbfr_name"] == "drbfr.safetensors"
    assert apply["inputs"]["use_dr_prompt"] is True
    users = [n for n in prompt.values() if n["class_type"] in ("KSampler", "CFGGuider")]
    assert len(users) == 1
    user = users[0]
    assert user["inputs"]["model"] == [apply_id, 0]
    assert user["inputs"]["positive"] == [apply_id, 1] and user["inputs"]["negative"] == [apply_id, 2]
    if user["class_type"] == "KSampler":
        assert user["inputs"]["latent_image"] == [apply_id, 3] and user["inputs"]["denoise"] == 1.0
    else:
        _, sched = _one(prompt, "BasicScheduler")
        _, adv = _one(prompt, "SamplerCustomAdvanced")
        assert sched["inputs"]["model"] == [apply_id, 0] and sched["inputs"]["denoise"] == 1.0
        assert adv["inputs"]["latent_image"] == [apply_id, 3]


def test_every_face_pipeline_workflow_is_checked_here():
    shipped = {p.stem for p in UI_FILES if any(n["type"] == "BFRDetectFaces" for n in json.loads(p.read_text())["nodes"])}
    assert shipped == set(PHOTO_WORKFLOWS), shipped


@pytest.mark.parametrize("stem,restorer", sorted(PHOTO_WORKFLOWS.items()))
def test_photo_workflow_is_detect_crop_restore_paste_save(stem, restorer):
    """One LoadImage feeds Detect, Crop and Paste; the restorer takes the crops; Paste takes the restorer's result
    (through VAEDecode for a MODEL patch), the faces from Detect and fixes colour; SaveImage saves the pasted photo;
    the numbered detection preview is shown."""
    prompt = _api(stem)
    load_id, _ = _one(prompt, "LoadImage")
    det_id, det = _one(prompt, "BFRDetectFaces")
    crop_id, crop = _one(prompt, "BFRCropFaces")
    paste_id, paste = _one(prompt, "BFRPasteFaces")
    assert det["inputs"]["image"] == crop["inputs"]["image"] == paste["inputs"]["image"] == [load_id, 0]
    assert crop["inputs"]["faces"] == paste["inputs"]["faces"] == [det_id, 0]
    assert crop["inputs"]["crop_size"] == 512 and det["inputs"]["selection"] == "all"
    assert paste["inputs"]["color_fix"] == "wavelet"
    rest_id, rest = _one(prompt, restorer)
    assert rest["inputs"]["image"] == [crop_id, 0]
    src = prompt[paste["inputs"]["restored"][0]]
    if restorer == "BFRDR2Restore":
        assert paste["inputs"]["restored"] == [rest_id, 0]
    else:
        assert src["class_type"] == "VAEDecode"
    _, save = _one(prompt, "SaveImage")
    assert save["inputs"]["images"] == [paste_id, 0]
    _, prev = _one(prompt, "PreviewImage")
    assert prev["inputs"]["images"] == [det_id, 1]


# ----------------------------------------------------------------------------------------------- CLR-Face workflows
CLRFACE_WORKFLOWS = ("restore_clrface", "restore_photo_clrface")


def test_every_clrface_workflow_is_checked_here():
    shipped = {p.stem for p in UI_FILES if any(n["type"] == "BFRCLRFaceSampler" for n in json.loads(p.read_text())["nodes"])}
    assert shipped == set(CLRFACE_WORKFLOWS), shipped


@pytest.mark.parametrize("stem", CLRFACE_WORKFLOWS)
def test_clrface_workflow_refines_the_dr2_estimate_as_the_paper_samples(stem):
    """CLR-Face §3.2-3.3 on SD2.1: x_id = DR2(LQ) in the same graph; refinement starts from VAEEncode(x_id) on a Karras
    schedule of the PATCHED model at denoise < 1 (sigma_start), ~40 Heun steps (paper), with the CLR-Face sampler whose
    identity reference is that same x_id; Apply CLR-Face reads the LQ faces (E(x^d) concatenated) and its MODEL and
    both prompts feed the guider at cfg 1; the identity drift x_id -> refined is shown by BFR Identity Score."""
    prompt = _api(stem)
    ckpt_id, _ = _one(prompt, "CheckpointLoaderSimple")
    dr2_id, dr2 = _one(prompt, "BFRDR2Restore")
    apply_id, apply = _one(prompt, "BFRApplyCLRFace")
    lq = dr2["inputs"]["image"]
    assert apply["inputs"]["image"] == lq, "Apply CLR-Face must read the degraded faces, not x_id"
    assert prompt[lq[0]]["class_type"] in ("LoadImage", "BFRCropFaces")
    assert (apply["inputs"]["model"], apply["inputs"]["vae"]) == ([ckpt_id, 0], [ckpt_id, 2])
    load_id, load = _one(prompt, "BFRLoadCLRFace")
    assert apply["inputs"]["clrface"] == [load_id, 0] and load["inputs"]["clrface_name"] == "clrface.safetensors"
    _, enc = _one(prompt, "VAEEncode")
    assert enc["inputs"]["pixels"] == [dr2_id, 0], "refinement starts from E(x_id)"
    sampler_id, sampler = _one(prompt, "BFRCLRFaceSampler")
    assert sampler["inputs"]["reference"] == [dr2_id, 0], "the identity reference is x_id"
    assert sampler["inputs"]["vae"] == [ckpt_id, 2] and sampler["inputs"]["scale"] > 0
    _, ident = _one(prompt, "BFRLoadIdentityModel")
    assert sampler["inputs"]["identity_model"][0] in prompt and ident["inputs"]["align"] == "template"
    _, sched = _one(prompt, "BasicScheduler")
    s = sched["inputs"]
    assert s["model"] == [apply_id, 0] and s["scheduler"] == "karras" and s["steps"] == 40 and 0 < s["denoise"] < 1
    _, guider = _one(prompt, "CFGGuider")
    g = guider["inputs"]
    assert (g["model"], g["positive"], g["negative"], g["cfg"]) == ([apply_id, 0], [apply_id, 1], [apply_id, 2], 1.0)
    adv_id, adv = _one(prompt, "SamplerCustomAdvanced")
    assert adv["inputs"]["sampler"] == [sampler_id, 0] and adv["inputs"]["latent_image"][0] == \
        [nid for nid, n in prompt.items() if n["class_type"] == "VAEEncode"][0]
    dec_id, dec = _one(prompt, "VAEDecode")
    assert dec["inputs"] == {"samples": [adv_id, 0], "vae": [ckpt_id, 2]}
    _, score = _one(prompt, "BFRIdentityScore")
    assert sorted([score["inputs"]["image_a"], score["inputs"]["image_b"]]) == sorted([[dr2_id, 0], [dec_id, 0]])
    shown = [n["inputs"]["source"] for n in prompt.values() if n["class_type"] == "PreviewAny"]
    assert [_one(prompt, "BFRIdentityScore")[0], 2] in shown and [sampler_id, 1] in shown


DRIFT_WORKFLOWS = ("restore_dr2", "restore_dr2_sampler", "restore_dr2_then_flipnet", "restore_flipnet", "restore_drbfr")


def test_every_aligned_restore_workflow_shows_identity_drift():
    """Identity drift is the first complaint of face-restoration users: every aligned-face restore workflow compares
    the input face with the saved result in BFR Identity Score and shows its report (CLR-Face's compare x_id with the
    refined face, tested above; whole-photo workflows paste several faces and have none)."""
    aligned = {p.stem for p in UI_FILES if p.stem.startswith("restore_") and "photo" not in p.stem
               and "clrface" not in p.stem}
    assert aligned == set(DRIFT_WORKFLOWS), aligned
    for stem in DRIFT_WORKFLOWS:
        prompt = _api(stem)
        load_id, _ = _one(prompt, "LoadImage")
        _, save = _one(prompt, "SaveImage")
        score_id, score = _one(prompt, "BFRIdentityScore")
        assert score["inputs"]["image_a"] == [load_id, 0], stem
        assert score["inputs"]["image_b"] == save["inputs"]["images"], stem
        assert score["inputs"]["aligned"] is True
        _, shown = _one(prompt, "PreviewAny")
        assert shown["inputs"]["source"] == [score_id, 2], stem
