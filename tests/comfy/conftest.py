"""Integration tests against a real ComfyUI checkout (``$COMFYUI_PATH``), run with ComfyUI's own Python.

Every test here is skipped, with the reason, when ``COMFYUI_PATH`` is unset or ``comfy`` cannot be imported
(e.g. the pack's venv, whose CPU torch has no matching torchvision). Setup: ``tests/setup_comfyui.sh``, then
``$COMFYUI_PATH/.venv/bin/python -m pytest tests/comfy``.

What this conftest does before any test module is imported:
- puts ``$COMFYUI_PATH`` first on ``sys.path`` (so ``import comfy``, ``folder_paths``, ``nodes`` give ComfyUI's
  modules, as under main.py; this repo's own ``nodes/`` is only reachable as ``comfyui_bfr.nodes``) and ``tests/``
  on ``sys.path`` (``from fixtures import tiny_sd``; ``tests.fixtures`` works too);
- sets ``comfy.cli_args.args.cpu = True`` before ``comfy.model_management`` is imported (otherwise it assumes a
  CUDA device);
- makes ``comfyui_bfr`` importable from THIS checkout even when the interpreter (ComfyUI's venv) has no
  ``pip install -e`` of it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
SKIP_REASON = "set COMFYUI_PATH to a ComfyUI checkout and run with its Python; see README 'Integration tests'"

logger = logging.getLogger(__name__)


def _import_comfy(path: str) -> str | None:
    """Make ComfyUI importable in-process; return None on success, else why not."""
    root = Path(path)
    if not (root / "comfy").is_dir() or not (root / "main.py").is_file():
        return f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/ or main.py)"
    # First on sys.path, as when ComfyUI runs main.py: ComfyUI code does ``import nodes`` / ``import server`` and
    # must get its own modules, not this repo's ``nodes/`` package (the repo root is on sys.path under
    # ``python -m pytest``). ComfyUI's root also has a ``tests`` package; see _register_tests_package().
    added = str(root) not in sys.path
    if added:
        sys.path.insert(0, str(root))
    try:
        import comfy.cli_args  # noqa: F401  (parses no CLI flags unless enable_args_parsing() was called)

        comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401
    except Exception as exc:  # any import failure means: wrong interpreter for this checkout
        if added:
            sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "comfy" or n.startswith("comfy.")]:
            del sys.modules[name]
        return f"cannot import comfy from {path} with {sys.executable}: {type(exc).__name__}: {exc}"
    return None


def _ensure_pack_importable() -> None:
    """Register this checkout as the ``comfyui_bfr`` package unless that already is this checkout."""
    mod = sys.modules.get("comfyui_bfr")
    if mod is None:
        try:
            import comfyui_bfr as mod  # noqa: F811
        except ImportError:
            mod = None
    if mod is not None and Path(mod.__file__).resolve().parent == REPO:
        return
    for name in [n for n in sys.modules if n == "comfyui_bfr" or n.startswith("comfyui_bfr.")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location("comfyui_bfr", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_bfr"] = module
    spec.loader.exec_module(module)


def _register_tests_package() -> None:
    """Make ``tests`` mean this repo's tests/ (so ``tests.fixtures.tiny_sd`` imports), not ComfyUI's ``tests``."""
    mod = sys.modules.get("tests")
    if mod is not None and str(TESTS) in list(getattr(mod, "__path__", [])):
        return
    import types

    pkg = types.ModuleType("tests")
    pkg.__path__ = [str(TESTS)]
    pkg.__package__ = "tests"
    sys.modules["tests"] = pkg


_COMFY_PATH = os.environ.get("COMFYUI_PATH", "")
_why = "COMFYUI_PATH is unset" if not _COMFY_PATH else _import_comfy(_COMFY_PATH)
COMFY_AVAILABLE = _why is None
COMFYUI_PATH = Path(_COMFY_PATH).resolve() if _COMFY_PATH else None

if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
_ensure_pack_importable()
if COMFY_AVAILABLE:
    _register_tests_package()


def pytest_collection_finish(session):
    """pytest put tests/comfy on sys.path to import the test modules; take it off again so that ComfyUI code (and
    pack nodes) doing ``from server import PromptServer`` get ComfyUI's server module, not tests/comfy/server.py."""
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p != here]
    mod = sys.modules.get("server")
    if mod is not None and Path(getattr(mod, "__file__", "") or "").resolve().parent == Path(here):
        del sys.modules["server"]


def pytest_collection_modifyitems(config, items):
    """Mark every test here ``comfy``; skip them all, with the reason, when ComfyUI is not usable.

    (Test modules here import nothing from comfy at module level, so they collect in any environment; a
    module-level ``pytest.skip`` in this conftest would crash pytest when tests/comfy is passed as an argument.)
    """
    here = Path(__file__).resolve().parent
    skip = None if COMFY_AVAILABLE else pytest.mark.skip(reason=f"{_why}: {SKIP_REASON}")
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.comfy)
            if skip is not None:
                item.add_marker(skip)


def load_server_module():
    """tests/comfy/server.py as module ``bfr_comfy_test_server``."""
    name = "bfr_comfy_test_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "server.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used the live server gets the tail of the server log in its report."""
    outcome = yield
    report = outcome.get_result()
    srv = getattr(item, "funcargs", {}).get("comfy_server")
    if report.failed and srv is not None:
        report.sections.append(("ComfyUI server log (tail)", f"{srv.log_path}\n{srv.log_tail(80)}"))


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    return COMFYUI_PATH


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """The tiny single-file SD2 checkpoint (cached outside the repo; see fixtures.tiny_sd)."""
    from fixtures.tiny_sd import cached_comfy_checkpoint

    return cached_comfy_checkpoint(seed=0)


@pytest.fixture(scope="module")
def comfy_models(tiny_checkpoint):
    """(MODEL, VAE) of the tiny checkpoint through ComfyUI's own CheckpointLoaderSimple code path."""
    import comfy.sd

    model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=True,
                                                                  output_clip=False, embedding_directory=None)
    return model, vae


@pytest.fixture(scope="session")
def tiny_flipnet_checkpoints() -> dict[str, Path]:
    """{mode: file}: one restore and one degrade FlipNet checkpoint for the tiny checkpoint's UNet, non-zero LoRA,
    BoostHub and (restore) face embedder, written with the pack's own code and cached (see fixtures.flipnet)."""
    from fixtures.flipnet import cached_tiny_flipnet_checkpoint

    return {mode: cached_tiny_flipnet_checkpoint(mode, seed=0) for mode in ("restore", "degrade")}


EXTRA_MODELS = "extra_models"  # <base>/extra_models/bfr: a 'bfr' folder from extra_model_paths.yaml


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_checkpoint, tiny_flipnet_checkpoints):
    """A headless ComfyUI on CPU with this pack in custom_nodes, the tiny checkpoint and, in models/bfr, the tiny
    FlipNet checkpoints under ``server.FLIPNET_NAMES`` (``srv.flipnet_names``: mode -> name) (see server.py).

    It also reads an ``extra_model_paths.yaml`` with a ``bfr`` entry (``<base>/extra_models/bfr``), as users
    configure shared model folders, so that the pack's ``models/bfr`` registration is tested to extend it."""
    # Loaded by path: ComfyUI's own top-level ``server`` module shadows the name on sys.path.
    server = load_server_module()
    base = tmp_path_factory.mktemp("comfy_base")
    (base / EXTRA_MODELS / "bfr").mkdir(parents=True)
    yaml_path = base / "extra_model_paths.yaml"
    yaml_path.write_text(f"bfr_tests:\n    base_path: {base / EXTRA_MODELS}\n    bfr: bfr/\n")
    bfr_models = {server.FLIPNET_NAMES[mode]: path for mode, path in tiny_flipnet_checkpoints.items()}
    from fixtures.drbfr import SERVER_NAME, write_tiny_drbfr_checkpoint

    bfr_models[SERVER_NAME] = write_tiny_drbfr_checkpoint(base / "tiny_drbfr.safetensors")
    from fixtures import clrface as clr

    bfr_models[clr.SERVER_NAME] = clr.write_tiny_clrface_checkpoint(base / "tiny_clrface.safetensors")[0]
    bfr_models[clr.IDENTITY_SERVER_NAME] = clr.write_tiny_identity_model(base / "tiny_identity" / "backbone.pth")
    with server.comfy_server_session(base, checkpoint=tiny_checkpoint, bfr_models=bfr_models,
                                     extra_args=["--extra-model-paths-config", str(yaml_path)]) as srv:
        srv.extra_model_dirs["bfr"] = base / EXTRA_MODELS / "bfr"
        srv.flipnet_names.update({mode: server.FLIPNET_NAMES[mode] for mode in tiny_flipnet_checkpoints})
        yield srv
