"""What every benchmark script shares: importing the installed pack, the full SD2.1-base UNet with random weights,
timers and the machine line. Imported as ``from common import ...`` (Python puts ``bench/`` on ``sys.path`` when
it runs ``python bench/<script>.py``); not part of the pack.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import platform
import resource
import sys
import time
from typing import Any, Callable

import torch

log = logging.getLogger("bench")


def require_pack(*modules: str) -> tuple:
    """``comfyui_bfr.<name>`` for each name, from the installed pack; exit with the install command if the pack is
    not installed (an import error inside an installed pack is raised as is)."""
    if importlib.util.find_spec("comfyui_bfr") is None:
        sys.exit("bench: the comfyui_bfr package is not installed in this Python. Install the checkout first: "
                 "`pip install -e .` in the repo root (see README), then rerun with the same interpreter.")
    return tuple(importlib.import_module(f"comfyui_bfr.{name}") for name in modules)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def unet_bench_parser(doc: str, *, batch_help: str, repeats: int, threads: int,
                      threads_help: str) -> argparse.ArgumentParser:
    """The flags every UNet-step benchmark has: --batch, --size, --repeats, --threads, --json."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1, help=batch_help)
    ap.add_argument("--size", type=int, default=512, help="image size in px (latent = size/8)")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=threads, help=threads_help)
    ap.add_argument("--json", help="also write the results here")
    return ap


def build_sd21_unet(seed: int = 0):
    """The SD2.1-base ``UNet2DConditionModel`` (866 M parameters) with random weights, eval mode (timing only);
    logs its size and build time."""
    from diffusers import UNet2DConditionModel

    (convert,) = require_pack("sd.convert")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_config(dict(convert.SD21_BASE_UNET_CONFIG)).eval()
    log.info("built SD2.1-base UNet (%.0f M params) in %.0f s; torch %s, %d threads", n_params(unet) / 1e6,
             time.perf_counter() - t0, torch.__version__, torch.get_num_threads())
    return unet


def build_sd21_vae():
    """The SD 2.x ``AutoencoderKL`` with random weights, eval mode (timing only)."""
    from diffusers import AutoencoderKL

    (convert,) = require_pack("sd.convert")
    vae = AutoencoderKL.from_config(dict(convert.SD21_BASE_VAE_CONFIG)).eval()
    log.info("built SD AutoencoderKL (%.0f M params)", n_params(vae) / 1e6)
    return vae


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux: KiB


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


def machine() -> str:
    return (f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads").strip()


def command(script: str, argv: list[str] | None) -> str:
    """The command line that reproduces this run (for the result JSON and BENCHMARKS.md)."""
    return f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
