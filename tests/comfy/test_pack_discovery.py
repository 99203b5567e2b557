"""What ComfyUI discovers from the pack: models/bfr registered with folder_paths (so extra_model_paths.yaml works) and
workflows/ listed as templates."""

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


def test_workflows_are_listed_as_templates(comfy_server):
    """ComfyUI serves the pack's workflows/ folder as templates: every UI workflow is listed and downloadable."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    expected = sorted(p.stem for p in (repo / "workflows").glob("*.json"))
    listing = requests.get(comfy_server.url + "/workflow_templates", timeout=30).json()
    assert sorted(listing.get("comfyui-bfr", [])) == expected, listing
    res = requests.get(f"{comfy_server.url}/api/workflow_templates/comfyui-bfr/{expected[0]}.json", timeout=30)
    assert res.status_code == 200 and "nodes" in res.json()
