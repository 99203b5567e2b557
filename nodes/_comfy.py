"""The one bridge to ComfyUI internals: progress, interruption, previews, model folders, devices.

ComfyUI modules are imported lazily through :func:`comfy_module`, so the pack imports (and its nodes can be
unit-tested) without ComfyUI. Two failure kinds are told apart:

- ComfyUI absent (its top-level module cannot be found): silent, harmless fallbacks (no progress bar, no
  interruption, CPU, no previews);
- ComfyUI present but one of its modules fails to import or to set up (a broken install, a missing dependency):
  the fallback still applies, and a warning naming the module and the error is logged once.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Callable

import torch

logger = logging.getLogger(__name__)

BFR_FOLDER = "bfr"
FACE_FOLDER = "facedetection"  # the folder facerestore_cf / ReActor / CodeFormer users keep detectors + parsers in
IDENTITY_FOLDER = "bfr_identity"  # models/bfr/identity: ArcFace-style iresnet backbones (BFR Load Identity Model)

_warned: set[str] = set()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def comfy_module(name: str) -> ModuleType | None:
    """Import a ComfyUI module (``comfy.utils``, ``folder_paths``, ``latent_preview``, ...); None when unavailable.

    None without a word when ComfyUI is not installed; None with a logged warning when ComfyUI is there but the
    module fails to import.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        parts = name.split(".")
        if exc.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            return None  # the module itself (or its package) does not exist: ComfyUI is not here, standalone use
        _warn_once(name, "ComfyUI module %s is present but failed to import (%s: %s); the BFR nodes fall back to "
                   "no progress/previews/interruption and the CPU", name, type(exc).__name__, exc)
        return None
    except Exception as exc:  # ComfyUI is importable but this module raised while importing
        _warn_once(name, "ComfyUI module %s failed to import (%s: %s); the BFR nodes fall back to no "
                   "progress/previews/interruption and the CPU", name, type(exc).__name__, exc)
        return None


def comfy_available() -> bool:
    return comfy_module("comfy.model_management") is not None


def check_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel (POST /interrupt)."""
    mm = comfy_module("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def progress_callback(total: int, node_id: str | None = None) -> Callable[[int], None]:
    """Return ``cb(done)`` that updates a ComfyUI ProgressBar and honours Cancel; a no-op outside ComfyUI."""
    mm, utils = comfy_module("comfy.model_management"), comfy_module("comfy.utils")
    if mm is None or utils is None:
        return lambda done: None
    bar = utils.ProgressBar(total, node_id=node_id)

    def _cb(done: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return _cb


def sampler_callback(model, total: int, node_id: str | None = None) -> Callable:
    """``cb(step, x0, x, total)`` for ``comfy.sample``: progress bar, latent previews, Cancel.

    Uses ComfyUI's ``latent_preview.prepare_callback`` (previews as the user configured them); without it (unit
    tests, or a logged failure) a plain progress bar that still honours Cancel.
    """
    preview = comfy_module("latent_preview")
    if preview is not None:
        try:
            inner = preview.prepare_callback(model, total)
        except Exception as exc:  # e.g. a broken previewer: keep sampling, say why previews are missing
            _warn_once("latent_preview.prepare_callback", "latent previews unavailable (%s: %s); showing "
                       "progress only", type(exc).__name__, exc)
        else:
            def callback(step, x0, x, _total):
                check_interrupted()
                inner(step, x0, x, total)

            return callback
    progress = progress_callback(total, node_id)
    return lambda step, x0, x, _total: progress(step + 1)


def torch_device() -> torch.device:
    mm = comfy_module("comfy.model_management")
    return torch.device("cpu") if mm is None else mm.get_torch_device()


def intermediate_device() -> torch.device:
    mm = comfy_module("comfy.model_management")
    return torch.device("cpu") if mm is None else mm.intermediate_device()


def module_patcher(module: torch.nn.Module):
    """A ComfyUI ModelPatcher for one of the pack's own modules (loaded to ComfyUI's torch device when a node needs
    it, offloaded with the rest under memory pressure); None outside ComfyUI."""
    mm, mp = comfy_module("comfy.model_management"), comfy_module("comfy.model_patcher")
    if mm is None or mp is None:
        return None
    return mp.ModelPatcher(module, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def register_model_folder() -> None:
    """Register ``models/bfr`` with ComfyUI's public ``folder_paths.add_model_folder_path``.

    Idempotent. A ``bfr`` entry from ``extra_model_paths.yaml`` (applied before custom nodes load) is extended,
    never replaced. ComfyUI gives a folder created this way an empty extension filter, so ``GET /models/bfr`` lists
    every file in it; :func:`model_files` is the weight-file list for combo inputs.
    """
    fp = comfy_module("folder_paths")
    if fp is not None:
        fp.add_model_folder_path(BFR_FOLDER, os.path.join(fp.models_dir, BFR_FOLDER))
        # models/facedetection: added as a path, so another pack's registration of the same folder is extended
        fp.add_model_folder_path(FACE_FOLDER, os.path.join(fp.models_dir, FACE_FOLDER))
        fp.add_model_folder_path(IDENTITY_FOLDER, os.path.join(fp.models_dir, BFR_FOLDER, "identity"))


def folder_dirs(folder: str) -> list[str]:
    """The directories of a registered model folder (``extra_model_paths.yaml`` included); [] outside ComfyUI."""
    fp = comfy_module("folder_paths")
    if fp is None:
        return []
    register_model_folder()
    try:
        return list(fp.get_folder_paths(folder))
    except KeyError:
        return []


def model_files(folder: str = BFR_FOLDER) -> list[str]:
    """Weight files (ComfyUI's ``supported_pt_extensions``: .safetensors, .pt, .pth, ...) in a model folder.

    An empty list outside ComfyUI."""
    fp = comfy_module("folder_paths")
    if fp is None:
        return []
    if folder in (BFR_FOLDER, FACE_FOLDER, IDENTITY_FOLDER):
        register_model_folder()
    files = fp.filter_files_extensions(fp.get_filename_list(folder), fp.supported_pt_extensions)
    if folder == BFR_FOLDER:  # models/bfr/identity belongs to BFR Load Identity Model, not the pack's own files
        files = [f for f in files if not f.replace("\\", "/").startswith("identity/")]
    return files
