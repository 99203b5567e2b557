"""House rules of the package: import without ComfyUI, thin registration, relative imports, node metadata."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_bfr import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]
PACK_DIRS = ("nodes", "pipelines", "lora")


def _py_files(*dirs):
    for d in dirs:
        yield from sorted((ROOT / d).glob("*.py"))


def test_imports_without_comfyui_and_without_network():
    code = ("import socket, sys\n"
            "def _no(*a, **k): raise RuntimeError('network at import time')\n"
            "socket.socket.connect = _no\n"
            "import comfyui_bfr\n"
            "assert 'comfy' not in sys.modules, 'comfy imported at import time'\n"
            "assert len(comfyui_bfr.NODE_CLASS_MAPPINGS) > 0\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


@pytest.mark.parametrize("path", list(_py_files("pipelines", "lora")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pipelines_and_lora_never_import_comfy(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            assert top not in ("comfy", "comfy_extras", "folder_paths", "nodes", "server", "comfy_api"), \
                f"{path.name} imports {name}"


@pytest.mark.parametrize("path", list(_py_files(*PACK_DIRS)) + [ROOT / "__init__.py"], ids=lambda p: p.name)
def test_only_relative_imports_inside_the_pack(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            assert not node.module.startswith(("comfyui_bfr", "nodes.", "pipelines", "lora")), \
                f"{path.name}: absolute import of the pack ({node.module}); use a relative import"


def test_init_is_registration_only():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    for node in tree.body:
        assert isinstance(node, (ast.Expr, ast.ImportFrom, ast.Assign)), f"unexpected statement in __init__: {node}"


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_node_metadata(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("BFR") and node_id.isidentifier(), "node ids are stable PascalCase, prefixed BFR"
    assert node_id in NODE_DISPLAY_NAME_MAPPINGS
    assert cls.CATEGORY.startswith("BFR/")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    assert hasattr(cls, cls.FUNCTION)
    types = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            opts = spec[1] if len(spec) > 1 else {}
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
    if getattr(cls, "RETURN_NAMES", None):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    if getattr(cls, "OUTPUT_TOOLTIPS", None):
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
