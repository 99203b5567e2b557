"""Reading third-party weight files safely: ``.safetensors``, or ``.pth`` through ``torch.load(weights_only=True)``
(a pickle that needs Python code is refused unread, never executed). One reader for every network the pack
re-implements (RetinaFace, the face-parsing nets, ...); each caller turns a problem into its own error type."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import load_file

WRAPPERS = ("state_dict", "params_ema", "params", "model", "net")


def _reason(exc: BaseException) -> str:
    """The informative part of a load error (torch's weights-only preamble dropped), on one line."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def read_state_dict(path: Path, fail: Callable[[Path, str], Exception]) -> dict[str, torch.Tensor]:
    """name -> tensor of a weight file, unwrapped from a ``state_dict``/``params_ema``/``params``/``model``/``net``
    wrapper, with DataParallel's ``module.`` prefix stripped. ``fail(path, what)`` builds the exception raised
    for a missing, unreadable, pickled-code or non-state-dict file."""
    if not path.is_file():
        raise fail(path, "is a folder, not a file" if path.is_dir() else "file not found")
    if path.suffix.lower() == ".safetensors":
        try:
            obj = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for truncated / invalid headers
            raise fail(path, f"not a readable safetensors file (truncated or corrupt? {_reason(exc)}); "
                             "download it again") from exc
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            text = str(exc).lower()
            # torch prefixes every weights-only failure with the same preamble; only these name a refused global
            if any(s in text for s in ("unsupported global", "unsupported class", "allowed global")):
                raise fail(path, "the file holds pickled Python objects other than tensors, so it was refused "
                                 "unread (only weights_only loading is allowed; nothing in it was executed); use "
                                 "the original release file") from exc
            raise fail(path, f"not a readable PyTorch file (truncated or corrupt? {_reason(exc)}); download it "
                             "again") from exc
        except Exception as exc:  # zip / EOF / runtime errors of a damaged file
            raise fail(path, f"not a readable PyTorch file (truncated or corrupt? {_reason(exc)}); download it "
                             "again") from exc
    if isinstance(obj, Mapping):
        for wrapper in WRAPPERS:
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise fail(path, f"expected a state dict (name -> tensor), found {type(obj).__name__}")
    sd: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise fail(path, f"entry {key!r} is a {type(value).__name__}, not a tensor")
        key = str(key)
        sd[key[len("module."):] if key.startswith("module.") else key] = value
    return sd
