"""Every shipped API workflow, queued on a real headless ComfyUI through our client, exactly as users run it.

Only the inputs a user would change differ: every CheckpointLoaderSimple ``ckpt_name`` points at the tiny SD2
checkpoint (tests/fixtures/tiny_sd.py) and every LoadImage at an uploaded 128 px test photo.
"""

from __future__ import annotations

import json
import time
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
    from comfyui_bfr.cli.main import main

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


# ------------------------------------------------------------------ doors through the real server (design.md §8)
def _restore_graph(ckpt: str, width: int, height: int, **restore) -> dict:
    """CheckpointLoaderSimple + EmptyImage -> BFR DR2 Restore -> PreviewImage."""
    params = dict(n=2.0, tau=3, omega_mode="auto", omega=60, steps=20, space="latent", seed=0)
    params.update(restore)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": 1,
                                                     "color": 0x7F6A5A}},
        "3": {"class_type": "BFRDR2Restore", "inputs": {"model": ["1", 0], "vae": ["1", 2], "image": ["2", 0],
                                                        **params}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def test_huge_image_is_rejected_at_once_and_the_server_keeps_working(comfy_server):
    """A 4096x4096 IMAGE into BFR DR2 Restore used to run for minutes at 15 GB and ignore Cancel; the size guard
    rejects it before any work, with the fix in the message."""
    from comfyui_bfr.cli.client import PromptFailed

    ckpt = comfy_server.checkpoint_name
    with ComfyClient(comfy_server.url) as client:
        t0 = time.monotonic()
        prompt_id = client.queue(_restore_graph(ckpt, 4096, 4096, steps=4, tau=1, omega_mode="explicit", omega=3))
        with pytest.raises(PromptFailed) as info:
            client.wait(prompt_id, timeout=120)
        elapsed = time.monotonic() - t0
        assert info.value.node_type == "BFRDR2Restore", info.value
        message = info.value.exception_message
        assert "[BFR DR2 Restore] IMAGE is 4096x4096 = 16.8 megapixels per image, above max_megapixels=4.2" \
            in message, message
        assert "Crop the faces first" in message, message
        assert elapsed < 60, f"the guard took {elapsed:.0f} s"
        client.wait(client.queue(_restore_graph(ckpt, 64, 64, seed=1)), timeout=PROMPT_TIMEOUT_S)  # still serving


def test_interrupt_stops_a_long_dr2_restore_and_the_next_prompt_runs(comfy_server):
    """POST /interrupt during a long pixel-space DR2 run (1000 steps, a VAE round trip each) ends it within a step
    or two; the queue then runs the next prompt normally."""
    from comfyui_bfr.cli.client import PromptFailed

    ckpt = comfy_server.checkpoint_name
    long_run = _restore_graph(ckpt, 256, 256, n=8.0, tau=0, omega_mode="explicit", omega=999, steps=1000,
                              space="pixel", seed=5)
    marker = "DR2 restore: 1 image(s) 256x256"

    def started() -> int:
        return comfy_server.log_path.read_text(encoding="utf-8", errors="replace").count(marker)

    with ComfyClient(comfy_server.url) as client:
        before = started()
        prompt_id = client.queue(long_run)
        deadline = time.monotonic() + 300
        while started() == before:
            assert time.monotonic() < deadline, "the long DR2 run never started sampling"
            assert client.history(prompt_id) is None, "the long DR2 run ended before it could be interrupted"
            time.sleep(0.2)
        time.sleep(2.0)  # well inside the step loop (1000 steps take minutes on this CPU)
        assert client.history(prompt_id) is None, "the long DR2 run ended before it could be interrupted"
        t0 = time.monotonic()
        client.interrupt()
        with pytest.raises(PromptFailed) as info:
            client.wait(prompt_id, timeout=120)
        stopped = time.monotonic() - t0
        assert info.value.interrupted and info.value.node_type == "BFRDR2Restore", info.value
        assert stopped < 20, f"Cancel took {stopped:.1f} s to stop the run"
        next_id = client.queue(_restore_graph(ckpt, 64, 64, seed=2))
        entry = client.wait(next_id, timeout=PROMPT_TIMEOUT_S)
        assert entry["status"]["status_str"] == "success"
        assert client.outputs(next_id), "the next prompt produced no image"
