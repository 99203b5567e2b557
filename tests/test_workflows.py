"""Shipped workflows: UI format loads, API twin in step, every node type exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfyui_bfr import NODE_CLASS_MAPPINGS
from comfyui_bfr.cli.workflow_format import (WorkflowFormatError, comparable, is_ui_format, schema_from_node_class,
                                         ui_to_api)

ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
CORE = json.loads((Path(__file__).parent / "data" / "core_object_info.json").read_text())


def object_info() -> dict:
    info = {k: v for k, v in CORE.items() if not k.startswith("_")}
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        info[node_id] = schema_from_node_class(cls)
    return info


def test_there_are_workflows():
    assert UI_FILES, "workflows/ must ship example workflows"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_has_api_twin_in_step(path):
    ui = json.loads(path.read_text())
    assert is_ui_format(ui), f"{path.name} must be a UI-format (canvas) workflow"
    twin = ROOT / "workflows" / "api" / path.name
    assert twin.is_file(), f"missing API twin workflows/api/{path.name}"
    api = json.loads(twin.read_text())
    assert comparable(ui_to_api(ui, object_info())) == comparable(api)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_every_node_type_exists_and_links_are_consistent(path):
    ui = json.loads(path.read_text())
    known = object_info()
    ids = {n["id"] for n in ui["nodes"]}
    for node in ui["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):  # frontend-only annotation nodes
            continue
        assert node["type"] in known, f"{path.name}: unknown node type {node['type']}"
    for link_id, src, _src_slot, dst, _dst_slot, _type in ui["links"]:
        assert src in ids and dst in ids, f"{path.name}: link {link_id} references a missing node"
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        assert any(i.get("link") == link_id for i in dst_node["inputs"]), f"link {link_id} not on its target input"
    assert ui["last_link_id"] >= max([row[0] for row in ui["links"]] or [0])
    assert ui["last_node_id"] >= max(ids)


def test_api_workflows_only_use_declared_inputs():
    known = object_info()
    for path in sorted((ROOT / "workflows" / "api").glob("*.json")):
        for node_id, node in json.loads(path.read_text()).items():
            schema = known[node["class_type"]]["input"]
            declared = set(schema.get("required", {})) | set(schema.get("optional", {}))
            extra = set(node["inputs"]) - declared
            assert not extra, f"{path.name} node {node_id}: undeclared inputs {extra}"
            missing = set(schema.get("required", {})) - set(node["inputs"])
            assert not missing, f"{path.name} node {node_id}: missing required inputs {missing}"


def test_converter_rejects_a_stale_widget_list():
    ui = json.loads((ROOT / "workflows" / "degrade_classical.json").read_text())
    node = next(n for n in ui["nodes"] if n["type"] == "BFRDegradeClassical")
    node["widgets_values"] = node["widgets_values"][:-2]
    with pytest.raises(WorkflowFormatError, match="widget values"):
        ui_to_api(ui, object_info())


def test_converter_rejects_unknown_node_type():
    ui = json.loads((ROOT / "workflows" / "degrade_classical.json").read_text())
    ui["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(WorkflowFormatError, match="unknown type"):
        ui_to_api(ui, object_info())
