"""``bfr demo``: the whole-photo path on real photos, as one labelled panel.

On the sample group photo (:func:`..pipelines.sample_data.sample_group_photo`: scikit-image's astronaut and
cameraman, public domain, with a mirrored copy of the astronaut's face) or ``--image``:

1. detect and number the faces (the numbered preview), select (``--faces``), align and crop them;
2. degrade each aligned crop with one of the pack's presets and paste the degraded crops back: the LQ photo (this
   is also the paste-back round trip, the same code that pastes restored faces);
3. when SD 2.1-base is found the way every command finds it (``--base-model``, ``$BFR_SD21_CHECKPOINT``, ComfyUI's
   ``models/checkpoints``, ``--download``), restore the LQ photo's faces with DR2 (one batch, colour fix against
   the LQ crops, never the clean ones) and paste them back. Without it nothing is faked: the restoration tiles are
   text tiles that say so and how to get them, and no tiny random model runs;
4. write ``demo_photo.png`` (the panel), ``demo_photo.json`` (faces, degradation parameters, what ran, every tile),
   and ``demo_degradation.png`` / ``.json``: every preset on the astronaut face.

Every image tile is checked for flatness (:func:`..pipelines.panel.is_flat`): a flat tile is marked in red on the
panel, logged as an error, and the command exits with 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict

import numpy as np
import torch

from ..pipelines import degradation, dr2, face_detect, photo
from ..pipelines.image_io import from_uint8, prepare_output_folder, save_png
from ..pipelines.panel import Note, is_flat, labelled_panel
from ..pipelines.sample_data import sample_face, sample_group_photo
from ..sd.loader import ENV_CHECKPOINT, ENV_COMFY_PATH, load_sd, resolve_base_model
from .folders import dr2_crop_restorer, resolve_device
from .photos import face_model_dirs, parse_faces

logger = logging.getLogger("bfr")

DEFAULT_FACE_PRESETS = ("dr2-mild-x4", "dr2-medium-x8", "dr2-severe-x8")
FACE_NO_SD = ("NOT RUN: no SD 2.1-base found, this face is not restored. DR2 needs SD 2.1-base: see the "
              "'restored photo' tile or the README.")
GROUP_PHOTO = "the sample group photo (scikit-image astronaut + cameraman, public domain)"
NO_SD = ("NOT RUN: no SD 2.1-base checkpoint was found, so nothing here is restored.\n"
         "To get this column: put v2-1_512-ema-pruned.safetensors (SD 2.1-base) in ComfyUI/models/checkpoints with "
         f"${ENV_COMFY_PATH} set, or set ${ENV_CHECKPOINT}=FILE, or run bfr demo --base-model FILE.")


def _gallery(args: argparse.Namespace, out_dir, face_crop: np.ndarray | None) -> None:
    """demo_degradation.png: every preset on one face (the astronaut, or the first face of --image)."""
    x = (torch.from_numpy(face_crop).permute(2, 0, 1) if face_crop is not None
         else from_uint8(sample_face(args.size)))[None].float()
    row: list[tuple] = [("input (HQ)", x[0])]
    report = {}
    for name in args.presets or list(degradation.PRESETS):
        if name == "custom":
            continue
        out, params = degradation.degrade(x, degradation.get_preset(name), seed=args.seed, backend=args.backend)
        row.append((name, out[0]))
        report[name] = params[0]
    per_row = max(args.columns, 1)
    rows = [row[i:i + per_row] for i in range(0, len(row), per_row)]
    save_png(out_dir / "demo_degradation.png", np.asarray(labelled_panel(rows, tile=args.tile, on_flat="mark")))
    (out_dir / "demo_degradation.json").write_text(json.dumps(report, indent=1))
    logger.info("wrote %s (%d presets on one face) and its parameter report", out_dir / "demo_degradation.png",
                len(report))


def _region(image: np.ndarray, box, scale: float = 1.8) -> np.ndarray:
    """The square around a face box (``scale`` x its larger side), clipped to the photo: the pasted face in context."""
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * scale / 2
    h, w = image.shape[:2]
    a, b = max(int(cx - half), 0), min(int(cx + half), w)
    c, d = max(int(cy - half), 0), min(int(cy + half), h)
    return image[c:d, a:b, :3]


def run_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out_dir = prepare_output_folder(args.out)
    device = resolve_device(args.device)
    selection, indices = parse_faces(args.faces)
    if args.image:
        image, _ = photo.read_photo(args.image)
        name = str(args.image)
    else:
        image, name = sample_group_photo().astype(np.float32) / np.float32(255.0), GROUP_PHOTO
    rgb = photo.split_channels(image)[0]
    folders = face_model_dirs(args.face_models)
    t1 = time.perf_counter()
    backend, dets = face_detect.detect(rgb, args.detector, folders, device=device)
    logger.info("demo: %d face(s) detected in %s with %s (%.1fs)", len(dets), name, backend,
                time.perf_counter() - t1)

    presets = list(args.restore_presets or DEFAULT_FACE_PRESETS)
    degraded_with: list[dict] = []

    def degrade_crops(crops: np.ndarray) -> np.ndarray:
        outs = []
        for k, crop in enumerate(crops):
            preset = presets[k % len(presets)]
            x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None]
            y, params = degradation.degrade(x, degradation.get_preset(preset), seed=args.seed + k, backend=args.backend)
            outs.append(y[0].permute(1, 2, 0).numpy())
            degraded_with.append({"preset": preset, "seed": args.seed + k, "params": params[0]})
        return np.stack(outs).astype(np.float32)

    common = dict(backend=backend, folders=folders, selection=selection, indices=indices, order=args.face_order,
                  min_size=args.min_face, crop_size=args.size, feather=args.feather, detections=[dets])
    lq = photo.restore_photo(rgb, degrade_crops, color_fix="none", **common)
    for w in lq.warnings:
        logger.warning("demo: %s", w)

    model, reason, restored = None, None, None
    config = dr2.DR2Config(n=args.n, tau=args.tau, omega=args.omega, steps=args.steps, space=args.space,
                           seed=args.seed)
    if args.restore == "none":
        reason = "NOT RUN: --restore none was given."
    elif not lq.changed:
        reason = "NOT RUN: no face was selected, nothing to restore."
    else:
        path = resolve_base_model(args.base_model, download=args.download, repo_id=args.repo)
        if path is None:
            reason = NO_SD
            logger.warning("demo: no SD 2.1-base found: the panel shows detection, alignment, degradation and the "
                           "paste-back of the degraded faces; the restoration tiles say NOT RUN. %s",
                           NO_SD.split("\n", 1)[1])
        else:
            config.validate()
            model = load_sd(path, device=device)
            t2 = time.perf_counter()
            restorer = dr2_crop_restorer(model, config, batch_size=max(len(lq.faces), 1))
            restored = photo.restore_photo(lq.photo, restorer, color_fix=args.color_fix, **common)
            logger.info("demo: DR2 restored %d face(s) in %.1fs (model: %s)", len(restored.faces),
                        time.perf_counter() - t2, model.source or path)
    dr2_label = f"DR2 N={config.n:g} tau={config.tau}"
    final = restored if restored is not None else lq

    rows: list[list[tuple]] = [[
        ("input photo", rgb, 2),
        (f"detected: {len(dets)} face(s), {backend}; green = selected", lq.preview(), 2),
        ("degraded faces pasted back (LQ photo)", lq.photo, 2),
        (f"restored photo ({dr2_label})", restored.photo, 2) if restored is not None
        else ("restored photo: NOT RUN", Note(reason), 2),
    ]]
    face_tiles: list[tuple] = []
    for j, f in enumerate(lq.faces.faces):
        k = f"#{f.number}"
        face_tiles.append((f"{k} aligned crop", lq.crops[j]))
        face_tiles.append((f"{k} degraded: {degraded_with[j]['preset']}", lq.restored[j]))
        if restored is not None:
            face_tiles.append((f"{k} restored: {dr2_label}", restored.restored[j]))
            face_tiles.append((f"{k} pasted (restored)", _region(final.photo, f.box)))
        else:
            face_tiles.append((f"{k} restored: NOT RUN", Note(reason.split("\n", 1)[0] if reason != NO_SD else
                                                              FACE_NO_SD)))
            face_tiles.append((f"{k} pasted (degraded, round trip)", _region(final.photo, f.box)))
    if not face_tiles:
        face_tiles.append(("no face", Note(f"No face selected ({backend}, --faces {args.faces}). "
                                           + "; ".join(lq.warnings))))
    per_row = 8
    rows += [face_tiles[i:i + per_row] for i in range(0, len(face_tiles), per_row)]

    tiles, flat = [], []
    for row in rows:
        for item in row:
            kind = "note" if isinstance(item[1], Note) else ("flat" if is_flat(item[1]) else "image")
            tiles.append({"label": item[0], "kind": kind})
            if kind == "flat":
                flat.append(item[0])
    for label in flat:
        logger.error("demo: tile %r is a flat image (a failed step, not a result); it is marked on the panel", label)
    panel_path = out_dir / "demo_photo.png"
    save_png(panel_path, np.asarray(labelled_panel(rows, tile=args.tile, on_flat="mark")))
    report = {"photo": name, "backend": backend, "faces": lq.to_dict(), "degradations": degraded_with,
              "restoration": {"ran": restored is not None, "method": "dr2" if restored is not None else None,
                              "model": (model.source or str(path)) if model is not None else None,
                              "reason": reason, "config": asdict(config) if restored is not None else None},
              "tiles": tiles, "flat_tiles": flat}
    (out_dir / "demo_photo.json").write_text(json.dumps(report, indent=1, default=str))
    _gallery(args, out_dir, lq.crops[0] if args.image and len(lq.faces) else None)
    logger.info("wrote %s (%d face(s); restoration: %s) in %.1fs", panel_path, len(lq.faces),
                dr2_label if restored is not None else "not run", time.perf_counter() - t0)
    return 1 if flat else 0
