"""Every shipped API workflow, queued on a real headless ComfyUI through our client, exactly as users run it.

Only the inputs a user would change differ: every CheckpointLoaderSimple ``ckpt_name`` points at the tiny SD2
checkpoint (tests/fixtures/tiny_sd.py) and every LoadImage at an uploaded 128 px test photo.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from comfyui_bfr import NODE_CLASS_MAPPINGS
from comfyui_bfr.cli.client import ComfyClient, apply_overrides, load_api_prompt, set_load_images

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[2]
API_WORKFLOWS = sorted((REPO / "workflows" / "api").glob("*.json"))
TEST_IMAGE_PX = 128
PROMPT_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def test_image(tmp_path_factory) -> Path:
    """skimage's astronaut (public domain) resized to 128 px, as PNG."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((TEST_IMAGE_PX, TEST_IMAGE_PX), Image.Resampling.LANCZOS)
    path = tmp_path_factory.mktemp("bfr_img") / "astronaut_128.png"
    img.save(path)
    return path


@pytest.fixture(scope="session")
def object_info(comfy_server) -> dict:
    with ComfyClient(comfy_server.url) as c:
        return c.object_info()


def test_server_lists_every_pack_node(comfy_server, object_info):
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(object_info))
    assert not missing, missing
    for node_id in NODE_CLASS_MAPPINGS:
        assert object_info[node_id]["python_module"].startswith("custom_nodes."), node_id


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_node_has_description_and_tooltips(object_info, node_id):
    info = object_info[node_id]
    assert node_id.startswith("BFR"), node_id
    assert info["category"].startswith("BFR"), info["category"]
    assert isinstance(info.get("description"), str) and info["description"].strip(), "DESCRIPTION missing"
    no_tip = []
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if not str(opts.get("tooltip", "")).strip():
                no_tip.append(name)
    assert not no_tip, f"inputs without a tooltip: {no_tip}"


def test_there_are_api_workflows():
    assert API_WORKFLOWS, "workflows/api/ must hold the API-format twins of the shipped workflows"


def _prepare(prompt: dict, image_name: str, checkpoint_name: str, object_info: dict) -> dict:
    prompt = json.loads(json.dumps(prompt))
    sets = []
    for nid, node in prompt.items():
        if node.get("class_type") == "CheckpointLoaderSimple":
            sets.append(f"{nid}.ckpt_name={checkpoint_name}")
        assert node.get("class_type") in object_info, f"node {nid}: unknown class_type {node.get('class_type')}"
    set_load_images(prompt, image_name)
    return apply_overrides(prompt, sets)


@pytest.mark.parametrize("workflow", API_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs(comfy_server, object_info, test_image, workflow, tmp_path):
    prompt, _ = load_api_prompt(workflow)
    with ComfyClient(comfy_server.url) as client:
        image_name = client.upload_image(test_image)
        prompt = _prepare(prompt, image_name, comfy_server.checkpoint_name, object_info)
        events = []
        prompt_id = client.queue(prompt)
        entry = client.wait(prompt_id, timeout=PROMPT_TIMEOUT_S, on_progress=events.append)
        assert entry["status"]["status_str"] == "success"
        assert events and events[-1]["event"] == "done"
        assert entry["outputs"], "the workflow produced no outputs"
        refs = client.outputs(prompt_id)
        paths = [client.download(ref, tmp_path) for ref in refs]

    from PIL import Image

    save_nodes = [nid for nid, n in prompt.items() if n["class_type"] in ("SaveImage", "PreviewImage")]
    if save_nodes:
        assert refs, f"image nodes {save_nodes} saved nothing"
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
        with Image.open(path) as im:
            w, h = im.size
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        assert 16 <= w <= 4096 and 16 <= h <= 4096, (path.name, w, h)
        assert np.isfinite(arr).all()
        assert arr.std() > 1e-3, f"{path.name} is a constant image"


# ------------------------------------------------------------------------------- the tiny checkpoint, core nodes
def _core_graph(ckpt: str, image_name: str) -> dict:
    """txt2img and img2img with core nodes only: CheckpointLoaderSimple -> CLIPTextEncode -> KSampler -> VAE."""
    def node(cls, title, **inputs):
        return {"class_type": cls, "inputs": inputs, "_meta": {"title": title}}

    return {
        "1": node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=ckpt),
        "2": node("CLIPTextEncode", "Positive", clip=["1", 1], text="a photo of a face, high quality"),
        "3": node("CLIPTextEncode", "Negative", clip=["1", 1], text="blurry"),
        "4": node("EmptyLatentImage", "Empty Latent", width=128, height=128, batch_size=1),
        "5": node("KSampler", "KSampler", model=["1", 0], positive=["2", 0], negative=["3", 0],
                  latent_image=["4", 0], seed=0, steps=2, cfg=2.0, sampler_name="euler", scheduler="normal",
                  denoise=1.0),
        "6": node("VAEDecode", "Decode", samples=["5", 0], vae=["1", 2]),
        "7": node("SaveImage", "Save txt2img", images=["6", 0], filename_prefix="bfr_test/txt2img"),
        "8": node("LoadImage", "Load photo", image=image_name),
        "9": node("VAEEncode", "Encode", pixels=["8", 0], vae=["1", 2]),
        "10": node("KSampler", "KSampler img2img", model=["1", 0], positive=["2", 0], negative=["3", 0],
                   latent_image=["9", 0], seed=1, steps=2, cfg=2.0, sampler_name="euler", scheduler="normal",
                   denoise=0.5),
        "11": node("VAEDecode", "Decode img2img", samples=["10", 0], vae=["1", 2]),
        "12": node("SaveImage", "Save img2img", images=["11", 0], filename_prefix="bfr_test/img2img"),
    }


def test_tiny_checkpoint_runs_core_sampling_graph(comfy_server, test_image, tmp_path):
    """CheckpointLoaderSimple gives MODEL, CLIP and VAE from the one tiny file; KSampler + VAE round trip work."""
    from PIL import Image

    with ComfyClient(comfy_server.url) as client:
        name = client.upload_image(test_image)
        prompt_id = client.queue(_core_graph(comfy_server.checkpoint_name, name))
        client.wait(prompt_id, timeout=PROMPT_TIMEOUT_S)
        refs = client.outputs(prompt_id, types=["output"])
        assert sorted(r["node_id"] for r in refs) == ["12", "7"]
        paths = [client.download(r, tmp_path) for r in refs]
    for p in paths:
        arr = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
        assert arr.shape == (TEST_IMAGE_PX, TEST_IMAGE_PX, 3) and arr.std() > 1.0, p.name


def test_rejected_prompt_raises_with_node_errors(comfy_server):
    from comfyui_bfr.cli.client import PromptRejected

    prompt = _core_graph("no_such_checkpoint.safetensors", "no_such_image.png")
    with ComfyClient(comfy_server.url) as client, pytest.raises(PromptRejected) as info:
        client.queue(prompt)
    assert "1" in info.value.node_errors
    assert "no_such_checkpoint.safetensors" in str(info.value)


def test_failed_prompt_raises_with_exception_message(comfy_server, test_image):
    """A runtime error (SaveImage refuses to write outside the output folder) comes back from /history."""
    from comfyui_bfr.cli.client import PromptFailed

    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "../../escape"}},
    }
    with ComfyClient(comfy_server.url) as client:
        prompt["1"]["inputs"]["image"] = client.upload_image(test_image)
        prompt_id = client.queue(prompt)
        with pytest.raises(PromptFailed) as info:
            client.wait(prompt_id, timeout=120)
    assert info.value.node_id == "2" and info.value.node_type == "SaveImage"
    assert "output folder" in info.value.exception_message


def test_bfr_run_workflow_command(comfy_server, object_info, test_image, tmp_path):
    """`bfr run-workflow` on a UI-format workflow (uses its api/ twin), with --image and --set."""
    from comfyui_bfr.cli import main

    for ui in sorted((REPO / "workflows").glob("*.json")):
        twin = REPO / "workflows" / "api" / ui.name
        if not twin.is_file():
            continue
        prompt = json.loads(twin.read_text())
        if all(n["class_type"] in object_info for n in prompt.values()) and \
                not any(n["class_type"] == "CheckpointLoaderSimple" for n in prompt.values()):
            break
    else:
        pytest.skip("no shipped workflow runs without a checkpoint on the current node set")
    seeded = [nid for nid, n in prompt.items() if "seed" in n.get("inputs", {})]
    sets = [f"{seeded[0]}.seed=7"] if seeded else []
    argv = ["run-workflow", str(ui), "--server", comfy_server.url, "--image", str(test_image), "--out",
            str(tmp_path / "out"), "--timeout", str(PROMPT_TIMEOUT_S)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    saved = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert saved, "run-workflow saved no images"


def _run_and_load(client, prompt, tmp_path) -> list[np.ndarray]:
    from PIL import Image

    prompt_id = client.queue(prompt)
    client.wait(prompt_id, timeout=PROMPT_TIMEOUT_S)
    out = []
    for ref in client.outputs(prompt_id):
        with Image.open(client.download(ref, tmp_path)) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.int16))
    return out


def test_dr2_restore_and_sampler_workflows_give_the_same_image(comfy_server, object_info, test_image, tmp_path):
    """The convenience node and the SamplerCustomAdvanced graph are the same algorithm: same seed, same image;
    and another seed gives another image (the seed reaches the noise in both graphs)."""
    root = Path(__file__).resolve().parents[2] / "workflows" / "api"
    with ComfyClient(comfy_server.url) as client:
        name = client.upload_image(test_image)
        prompts = {}
        for stem in ("restore_dr2", "restore_dr2_sampler"):
            prompt, _ = load_api_prompt(root / f"{stem}.json")
            prompts[stem] = _prepare(prompt, name, comfy_server.checkpoint_name, object_info)
        a = _run_and_load(client, prompts["restore_dr2"], tmp_path / "a")
        b = _run_and_load(client, prompts["restore_dr2_sampler"], tmp_path / "b")
        assert len(a) == len(b) == 1
        assert a[0].shape == b[0].shape
        assert np.abs(a[0] - b[0]).max() <= 1, "same seed: the two DR2 graphs must agree"
        reseeded = json.loads(json.dumps(prompts["restore_dr2"]))
        seed_inputs = [(nid, k) for nid, n in reseeded.items() for k in n["inputs"] if k in ("seed", "noise_seed")]
        assert seed_inputs, "restore_dr2 has no seed input"
        for nid, k in seed_inputs:
            reseeded[nid]["inputs"][k] = 12345
        c = _run_and_load(client, reseeded, tmp_path / "c")
        assert np.abs(a[0] - c[0]).mean() > 0.05, "another seed must change the result"
