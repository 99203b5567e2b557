"""`models/bfr` is registered with folder_paths when ComfyUI loads the pack (so extra_model_paths.yaml works)."""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.comfy


def test_models_bfr_lists_weight_files(comfy_server):
    folder = comfy_server.base / "models" / "bfr"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe_flipnet.safetensors").write_bytes(b"not read by this test")
    (folder / "notes.txt").write_text("not a weight file")
    res = requests.get(comfy_server.url + "/models/bfr", timeout=30)
    assert res.status_code == 200, res.text
    names = res.json()
    assert "probe_flipnet.safetensors" in names
    assert "notes.txt" not in names  # only pytorch/safetensors extensions are listed
    assert "bfr" in requests.get(comfy_server.url + "/models", timeout=30).json()
