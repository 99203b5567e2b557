"""What ComfyUI discovers from the pack: models/bfr registered with folder_paths (so extra_model_paths.yaml works) and
workflows/ listed as templates."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.comfy


def test_models_bfr_lists_weight_files_from_every_bfr_folder(comfy_server):
    """models/bfr and a 'bfr' folder from extra_model_paths.yaml (registered before the pack loads) both list."""
    own = comfy_server.base / "models" / "bfr"
    own.mkdir(parents=True, exist_ok=True)
    (own / "probe_flipnet.safetensors").write_bytes(b"not read by this test")
    (comfy_server.extra_model_dirs["bfr"] / "shared_flipnet.safetensors").write_bytes(b"not read either")
    res = requests.get(comfy_server.url + "/models/bfr", timeout=30)
    assert res.status_code == 200, res.text
    names = res.json()
    assert "probe_flipnet.safetensors" in names and "shared_flipnet.safetensors" in names, names
    assert "bfr" in requests.get(comfy_server.url + "/models", timeout=30).json()


def test_model_files_lists_only_weight_files(tmp_path):
    """``add_model_folder_path`` gives a new folder no extension filter (GET /models/bfr lists every file); the
    pack's combo list keeps ComfyUI's supported_pt_extensions. In-process, on ComfyUI's own folder_paths."""
    import folder_paths

    from comfyui_bfr.nodes import _comfy

    (tmp_path / "weights.safetensors").write_bytes(b"x")
    (tmp_path / "old.pth").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a weight file")
    (tmp_path / "identity" / "r50").mkdir(parents=True)
    (tmp_path / "identity" / "r50" / "backbone.pth").write_bytes(b"x")
    folder_paths.add_model_folder_path(_comfy.BFR_FOLDER, str(tmp_path))
    _comfy.register_model_folder()
    _comfy.register_model_folder()  # idempotent
    paths = folder_paths.get_folder_paths(_comfy.BFR_FOLDER)
    assert str(tmp_path) in paths and paths.count(str(Path(folder_paths.models_dir) / "bfr")) == 1, paths
    files = _comfy.model_files()
    assert "weights.safetensors" in files and "old.pth" in files and "notes.txt" not in files, files
    # an identity backbone under models/bfr/identity is offered by BFR Load Identity Model only
    assert not [f for f in files if "backbone.pth" in f], files


def test_workflows_are_listed_as_templates(comfy_server):
    """ComfyUI serves the pack's workflows/ folder as templates: every UI workflow is listed and downloadable."""
    repo = Path(__file__).resolve().parents[2]
    expected = sorted(p.stem for p in (repo / "workflows").glob("*.json"))
    listing = requests.get(comfy_server.url + "/workflow_templates", timeout=30).json()
    assert sorted(listing.get("comfyui-bfr", [])) == expected, listing
    res = requests.get(f"{comfy_server.url}/api/workflow_templates/comfyui-bfr/{expected[0]}.json", timeout=30)
    assert res.status_code == 200 and "nodes" in res.json()
