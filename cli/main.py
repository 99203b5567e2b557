"""The ``bfr`` command line: demo, degrade, restore, train, synthesize, export-lora, run-workflow.

Each subcommand is a small adapter: parse arguments, call a pipeline or trainer, report. Logging goes to stderr.
Flags mean the same for every method: ``--base-model`` is SD 2.1-base, ``--checkpoint`` is a file this pack
trained, ``--device`` defaults to ``auto`` (CUDA when present).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


from ..lora.checkpoint import export_lora_only
from ..pipelines import degradation, dr2, face, face_detect
from ..pipelines.degrade_folder import degrade_folder
from ..sd.loader import load_model
from ..train import face_ae
from ..train import clrface as clrface_trainer
from ..train import dr_encoder as dr_encoder_trainer
from ..train import drbfr as drbfr_trainer
from ..train import flipnet as flipnet_trainer
from ..train import id_mask as id_mask_trainer
from ..train import irn as irn_trainer
from .args import add_dataclass_arguments, add_dr2_options, dataclass_from_namespace
from .analyze_dr import add_analyze_dr
from .client import run_workflow
from .demo import run_demo
from .dr2_auto import add_auto_args, add_calibrate_dr2, restore_dr2_auto
from .folders import (CLRFaceRestoreConfig, DRBFRRestoreConfig, RestoreConfig, SynthesizeConfig, clrface_crop_restorer,
                      dr2_crop_restorer, drbfr_crop_restorer, flipnet_crop_restorer, model_identity, resolve_device,
                      restore_clrface, restore_dr2, restore_drbfr,
                      restore_flipnet, synthesize_degraded)
from .evaluate import add_eval, add_make_testset, add_sweep
from .photos import FACES_CHOICES, PhotoOptions, restore_photo_folder

logger = logging.getLogger("bfr")

COMMANDS = ("demo", "degrade", "restore", "train", "synthesize", "export-lora", "run-workflow", "make-testset", "eval",
            "sweep", "analyze-dr", "calibrate-dr2")


# --------------------------------------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole-photo path on real photos: detect, align, degrade, restore (DR2 with "
                                    "SD 2.1), paste back, as one labelled panel",
                       description="On the sample group photo (scikit-image's astronaut and cameraman, public domain) "
                                   "or --image: detect and number the faces, align them, degrade each crop with a "
                                   "preset, restore the degraded crops with DR2 when SD 2.1-base is found (otherwise "
                                   "the panel says so), paste them back. Writes demo_photo.png + demo_photo.json, and "
                                   "demo_degradation.png (every preset on the astronaut face).")
    p.add_argument("--image", help="use this whole photo instead of the built-in group photo")
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--size", type=int, default=512, help="aligned face crop size in px (default 512)")
    p.add_argument("--tile", type=int, default=160, help="panel tile size in px")
    p.add_argument("--columns", type=int, default=7, help="tiles per row of the degradation gallery")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["torch", "cv2"], default="cv2", help="degradation backend")
    p.add_argument("--presets", nargs="*", help="gallery presets (default: all)")
    p.add_argument("--restore", choices=["dr2", "none"], default="dr2",
                   help="restore the degraded faces with DR2 when SD 2.1-base is found (default: dr2)")
    p.add_argument("--restore-presets", nargs="*", help="presets applied to the faces, face k gets preset k mod len "
                                                        "(default: dr2-mild-x4 dr2-medium-x8 dr2-severe-x8)")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda, cuda:1")
    g = p.add_argument_group("faces")
    g.add_argument("--faces", default="all", help=f"which faces: {FACES_CHOICES} (default: all)")
    g.add_argument("--face-order", choices=face.ORDERS, default="area", help="face numbering (default: area)")
    g.add_argument("--min-face", type=int, default=32, help="ignore faces smaller than this (px)")
    g.add_argument("--detector", choices=face_detect.BACKENDS, default="auto", help="face detector (default: auto)")
    g.add_argument("--face-models", metavar="DIR", help="RetinaFace folder (default: ComfyUI's models/facedetection)")
    g.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default="wavelet",
                   help="colour fix of the restored faces against the degraded ones (default: wavelet)")
    g.add_argument("--feather", type=float, default=1.0, help="paste edge width, relative to facexlib's")
    _add_model_args(p)
    _add_dr2_args(p)
    p.set_defaults(func=run_demo)


# ------------------------------------------------------------------------------------------------------ degrade
_OVERRIDES_EXAMPLE = '\'{"jpeg_quality": [30, 60]}\''


def _list_presets() -> int:
    width = max(map(len, degradation.PRESETS))
    lines = [f"{name:<{width}}  {cfg.describe()}" for name, cfg in degradation.PRESETS.items()]
    lines.append(f"Change any field with --overrides, e.g. {_OVERRIDES_EXAMPLE}.")
    try:
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `bfr degrade --list-presets | head`: the reader left early; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _parse_overrides(text: str | None) -> dict | None:
    """``--overrides`` JSON -> a dict of DegradationConfig fields (None when not given)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--overrides is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}; give an "
                         f"object such as {_OVERRIDES_EXAMPLE}.") from exc
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
            type(value), "null")
        raise ValueError(f"--overrides must be a JSON object of preset fields, got {kind}: {text!r}; give an object "
                         f"such as {_OVERRIDES_EXAMPLE}.")
    return value


def _cmd_degrade(args: argparse.Namespace) -> int:
    if args.list_presets:
        return _list_presets()
    if not args.in_dir or not args.out_dir:
        raise ValueError("bfr degrade needs IN_DIR and OUT_DIR (or --list-presets to see the presets).")
    overrides = _parse_overrides(args.overrides)
    summary = degrade_folder(args.in_dir, args.out_dir, preset=args.preset, per_image=args.per_image,
                             seed=args.seed, workers=args.workers, overrides=overrides, size=args.size,
                             resume=not args.no_resume)
    logger.info("degrade summary: %s", json.dumps(summary))
    return 0


def _add_degrade(sub) -> None:
    p = sub.add_parser("degrade", help="build LQ training pairs from a folder of HQ faces (resumable, parallel)",
                       description="Degrade every image of IN_DIR (recursively) PER_IMAGE times with a preset into "
                                   "OUT_DIR/<stem>_<k>.png plus params.jsonl. `bfr degrade --list-presets` prints the "
                                   "presets and their ranges.")
    p.add_argument("in_dir", nargs="?", help="folder of HQ images")
    p.add_argument("out_dir", nargs="?", help="output folder for LQ images and params.jsonl")
    p.add_argument("--list-presets", action="store_true", help="print every preset with its ranges and exit")
    p.add_argument("--preset", default="flipnet", help="degradation preset (see `bfr degrade --list-presets`)")
    p.add_argument("--per-image", type=int, default=5, help="LQ variants per HQ image (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--size", type=int, default=None, help="resize HQ images to SIZE x SIZE first")
    p.add_argument("--overrides", default=None, help=f"JSON object overriding preset fields, e.g. {_OVERRIDES_EXAMPLE}")
    p.add_argument("--no-resume", action="store_true", help="redo images whose outputs already exist")
    p.set_defaults(func=_cmd_degrade)


# ------------------------------------------------------------------------------------------------------ restore
def _add_model_args(p) -> None:
    p.add_argument("--base-model", help="SD 2.1-base: a single .safetensors or a diffusers folder "
                                        "(else $BFR_SD21_CHECKPOINT, then ComfyUI's models/checkpoints)")
    p.add_argument("--download", action="store_true", help="allow downloading SD 2.1-base from --repo")
    p.add_argument("--repo", help="repo id for --download (default $BFR_SD21_REPO or a community mirror)")


def _add_dr2_args(p) -> None:
    add_dr2_options(p.add_argument_group("DR2"))


def _restore_out(args: argparse.Namespace) -> str:
    """OUT as the second positional or ``--out`` (either, not two different ones)."""
    if args.out and args.out_dir and args.out != args.out_dir:
        raise ValueError(f"two outputs given ({args.out_dir!r} and --out {args.out!r}); give OUT once")
    out = args.out or args.out_dir
    if not out:
        raise ValueError("bfr restore needs an output: bfr restore INPUT OUT (or --out OUT)")
    return out


_PHOTO_DEFAULTS = {"face_order": "area", "min_face": 32, "max_faces": 0, "detector": "auto", "face_models": None,
                   "detect_threshold": None, "max_side": face_detect.DEFAULT_MAX_SIDE, "color_fix": "wavelet",
                   "feather": 1.0, "save_crops": False, "no_resume": False}


# methods configured by a dataclass of cli/folders.py: (config, crop restorer for --faces, folder restorer)
CONFIGURED_METHODS = {"flipnet": (RestoreConfig, flipnet_crop_restorer, restore_flipnet),
                      "drbfr": (DRBFRRestoreConfig, drbfr_crop_restorer, restore_drbfr),
                      "clrface": (CLRFaceRestoreConfig, clrface_crop_restorer, restore_clrface)}
# run options that do not change the restored faces (left out of the photo report's identity: resume across them)
_NOT_IN_IDENTITY = ("input", "out_dir", "base_model", "tokenizer", "download", "repo", "device", "batch_size", "size")


def _cmd_restore(args: argparse.Namespace) -> int:
    out = _restore_out(args)
    if args.faces is not None:
        return _cmd_restore_photos(args, out)
    given = [k for k, v in _PHOTO_DEFAULTS.items() if getattr(args, k) != v]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} is a whole-photo option; add --faces {FACES_CHOICES} "
                         "(without --faces the inputs are aligned face crops)")
    if args.method in CONFIGURED_METHODS:
        args.input, args.out_dir = args.image, out
        cls, _crop, restore_folder = CONFIGURED_METHODS[args.method]
        written = restore_folder(dataclass_from_namespace(cls, args))
        logger.info("restored %d image(s) into %s", len(written), out)
        return 0
    if getattr(args, "auto", None):
        return restore_dr2_auto(args, out)
    cfg = dr2.DR2Config(n=args.n, tau=args.tau, omega=args.omega, steps=args.steps, space=args.space,
                        seed=args.seed)
    result = restore_dr2(args.image, out, cfg, base_model=args.base_model, download=args.download,
                         repo_id=args.repo, size=args.size, device=args.device)
    logger.info("restored -> %s", result)
    return 0


def _cmd_restore_photos(args: argparse.Namespace, out: str) -> int:
    """``bfr restore --faces ... PHOTOS OUT``: whole photos through :func:`.photos.restore_photo_folder`."""
    device = resolve_device(args.device)
    models: list = []
    if args.method in CONFIGURED_METHODS:
        args.input, args.out_dir = args.image, out
        cls, crop_restorer, _folder = CONFIGURED_METHODS[args.method]
        cfg = dataclass_from_namespace(cls, args)
        cfg.validate()
        crop_size = cfg.size
        identity = {"method": args.method, "model": model_identity(cfg.base_model, cfg.download, cfg.repo),
                    **{k: v for k, v in vars(cfg).items() if k not in _NOT_IN_IDENTITY}}
        if cfg.checkpoint:
            identity["checkpoint"] = str(os.path.abspath(cfg.checkpoint))

        def make():
            return crop_restorer(cfg)
    else:
        cfg = dr2.DR2Config(n=args.n, tau=args.tau, omega=args.omega, steps=args.steps, space=args.space,
                            seed=args.seed)
        cfg.validate()
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        crop_size = args.size or 512
        identity = {"method": "dr2", "model": model_identity(args.base_model, args.download, args.repo),
                    "n": cfg.n, "tau": cfg.tau, "omega": cfg.omega, "steps": cfg.steps, "space": cfg.space,
                    "seed": cfg.seed}

        def make():
            models.append(load_model(args.base_model, download=args.download, repo_id=args.repo, device=device))
            return dr2_crop_restorer(models[0], cfg, args.batch_size)
    opts = PhotoOptions(faces=args.faces, face_order=args.face_order, min_face=args.min_face,
                        max_faces=args.max_faces, detector=args.detector, face_models=args.face_models,
                        detect_threshold=args.detect_threshold, max_side=args.max_side, color_fix=args.color_fix,
                        feather=args.feather, crop_size=crop_size, save_crops=args.save_crops,
                        resume=not args.no_resume)
    summary = restore_photo_folder(args.image, out, opts, make, identity, device=device)
    if models and not models[0].is_real:
        logger.warning("the faces above came from the TINY RANDOM model: they are NOT a real restoration")
    logger.debug("restore summary: %s", json.dumps(summary))
    return 1 if summary["failed"] else 0


def _option_value(argv: list[str], flag: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return default


def _add_photo_args(p) -> None:
    g = p.add_argument_group(
        "whole photos (--faces)",
        "With --faces, INPUT is a photo or a folder of whole photos (searched recursively) and OUT a folder: the "
        "faces are detected, selected, aligned, restored as one batch per photo, colour-fixed and pasted back "
        "(OUT/<name>.png; OUT/restore_report.jsonl, resumable). Without --faces the inputs are aligned face crops.")
    g.add_argument("--faces", default=None, metavar="WHICH",
                   help=f"restore whole photos: {FACES_CHOICES} (numbers as on the detection preview, largest face "
                        "first)")
    g.add_argument("--face-order", choices=face.ORDERS, default="area",
                   help="how faces are numbered: area (largest first) | left_to_right (default: area)")
    g.add_argument("--min-face", type=int, default=32,
                   help="ignore faces smaller than this (px, shorter box side; default 32). dlib's CNN finds faces "
                        "from about 80 px (RetinaFace smaller)")
    g.add_argument("--max-faces", type=int, default=0, help="at most this many faces per photo, in order (0 = all)")
    g.add_argument("--detector", choices=face_detect.BACKENDS, default="auto",
                   help="auto = RetinaFace (ResNet-50, then MobileNet) when its file is in --face-models, else dlib "
                        "CNN (the [faces] extra)")
    g.add_argument("--face-models", metavar="DIR",
                   help="folder with detection_Resnet50_Final.pth / detection_mobilenet0.25_Final.pth (default: "
                        "ComfyUI's models/facedetection from $BFR_COMFY_MODELS or $COMFYUI_PATH, if it exists)")
    g.add_argument("--detect-threshold", type=float, default=None,
                   help="detector score threshold in the backend's units (default: RetinaFace 0.8, dlib 0.3)")
    g.add_argument("--max-side", type=int, default=face_detect.DEFAULT_MAX_SIDE,
                   help="larger photos are detected on a copy downscaled to this (default 1280)")
    g.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default="wavelet",
                   help="match each restored face's colours to the original face (default: wavelet)")
    g.add_argument("--feather", type=float, default=1.0, help="paste edge width relative to facexlib's sqrt(area)/20 "
                                                              "(0 = hard edge; default 1)")
    g.add_argument("--save-crops", action="store_true",
                   help="also write OUT/faces/<name>_<k>.png (restored face k), <name>_<k>_input.png and "
                        "<name>_faces.png (numbered preview)")
    g.add_argument("--no-resume", action="store_true", help="start the report over and redo every photo")


def _add_restore(sub, argv: list[str]) -> None:
    method = _option_value(argv, "--method", "dr2") if _positionals(argv)[:1] == ["restore"] else "dr2"
    p = sub.add_parser("restore", help="restore aligned faces, or whole photos with --faces: --method dr2 | flipnet | drbfr | "
                            "clrface",
                       usage="bfr restore INPUT OUT [--method dr2|flipnet|drbfr|clrface] [--faces WHICH] [options]",
                       description="Restore faces: aligned face crops (a file or folder), or with --faces the faces "
                                   "of whole photos. The options depend on --method; see `bfr restore --method "
                                   "flipnet --help` for FlipNet's, `--method drbfr --help` for DR-BFR's, `--method clrface "
                                   "--help` for CLR-Face's.")
    p.add_argument("image", metavar="INPUT", help="image file or folder: aligned face crops, or whole photos with "
                                                  "--faces")
    p.add_argument("out_dir", metavar="OUT", nargs="?", default=None,
                   help="output file (one aligned face, dr2) or folder (the same as --out)")
    p.add_argument("--out", default=None, help="output (the same as OUT)")
    p.add_argument("--method", choices=["dr2", *CONFIGURED_METHODS], default="dr2", help="restoration method")
    p.set_defaults(func=_cmd_restore)
    _add_photo_args(p)
    if method == "flipnet":
        # --checkpoint (the FlipNet .safetensors), --base-model (SD 2.1), --phi, ..., --device, --batch-size
        add_dataclass_arguments(p, RestoreConfig, skip=("input", "out_dir"))
        return
    if method == "drbfr":
        add_dataclass_arguments(p, DRBFRRestoreConfig, skip=("input", "out_dir"))
        return
    if method == "clrface":
        add_dataclass_arguments(p, CLRFaceRestoreConfig, skip=("input", "out_dir"))
        return
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE first (e.g. 512); with --faces: "
                                                          "the aligned crop size (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="with --faces: face crops per model call (default 4)")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument("--checkpoint", action=_NotForDR2, help=argparse.SUPPRESS)
    _add_model_args(p)
    _add_dr2_args(p)
    add_auto_args(p)


class _NotForDR2(argparse.Action):
    """``--checkpoint`` names a file this pack trained; DR2 has none, so it is refused with the flag to use."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is a FlipNet checkpoint (a file this pack trained); DR2 is training-free. "
                     f"Pass SD 2.1-base with --base-model {values}, or use --method flipnet|drbfr|clrface --checkpoint FILE.")


# ------------------------------------------------------------------------------------------- train, synthesize
TRAINERS = {
    "face-ae": (face_ae.FaceAETrainConfig, face_ae.train_face_ae),
    "flipnet": (flipnet_trainer.FlipNetTrainConfig, flipnet_trainer.train_flipnet),
    "dr-encoder": (dr_encoder_trainer.DREncoderTrainConfig, dr_encoder_trainer.train_dr_encoder),
    "drbfr": (drbfr_trainer.DRBFRTrainConfig, drbfr_trainer.train_drbfr),
    "id-mask": (id_mask_trainer.IdMaskTrainConfig, id_mask_trainer.train_id_mask),
    "irn": (irn_trainer.IRNTrainConfig, irn_trainer.train_irn),
    "clr-face": (clrface_trainer.CLRFaceTrainConfig, clrface_trainer.train_clrface),
}


def _add_train(sub, argv: list[str]) -> None:
    p = sub.add_parser("train", help="train a model (accelerate): FlipNet + its face autoencoders, DR encoder, "
                                     "DR-BFR, CLR-Face denoiser, identity mask, IRN")
    tsub = p.add_subparsers(dest="what", required=True)
    positionals = _positionals(argv)
    which = positionals[1] if positionals[:1] == ["train"] and len(positionals) > 1 else None
    helps = {"face-ae": "HQ/LQ face autoencoders: --stage recon, then --stage assoc",
             "flipnet": "FlipNet LoRA + BoostHub (+ face tokens): --mode restore | degrade",
             "dr-encoder": "DR-BFR's degradation representation E_DR (+ G_LQ, InfoNCE, energy distance; Eq. 7)",
             "drbfr": "DR-BFR: LoRA + LQ latent concatenated + the DR encoder's tokens as a timestep-modulated prompt",
             "id-mask": "CLR-Face identity mask f_M (perceptual + identity + sparsity) on a frozen SD2.1",
             "irn": "CLR-Face Identity Recovery Network f_phi (Eq. 11: alpha L1 + ArcFace cosine distance)",
             "clr-face": "CLR-Face conditional denoiser: LoRA + the degraded latent concatenated, EDM noise levels"}
    parsers = {name: tsub.add_parser(name, help=helps[name], description=TRAINERS[name][0].FIRST_RUN or None,
                                     usage=f"bfr train {name} [--FLAG VALUE ...]  (flags by topic below)",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
               for name in helps}
    if which in parsers:
        config_cls, train = TRAINERS[which]
        add_dataclass_arguments(parsers[which], config_cls)

        def run(ns: argparse.Namespace) -> int:
            path = train(dataclass_from_namespace(config_cls, ns))
            logger.info("%s checkpoint: %s", which, path)
            return 0

        parsers[which].set_defaults(func=run)


def _add_synthesize(sub, argv: list[str]) -> None:
    p = sub.add_parser("synthesize", help="off-shelf LQ faces with a degradation-mode FlipNet checkpoint")
    p.add_argument("hq_dir", help="folder of aligned HQ faces")
    p.add_argument("out_dir", help="output folder (<stem>_<k>.png, the off-shelf LQ layout)")
    add_dataclass_arguments(p, SynthesizeConfig, skip=("hq_dir", "out_dir"))

    def run(ns: argparse.Namespace) -> int:
        n = synthesize_degraded(dataclass_from_namespace(SynthesizeConfig, ns))
        logger.info("wrote %d degraded image(s) into %s", n, ns.out_dir)
        return 0

    p.set_defaults(func=run)


# -------------------------------------------------------------------------------------------------- export-lora
def _cmd_export_lora(args: argparse.Namespace) -> int:
    path = export_lora_only(args.flipnet, args.out)
    logger.info("LoRA-only file: %s (load it with LoraLoaderModelOnly; BoostHub and face tokens need the full file "
                "and BFR Load FlipNet)", path)
    return 0


def _add_export_lora(sub) -> None:
    p = sub.add_parser("export-lora", help="write the LoRA part of a FlipNet file alone (for core LoraLoaderModelOnly)",
                       description="Write the kohya LoRA tensors (lora_unet_*) of a FlipNet checkpoint alone, with the "
                                   "metadata a LoRA file usually has, so that ComfyUI's LoraLoaderModelOnly loads every "
                                   "key (on the full file it logs each BoostHub / face-embedder key as 'lora key not "
                                   "loaded'). That is the LoRA only: FlipNet restoration also needs BoostHub and the "
                                   "face tokens (BFR Load FlipNet + BFR Apply FlipNet with the full file).")
    p.add_argument("flipnet", help="FlipNet checkpoint (flipnet_restore/degrade.safetensors from `bfr train flipnet`)")
    p.add_argument("out", help="output .safetensors (e.g. ComfyUI/models/loras/flipnet_restore_lora.safetensors)")
    p.set_defaults(func=_cmd_export_lora)


# ------------------------------------------------------------------------------------------------- run-workflow
def _cmd_run_workflow(args: argparse.Namespace) -> int:
    paths = run_workflow(args.server, args.workflow, sets=args.set or [], image=args.image, out_dir=args.out,
                         timeout=args.timeout)
    for p in paths:
        logger.info("saved %s", p)
    return 0


def _add_run_workflow(sub) -> None:
    p = sub.add_parser("run-workflow", help="queue a workflow on a running ComfyUI and save its outputs")
    p.add_argument("workflow", help="API-format workflow JSON (or a UI-format one with an API twin in api/)")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL")
    p.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                   help="override an input; NODE is a node id or title; VALUE is JSON or a string")
    p.add_argument("--image", help="upload this image and use it in every LoadImage node")
    p.add_argument("--out", default="outputs/run", help="where to save output images")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the prompt")
    p.set_defaults(func=_cmd_run_workflow)


def _positionals(argv: list[str]) -> list[str]:
    """The words of ``argv`` that are not options, from the subcommand on (``bfr -v train flipnet ...`` ->
    ``["train", "flipnet", ...]``); option values are not told apart, which is enough to pick the subparsers."""
    words = [a for a in argv if not a.startswith("-")]
    start = next((i for i, w in enumerate(words) if w in COMMANDS), len(words))
    return words[start:]


class _SubcommandParser(argparse.ArgumentParser):
    """A (sub)command's parser: also takes ``-v`` after the command (``bfr train flipnet ... -v``), without
    overriding one given before it; nested subcommands inherit the class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="debug logging, tracebacks on errors")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``bfr`` parser. A trainer's flags are added only when ``argv`` selects it (``bfr train KIND``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="bfr", description="Diffusion-based blind face restoration tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubcommandParser)
    _add_demo(sub)
    _add_degrade(sub)
    _add_restore(sub, argv)
    _add_train(sub, argv)
    _add_synthesize(sub, argv)
    _add_export_lora(sub)
    _add_run_workflow(sub)
    add_make_testset(sub)
    add_eval(sub, argv)
    add_sweep(sub, argv)
    add_analyze_dr(sub)
    add_calibrate_dr2(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        # user errors carry the bad value and the fix; -v adds the traceback for bug reports
        logger.error("%s: %s", type(exc).__name__, exc, exc_info=args.verbose)
        return 2
