"""House rules of the package: import without ComfyUI, thin registration, relative imports, node metadata."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_bfr import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]
PACK_DIRS = ("nodes", "pipelines", "lora", "sd", "train", "cli")  # every subpackage of the pack
NO_COMFY_DIRS = tuple(d for d in PACK_DIRS if d != "nodes")  # only nodes/ touches ComfyUI
COMFY_MODULES = ("comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "latent_preview", "nodes",
                 "node_helpers", "server", "execution")
CATEGORIES = ("BFR/degradation", "BFR/DR2", "BFR/FlipNet", "BFR/DR-BFR", "BFR/CLR-Face", "BFR/faces")  # one tree


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


def _absolute_imports(path):
    """(line, module) of every absolute import in a file, functions included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def _rel(path):
    return str(path.relative_to(ROOT))


def test_every_subpackage_is_checked():
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in ("tests", "bench"))
    assert packages == sorted(PACK_DIRS), "a new subpackage must be added to PACK_DIRS (house-rule checks)"


@pytest.mark.parametrize("path", list(_py_files(*NO_COMFY_DIRS)), ids=_rel)
def test_only_nodes_imports_comfy(path):
    for line, name in _absolute_imports(path):
        assert name.split(".")[0] not in COMFY_MODULES, f"{_rel(path)}:{line} imports {name}; only nodes/ may"


@pytest.mark.parametrize("path", list(_py_files(*PACK_DIRS)) + [ROOT / "__init__.py"], ids=_rel)
def test_only_relative_imports_inside_the_pack(path):
    # ComfyUI imports the pack under its absolute path, so ``comfyui_bfr.x`` / ``pipelines.x`` do not resolve
    # there; a bare ``nodes`` is ComfyUI's own nodes.py (allowed in nodes/ only, checked above).
    own = ("comfyui_bfr",) + PACK_DIRS
    for line, name in _absolute_imports(path):
        parts = name.split(".")
        is_pack = parts[0] in own and (parts[0] != "nodes" or len(parts) > 1)
        assert not is_pack, f"{_rel(path)}:{line}: absolute import of the pack ({name}); use a relative import"


def test_init_is_registration_only():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    for node in tree.body:
        assert isinstance(node, (ast.Expr, ast.ImportFrom, ast.Assign)), f"unexpected statement in __init__: {node}"


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_node_metadata(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("BFR") and node_id.isidentifier(), "node ids are stable PascalCase, prefixed BFR"
    assert node_id in NODE_DISPLAY_NAME_MAPPINGS
    assert NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("BFR "), "display names read 'BFR ...'"
    assert cls.CATEGORY in CATEGORIES, f"category {cls.CATEGORY!r} is outside the one tree {CATEGORIES}"
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


# ------------------------------------------------------------------------ nodes/_comfy.py: the bridge to ComfyUI
@pytest.fixture
def fake_modules(tmp_path, monkeypatch):
    """A top-level package with a submodule whose dependency is missing, and a module that raises on import."""
    pkg = tmp_path / "bfr_fake_host"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "needs_dep.py").write_text("import bfr_no_such_dependency_xyz\n")
    (tmp_path / "bfr_fake_broken.py").write_text("raise RuntimeError('device init failed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in [n for n in sys.modules if n.startswith(("bfr_fake_host", "bfr_fake_broken"))]:
        del sys.modules[name]


def test_bridge_is_silent_when_comfyui_is_absent(caplog):
    from comfyui_bfr.nodes import _comfy

    with caplog.at_level(logging.DEBUG, logger="comfyui_bfr.nodes._comfy"):
        assert _comfy.comfy_module("bfr_absent_top_level.utils") is None
        assert _comfy.comfy_available() is False
        _comfy.check_interrupted()  # no-op
        assert _comfy.model_files() == []
        assert str(_comfy.torch_device()) == "cpu"
    assert not caplog.records


def test_bridge_warns_when_comfyui_is_present_but_broken(fake_modules, caplog):
    from comfyui_bfr.nodes import _comfy

    with caplog.at_level(logging.WARNING, logger="comfyui_bfr.nodes._comfy"):
        assert _comfy.comfy_module("bfr_fake_host.needs_dep") is None
        assert _comfy.comfy_module("bfr_fake_broken") is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("bfr_fake_host.needs_dep" in m and "bfr_no_such_dependency_xyz" in m for m in messages), messages
    assert any("bfr_fake_broken" in m and "device init failed" in m for m in messages), messages


def test_bridge_registers_models_bfr_through_the_public_api_only():
    """register_model_folder may only call folder_paths' functions: no assignment into its registry."""
    tree = ast.parse((ROOT / "nodes" / "_comfy.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                assert "folder_names_and_paths" not in ast.unparse(t), ast.unparse(node)
        if isinstance(node, ast.Attribute):
            assert node.attr != "folder_names_and_paths", "use folder_paths.add_model_folder_path"
