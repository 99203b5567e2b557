"""Every shipped UI workflow loads in the real ComfyUI frontend (headless Chromium) without missing nodes, and the
frontend's own UI->API conversion (``app.graphToPrompt()``) equals the API twin in ``workflows/api/``.

Needs Debian's ``chromium`` and the ``playwright`` Python package (its bundled driver; no browser download).
Skipped with the reason when either is missing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[2]
UI_FILES = sorted((REPO / "workflows").glob("*.json"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def frontend_page(comfy_server):
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium): frontend checks skipped")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (driver only) to run")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(comfy_server.url + "/")
        page.wait_for_function("window.app && window.app.graph", timeout=120_000)
        yield page, errors
        browser.close()


def _declared(object_info: dict, class_type: str) -> set[str]:
    schema = object_info[class_type]["input"]
    return set(schema.get("required", {})) | set(schema.get("optional", {}))


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_frontend_loads_workflow_and_converts_to_the_api_twin(comfy_server, frontend_page, path):
    page, errors = frontend_page
    ui = json.loads(path.read_text())
    result = page.evaluate(
        """async (wf) => {
            await window.app.loadGraphData(wf);
            const missing = window.app.graph._nodes.filter(n => n.has_errors || !n.constructor.comfyClass)
                                                   .map(n => n.type);
            const r = await window.app.graphToPrompt();
            return {missing, output: r.output};
        }""",
        ui,
    )
    assert result["missing"] == [], f"{path.name}: nodes the frontend does not know: {result['missing']}"
    shots = os.environ.get("BFR_SCREENSHOT_DIR")  # README pictures: BFR_SCREENSHOT_DIR=docs pytest ... -k photo
    if shots:
        page.set_viewport_size({"width": 1600, "height": 760})
        # the template browser opens on a first start: close it (its close button, or drop the overlay)
        close = page.locator(".p-dialog .p-dialog-close-button, .p-dialog button[aria-label='Close']")
        if close.count():
            close.first.click()
        page.evaluate("() => document.querySelectorAll('.p-dialog-mask').forEach(e => e.remove())")
        page.evaluate("() => { const c = window.app.canvas; c.ds.scale = 0.62; c.ds.offset = [110, 120]; "
                      "c.setDirty(true, true); }")
        page.wait_for_timeout(500)
        page.screenshot(path=str(Path(shots) / f"workflow_{path.stem}.png"))
    object_info = comfy_server.client().object_info()
    twin = json.loads((REPO / "workflows" / "api" / path.name).read_text())
    frontend = result["output"]
    assert set(frontend) == set(twin), f"{path.name}: node ids differ"
    for node_id, node in twin.items():
        got = frontend[node_id]
        assert got["class_type"] == node["class_type"]
        declared = _declared(object_info, node["class_type"])
        # the frontend also serialises frontend-only widgets (e.g. PreviewAny's preview); the server ignores them
        got_inputs = {k: v for k, v in got["inputs"].items() if k in declared}
        assert got_inputs == node["inputs"], f"{path.name} node {node_id} ({node['class_type']})"
    assert not errors, f"page errors while loading {path.name}: {errors}"
