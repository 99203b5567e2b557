"""`bfr synthesize` (``python -m comfyui_bfr.cli synthesize HQ OUT``, FlipNet degradation mode) sharded over two
processes (torchrun, gloo): every (image, variant) is written once, and each equals the single-process result (one
seed per image and variant, independent of sharding)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fixtures.flipnet import write_faces, write_flipnet_checkpoint, write_micro_folder


def _run(args, tmp_path, nproc):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    if nproc == 1:
        cmd = [sys.executable, "-m", "comfyui_bfr.cli", *args]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port,
               "-m", "comfyui_bfr.cli", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res.stdout + res.stderr


@pytest.mark.slow
def test_two_process_synthesis_shards_the_jobs_and_matches_one_process(tmp_path):
    base = write_micro_folder(tmp_path / "base")
    ckpt = write_flipnet_checkpoint(tmp_path / "flipnet_degrade.safetensors", "degrade")
    write_faces(tmp_path / "hq", 3, size=64)
    common = ["--checkpoint", str(ckpt), "--base-model", str(base), "--per-image", "2", "--size", "64",
              "--batch-size", "1", "--num-inference-steps", "2", "--seed", "3", "--t-y-policy", "fixed", "--t-y", "50"]
    log = _run(["synthesize", str(tmp_path / "hq"), str(tmp_path / "ddp"), *common], tmp_path, 2)
    assert "process 0: 3 of 6 synthesis jobs" in log and "process 1: 3 of 6 synthesis jobs" in log, \
        "\n".join(line for line in log.splitlines() if "process" in line or "wrote" in line)
    _run(["synthesize", str(tmp_path / "hq"), str(tmp_path / "one"), *common], tmp_path, 1)
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert names == [f"0000{i}_{k}.png" for i in range(3) for k in range(2)]
    assert sorted(p.name for p in (tmp_path / "ddp").glob("*.png")) == names
    for name in names:
        a = np.asarray(Image.open(tmp_path / "one" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "ddp" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name
    variants = [np.asarray(Image.open(tmp_path / "one" / f"00000_{k}.png"), dtype=np.int16) for k in range(2)]
    assert np.abs(variants[0] - variants[1]).mean() > 0.5, "the two variants of one face must differ"
