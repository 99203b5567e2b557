"""``bfr analyze-dr CHECKPOINT HQ_DIR --out DIR``: what a trained DR encoder knows (:mod:`..pipelines.dr_analysis`).

Held-out HQ images under a grid of known degradations -> t-SNE PNGs coloured by type and level, a kNN-probe table
(blur / noise / JPEG / scale level, type, type + level; leave-one-content-out) against a randomly initialised E_DR
and raw-pixel statistics, and G_LQ re-degradation PSNR/SSIM (DR-BFR Fig. 6 / 7). Writes report.md + report.json.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from ..lora.dr_checkpoint import read_dr_checkpoint
from ..lora.dr_module import DRModule
from ..pipelines import dr_analysis

logger = logging.getLogger("bfr")


def training_resolution(meta: dict, default: int = 128) -> int:
    """The ``--resolution`` the DR file was trained at (its train_config), else ``default``."""
    try:
        return int(json.loads(meta.get("train_config", "{}")).get("resolution", default))
    except (ValueError, TypeError, AttributeError):
        return default


def cmd_analyze_dr(args: argparse.Namespace) -> int:
    module, meta = read_dr_checkpoint(args.checkpoint)
    module = module.float()
    patch = int(meta["patch_size"])
    size = args.size or training_resolution(meta)
    hq, names = dr_analysis.load_images(args.hq_dir, size, args.images, args.seed)
    torch.manual_seed(args.seed + 12345)
    random_module = DRModule(module.cfg).eval()
    report = dr_analysis.analyze(module, random_module, hq, names, patch, args.out, seed=args.seed, k=args.k)
    for task, row in report["probe"].items():
        logger.info("probe %-10s trained %.3f | random E_DR %.3f | pixel stats %.3f | chance %.3f", task,
                    row["trained E_DR"], row["random E_DR"], row["pixel stats"], row["chance"])
    r = report["redegradation"]
    logger.info("G_LQ re-degradation PSNR %.2f / SSIM %.4f (another DR %.2f / %.4f; HQ itself %.2f / %.4f)",
                r["model"]["psnr"], r["model"]["ssim"], r["other_dr"]["psnr"], r["other_dr"]["ssim"],
                r["baseline"]["psnr"], r["baseline"]["ssim"])
    return 0


def add_analyze_dr(sub) -> None:
    p = sub.add_parser("analyze-dr", help="DR encoder analysis: t-SNE, kNN probe vs controls, G_LQ re-degradation",
                       usage="bfr analyze-dr CHECKPOINT HQ_DIR --out DIR [--images N] [--seed S]",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="dr_encoder.safetensors from `bfr train dr-encoder`")
    p.add_argument("hq_dir", metavar="HQ_DIR", help="held-out HQ images (never seen in training)")
    p.add_argument("--out", required=True, metavar="DIR", help="report folder (report.md, report.json, PNGs)")
    p.add_argument("--images", type=int, default=24, metavar="N", help="at most N images of HQ_DIR (default 24)")
    p.add_argument("--size", type=int, default=None, help="resize to SIZE squares (default: the training resolution)")
    p.add_argument("--k", type=int, default=5, help="neighbours of the kNN probe (default 5)")
    p.add_argument("--seed", type=int, default=0, help="image sample, degradation noise, control init, t-SNE")
    p.set_defaults(func=cmd_analyze_dr)
