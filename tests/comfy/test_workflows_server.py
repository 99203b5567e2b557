"""Every shipped API workflow, queued on a real headless ComfyUI through our client, exactly as users run it.

Only the inputs a user would change differ: every CheckpointLoaderSimple ``ckpt_name`` points at the tiny SD2
checkpoint (tests/fixtures/tiny_sd.py), every BFR Load FlipNet ``flipnet_name`` (``flipnet_<mode>.safetensors``, what
``bfr train flipnet`` writes) at the tiny FlipNet checkpoint of that mode (tests/fixtures/flipnet.py, non-zero
LoRA/BoostHub/face embedder on the tiny checkpoint's UNet), the DR-BFR / CLR-Face loaders at tiny non-zero files of
their formats, BFR Load Identity Model at a random-weights iresnet r18 ``backbone.pth`` (tests/fixtures/clrface.py),
and every LoadImage at an uploaded 128 px test photo.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from comfyui_bfr import NODE_CLASS_MAPPINGS
from comfyui_bfr.cli.client import ComfyClient, apply_overrides, load_api_prompt, set_load_images
from fixtures.clrface import IDENTITY_SERVER_NAME
from fixtures.clrface import SERVER_NAME as CLRFACE_SERVER_NAME
from fixtures.drbfr import SERVER_NAME as DRBFR_SERVER_NAME

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


def _prepare(prompt: dict, image_name: str, server, object_info: dict) -> dict:
    """The shipped prompt with the test server's model files and the uploaded image (nothing else changed)."""
    prompt = json.loads(json.dumps(prompt))
    sets = []
    flipnet_files = {f"flipnet_{mode}.safetensors": name for mode, name in server.flipnet_names.items()}
    for nid, node in prompt.items():
        if node.get("class_type") == "CheckpointLoaderSimple":
            sets.append(f"{nid}.ckpt_name={server.checkpoint_name}")
        if node.get("class_type") == "BFRLoadFlipNet":
            shipped = node["inputs"]["flipnet_name"]
            assert shipped in flipnet_files, f"node {nid}: ships {shipped!r}, not one of {sorted(flipnet_files)}"
            sets.append(f"{nid}.flipnet_name={flipnet_files[shipped]}")
        if node.get("class_type") == "BFRLoadDRBFR":
            assert node["inputs"]["drbfr_name"] == "drbfr.safetensors", f"node {nid}: ships another file name"
            sets.append(f"{nid}.drbfr_name={DRBFR_SERVER_NAME}")
        if node.get("class_type") == "BFRLoadCLRFace":
            assert node["inputs"]["clrface_name"] == "clrface.safetensors", f"node {nid}: ships another file name"
            sets.append(f"{nid}.clrface_name={CLRFACE_SERVER_NAME}")
        if node.get("class_type") == "BFRLoadIdentityModel":
            sets.append(f"{nid}.identity_name={IDENTITY_SERVER_NAME.removeprefix('identity/')}")
        assert node.get("class_type") in object_info, f"node {nid}: unknown class_type {node.get('class_type')}"
    set_load_images(prompt, image_name)
    return apply_overrides(prompt, sets)


@pytest.mark.parametrize("workflow", API_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs(comfy_server, object_info, test_image, workflow, tmp_path):
    prompt, _ = load_api_prompt(workflow)
    with ComfyClient(comfy_server.url) as client:
        image_name = client.upload_image(test_image)
        prompt = _prepare(prompt, image_name, comfy_server, object_info)
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
        assert (w, h) == (TEST_IMAGE_PX, TEST_IMAGE_PX), f"{path.name} is {w}x{h}, the input {TEST_IMAGE_PX} px"
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
            prompts[stem] = _prepare(prompt, name, comfy_server, object_info)
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


# ------------------------------------------------------------------------------------ FlipNet workflows, by property
FLIPNET_STEPS = 4  # KSampler steps for the property runs (the shipped 50 run once in test_workflow_runs)
DIFFERS = 2.0  # mean |difference| in 8-bit levels above which two outputs count as different


@pytest.fixture(scope="module")
def flipnet_inputs(comfy_server, test_image, tmp_path_factory) -> dict[str, str]:
    """Uploaded LoadImage names: ``photo`` (the test photo), ``copy`` (the same bytes under another name, so that a
    rerun re-executes every node instead of answering from ComfyUI's cache) and ``mirrored`` (another input)."""
    import shutil

    from PIL import Image

    d = tmp_path_factory.mktemp("bfr_flipnet_inputs")
    copy = d / "astronaut_128_copy.png"
    shutil.copyfile(test_image, copy)
    mirrored = d / "astronaut_128_mirrored.png"
    with Image.open(test_image) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    with ComfyClient(comfy_server.url) as client:
        return {"photo": client.upload_image(test_image), "copy": client.upload_image(copy),
                "mirrored": client.upload_image(mirrored)}


def _images_by_node(client, prompt, out_dir) -> dict[str, np.ndarray]:
    """Run ``prompt``; {node id: 8-bit RGB image (int16)} of every image it saved or previewed (one per node)."""
    from PIL import Image

    prompt_id = client.queue(prompt)
    client.wait(prompt_id, timeout=PROMPT_TIMEOUT_S)
    out = {}
    for ref in client.outputs(prompt_id):
        assert ref["node_id"] not in out, f"node {ref['node_id']} returned more than one image"
        with Image.open(client.download(ref, out_dir)) as im:
            out[ref["node_id"]] = np.asarray(im.convert("RGB"), dtype=np.int16)
    return out


def _only(images: dict[str, np.ndarray]) -> np.ndarray:
    assert len(images) == 1, sorted(images)
    return next(iter(images.values()))


def _node(prompt: dict, class_type: str) -> str:
    (nid,) = [k for k, n in prompt.items() if n["class_type"] == class_type]
    return nid


def _variant(prompt: dict, **changes) -> dict:
    """A copy of ``prompt`` with ``{node_id: {input: value}}`` changes."""
    out = json.loads(json.dumps(prompt))
    for nid, inputs in changes.items():
        out[nid]["inputs"].update(inputs)
    return out


def _flipnet_prompt(stem, server, object_info, image_name, steps=FLIPNET_STEPS) -> dict:
    prompt, _ = load_api_prompt(REPO / "workflows" / "api" / f"{stem}.json")
    prompt = _prepare(prompt, image_name, server, object_info)
    prompt[_node(prompt, "KSampler")]["inputs"]["steps"] = steps
    return prompt


def _plain_ksampler(prompt: dict) -> dict:
    """The same graph without FlipNet: KSampler on the checkpoint's MODEL, the same prompts (no face tokens) and an
    empty latent of the same size, same sampler settings and seed."""
    out = json.loads(json.dumps(prompt))
    apply_id, ks = _node(out, "BFRApplyFlipNet"), _node(out, "KSampler")
    apply = out[apply_id]["inputs"]
    out["900"] = {"class_type": "EmptyLatentImage", "inputs": {"width": TEST_IMAGE_PX, "height": TEST_IMAGE_PX,
                                                                "batch_size": 1}}
    out[ks]["inputs"].update(model=apply["model"], positive=apply["positive"], negative=apply["negative"],
                             latent_image=["900", 0])
    for nid in [apply_id, _node(out, "BFRLoadFlipNet"), _node(out, "LoadImage")]:
        del out[nid]
    return out


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).mean())


@pytest.mark.parametrize("stem,mode", [("restore_flipnet", "restore"), ("degrade_flipnet", "degrade")])
def test_flipnet_workflow_is_seeded_and_flipnet_shapes_the_result(comfy_server, object_info, flipnet_inputs, stem,
                                                                 mode, tmp_path, record_figure):
    """Through the API queue, on the tiny FlipNet checkpoints: the same seeds give the same image when every node runs
    again; the sampler seed and Apply's condition-noise seed each change it; so do phi=0, another input image, and
    leaving FlipNet out (a plain KSampler run with the same prompts and seed). With phi=0 a restore file still
    sees the input through its face tokens, a degrade file (no face tokens) does not see it at all."""
    prompt = _flipnet_prompt(stem, comfy_server, object_info, flipnet_inputs["photo"])
    ks, apply, load = _node(prompt, "KSampler"), _node(prompt, "BFRApplyFlipNet"), _node(prompt, "LoadImage")
    with ComfyClient(comfy_server.url) as client:
        def run(p, tag):
            return _only(_images_by_node(client, p, tmp_path / tag))

        base = run(prompt, "base")
        assert base.shape == (TEST_IMAGE_PX, TEST_IMAGE_PX, 3) and base.std() > 1.0
        again = run(_variant(prompt, **{load: {"image": flipnet_inputs["copy"]}}), "again")
        assert np.array_equal(base, again), "same seeds, same input pixels: FlipNet must give the same image"
        diffs = {
            "sampler seed": _mean_diff(base, run(_variant(prompt, **{ks: {"seed": 1}}), "seed")),
            "condition seed": _mean_diff(base, run(_variant(prompt, **{apply: {"seed": 1}}), "cseed")),
            "phi=0": _mean_diff(base, run(_variant(prompt, **{apply: {"phi": 0.0}}), "phi0")),
            "other input": _mean_diff(base, run(_variant(prompt, **{load: {"image": flipnet_inputs["mirrored"]}}),
                                                "mirrored")),
            "no FlipNet": _mean_diff(base, run(_plain_ksampler(prompt), "plain")),
        }
        phi0 = _variant(prompt, **{apply: {"phi": 0.0}})
        phi0_other = _mean_diff(run(phi0, "phi0_again"),
                                run(_variant(phi0, **{load: {"image": flipnet_inputs["mirrored"]}}), "phi0_mirrored"))
    record_figure(f"{stem} mean |diff| (8-bit)",
                  ", ".join(f"{k} {v:.1f}" for k, v in diffs.items()) + f"; phi=0 other input {phi0_other:.1f}")
    same = {k: v for k, v in diffs.items() if v <= DIFFERS}
    assert not same, f"{stem}: these changes did not change the output (mean |diff| <= {DIFFERS}): {same}"
    if mode == "restore":
        assert phi0_other > DIFFERS, "restore, phi=0: the face tokens must still carry the input image"
    else:
        assert phi0_other == 0.0, "degrade, phi=0: BoostHub is the only path of the input image; it must be closed"


def test_dr2_then_flipnet_is_flipnet_on_the_dr2_image(comfy_server, object_info, flipnet_inputs, tmp_path,
                                                      record_figure):
    """The two-stage workflow: its stage-1 preview is exactly what restore_dr2 gives, and its result is what
    restore_flipnet gives on that DR2 image (uploaded as 8-bit PNG, hence a small tolerance) -- and clearly not what
    restore_flipnet gives on the raw photo."""
    root = REPO / "workflows" / "api"
    with ComfyClient(comfy_server.url) as client:
        chain = _flipnet_prompt("restore_dr2_then_flipnet", comfy_server, object_info, flipnet_inputs["photo"])
        stage1 = next(nid for nid, n in chain.items() if n["class_type"] == "PreviewImage")
        final = next(nid for nid, n in chain.items() if n["class_type"] == "SaveImage")
        out = _images_by_node(client, chain, tmp_path / "chain")
        assert sorted(out) == sorted([stage1, final])
        dr2_prompt, _ = load_api_prompt(root / "restore_dr2.json")
        dr2 = _only(_images_by_node(client, _prepare(dr2_prompt, flipnet_inputs["photo"], comfy_server, object_info),
                                    tmp_path / "dr2"))
        assert np.abs(out[stage1] - dr2).max() <= 1, "stage 1 must be the shipped DR2 restore"
        from PIL import Image

        png = tmp_path / "dr2_stage.png"
        Image.fromarray(dr2.astype(np.uint8)).save(png)
        on_dr2 = _only(_images_by_node(client, _flipnet_prompt("restore_flipnet", comfy_server, object_info,
                                                               client.upload_image(png)), tmp_path / "on_dr2"))
        on_raw = _only(_images_by_node(client, _flipnet_prompt("restore_flipnet", comfy_server, object_info,
                                                               flipnet_inputs["photo"]), tmp_path / "on_raw"))
    to_dr2, to_raw = _mean_diff(out[final], on_dr2), _mean_diff(out[final], on_raw)
    record_figure("dr2_then_flipnet mean |diff|", f"vs FlipNet(DR2 png) {to_dr2:.2f}, vs FlipNet(raw) {to_raw:.1f}")
    assert to_dr2 < 1.0 and to_raw > DIFFERS and to_raw > 5 * to_dr2, (to_dr2, to_raw)


# ------------------------------------------------------------------------------------ whole-photo workflows
PHOTO_CROP_PX = 128  # the shipped 512 px crops, made small for the tiny models on this CPU


@pytest.fixture(scope="module")
def photo_inputs(comfy_server, tmp_path_factory) -> dict[str, str]:
    """Uploaded LoadImage names: ``group`` (sample_group_photo: 3 real faces, 1024x512) and ``flat`` (no face)."""
    from PIL import Image

    from comfyui_bfr.pipelines.sample_data import sample_group_photo

    d = tmp_path_factory.mktemp("bfr_photos")
    Image.fromarray(sample_group_photo()).save(d / "group.png")
    Image.new("RGB", (160, 120), (120, 110, 100)).save(d / "flat.png")
    with ComfyClient(comfy_server.url) as client:
        return {"group": client.upload_image(d / "group.png"), "flat": client.upload_image(d / "flat.png")}


def _photo_prompt(stem, server, object_info, image_name) -> dict:
    prompt, _ = load_api_prompt(REPO / "workflows" / "api" / f"{stem}.json")
    prompt = _prepare(prompt, image_name, server, object_info)
    prompt[_node(prompt, "BFRCropFaces")]["inputs"]["crop_size"] = PHOTO_CROP_PX
    for n in prompt.values():
        if n["class_type"] in ("KSampler", "BasicScheduler"):
            n["inputs"]["steps"] = FLIPNET_STEPS
    # also save the paste MASK and the untouched photo (LoadImage -> SaveImage), to compare pixel by pixel
    paste, load = _node(prompt, "BFRPasteFaces"), _node(prompt, "LoadImage")
    prompt["901"] = {"class_type": "MaskToImage", "inputs": {"mask": [paste, 1]}}
    prompt["902"] = {"class_type": "SaveImage", "inputs": {"images": ["901", 0], "filename_prefix": "bfr_test/mask"}}
    prompt["903"] = {"class_type": "SaveImage", "inputs": {"images": [load, 0], "filename_prefix": "bfr_test/orig"}}
    return prompt


@pytest.mark.parametrize("stem", ["restore_photo_dr2", "restore_photo_flipnet", "restore_photo_drbfr",
                                  "restore_photo_clrface"])
def test_photo_workflow_restores_only_the_faces(comfy_server, object_info, photo_inputs, stem, tmp_path,
                                                record_figure):
    """Detect -> Crop -> restorer -> Paste on a real 3-face photo through the API queue: every face region changed,
    every pixel outside the paste mask identical to the untouched photo, the numbered preview shown; a photo
    without a face comes back unchanged and the prompt still succeeds."""
    prompt = _photo_prompt(stem, comfy_server, object_info, photo_inputs["group"])
    save = next(nid for nid, n in prompt.items() if n["class_type"] == "SaveImage" and nid not in ("902", "903"))
    preview = _node(prompt, "PreviewImage")
    with ComfyClient(comfy_server.url) as client:
        out = _images_by_node(client, prompt, tmp_path / "group")
        assert sorted(out) == sorted([save, preview, "902", "903"])
        result, orig, mask = out[save], out["903"], out["902"][..., 0]
        assert result.shape == orig.shape == (512, 1024, 3) and out[preview].shape == orig.shape
        from scipy import ndimage

        # the 8-bit MASK PNG reads 0 where the float mask is below 1/255, i.e. on the far tail of the feathering,
        # where the blend may still move a pixel by a level: every changed pixel must lie within the feathering
        # kernel's reach of the visible mask (its radius is sqrt(area) / 20, ~12 px for these faces)
        outside = mask == 0
        moved = np.abs(result - orig).max(-1) > 0
        far = ndimage.distance_transform_edt(outside) > 24
        assert outside.mean() > 0.5 and not (moved & far).any(), f"{int((moved & far).sum())} pixels changed far " \
                                                                    "from every face"
        inside = mask > 128
        changed = float(np.abs(result - orig)[inside].mean())
        assert changed > DIFFERS, f"the faces did not change (mean |diff| {changed:.2f})"

        n_regions = ndimage.label(mask > 0)[1]
        assert n_regions == 3, f"expected 3 pasted faces, found {n_regions} mask regions"
        flat = _images_by_node(client, _photo_prompt(stem, comfy_server, object_info, photo_inputs["flat"]),
                               tmp_path / "flat")
        assert np.array_equal(flat[save], flat["903"]) and not flat["902"].any()
    record_figure(f"{stem} (ComfyUI)", f"3 faces pasted, mean |diff| inside the masks {changed:.1f} levels, "
                                       f"{(~moved).mean() * 100:.0f} % of the photo bit-identical")
