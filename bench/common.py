"""What every benchmark script shares: importing the installed pack, the full SD2.1-base UNet (and VAE, text
encoder) with random weights, --device/--dtype, timers (CUDA-synchronised), FLOP counting, peak memory and the
machine line. Imported as ``from common import ...`` (Python puts ``bench/`` on ``sys.path`` when it runs
``python bench/<script>.py``); not part of the pack.
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
from pathlib import Path
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


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_device_flags(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--device (cpu | cuda[:i] | meta: shapes only, for FLOP counting) and --dtype (fp32 | fp16 | bf16)."""
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (meta: no data, FLOP counts only)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and activations")
    return ap


def device_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The run's device and dtype from :func:`add_device_flags`; exits with a sentence if CUDA is asked for and absent."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench: --device {args.device} but torch {torch.__version__} sees no CUDA device.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    return device, DTYPES[args.dtype]


def unet_bench_parser(doc: str, *, batch_help: str, repeats: int, threads: int,
                      threads_help: str) -> argparse.ArgumentParser:
    """The flags every UNet-step benchmark has: --batch, --size, --repeats, --threads, --json, --device, --dtype."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1, help=batch_help)
    ap.add_argument("--size", type=int, default=512, help="image size in px (latent = size/8)")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=threads, help=threads_help)
    ap.add_argument("--json", help="also write the results here")
    return add_device_flags(ap)


def _build(kind: str, make: Callable[[], torch.nn.Module], device, dtype, seed: int) -> torch.nn.Module:
    """``make()`` with random weights from ``seed``, built directly on ``device`` (fast on a GPU), cast to ``dtype``."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device(device):
        module = make()
    module = module.to(dtype=dtype).eval()
    log.info("built %s (%.0f M params) on %s %s in %.0f s", kind, n_params(module) / 1e6, device,
             str(dtype).removeprefix("torch."), time.perf_counter() - t0)
    return module


def build_sd21_unet(seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32):
    """The SD2.1-base ``UNet2DConditionModel`` (866 M parameters) with random weights, eval mode (timing only);
    logs its size and build time."""
    from diffusers import UNet2DConditionModel

    (convert,) = require_pack("sd.convert")
    unet = _build("SD2.1-base UNet", lambda: UNet2DConditionModel.from_config(dict(convert.SD21_BASE_UNET_CONFIG)),
                  device, dtype, seed)
    log.info("torch %s, %d threads", torch.__version__, torch.get_num_threads())
    return unet


def build_sd21_vae(seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32):
    """The SD 2.x ``AutoencoderKL`` with random weights, eval mode (timing only)."""
    from diffusers import AutoencoderKL

    (convert,) = require_pack("sd.convert")
    return _build("SD AutoencoderKL", lambda: AutoencoderKL.from_config(dict(convert.SD21_BASE_VAE_CONFIG)),
                  device, dtype, seed)


def build_sd21_text_encoder(seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32):
    """The SD2 ``CLIPTextModel`` (OpenCLIP-H text tower as diffusers has it, 23 layers) with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    (convert,) = require_pack("sd.convert")
    cfg = {k: v for k, v in convert.SD21_TEXT_ENCODER_CONFIG.items() if k not in ("architectures", "model_type")}
    return _build("SD2 text encoder", lambda: CLIPTextModel(CLIPTextConfig(**cfg)), device, dtype, seed)


class StubTokenizer:
    """Stands in for the CLIP tokenizer (no vocabulary is available offline): 77 ids per prompt from its bytes.
    The ids only have to be valid; with random weights nothing depends on which they are."""

    model_max_length = 77

    def __call__(self, prompts, padding=None, max_length=77, truncation=True, return_tensors="pt"):
        from types import SimpleNamespace

        ids = torch.full((len(prompts), max_length), 49407, dtype=torch.long)
        for i, p in enumerate(prompts):
            body = [49406] + [b + 256 for b in p.encode()][: max_length - 2]
            ids[i, : len(body)] = torch.tensor(body)
        return SimpleNamespace(input_ids=ids)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sync(device=None) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); nothing on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device=None) -> tuple[float, Any]:
    """(wall seconds, result) of one call; on CUDA synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def timed_cpu(fn: Callable[[], Any], device=None) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call. On a shared CPU the CPU time of a 1-thread run
    counts the work done and not the time spent waiting for a core (with more threads it also counts OpenMP
    spin-waits); on CUDA only the wall time means anything."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


# ------------------------------------------------------------------------------------------------ FLOPs

# SDPA kernels torch.utils.flop_counter may not know: torch 2.13's registry has the CUDA ones (flash, efficient,
# cudnn) but not the CPU kernel, which it would count as 0. Counted like the registered ones: QK^T and AV,
# 2 * B * H * Nq * Nk * D each.
_EXTRA_SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")


def sdpa_flop_mapping() -> dict:
    """custom_mapping for FlopCounterMode: the SDPA kernels of this torch that its registry lacks."""
    from torch.utils.flop_counter import flop_registry, sdpa_flop_count

    def sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    return {getattr(aten, name): sdpa_flop for name in _EXTRA_SDPA_OPS
            if hasattr(aten, name) and getattr(aten, name) not in flop_registry}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int], Any]:
    """(total FLOPs, {aten op: FLOPs}, result) of one call: matmuls, convolutions and SDPA (4 B H Nq Nk D) as
    torch.utils.flop_counter counts them (a multiply-add = 2 FLOPs), element-wise ops not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping()) as counter:
        out = fn()
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), per_op, out


# ------------------------------------------------------------------------------------------------ memory


def peak_rss_gb() -> float:
    """Peak resident set of this process in GiB: VmHWM of /proc/self/status (every allocator, torch's included),
    else getrusage's ru_maxrss (the same figure on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux: KiB


def rss_gb() -> float:
    """Current resident set of this process in GiB (VmRSS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return float("nan")


def reset_peak_memory(device=None) -> bool:
    """Restart the peak-memory mark: CUDA's max_memory_allocated, or on the CPU VmHWM (writing 5 to
    /proc/self/clear_refs resets it to the current RSS). False if the platform cannot."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_gb(device=None) -> float:
    """Peak memory since :func:`reset_peak_memory`, GiB: torch.cuda.max_memory_allocated on CUDA, else peak RSS."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024 ** 3
    return peak_rss_gb()


def tensor_bytes(tensors) -> int:
    """Bytes held by the tensors of a nested dict/list/tuple."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(tensor_bytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(tensor_bytes(v) for v in tensors)
    return 0


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


def machine(device=None) -> str:
    if device is not None and torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return (f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads").strip()


def command(script: str, argv: list[str] | None) -> str:
    """The command line that reproduces this run (for the result JSON and BENCHMARKS.md)."""
    return f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
