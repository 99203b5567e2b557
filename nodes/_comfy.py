"""The one bridge to ComfyUI internals: progress, interruption, model folders, devices.

Every function imports ``comfy`` lazily, so the pack imports (and its nodes can be unit-tested) without ComfyUI;
outside ComfyUI the functions fall back to harmless behaviour (no progress bar, no interruption, CPU).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

logger = logging.getLogger(__name__)

BFR_FOLDER = "bfr"


def comfy_available() -> bool:
    try:
        import comfy.model_management  # noqa: F401
    except Exception:  # ComfyUI absent or not importable in this interpreter
        return False
    return True


def progress_callback(total: int, node_id: str | None = None) -> Callable[[int], None]:
    """Return ``cb(done)`` that updates a ComfyUI ProgressBar and honours Cancel; a no-op outside ComfyUI."""
    try:
        import comfy.model_management as mm
        import comfy.utils
    except Exception:
        return lambda done: None
    bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def _cb(done: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return _cb


def check_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel."""
    try:
        import comfy.model_management as mm
    except Exception:
        return
    mm.throw_exception_if_processing_interrupted()


def torch_device():
    import torch

    try:
        import comfy.model_management as mm
    except Exception:
        return torch.device("cpu")
    return mm.get_torch_device()


def intermediate_device():
    import torch

    try:
        import comfy.model_management as mm
    except Exception:
        return torch.device("cpu")
    return mm.intermediate_device()


def register_model_folder() -> None:
    """Register ``models/bfr`` with folder_paths, extending (never replacing) extra_model_paths entries."""
    try:
        import folder_paths
    except Exception:
        return
    path = os.path.join(folder_paths.models_dir, BFR_FOLDER)
    if BFR_FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[BFR_FOLDER]
        if path not in paths:
            folder_paths.add_model_folder_path(BFR_FOLDER, path)
    else:
        folder_paths.add_model_folder_path(BFR_FOLDER, path, is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[BFR_FOLDER]
    folder_paths.folder_names_and_paths[BFR_FOLDER] = (paths, set(folder_paths.supported_pt_extensions))
