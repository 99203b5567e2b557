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


def short_list(keys, n: int = 6) -> str:
    """A few sorted names for an error message, with the total when there are more."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def layout_problems(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> tuple[str | None, set]:
    """Compare a state dict with the network's own: (what is wrong or None, the optional keys).

    Optional = BatchNorm ``num_batches_tracked`` (absent from old checkpoints). Reported: missing keys, unexpected
    keys, wrong shapes (``name (file shape) (expected (shape))``), non-float weights."""
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"missing keys: {short_list(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {short_list(unexpected)}")
    if wrong:
        parts.append(f"wrong shapes: {short_list(wrong, 4)}")
    if not parts:
        bad = [k for k in sd if not (sd[k].is_floating_point() or k in optional)]
        if bad:
            parts.append(f"non-float weights: {short_list(bad)}")
    return ("; ".join(parts) or None), optional


def load_checked(model: torch.nn.Module, sd: Mapping[str, torch.Tensor],
                 fail: Callable[[str], Exception]) -> torch.nn.Module:
    """``model`` with the weights ``sd`` once :func:`layout_problems` finds nothing wrong (else ``fail(problem)`` is
    raised): float tensors cast to float32, BatchNorm counters may be absent. Returned in eval mode, frozen."""
    problem, _ = layout_problems(sd, model.state_dict())
    if problem:
        raise fail(problem)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=False)
    return model.eval().requires_grad_(False)
