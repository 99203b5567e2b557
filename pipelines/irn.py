"""CLR-Face's Identity Recovery Network in use (CLR-Face §3.3, design.md §3.5): its objective (Eq. 11) and inference.

The network and its file are :mod:`..lora.irn`; ``bfr train irn`` (:mod:`..train.irn`) trains it with
:func:`irn_loss`; the node ``BFR CLR-Face IRN`` runs :func:`run_irn` to make x_id, which initialises and guides the
CLR-Face refinement like any other restorer's output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arcface import IdentityModel
from .clrface import identity_loss

logger = logging.getLogger(__name__)


def irn_loss(restored: torch.Tensor, hq: torch.Tensor, identity: IdentityModel, alpha: float,
             hq_embedding: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """CLR-Face Eq. 11, ``L_IRN = alpha L1(f_phi(x^d), x) + D_cos(f_arc(f_phi(x^d)), f_arc(x))``, batch mean.

    ``restored`` = f_phi(x^d) and ``hq`` = x are (B, 3, H, W) FFHQ-aligned faces in [0, 1]; L1 is the mean absolute
    pixel error, D_cos = 1 - cos of the ArcFace embeddings (L_arc, :func:`.clrface.identity_loss`), differentiable in
    ``restored`` only (f_arc is frozen; f_arc(x) is a constant, ``hq_embedding`` when already computed). Returns the
    loss and its two terms as floats (``l1``, ``l_arc``)."""
    if restored.shape != hq.shape:
        raise ValueError(f"Eq. 11 compares f_phi(x^d) with x: shapes {tuple(restored.shape)} and {tuple(hq.shape)} "
                         "differ.")
    if not alpha >= 0:
        raise ValueError(f"alpha (the L1 weight of Eq. 11) must be >= 0, got {alpha}.")
    if hq_embedding is None:
        hq_embedding = identity.embed(hq)
    l1 = F.l1_loss(restored.float(), hq.float())
    l_arc = identity_loss(restored, identity, hq_embedding).mean()
    loss = alpha * l1 + l_arc
    return loss, {"l1": float(l1.detach()), "l_arc": float(l_arc.detach())}


@torch.no_grad()
def run_irn(net: nn.Module, images: torch.Tensor, batch_size: int = 4, device: torch.device | str | None = None,
            callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """x_id = clamp(f_phi(x^d), 0, 1) for (B, 3, H, W) faces in [0, 1], any size, ``batch_size`` at a time on
    ``device`` (default: the network's); the result is on the input's device, float32. ``callback(done)`` after
    each chunk (progress, Cancel)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"run_irn takes (B, 3, H, W) images in [0, 1], got {tuple(images.shape)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    param = next(net.parameters())
    device = param.device if device is None else torch.device(device)
    out = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size].to(device, param.dtype)
        out.append(net(chunk).clamp(0, 1).float().to(images.device))
        if callback is not None:
            callback(min(start + batch_size, images.shape[0]))
    return torch.cat(out)
