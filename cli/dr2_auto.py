"""``bfr calibrate-dr2`` and ``bfr restore --method dr2 --auto CALIBRATION``: DR2's (N, tau, omega) chosen from the DR
encoder's f_DR of each input (:mod:`..pipelines.dr2_auto`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ..lora.dr_checkpoint import read_dr_checkpoint
from ..pipelines import dr2, dr2_auto
from ..pipelines.dr_analysis import load_images
from ..pipelines.image_io import IMAGE_EXTENSIONS, list_images, load_image, prepare_output_folder, save_png
from ..sd.loader import load_model
from .folders import resolve_device

logger = logging.getLogger("bfr")


def _encoder(path: str) -> torch.nn.Module:
    module, _ = read_dr_checkpoint(path)
    return module.float().encoder


def cmd_calibrate_dr2(args: argparse.Namespace) -> int:
    module, meta = read_dr_checkpoint(args.dr_encoder)
    encoder, patch = module.float().encoder, int(meta["patch_size"])
    hq, _ = load_images(args.hq_dir, args.size, args.images, args.seed)
    held = hq[: args.held_out] if args.held_out else None
    cal_hq = hq[args.held_out:] if args.held_out else hq
    if args.restorer == "proxy":
        restore = dr2_auto.proxy_restorer(dr2_auto.GaussianFacePrior(cal_hq), args.steps)
        space = "pixel"
    else:
        model = load_model(args.base_model, download=args.download, repo_id=args.repo,
                           device=resolve_device(args.device))
        restore, space = dr2_auto.model_restorer(model, args.steps, args.space), args.space
    cal = dr2_auto.calibrate(encoder, patch, restore, cal_hq, steps=args.steps, space=space, k=args.k,
                             seed=args.seed, restorer_name=args.restorer)
    dr2_auto.save_calibration(args.out, cal)
    if held is not None and len(held):
        result = dr2_auto.evaluate_auto(cal, encoder, restore, held, seed=args.seed + 1)
        report = Path(args.out).with_suffix(".eval.json")
        report.write_text(json.dumps(result, indent=1))
        logger.info("held-out (%d images): auto %.2f dB | best fixed (calibration) %s %.2f | best fixed (test) %s "
                    "%.2f | per-image oracle %.2f -> %s", len(held), result["auto"],
                    result["fixed_calibrated_params"], result["fixed_calibrated"], result["fixed_oracle_params"],
                    result["fixed_oracle"], result["per_image_oracle"], report)
    return 0


def add_calibrate_dr2(sub) -> None:
    p = sub.add_parser("calibrate-dr2", help="calibrate DR2's automatic (N, tau) from a DR encoder on HQ faces",
                       usage="bfr calibrate-dr2 DR_ENCODER HQ_DIR --out CAL.safetensors [--restorer dr2|proxy]")
    p.add_argument("dr_encoder", metavar="DR_ENCODER", help="dr_encoder.safetensors from `bfr train dr-encoder`")
    p.add_argument("hq_dir", metavar="HQ_DIR", help="HQ faces; degraded with known severities for calibration")
    p.add_argument("--out", required=True, help="the calibration .safetensors to write")
    p.add_argument("--restorer", choices=["dr2", "proxy"], default="dr2",
                   help="dr2: DR2 on SD 2.1 (--base-model); proxy: the DR2 loop with a Gaussian face prior instead "
                        "of the UNet (CPU-cheap; not SD 2.1)")
    p.add_argument("--size", type=int, default=512, help="face size in px (default 512)")
    p.add_argument("--images", type=int, default=None, help="at most this many HQ images")
    p.add_argument("--held-out", type=int, default=0, help="keep the first N images out of the calibration and "
                                                           "report auto vs the best fixed (N, tau) on them")
    p.add_argument("--k", type=int, default=5, help="neighbours of the kNN choice (default 5)")
    p.add_argument("--steps", type=int, default=100, help="T of DR2's respaced schedule")
    p.add_argument("--space", choices=["latent", "pixel"], default="latent", help="dr2 restorer: where Phi_N acts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--base-model", help="SD 2.1-base (dr2 restorer)")
    p.add_argument("--download", action="store_true")
    p.add_argument("--repo")
    p.set_defaults(func=cmd_calibrate_dr2)


# ------------------------------------------------------------------------------------------- restore --auto
def add_auto_args(p) -> None:
    g = p.add_argument_group("DR2 auto (N, tau, omega) from a DR encoder")
    g.add_argument("--auto", metavar="CALIBRATION", default=None,
                   help="choose N, tau, omega per image with this `bfr calibrate-dr2` file (overrides --n/--tau/"
                        "--omega); needs --dr-encoder")
    g.add_argument("--dr-encoder", metavar="FILE", default=None, help="the DR encoder the calibration was made with")


def restore_dr2_auto(args: argparse.Namespace, out: str) -> int:
    """``bfr restore --method dr2 --auto CAL --dr-encoder FILE INPUT OUT``: per image its own (N, tau, omega)."""
    if not args.dr_encoder:
        raise ValueError("--auto needs --dr-encoder FILE (the dr_encoder.safetensors the calibration was made with)")
    cal = dr2_auto.load_calibration(args.auto)
    encoder = _encoder(args.dr_encoder)
    src = Path(args.image)
    sources = list_images(src, "restore input folder") if src.is_dir() else [src]
    out_path = Path(out)
    to_folder = src.is_dir() or out_path.suffix.lower() not in IMAGE_EXTENSIONS
    if to_folder:
        prepare_output_folder(out_path)
    model = load_model(args.base_model, download=args.download, repo_id=args.repo, device=resolve_device(args.device))
    for path in sources:
        x = load_image(path, args.size)[None]
        (n, tau, omega), = dr2_auto.auto_params(cal, encoder, x)
        cfg = dr2.DR2Config(n=n, tau=tau, omega=omega, steps=cal.steps, space=cal.space, seed=args.seed)
        result = dr2.restore(model, x, cfg)
        dst = out_path / f"{path.stem}_dr2.png" if to_folder else out_path
        save_png(dst, result.images[0])
        logger.info("DR2 auto %s: N=%g tau=%d omega=%d -> %s", path.name, n, tau, omega, dst)
    return 0
