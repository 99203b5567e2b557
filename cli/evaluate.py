"""``bfr make-testset``, ``bfr eval`` and ``bfr sweep``: one harness that runs every method on the same pairs with
the same metrics (:mod:`..pipelines.evaluate`).

Methods come from :data:`METHODS`, a registry name -> :class:`MethodSpec` (its CLI options, and a builder from the
parsed options to a crop restorer ``(N, S, S, 3) float [0, 1] -> (N, S, S, 3)``); a new method is one entry.
``--workflow W.json --server URL`` instead runs any ComfyUI workflow through the API queue (:mod:`.client`), one
image per prompt, with each prompt's error recorded and the rest continuing.

Output folder ``OUT``: ``<label>/images/<name>.png``, ``<label>/metrics.jsonl``, ``<label>/run.json``, and for all
labels in OUT ``summary.md`` (the papers' table), ``metrics.csv``, ``grid.png`` (LQ | methods | HQ); ``bfr sweep``
adds ``sweep_<metric>.png`` plots and ``sweep_grid.png``. Reruns resume.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..lora.irn import load_irn_checkpoint
from ..pipelines import dr2, evaluate, face_detect
from ..pipelines.irn import run_irn
from ..pipelines.image_io import read_rgb, resize_uint8, save_png
from ..pipelines.testset import TestSet, make_testset, read_testset
from ..sd.loader import load_model
from .args import add_dataclass_arguments, add_dr2_options, dataclass_from_namespace
from .client import ComfyClient, ComfyError, apply_overrides, load_api_prompt, set_load_images
from .folders import (CLRFaceRestoreConfig, DRBFRRestoreConfig, RestoreConfig, clrface_crop_restorer, dr2_crop_restorer,
                      drbfr_crop_restorer, flipnet_crop_restorer, model_identity, resolve_device)

logger = logging.getLogger("bfr")

PLUMBING_NOTE = ("**Plumbing check, tiny random models, not results**: the tiny randomly initialised SD-shaped "
                 "models restore nothing; only the harness is being checked.")


# ------------------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class MethodSpec:
    """A ``--method``: ``add_args(parser)`` adds its options, ``build(ns)`` returns the crop restorer, ``describe(ns)``
    the settings recorded in run.json (a rerun with other settings is refused)."""

    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    build: Callable[[argparse.Namespace], evaluate.Restorer]
    describe: Callable[[argparse.Namespace], dict]


def _dr2_args(p) -> None:
    g = p.add_argument_group("DR2 (--method dr2)")
    add_dr2_options(g)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=1, help="crops per model call")
    g.add_argument("--base-model", help="SD 2.1-base .safetensors or diffusers folder (else $BFR_SD21_CHECKPOINT, "
                                        "ComfyUI's models/checkpoints; the tiny random model as the last resort)")
    g.add_argument("--download", action="store_true", help="allow downloading SD 2.1-base from --repo")
    g.add_argument("--repo", help="repo id for --download")


def _dr2_config(ns) -> dr2.DR2Config:
    return dr2.DR2Config(n=ns.n, tau=ns.tau, omega=ns.omega, steps=ns.steps, space=ns.space, seed=ns.seed)


def _dr2_build(ns) -> evaluate.Restorer:
    model = load_model(ns.base_model, download=ns.download, repo_id=ns.repo, device=resolve_device(ns.device))
    return dr2_crop_restorer(model, _dr2_config(ns), ns.batch_size)


def _dr2_describe(ns) -> dict:
    return {"method": "dr2", **vars(_dr2_config(ns)), "base_model": model_identity(ns.base_model, ns.download,
                                                                                    ns.repo)}


def _checkpoint_method(name: str, help_text: str, config_cls, crop_restorer) -> MethodSpec:
    """A method run from files this pack trained, configured by a dataclass of cli/folders.py (FlipNet, DR-BFR,
    CLR-Face)."""

    def config(ns):
        return dataclass_from_namespace(config_cls, ns, size=ns.size or 512, input="", out_dir="")

    def describe(ns) -> dict:
        cfg = vars(config(ns))
        return {"method": name, **{k: v for k, v in cfg.items() if k not in ("input", "out_dir")},
                "base_model": model_identity(ns.base_model, ns.download, ns.repo)}

    return MethodSpec(help_text, lambda p: add_dataclass_arguments(p, config_cls, skip=("input", "out_dir", "device",
                                                                                         "size")),
                      lambda ns: crop_restorer(config(ns)), describe)


def _lq_build(ns) -> evaluate.Restorer:
    return lambda crops: crops


def _irn_args(p) -> None:
    g = p.add_argument_group("CLR-Face IRN alone (--method irn)")
    g.add_argument("--irn", required=True, help="clrface-irn/1 file from `bfr train irn`")
    g.add_argument("--batch-size", type=int, default=4, help="crops per network call")


def _irn_build(ns) -> evaluate.Restorer:
    net = load_irn_checkpoint(ns.irn).net.to(resolve_device(ns.device)).eval()

    def restore(crops: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
        return run_irn(net, x, ns.batch_size).permute(0, 2, 3, 1).numpy()

    return restore


METHODS: dict[str, MethodSpec] = {
    "lq": MethodSpec("the LQ input itself (the 'Input' row of the papers' tables)", lambda p: None, _lq_build,
                     lambda ns: {"method": "lq"}),
    "dr2": MethodSpec("DR2 (training-free, SD 2.1)", _dr2_args, _dr2_build, _dr2_describe),
    "flipnet": _checkpoint_method("flipnet", "FlipNet restore mode (--checkpoint flipnet_restore.safetensors)",
                                  RestoreConfig, flipnet_crop_restorer),
    "drbfr": _checkpoint_method("drbfr", "DR-BFR (--checkpoint drbfr.safetensors)", DRBFRRestoreConfig,
                                drbfr_crop_restorer),
    "irn": MethodSpec("CLR-Face's Identity Recovery Network alone (--irn irn.safetensors; Tab. 4's 'IRN' row)",
                      _irn_args, _irn_build, lambda ns: {"method": "irn", "irn": str(Path(ns.irn).resolve())}),
    "clrface": _checkpoint_method("clrface", "CLR-Face (x_id from --init dr2|lq, --checkpoint clrface.safetensors, "
                                  "--identity-model backbone.pth, --mask)", CLRFaceRestoreConfig,
                                  clrface_crop_restorer),
}


# ------------------------------------------------------------------------------------------------ runners
def _load_lq(pair, size: int | None) -> np.ndarray:
    img = read_rgb(pair.lq)
    if size and img.shape[:2] != (size, size):
        img = resize_uint8(img, size, size)
    return img


def run_method(ts: TestSet, log: evaluate.RunLog, restorer: evaluate.Restorer, size: int | None = None) -> int:
    """Restore every pair not done yet into ``log.images``; returns how many failed."""
    todo = [p for p in ts.pairs if not log.done(p.name)]
    failed = 0
    for k, pair in enumerate(todo, 1):
        t0 = time.perf_counter()
        try:
            x = _load_lq(pair, size).astype(np.float32)[None] / 255.0
            y = np.asarray(restorer(x))[0]
            save_png(log.images / f"{pair.name}.png", np.clip(y, 0.0, 1.0))
            log.add({"name": pair.name, "status": "ok", "seconds": round(time.perf_counter() - t0, 3)})
        except (ValueError, RuntimeError, OSError) as exc:
            failed += 1
            log.add({"name": pair.name, "status": "error", "error": f"{type(exc).__name__}: {exc}"})
            logger.error("[%d/%d] %s failed: %s", k, len(todo), pair.name, exc)
            continue
        logger.info("[%d/%d] %s restored in %.1f s", k, len(todo), pair.name, time.perf_counter() - t0)
    return failed


def _pick_output(refs: list[dict]) -> dict | None:
    saved = [r for r in refs if r.get("type") == "output"]
    return (saved or refs or [None])[0]


def run_workflow_eval(ts: TestSet, log: evaluate.RunLog, workflow, server: str, sets=(), timeout: float = 3600.0,
                      size: int | None = None) -> int:
    """Queue ``workflow`` once per LQ image (uploaded, set on every LoadImage, then ``--set`` overrides); save the
    first SaveImage output. A rejected / failed / timed-out prompt is recorded with the server's message."""
    todo = [p for p in ts.pairs if not log.done(p.name)]
    failed = 0
    with ComfyClient(server) as client, tempfile.TemporaryDirectory() as tmp:
        prompt0, used = load_api_prompt(workflow, object_info=client.object_info)
        if not any(n.get("class_type") == "LoadImage" for n in prompt0.values()):
            raise ValueError(f"{used} has no LoadImage node to feed the LQ images into")
        for k, pair in enumerate(todo, 1):
            t0 = time.perf_counter()
            try:
                src = pair.lq
                if size:
                    src = Path(tmp) / f"{pair.name}.png"
                    save_png(src, _load_lq(pair, size))
                prompt = copy.deepcopy(prompt0)
                set_load_images(prompt, client.upload_image(src))
                prompt = apply_overrides(prompt, sets)
                pid = client.queue(prompt)
                client.wait(pid, timeout=timeout, on_progress=lambda e, n=pair.name: _progress(n, e))
                ref = _pick_output(client.outputs(pid))
                if ref is None:
                    raise ComfyError(f"prompt {pid} finished without an output image (add a SaveImage node)")
                got = client.download(ref, Path(tmp) / "dl")
                shutil.move(str(got), log.images / f"{pair.name}.png")
            except (ComfyError, ValueError, OSError) as exc:
                failed += 1
                log.add({"name": pair.name, "status": "error", "error": f"{type(exc).__name__}: {exc}"})
                logger.error("[%d/%d] %s failed: %s", k, len(todo), pair.name, exc)
                continue
            log.add({"name": pair.name, "status": "ok", "seconds": round(time.perf_counter() - t0, 3),
                     "prompt_id": pid})
            logger.info("[%d/%d] %s done in %.1f s", k, len(todo), pair.name, time.perf_counter() - t0)
    return failed


def _progress(name: str, event: dict) -> None:
    if event.get("event") == "progress":
        logger.debug("%s: node %s %s/%s", name, event.get("node"), event.get("value"), event.get("max"))


# ------------------------------------------------------------------------------------------------ reports
def _labels(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if (p / evaluate.RUN_JSON).is_file()) if out.is_dir() else []


def write_reports(ts: TestSet, out: Path, scorer: evaluate.Scorer, fid_ref: str | None = None,
                  note: str = "", labels: list[str] | None = None, grid_rows: int = 6) -> dict:
    """summary.md + metrics.csv + grid.png for every label in ``out`` (each scored with ``scorer`` if needed);
    returns {label: aggregate}."""
    from ..pipelines.image_io import list_images

    labels = labels or _labels(out)
    rows, all_records = [], []
    ref_files = list_images(fid_ref, "FID reference folder", recursive=True) if fid_ref else []
    hq_files = [p.hq for p in ts.pairs if p.hq is not None]
    for label in labels:
        cfg = json.loads((out / label / evaluate.RUN_JSON).read_text(encoding="utf-8"))["config"]
        log = evaluate.RunLog(out, label, cfg)
        evaluate.score_run(log, ts.pairs, scorer)
        recs = [log.records[p.name] for p in ts.pairs if p.name in log.records]
        agg = evaluate.aggregate(recs)
        done = [log.images / f"{r['name']}.png" for r in recs if r.get("status") == "ok"]
        if hq_files:
            agg["fid_hq"] = evaluate.set_fid(scorer, done, hq_files)
        if ref_files:
            agg["fid_ref"] = evaluate.set_fid(scorer, done, ref_files)
        rows.append((label, agg))
        all_records += recs
    skipped = dict(scorer.skipped)
    if not ts.has_hq:
        skipped["full-reference metrics"] = "an LQ-only test set has no HQ images"
    (out / "summary.md").write_text(evaluate.markdown_table(rows, skipped, scorer.weights, note), encoding="utf-8")
    evaluate.write_csv(all_records, out / "metrics.csv")
    headers = ["LQ", *labels] + (["HQ"] if ts.has_hq else [])
    grid = [[p.lq, *(out / lb / "images" / f"{p.name}.png" for lb in labels)] + ([p.hq] if ts.has_hq else [])
            for p in ts.pairs[:grid_rows]]
    evaluate.comparison_grid(grid, headers, out / "grid.png")
    return dict(rows)


# ------------------------------------------------------------------------------------------------ commands
def _metric_options(ns) -> evaluate.MetricOptions:
    names = tuple(ns.metrics) if ns.metrics else evaluate.ALL_METRICS
    if ns.no_lmd:
        names = tuple(m for m in names if m != "lmd")
    return evaluate.MetricOptions(metrics=names, lpips_net=ns.lpips_net, lpips_dir=ns.lpips_dir, arcface=ns.arcface,
                                  lmd_detector=ns.detector, face_models=tuple(ns.face_models or ()),
                                  fid_weights=ns.fid_weights, clipiqa_weights=ns.clipiqa_weights,
                                  clipiqa_prompts=ns.clipiqa_prompts, musiq_weights=ns.musiq_weights,
                                  musiq_dataset=ns.musiq_dataset, y_channel=ns.y_channel, device=str(
                                      resolve_device(ns.device)))


def _run_one(ns, ts: TestSet, out: Path, label: str, config: dict) -> int:
    log = evaluate.RunLog(out, label, config, resume=not ns.no_resume)
    if ns.workflow:
        return run_workflow_eval(ts, log, ns.workflow, ns.server, ns.set or [], ns.timeout, ns.size)
    return run_method(ts, log, METHODS[ns.method].build(ns), ns.size)


def _method_config(ns) -> tuple[str, dict]:
    if ns.workflow:
        label = ns.label or Path(ns.workflow).stem
        return label, {"workflow": str(Path(ns.workflow).resolve()), "sets": list(ns.set or []), "size": ns.size}
    return ns.label or ns.method, {**METHODS[ns.method].describe(ns), "size": ns.size}


def cmd_eval(ns) -> int:
    if bool(ns.workflow) == bool(ns.method):
        raise ValueError("bfr eval needs exactly one of --method NAME or --workflow W.json (with --server URL)")
    ts = read_testset(ns.testset)
    out = Path(ns.out)
    label, config = _method_config(ns)
    failed = _run_one(ns, ts, out, label, config)
    aggs = write_reports(ts, out, evaluate.Scorer(_metric_options(ns)), ns.fid_ref,
                         PLUMBING_NOTE if ns.plumbing_note else "")
    logger.info("%s: %s", label, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in aggs[label].items()})
    logger.info("wrote %s, %s, %s", out / "summary.md", out / "metrics.csv", out / "grid.png")
    return 1 if failed else 0


def _grid_values(items: list[str]) -> dict[str, list]:
    grid = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid {item!r}: expected NAME=V1,V2,... (e.g. n=1,2,4)")
        name, values = item.split("=", 1)
        grid[name.strip().replace("-", "_")] = [json.loads(v) if v.strip()[:1] in "-0123456789." else v.strip()
                                                for v in values.split(",") if v.strip()]
    return grid


def cmd_sweep(ns) -> int:
    """Every combination of ``--grid`` values as one labelled run, then a plot per metric (x = first grid
    parameter, one line per value of the second) and a grid of the first images."""
    if not ns.method:
        raise ValueError(f"bfr sweep needs --method ({', '.join(sorted(METHODS))})")
    ts = read_testset(ns.testset)
    out = Path(ns.out)
    grid = _grid_values(ns.grid)
    if not grid or len(grid) > 2:
        raise ValueError(f"bfr sweep takes one or two --grid parameters, got {list(grid)}")
    for name in grid:
        if not hasattr(ns, name):
            raise ValueError(f"--grid {name}: --method {ns.method} has no option --{name.replace('_', '-')}")
    names = list(grid)
    labels, failed = [], 0
    for combo in itertools.product(*grid.values()):
        run = copy.copy(ns)
        for k, v in zip(names, combo):
            setattr(run, k, v)
        label = ns.method + "_" + "_".join(f"{k}{v}" for k, v in zip(names, combo))
        labels.append(label)
        failed += _run_one(run, ts, out, label, {**METHODS[ns.method].describe(run), "size": ns.size})
    scorer = evaluate.Scorer(_metric_options(ns))
    aggs = write_reports(ts, out, scorer, ns.fid_ref, PLUMBING_NOTE if ns.plumbing_note else "", labels)
    xs = grid[names[0]]
    second = grid[names[1]] if len(names) > 1 else [None]
    for key, title, _ in evaluate.COLUMNS:
        if not any(a.get(key) is not None for a in aggs.values()):
            continue
        series = {}
        for v2 in second:
            ys = []
            for v1 in xs:
                combo = (v1,) if v2 is None else (v1, v2)
                ys.append(aggs[ns.method + "_" + "_".join(f"{k}{v}" for k, v in zip(names, combo))].get(key))
            series[ns.method if v2 is None else f"{names[1]}={v2}"] = ys
        evaluate.line_plot([float(x) for x in xs], series, out / f"sweep_{key}.png", title=f"{title} vs {names[0]}",
                           xlabel=names[0], ylabel=title)
    first = ts.pairs[:1]
    evaluate.comparison_grid([[p.lq, *(out / lb / "images" / f"{p.name}.png" for lb in labels)]
                              + ([p.hq] if p.hq else []) for p in first],
                             ["LQ", *labels] + (["HQ"] if ts.has_hq else []), out / "sweep_grid.png")
    logger.info("sweep of %d runs: %s", len(labels), out)
    return 1 if failed else 0


def cmd_make_testset(ns) -> int:
    overrides = json.loads(ns.overrides) if ns.overrides else None
    ts = make_testset(ns.hq_dir, ns.out, ns.preset, ns.seed, ns.size or None, ns.faces, ns.which_faces, ns.detector,
                      tuple(ns.face_models or ()), overrides, ns.limit)
    logger.info("wrote %d pairs into %s", len(ts), ns.out)
    return 0


# ------------------------------------------------------------------------------------------------ parsers
def _selected_method(argv: list[str], command: str) -> str | None:
    if command not in argv:
        return None
    for i, a in enumerate(argv):
        if a == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return None


def _add_metric_args(p) -> None:
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics", nargs="*", choices=evaluate.ALL_METRICS, help="default: all (a metric whose weights "
                                                                              "are missing is skipped and reported)")
    g.add_argument("--no-lmd", action="store_true", help="skip LMD (two face detections per image)")
    g.add_argument("--arcface", help="arcface_torch iresnet backbone.pth / .safetensors for Deg. and IDS")
    g.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex")
    g.add_argument("--lpips-dir", help="folder with lpips v0.1 heads alex.pth / vgg.pth (default: the lpips package)")
    g.add_argument("--fid-weights", help="pytorch-fid Inception file (default: the torch hub cache)")
    g.add_argument("--clipiqa-weights", help="CLIP RN50 state dict for CLIP-IQA (open_clip's RN50 openai "
                                             "open_clip_model.safetensors; default: $BFR_CLIP_RN50)")
    g.add_argument("--clipiqa-prompts", choices=["paper", "pyiqa"], default="paper",
                   help="paper: Good/Bad photo; pyiqa: + High/Low quality, Sharp/Blurry photo (averaged)")
    g.add_argument("--musiq-weights", help="pyiqa MUSIQ file, e.g. musiq_koniq_ckpt-e95806b9.pth (default: $BFR_MUSIQ, "
                                           "then pyiqa's cache $TORCH_HOME/hub/pyiqa)")
    g.add_argument("--musiq-dataset", choices=["koniq", "spaq", "paq2piq", "ava"], default="koniq",
                   help="which pyiqa MUSIQ release file to look for in pyiqa's cache (koniq = pyiqa's 'musiq')")
    g.add_argument("--fid-ref", help="reference folder for a second FID (e.g. FFHQ)")
    g.add_argument("--y-channel", action="store_true", help="PSNR/SSIM on the BT.601 luma (default: RGB)")
    g.add_argument("--detector", choices=face_detect.BACKENDS, default="auto", help="LMD face detector")
    g.add_argument("--face-models", nargs="*", help="RetinaFace folder(s)")


def _add_run_args(p, argv: list[str], command: str) -> None:
    p.add_argument("testset", help="a folder from bfr make-testset, an lq/+hq/ folder, or a folder of LQ images")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per method label)")
    p.add_argument("--method", choices=sorted(METHODS), help="; ".join(f"{k}: {v.help}" for k, v in METHODS.items()))
    p.add_argument("--label", help="row name / sub-folder (default: the method or the workflow's file stem)")
    p.add_argument("--size", type=int, default=None, help="resize LQ inputs to SIZE x SIZE first")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-resume", action="store_true", help="redo every image of this label")
    p.add_argument("--plumbing-note", action="store_true", help="label the table as a plumbing check")
    method = _selected_method(argv, command)
    if method in METHODS:
        METHODS[method].add_args(p)
    _add_metric_args(p)


def add_make_testset(sub) -> None:
    p = sub.add_parser("make-testset", help="seeded LQ/HQ pairs (CelebA-Test style) from a folder of HQ images")
    p.add_argument("hq_dir", help="HQ images (aligned faces, or whole photos with --faces)")
    p.add_argument("out", help="output folder: hq/, lq/, testset.json")
    p.add_argument("--preset", default="dr2-medium-x8", help="degradation preset (bfr degrade --list-presets)")
    p.add_argument("--overrides", help="JSON object of preset fields to change")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512, help="HQ size in px (0 keeps the size)")
    p.add_argument("--limit", type=int, default=0, help="first N files only (0 = all)")
    p.add_argument("--faces", action="store_true", help="detect and align faces of whole photos first")
    p.add_argument("--which-faces", choices=["largest", "all"], default="largest")
    p.add_argument("--detector", choices=face_detect.BACKENDS, default="auto")
    p.add_argument("--face-models", nargs="*", help="RetinaFace folder(s)")
    p.set_defaults(func=cmd_make_testset)


def add_eval(sub, argv: list[str]) -> None:
    p = sub.add_parser("eval", help="run a method or any ComfyUI workflow on a test set and score it",
                       usage="bfr eval TESTSET --out OUT (--method NAME [method options] | --workflow W.json "
                             "--server URL [--set NODE.INPUT=VALUE ...]) [metric options]")
    _add_run_args(p, argv, "eval")
    g = p.add_argument_group("ComfyUI workflow runner")
    g.add_argument("--workflow", help="API-format workflow (or UI-format with an api/ twin); its LoadImage nodes get "
                                      "each LQ image, its first SaveImage output is the restoration")
    g.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL")
    g.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE", help="override a workflow input")
    g.add_argument("--timeout", type=float, default=3600.0, help="seconds per prompt")
    p.set_defaults(func=cmd_eval)


def add_sweep(sub, argv: list[str]) -> None:
    p = sub.add_parser("sweep", help="a parameter grid of one method -> metric curves (PNG) and an image grid",
                       usage="bfr sweep TESTSET --out OUT --method NAME --grid n=1,2,4 --grid tau=20,35 [options]")
    _add_run_args(p, argv, "sweep")
    p.add_argument("--grid", action="append", required=True, metavar="NAME=V1,V2",
                   help="a method option and its values (DR2: n, tau; FlipNet: phi; CLR-Face: guidance_scale)")
    p.set_defaults(func=cmd_sweep, workflow=None)


__all__ = ["METHODS", "MethodSpec", "add_eval", "add_make_testset", "add_sweep", "cmd_eval", "cmd_sweep",
           "run_method", "run_workflow_eval", "write_reports"]
