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

import numpy as np

from ..lora.checkpoint import export_lora_only
from ..pipelines import degradation, dr2
from ..pipelines.degrade_folder import degrade_folder
from ..pipelines.image_io import from_uint8, load_image, prepare_output_folder, save_png
from ..pipelines.panel import labelled_panel
from ..pipelines.sample_data import sample_face
from ..sd.loader import load_model
from ..train import face_ae
from ..train import flipnet as flipnet_trainer
from .args import add_dataclass_arguments, dataclass_from_namespace
from .client import run_workflow
from .folders import RestoreConfig, SynthesizeConfig, resolve_device, restore_dr2, restore_flipnet, synthesize_degraded

logger = logging.getLogger("bfr")

COMMANDS = ("demo", "degrade", "restore", "train", "synthesize", "export-lora", "run-workflow")


# --------------------------------------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    x = (load_image(args.image, args.size) if args.image else from_uint8(sample_face(args.size)))[None]
    hq = x[0]
    presets = args.presets or list(degradation.PRESETS)
    row: list[tuple[str, object]] = [("input (HQ)", hq)]
    report = {}
    for name in presets:
        if name == "custom":
            continue
        out, params = degradation.degrade(x, degradation.get_preset(name), seed=args.seed, backend=args.backend)
        row.append((name, out[0]))
        report[name] = params[0]
        logger.info("degraded with preset %s", name)
    per_row = args.columns
    rows = [row[i:i + per_row] for i in range(0, len(row), per_row)]
    out_dir = prepare_output_folder(args.out)
    panel_path = out_dir / "demo_degradation.png"
    save_png(panel_path, np.asarray(labelled_panel(rows, tile=args.tile)))
    (out_dir / "demo_degradation.json").write_text(json.dumps(report, indent=1))
    logger.info("wrote %s (%d presets) and its parameter report", panel_path, len(report))
    if args.restore == "none":
        return 0

    model = load_model(args.base_model, download=args.download, repo_id=args.repo, device=resolve_device(args.device))
    restore_presets = args.restore_presets or ["dr2-mild-x4", "dr2-medium-x8", "dr2-severe-x8"]
    degraded = {}
    for name in restore_presets:
        out, _ = degradation.degrade(x, degradation.get_preset(name), seed=args.seed, backend=args.backend)
        degraded[name] = out
    config = dr2.DR2Config(n=args.n, tau=args.tau, steps=args.steps, space=args.space, seed=args.seed)
    rows = dr2.demo_rows(model, hq, degraded, config)
    dr2_path = out_dir / "demo_dr2.png"
    save_png(dr2_path, np.asarray(labelled_panel(rows, tile=args.tile)))
    logger.info("wrote %s (degrade -> DR2 restore, model: %s)", dr2_path, model.source)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="degrade the sample face with every preset and write a labelled panel PNG")
    p.add_argument("--image", help="use this photo instead of the built-in sample face")
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--size", type=int, default=512, help="working resolution (default 512)")
    p.add_argument("--tile", type=int, default=192, help="panel tile size in px")
    p.add_argument("--columns", type=int, default=6, help="tiles per panel row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["torch", "cv2"], default="cv2")
    p.add_argument("--presets", nargs="*", help="subset of presets (default: all)")
    p.add_argument("--restore", choices=["dr2", "none"], default="dr2",
                   help="also restore a few degraded faces with DR2 and write demo_dr2.png (default: dr2)")
    p.add_argument("--restore-presets", nargs="*", help="presets to restore (default: dr2-mild-x4 dr2-medium-x8 "
                                                        "dr2-severe-x8)")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda, cuda:1")
    _add_model_args(p)
    _add_dr2_args(p)
    p.set_defaults(func=_cmd_demo)


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


def _omega(value: str):
    return int(value) if value.isdigit() else value


def _add_dr2_args(p) -> None:
    g = p.add_argument_group("DR2")
    g.add_argument("--n", type=float, default=2.0, help="low-pass factor N (latent px for --space latent)")
    g.add_argument("--tau", type=int, default=35, help="output level tau (of --steps levels)")
    g.add_argument("--omega", type=_omega, default="auto", help="start level: auto | official | an integer")
    g.add_argument("--steps", type=int, default=100, help="T of the respaced schedule (default 100)")
    g.add_argument("--space", choices=["latent", "pixel"], default="latent", help="where Phi_N is applied")


def _cmd_restore(args: argparse.Namespace) -> int:
    if args.method == "flipnet":
        args.input, args.out_dir = args.image, args.out
        written = restore_flipnet(dataclass_from_namespace(RestoreConfig, args))
        logger.info("restored %d image(s) into %s", len(written), args.out)
        return 0
    cfg = dr2.DR2Config(n=args.n, tau=args.tau, omega=args.omega, steps=args.steps, space=args.space,
                        seed=args.seed)
    out = restore_dr2(args.image, args.out, cfg, base_model=args.base_model, download=args.download,
                      repo_id=args.repo, size=args.size, device=args.device)
    logger.info("restored -> %s", out)
    return 0


def _option_value(argv: list[str], flag: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return default


def _add_restore(sub, argv: list[str]) -> None:
    method = _option_value(argv, "--method", "dr2") if _positionals(argv)[:1] == ["restore"] else "dr2"
    p = sub.add_parser("restore", help="restore a face image (or a folder of them): --method dr2 | flipnet",
                       description="Restore faces. The options depend on --method; see `bfr restore --method "
                                   "flipnet --help` for FlipNet's.")
    p.add_argument("image", help="image file or folder (aligned face crops)")
    p.add_argument("--out", required=True, help="output file (one image, dr2) or folder")
    p.add_argument("--method", choices=["dr2", "flipnet"], default="dr2", help="restoration method")
    p.set_defaults(func=_cmd_restore)
    if method == "flipnet":
        # --checkpoint (the FlipNet .safetensors), --base-model (SD 2.1), --phi, ..., --device
        add_dataclass_arguments(p, RestoreConfig, skip=("input", "out_dir"))
        return
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE first (e.g. 512)")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument("--checkpoint", action=_NotForDR2, help=argparse.SUPPRESS)
    _add_model_args(p)
    _add_dr2_args(p)


class _NotForDR2(argparse.Action):
    """``--checkpoint`` names a file this pack trained; DR2 has none, so it is refused with the flag to use."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is a FlipNet checkpoint (a file this pack trained); DR2 is training-free. "
                     f"Pass SD 2.1-base with --base-model {values}, or use --method flipnet --checkpoint FILE.")


# ------------------------------------------------------------------------------------------- train, synthesize
TRAINERS = {
    "face-ae": (face_ae.FaceAETrainConfig, face_ae.train_face_ae),
    "flipnet": (flipnet_trainer.FlipNetTrainConfig, flipnet_trainer.train_flipnet),
}


def _add_train(sub, argv: list[str]) -> None:
    p = sub.add_parser("train", help="train FlipNet's face autoencoders or FlipNet itself (accelerate)")
    tsub = p.add_subparsers(dest="what", required=True)
    positionals = _positionals(argv)
    which = positionals[1] if positionals[:1] == ["train"] and len(positionals) > 1 else None
    helps = {"face-ae": "HQ/LQ face autoencoders: --stage recon, then --stage assoc",
             "flipnet": "FlipNet LoRA + BoostHub (+ face tokens): --mode restore | degrade"}
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
