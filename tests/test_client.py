"""client.py without a server: overrides, workflow loading, error messages, waiting/outputs against a fake API.

The same client against a real ComfyUI: tests/comfy/test_workflows_server.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfyui_bfr.cli import client as cl

PROMPT = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Load HQ face"}},
    "2": {"class_type": "KSampler", "inputs": {"seed": 0, "cfg": 7.0, "model": ["4", 0]}, "_meta": {"title": "Sampler"}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"},
          "_meta": {"title": "Save"}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "y"},
          "_meta": {"title": "Save"}},
}


def test_apply_overrides_by_id_title_and_class():
    out = cl.apply_overrides(PROMPT, ["2.seed=42", "Load HQ face.image=face.png", "sampler.cfg=2.5",
                                      "KSampler.model=[\"9\", 1]", "3.filename_prefix=bfr/out"])
    assert out["2"]["inputs"]["seed"] == 42
    assert out["1"]["inputs"]["image"] == "face.png"
    assert out["2"]["inputs"]["cfg"] == 2.5  # title matched case-insensitively
    assert out["2"]["inputs"]["model"] == ["9", 1]
    assert out["3"]["inputs"]["filename_prefix"] == "bfr/out"
    assert PROMPT["2"]["inputs"]["seed"] == 0  # the input prompt is not modified


def test_apply_overrides_values_are_json_or_strings():
    out = cl.apply_overrides(PROMPT, ["2.seed=true", "1.image=\"7\"", "1.image2=a=b", "2.cfg=null"])
    assert out["2"]["inputs"]["seed"] is True
    assert out["1"]["inputs"]["image"] == "7"
    assert out["1"]["inputs"]["image2"] == "a=b"
    assert out["2"]["inputs"]["cfg"] is None


@pytest.mark.parametrize("bad, match", [("2seed=1", "NODE.INPUT"), ("2.seed", "NODE.INPUT"),
                                        ("Nope.seed=1", "no node"), ("Save.filename_prefix=z", "matches nodes")])
def test_apply_overrides_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        cl.apply_overrides(PROMPT, [bad])


def test_set_load_images():
    p = json.loads(json.dumps(PROMPT))
    assert cl.set_load_images(p, "up/face.png") == ["1"]
    assert p["1"]["inputs"]["image"] == "up/face.png"


def test_load_api_prompt_api_ui_twin_and_errors(tmp_path):
    api = tmp_path / "flow.json"
    api.write_text(json.dumps(PROMPT))
    assert cl.load_api_prompt(api) == (PROMPT, api)

    ui = {"nodes": [{"id": 1, "type": "LoadImage"}], "links": [], "version": 0.4}
    ui_path = tmp_path / "ui" / "restore.json"
    ui_path.parent.mkdir()
    ui_path.write_text(json.dumps(ui))
    with pytest.raises(cl.WorkflowFormatError, match=r"Save \(API\)"):
        cl.load_api_prompt(ui_path)
    (ui_path.parent / "api").mkdir()
    (ui_path.parent / "api" / "restore.json").write_text(json.dumps(PROMPT))
    prompt, used = cl.load_api_prompt(ui_path)
    assert prompt == PROMPT and used.parent.name == "api"

    body = tmp_path / "body.json"
    body.write_text(json.dumps({"prompt": PROMPT, "client_id": "x"}))
    assert cl.load_api_prompt(body)[0] == PROMPT
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    with pytest.raises(cl.WorkflowFormatError, match="neither"):
        cl.load_api_prompt(junk)
    with pytest.raises(FileNotFoundError):
        cl.load_api_prompt(tmp_path / "missing.json")


def test_prompt_rejected_message_names_nodes():
    exc = cl.PromptRejected({"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed"},
                            {"4": {"class_type": "CheckpointLoaderSimple",
                                   "errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                               "details": "ckpt_name: 'x' not in []"}]}})
    text = str(exc)
    assert "node 4 (CheckpointLoaderSimple)" in text and "value_not_in_list" in text and "ckpt_name" in text
    assert exc.node_errors["4"]["class_type"] == "CheckpointLoaderSimple"


# -------------------------------------------------------------------------------------------- fake server
class _Resp:
    def __init__(self, status=200, payload=None, content=b""):
        self.status_code = status
        self._payload = payload
        self.content = content
        self.text = json.dumps(payload) if payload is not None else content.decode("latin-1")

    def json(self):
        if self._payload is None:
            raise ValueError("no json")
        return self._payload


class _FakeComfy:
    """Answers like ComfyUI v0.8: the history entry appears after ``polls_until_done`` history polls."""

    def __init__(self, status="success", polls_until_done=2):
        self.status = status
        self.polls = polls_until_done
        self.calls = []

    def __call__(self, method, url, **kw):
        path = url.split("127.0.0.1:1", 1)[1]
        self.calls.append((method, path))
        if method == "POST" and path == "/prompt":
            prompt = kw["json"]["prompt"]
            if "bad" in prompt:
                return _Resp(400, {"error": {"type": "invalid_prompt", "message": "bad node"},
                                   "node_errors": {"bad": {"class_type": "X", "errors": [{"type": "t",
                                                                                          "message": "m"}]}}})
            return _Resp(200, {"prompt_id": "p1", "number": 0, "node_errors": {}})
        if path == "/queue":
            return _Resp(200, {"queue_running": [[0, "p1", {}, {}, []]], "queue_pending": []})
        if path.startswith("/history/"):
            self.polls -= 1
            if self.polls > 0:
                return _Resp(200, {})
            msgs = [["execution_start", {"prompt_id": "p1"}]]
            if self.status == "error":
                msgs.append(["execution_error", {"prompt_id": "p1", "node_id": "3", "node_type": "BFR X",
                                                 "exception_message": "[BFR X] tau must be < omega",
                                                 "exception_type": "ValueError", "traceback": []}])
            return _Resp(200, {"p1": {"status": {"status_str": self.status, "completed": self.status == "success",
                                                 "messages": msgs},
                                      "outputs": {"3": {"images": [{"filename": "a_00001_.png",
                                                                    "subfolder": "bfr", "type": "output"}]},
                                                  "4": {"images": [{"filename": "p.png", "subfolder": "",
                                                                    "type": "temp"}]},
                                                  "5": {"text": ["report"]}}}})
        if path.startswith("/view?"):
            return _Resp(200, content=b"\x89PNG fake")
        return _Resp(404, {"error": "not found"})


def _client(fake) -> cl.ComfyClient:
    c = cl.ComfyClient("127.0.0.1:1", use_websocket=False)
    c.session.request = fake
    return c


def test_queue_wait_outputs_download(tmp_path):
    fake = _FakeComfy()
    c = _client(fake)
    pid = c.queue(PROMPT)
    events = []
    entry = c.wait(pid, timeout=10, on_progress=events.append, poll_interval=0.01)
    assert entry["status"]["status_str"] == "success"
    assert events[-1] == {"event": "done", "status": "success"}
    refs = c.outputs(pid)
    assert [(r["node_id"], r["type"]) for r in refs] == [("3", "output"), ("4", "temp")]
    assert [r["filename"] for r in c.outputs(pid, types=["output"])] == ["a_00001_.png"]
    path = c.download(refs[0], tmp_path)
    assert path == tmp_path / "bfr" / "a_00001_.png" and path.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(cl.ComfyError, match="suspicious"):
        c.download({"filename": "x.png", "subfolder": "../up", "type": "output"}, tmp_path)


def test_queue_400_raises_prompt_rejected():
    c = _client(_FakeComfy())
    with pytest.raises(cl.PromptRejected, match="node bad") as info:
        c.queue({"bad": {"class_type": "X", "inputs": {}}})
    assert info.value.node_errors["bad"]["class_type"] == "X"


def test_wait_raises_prompt_failed_with_exception_message():
    c = _client(_FakeComfy(status="error"))
    with pytest.raises(cl.PromptFailed, match="tau must be < omega") as info:
        c.wait("p1", timeout=10, poll_interval=0.01)
    assert info.value.node_id == "3" and info.value.exception_type == "ValueError"


def test_wait_times_out():
    c = _client(_FakeComfy(polls_until_done=10**9))
    with pytest.raises(cl.PromptTimeout, match="p1"):
        c.wait("p1", timeout=0.2, poll_interval=0.01)


def test_unreachable_server_is_a_clear_error():
    c = cl.ComfyClient("http://127.0.0.1:9", timeout=2, use_websocket=False)
    with pytest.raises(cl.ComfyError, match="cannot reach ComfyUI"):
        c.object_info()


def test_ui_workflow_without_twin_is_converted_with_object_info(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    ui = json.loads((repo / "workflows" / "degrade_classical.json").read_text())
    twin = json.loads((repo / "workflows" / "api" / "degrade_classical.json").read_text())
    path = tmp_path / "degrade.json"
    path.write_text(json.dumps(ui))
    core = json.loads((repo / "tests" / "data" / "core_object_info.json").read_text())
    from comfyui_bfr import NODE_CLASS_MAPPINGS
    from comfyui_bfr.cli.workflow_format import comparable, schema_from_node_class

    info = dict(core)
    info.update({k: schema_from_node_class(v) for k, v in NODE_CLASS_MAPPINGS.items()})
    prompt, used = cl.load_api_prompt(path, object_info=lambda: info)
    assert used == path and comparable(prompt) == comparable(twin)
    ui["nodes"][1]["type"] = "NoSuchNode"
    path.write_text(json.dumps(ui))
    with pytest.raises(cl.WorkflowFormatError, match="unknown type"):
        cl.load_api_prompt(path, object_info=lambda: info)
