"""Whole-photo face handling per face (detection, alignment + crop, paste-back, colour fix) vs one DR2 step.

What ``pipelines.photo.restore_photo_batch`` adds around the restorer, per photo size and detector backend,
measured side by side with one DR2 restoration step of a 512 px face on the full SD2.1-base topology (random
weights, timing only), interleaved in every repeat so that machine load hits every component alike:

- photos: ``--sizes`` below 1024 px are scikit-image's astronaut (512x512, 1 face) resized to SxS; 1024 px and
  above are ``sample_data.sample_group_photo()`` (1024x512: astronaut, cameraman, mirrored astronaut crop, 3 real
  faces) resized (PIL bicubic) to S x S/2, so 2048 = 2048x1024 with 3 faces;
- prep: ``photo.split_channels`` (uint8 -> float32 RGB, once per photo);
- detection: ``face_detect.detect(rgb, backend, ...)`` exactly as restore_photo_batch calls it (float photo in,
  its own uint8 conversion, the resize to the detection copy, the network, decode/NMS, the 5-point predictor for
  dlib, scaling back). The detection copy's size is :func:`face_detect.detection_scale`'s: downscaled (area) to
  ``--max-side`` (1280) on the longer side, and for dlib_cnn upscaled when ``--min-face`` px faces would be under
  its 80 px window; the table names the size it ran at. RetinaFace has no real weights here: its nets are built
  with random weights (``retinaface.build_retinaface``), saved to a temporary ``facedetection`` folder and loaded
  through the backend's own path (``load_retinaface``), so the network compute and prior decoding are the real
  ones; but random outputs score 0.43-0.72, under the 0.8 threshold, so NMS gets no candidates (with real weights
  a few dozen priors per face pass: ``retina_nms_bound`` times ``retinaface.nms`` on 50 jittered boxes per face);
- alignment + crop: ``face.build_faceset`` (LMEDS similarity per face) + ``face.crop_faces`` (512 px crops) on the
  photo's faces; dlib backends use their own detections (their 5 points and calibrated template), RetinaFace rows
  use dlib_cnn's faces with their FFHQ landmarks as the 5 points (what a RetinaFace detection holds);
- colour fix: ``photo.color_fix_crops(restored, crops, "wavelet")`` at 512 px (the restored crops are the crops);
- paste-back: ``face.paste_faces([rgb], restored, faces, feather=1)`` (photo copy, soft mask, inverse warp, blend);
- DR2 step: one UNet eps_theta(x_t, t) call at batch 1 on a 64x64 latent with a 77x1024 null context (DR2 runs at
  CFG 1), plus x0-hat (Eq. 11), the step's noise draws, the DDPM transition and the latent refinement (N = 2,
  Eq. 10), as ``ilvr.dr2_sample`` runs one transition. ``--skip-unet`` uses ``--unet-step-s`` (a previous
  measurement) for the UNet call and still measures the rest.

The per-face figures are the whole-photo call divided by the photo's face count (detection and prep included,
amortised over the faces the row uses). Every component is timed on the wall clock and on the process CPU clock;
with --threads 1 on the CPU the CPU clock counts the work done and not the waits for a core on a shared machine,
so the ratios use it there (``--clock``). Peak memory is the process's peak RSS (VmHWM), read twice: after the
face work's warm-up (before the UNet is built) and at the end (UNet + everything); it is a process peak, not a
per-component one.

Run: ``python bench/faces.py --repeats 3 --json faces.json`` (see --help); medians over --repeats.
"""

from __future__ import annotations

import argparse
import os
import sys


def _early_threads(argv) -> int:
    """--threads before numpy/torch/dlib load, so that OpenMP / BLAS pools are created with it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=1)
    n = pre.parse_known_args(argv)[0].threads
    if n > 0:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(n)
    return n


_early_threads(sys.argv[1:])

import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (add_device_flags, build_sd21_unet, command, device_dtype, loadavg, machine,  # noqa: E402
                    peak_memory_gb, peak_rss_gb, require_pack, rss_gb, setup_logging, timed_cpu)

face, face_detect, retinaface, photo, sample_data, image_io, ilvr, diffusion = require_pack(
    "pipelines.face", "pipelines.face_detect", "pipelines.retinaface", "pipelines.photo", "pipelines.sample_data",
    "pipelines.image_io", "pipelines.ilvr", "sd.diffusion")

BACKENDS = ("dlib_cnn", "dlib_hog", "retinaface_resnet50", "retinaface_mobilenet0.25")
CROP = 512
# This script's own measurement (python bench/faces.py --repeats 3, CPU clock, 1 thread, fp32, 2-core box at load
# ~3): the DR2 step's UNet eps call, SD2.1-base, 512 px face. BENCHMARKS.md's DR2 table has 19.78 s from an
# earlier, more loaded bench/dr2.py run; pass that (or your own) with --unet-step-s.
PREVIOUS_UNET_STEP_S = 7.41

log = logging.getLogger("bench.faces")


# ------------------------------------------------------------------------------------------------------ inputs
def make_photo(size: int) -> tuple[np.ndarray, str]:
    """The benchmark photo for a size (uint8 HWC) and its description."""
    from skimage import data

    if size < 1024:
        return image_io.resize_uint8(data.astronaut(), size, size), f"astronaut {size}x{size}"
    h = size // 2
    return image_io.resize_uint8(sample_data.sample_group_photo(), h, size), f"group photo {size}x{h}"


def detection_size(h: int, w: int, backend: str, max_side: int, min_face: float) -> tuple[int, int, float]:
    """(width, height, photo px per detection px) of the copy ``face_detect.detect`` runs the detector on."""
    s = face_detect.detection_scale(h, w, backend, max_side, min_face)
    if s == 1.0:
        return w, h, s
    return max(int(round(w / s)), 1), max(int(round(h / s)), 1), s


def retina_folder(tmp: Path, backends) -> None:
    """Random-weight RetinaFace files (the released layout) in ``tmp``, for the backends asked for."""
    for name in backends:
        if name.startswith("retinaface"):
            arch = name.removeprefix("retinaface_")
            torch.manual_seed(0)
            net = retinaface.build_retinaface(arch)
            torch.save(net.state_dict(), tmp / face_detect.RETINAFACE_FILES[name])
            log.info("RetinaFace %s: random weights (%.2f M params) -> %s", arch,
                     sum(p.numel() for p in net.parameters()) / 1e6, tmp / face_detect.RETINAFACE_FILES[name])


def as_retina(dets) -> list:
    """dlib detections as a RetinaFace detection holds them: the FFHQ landmarks are the 5 points."""
    return [face.Detection(d.box, d.score, d.landmarks, d.landmarks, face.FFHQ_TEMPLATE_512) for d in dets]


def jittered_boxes(dets, per_face: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_face`` boxes jittered around each detection (what real RetinaFace scores let through to NMS)."""
    g = torch.Generator().manual_seed(seed)
    boxes, scores = [], []
    for d in dets:
        b = torch.tensor(d.box, dtype=torch.float32)
        size = float(min(d.width, d.height))
        boxes.append(b + torch.randn(per_face, 4, generator=g) * 0.05 * size)
        scores.append(0.8 + 0.2 * torch.rand(per_face, generator=g))
    return torch.cat(boxes), torch.cat(scores)


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512,2048", help="photo sizes, longer side px (comma-separated)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {', '.join(BACKENDS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch / cv2 / OpenMP threads (0 = defaults; 1: the CPU "
                    "clock then counts work, not waits)")
    ap.add_argument("--skip-unet", action="store_true", help="do not build the UNet; use --unet-step-s for its call")
    ap.add_argument("--unet-step-s", type=float, default=PREVIOUS_UNET_STEP_S,
                    help="UNet call seconds for --skip-unet, used for both clocks (default: this script's CPU-clock "
                         "measurement, 1 thread, fp32, on the 2-core CPU box)")
    ap.add_argument("--max-side", type=int, default=face_detect.DEFAULT_MAX_SIDE, help="detect()'s max_side")
    ap.add_argument("--min-face", type=float, default=face_detect.DLIB_CNN_MIN_FACE, help="detect()'s min_face")
    ap.add_argument("--retina-threshold", type=float, default=face_detect.DEFAULT_THRESHOLDS["retinaface_resnet50"],
                    help="RetinaFace score threshold (random weights score 0.43-0.72: none pass 0.8)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="clock of the ratios (default: cpu on the CPU, wall on CUDA)")
    ap.add_argument("--json", help="also write the results here")
    add_device_flags(ap)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = sorted(set(backends) - set(BACKENDS))
    if bad:
        ap.error(f"unknown backend(s) {bad}; choose from {BACKENDS}")
    setup_logging()
    device, dtype = device_dtype(args)
    if device.type == "meta":
        ap.error("--device meta has no data; use cpu or cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    load_start = loadavg()
    rss_start = rss_gb()

    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench_faces_")
    folder = Path(tmp_ctx.name)
    retina_folder(folder, backends)

    photos = {}
    for size in sizes:
        img, desc = make_photo(size)
        rgb = photo.split_channels(img)[0]
        _, ref = face_detect.detect(rgb, "dlib_cnn", max_side=args.max_side, min_face=args.min_face)
        if not ref:
            sys.exit(f"bench: dlib_cnn found no face in the {desc}; nothing to align or paste")
        photos[size] = {"uint8": img, "desc": desc, "ref": ref}
        log.info("%s: dlib_cnn reference faces %s", desc, [f"{d.width:.0f} px" for d in ref])

    def run_row(size: int, backend: str, record: dict | None):
        """One interleaved pass of a (photo, backend) row; times appended to ``record`` (None: warm-up)."""
        p = photos[size]
        img = p["uint8"]
        h, w = img.shape[:2]

        def measure(name, fn):
            wall, cpu, out = timed_cpu(fn, device)
            if record is not None:
                record["wall"][name].append(wall)
                record["cpu"][name].append(cpu)
            return out

        rgb = measure("prep", lambda: photo.split_channels(img)[0])
        thr = args.retina_threshold if backend.startswith("retinaface") else None
        used, found = measure("detect", lambda: face_detect.detect(
            rgb, backend, [folder], threshold=thr, max_side=args.max_side, min_face=args.min_face, device=device,
            dtype=dtype))
        if backend.startswith("retinaface"):
            dets = as_retina(p["ref"])
        else:
            dets = list(found) or list(p["ref"])
        faces = measure("align_crop_faceset", lambda: face.build_faceset([dets], [(h, w)], "all", min_size=32,
                                                                         backend=used))
        crops = measure("align_crop_crops", lambda: face.crop_faces([rgb], faces, CROP)[..., :3])
        restored = crops.copy()
        fixed = measure("color_fix", lambda: photo.color_fix_crops(restored, crops, "wavelet"))
        measure("paste", lambda: face.paste_faces([rgb], fixed, faces, feather=1.0))
        if backend.startswith("retinaface"):
            bx, sc = jittered_boxes(p["ref"], 50)
            measure("retina_nms_bound", lambda: retinaface.nms(bx, sc, 0.4))
        if record is not None:
            record["found"], record["faces_used"] = len(found), len(faces)
            record["faces_from"] = ("own detections" if (not backend.startswith("retinaface") and found)
                                    else "dlib_cnn detections")

    names = ["prep", "detect", "align_crop_faceset", "align_crop_crops", "color_fix", "paste", "retina_nms_bound"]
    rows = {(s, b): {"wall": {k: [] for k in names}, "cpu": {k: [] for k in names}} for s in sizes for b in backends}

    with torch.no_grad():
        for s in sizes:  # warm-up: first calls load models, allocate, fill caches
            for b in backends:
                run_row(s, b, None)
    rss_faces = rss_gb()
    peak_faces = peak_rss_gb()
    log.info("face work warmed up: RSS %.2f GiB, process peak so far %.2f GiB", rss_faces, peak_faces)

    # ------------------------------------------------------------------ the DR2 step
    unet = None if args.skip_unet else build_sd21_unet(device=device, dtype=dtype)
    lat = CROP // 8
    sigmas = diffusion.sigmas_from_alphas_cumprod(diffusion.sd_alphas_cumprod())
    s_now, s_next = float(sigmas[474]), float(sigmas[464])  # one DR2 transition (tau 35 -> omega, T = 100)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(1, 4, lat, lat, generator=gen).to(device)
    x = torch.randn(1, 4, lat, lat, generator=gen).to(device)  # x_t in DDPM form (unit variance)
    ctx = torch.zeros(1, 77, 1024, device=device, dtype=dtype)
    t = torch.full((1,), 474, dtype=torch.long, device=device)
    noise = ilvr.DR2Noise(0, y.shape)
    refiner = ilvr.LatentRefiner(y, 2.0, "ddpm")
    eps_fixed = torch.randn(1, 4, lat, lat, generator=gen).to(device)

    def transition(eps):
        x0 = ilvr.predict_x0(x, eps, s_now, "ddpm")
        z, e = noise.step(x)
        x_next = ilvr.ancestral_step(x, x0, s_now, s_next, z, "ddpm")
        return refiner(x_next, x0, e, s_next)

    def dr2_step():
        eps = unet(x.to(dtype), t, encoder_hidden_states=ctx).sample.to(torch.float32)
        return transition(eps)

    step_names = ["dr2_rest"] + ([] if unet is None else ["dr2_step"])
    steps = {"wall": {k: [] for k in step_names}, "cpu": {k: [] for k in step_names}}

    def measure_step(name, fn):
        wall, cpu, _ = timed_cpu(fn, device)
        steps["wall"][name].append(wall)
        steps["cpu"][name].append(cpu)

    with torch.no_grad():
        transition(eps_fixed)
        if unet is not None:
            dr2_step()  # warm-up
        for r in range(args.repeats):
            for s in sizes:
                for b in backends:
                    run_row(s, b, rows[(s, b)])
            measure_step("dr2_rest", lambda: transition(eps_fixed))
            if unet is not None:
                measure_step("dr2_step", dr2_step)
            log.info("repeat %d/%d: %s; load %.2f", r + 1, args.repeats,
                     f"DR2 step {steps['wall']['dr2_step'][-1]:.2f} s wall / {steps['cpu']['dr2_step'][-1]:.2f} s CPU"
                     if unet is not None else "UNet skipped", loadavg()[0])
    load_end = loadavg()
    peak_end = peak_rss_gb()
    tmp_ctx.cleanup()

    # ------------------------------------------------------------------ results
    def med(v):
        return statistics.median(v) if v else float("nan")

    step_med = {}
    for c in ("wall", "cpu"):
        rest = med(steps[c]["dr2_rest"])
        step_med[c] = med(steps[c]["dr2_step"]) if unet is not None else args.unet_step_s + rest
    results = []
    for (s, b), rec in rows.items():
        img = photos[s]["uint8"]
        h, w = img.shape[:2]
        dw, dh, scale = detection_size(h, w, b, args.max_side, args.min_face)
        n = rec["faces_used"]
        out = {"size": s, "photo": photos[s]["desc"], "backend": b, "detect_at": [dw, dh], "detect_scale": scale,
               "found": rec["found"], "faces_used": n, "faces_from": rec["faces_from"],
               "times_s": {k: v for k, v in rec["wall"].items() if v},
               "cpu_times_s": {k: v for k, v in rec["cpu"].items() if v}}
        for c, key in (("wall", "median_s"), ("cpu", "median_cpu_s")):
            m = {k: med(v) for k, v in rec[c].items() if v}
            m["align_crop"] = m["align_crop_faceset"] + m["align_crop_crops"]
            per_face = {"detect": (m["prep"] + m["detect"]) / n, "align_crop": m["align_crop"] / n,
                        "color_fix": m["color_fix"] / n, "paste": m["paste"] / n}
            per_face["total"] = sum(per_face.values())
            out[key] = m
            out[key.replace("median", "per_face")] = per_face
            out["ratio_to_dr2_step" + ("_cpu" if c == "cpu" else "")] = {
                **{k: m[k] / step_med[c] for k in ("prep", "detect")},
                **{f"{k}_per_face": v / step_med[c] for k, v in per_face.items()}}
        results.append(out)

    result = {
        "command": command("faces.py", argv), "machine": machine(device), "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "cv2_threads": cv2.getNumThreads(), "clock": clock, "repeats": args.repeats,
        "max_side": args.max_side, "min_face": args.min_face, "retina_threshold": args.retina_threshold,
        "crop_size": CROP, "dr2_step_s": {"wall": step_med["wall"], "cpu": step_med["cpu"]},
        "unet_measured": unet is not None, "unet_step_s_stated": None if unet is not None else args.unet_step_s,
        "dr2_times_s": steps["wall"], "dr2_cpu_times_s": steps["cpu"], "rows": results,
        "rss_start_gb": rss_start, "rss_after_face_warmup_gb": rss_faces, "peak_rss_before_unet_gb": peak_faces,
        "peak_rss_gb": peak_end, "peak_memory_gib": peak_memory_gb(device),
        "loadavg_start": load_start, "loadavg_end": load_end,
    }

    def cell(v, ref):
        return f"{v:.3f} s ({100 * v / ref:.2f} %)" if v >= 0.01 else f"{v * 1000:.1f} ms ({100 * v / ref:.3f} %)"

    def table(c):
        ref = step_med[c]
        key = "median_s" if c == "wall" else "median_cpu_s"
        pkey = "per_face_s" if c == "wall" else "per_face_cpu_s"
        print(f"\n{c} clock; each cell: median seconds (% of one DR2 step = {ref:.2f} s)\n")
        print("| photo | backend | detected at | faces found / used | detection (whole photo) | align + crop / face "
              "| paste-back / face (feather 1) | colour fix (wavelet) / face | total / face |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            m, pf = r[key], r[pkey]
            dw, dh = r["detect_at"]
            sc = r["detect_scale"]
            at = f"{dw}x{dh}" + ("" if sc == 1.0 else f" (down {sc:.2f}x)" if sc > 1 else f" (up {1 / sc:.2f}x)")
            found = f"{r['found']} / {r['faces_used']}" + ("" if r["faces_from"] == "own detections"
                                                           else " (dlib_cnn's)")
            print(f"| {r['photo']} | {r['backend']} | {at} | {found} | {cell(m['prep'] + m['detect'], ref)} "
                  f"| {cell(pf['align_crop'], ref)} | {cell(pf['paste'], ref)} | {cell(pf['color_fix'], ref)} "
                  f"| {cell(pf['total'], ref)} |")

    print(f"\nFace handling vs one DR2 step ({result['machine']}, {result['dtype']}), medians of {args.repeats}, "
          f"{torch.get_num_threads()} torch thread(s), cv2 {cv2.getNumThreads()} thread(s)")
    what = ("measured: UNet eps call, SD2.1-base 866 M params, 512 px face (64x64 latent, 77x1024 context), "
            "+ x0-hat, noise, DDPM transition, latent refinement N=2" if unet is not None else
            f"UNet call NOT measured: stated {args.unet_step_s:.2f} s (--unet-step-s) + measured rest")
    print(f"DR2 step: {step_med['wall']:.2f} s wall, {step_med['cpu']:.2f} s CPU ({what}); "
          f"non-UNet part {1000 * med(steps['wall']['dr2_rest']):.2f} ms")
    table(clock)
    table("wall" if clock == "cpu" else "cpu")
    retina = [r for r in results if r["backend"].startswith("retinaface")]
    if retina:
        nb = {r["size"]: med(r["times_s"]["retina_nms_bound"]) for r in retina}
        print("\nRetinaFace rows: random weights (no weight files here): network + prior decoding as with real "
              "weights, but no prior passes the threshold, so NMS is skipped; with real weights NMS runs on the "
              "few dozen passing priors per face: retinaface.nms on 50 jittered boxes per face took "
              + ", ".join(f"{1000 * v:.1f} ms at {s} px" for s, v in nb.items())
              + ". Their per-face align / paste / colour use dlib_cnn's faces (FFHQ landmarks as the 5 points).")
    print(f"\nload average start {' '.join(f'{v:.2f}' for v in load_start)}, end "
          f"{' '.join(f'{v:.2f}' for v in load_end)}; RSS at start {rss_start:.2f} GiB, after the face work's "
          f"warm-up {rss_faces:.2f} GiB (process peak then {peak_faces:.2f} GiB, before the UNet), process peak RSS "
          f"at the end {peak_end:.2f} GiB (VmHWM: the whole process, UNet included)"
          + (f"; peak GPU memory {result['peak_memory_gib']:.2f} GiB" if device.type == "cuda" else ""))
    print(f"command: {result['command']}")
    print(f"machine: {result['machine']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
