"""`bfr eval --workflow`: the shipped DR2 workflow on a 3-pair test set through a real headless ComfyUI's queue.

One pair's LQ is made larger than the workflow's ``max_megapixels`` (set with ``--set``), so the server fails that
prompt at run time; the failure must be recorded with the server's message while the other two are restored and
scored, and a rerun resumes (only the failed image is queued again)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def three_pairs(tmp_path_factory):
    from skimage import data

    from comfyui_bfr.pipelines.testset import make_testset

    hq = tmp_path_factory.mktemp("eval_hq")
    Image.fromarray(data.astronaut()[20:260, 110:350]).resize((128, 128)).save(hq / "astronaut.png")
    Image.fromarray(np.repeat(data.camera()[40:300, 150:410, None], 3, 2)).resize((128, 128)).save(hq / "camera.png")
    Image.fromarray(data.chelsea()[:300, 50:350]).resize((128, 128)).save(hq / "cat.png")
    ts = make_testset(hq, tmp_path_factory.mktemp("eval_ts") / "set", "dr2-medium-x4", seed=0, size=128)
    big = Image.open(ts.pairs[2].lq).resize((192, 192))  # 0.037 MP > the 0.02 MP limit set below
    big.save(ts.pairs[2].lq)
    return ts


def test_eval_workflow_reports_a_failing_prompt_and_continues(comfy_server, three_pairs, tmp_path):
    from comfyui_bfr.cli.main import main

    out = tmp_path / "res"
    args = ["eval", str(three_pairs.root), "--out", str(out), "--workflow", str(REPO / "workflows" / "restore_dr2.json"),
            "--server", comfy_server.url, "--set", f"1.ckpt_name={comfy_server.checkpoint_name}",
            "--set", "3.steps=4", "--set", "3.tau=2", "--set", "3.max_megapixels=0.02",
            "--metrics", "psnr", "ssim", "niqe"]
    assert main(args) == 1  # one image failed
    log = [json.loads(line) for line in (out / "restore_dr2" / "metrics.jsonl").read_text().splitlines()]
    last = {r["name"]: r for r in log}
    assert last["cat"]["status"] == "error" and "megapixel" in last["cat"]["error"].lower()
    for name in ("astronaut", "camera"):
        assert last[name]["status"] == "ok" and "psnr" in last[name]["metrics"], last[name]
        img = Image.open(out / "restore_dr2" / "images" / f"{name}.png")
        assert img.size == (128, 128)
    summary = (out / "summary.md").read_text()
    assert "| restore_dr2 | 2 (1 failed) |" in summary
    assert (out / "grid.png").is_file()

    queued_before = len(log)
    assert main(args) == 1  # resume: the two done images are not queued again, the failing one is retried
    log2 = (out / "restore_dr2" / "metrics.jsonl").read_text().splitlines()
    retried = [json.loads(line)["name"] for line in log2[queued_before:] if "metrics" not in json.loads(line)]
    assert retried == ["cat"]
