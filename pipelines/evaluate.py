"""The evaluation harness's pure part: score restored images against their pairs, keep resumable per-image logs,
aggregate, and write the papers' table, CSV, a comparison grid and sweep plots (PIL only, no matplotlib).

Metrics (``MetricOptions.metrics``; each says which weights it used or why it was skipped, a missing file never
stops the run):

- full reference: ``psnr`` and ``ssim`` (:mod:`.metrics`, scikit-image's numbers), ``lpips`` (:class:`.iqa.LPIPS`);
- identity: ``deg`` (arccos of the ArcFace cosine, degrees) and ``ids`` (the cosine) with an arcface_torch iresnet
  file (:mod:`.arcface`), ``dlib`` (dlib descriptor distance, offline, :mod:`.identity`), ``lmd`` (mean distance
  of the 5 landmarks the face pipeline detects on the restored and the HQ face, px, :func:`.metrics.lmd`);
- no reference: ``niqe`` (:func:`.iqa.niqe`), ``clipiqa`` (:class:`.iqa.CLIPIQA`, with a CLIP RN50 file),
  ``musiq`` (:class:`.iqa.MUSIQ`, with one of pyiqa's MUSIQ files);
- distribution: ``fid`` against the HQ set and against a reference folder (:class:`.iqa.FID`), per method.

Papers' column order (DR2 Tab. 1, FlipNet Tab. 1, DR-BFR, CLR-Face): PSNR, SSIM, LPIPS, Deg., IDS, LMD, then the
offline dlib distance, NIQE, MUSIQ, CLIP-IQA, FID.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import iqa, metrics
from .image_io import read_jsonl_report, read_rgb, resize_uint8

logger = logging.getLogger(__name__)

# (key, column title, higher is better)
COLUMNS = (("psnr", "PSNR↑", True), ("ssim", "SSIM↑", True), ("lpips", "LPIPS↓", False), ("deg", "Deg.↓", False),
           ("ids", "IDS↑", True), ("lmd", "LMD↓", False), ("dlib", "dlib dist↓", False), ("niqe", "NIQE↓", False),
           ("musiq", "MUSIQ↑", True), ("clipiqa", "CLIP-IQA↑", True), ("fid_hq", "FID (HQ)↓", False),
           ("fid_ref", "FID (ref)↓", False))
PER_IMAGE = ("psnr", "ssim", "lpips", "deg", "ids", "lmd", "dlib", "niqe", "musiq", "clipiqa")
ALL_METRICS = PER_IMAGE + ("fid",)
FULL_REFERENCE = {"psnr", "ssim", "lpips", "deg", "ids", "lmd", "dlib"}
REPORT = "metrics.jsonl"
RUN_JSON = "run.json"


@dataclass
class MetricOptions:
    """Which metrics, and where their weights are. ``None`` paths mean the default places (see :mod:`.iqa`)."""

    metrics: tuple[str, ...] = ALL_METRICS
    lpips_net: str = "alex"
    lpips_dir: str | None = None
    arcface: str | None = None
    dlib_dir: str | None = None
    lmd_detector: str = "auto"
    face_models: tuple[str, ...] = ()
    fid_weights: str | None = None
    clipiqa_weights: str | None = None
    clipiqa_prompts: str = "paper"
    musiq_weights: str | None = None
    musiq_dataset: str = "koniq"
    y_channel: bool = False
    device: str = "cpu"

    def __post_init__(self):
        bad = sorted(set(self.metrics) - set(ALL_METRICS))
        if bad:
            raise ValueError(f"unknown metric(s) {bad}; choose from {list(ALL_METRICS)}")


class Scorer:
    """Loads what :class:`MetricOptions` asks for once; :meth:`score` gives one image's values.

    ``skipped``: metric -> reason; ``weights``: metric -> ``[{file, sha256}]``."""

    def __init__(self, opts: MetricOptions):
        self.opts = opts
        self.skipped: dict[str, str] = {}
        self.weights: dict[str, list[dict]] = {}
        self._hq_landmarks: dict[str, np.ndarray | None] = {}
        want = set(opts.metrics)
        self.lpips = self.arcface = self.dlib = self.fid = self.clipiqa = self.musiq = None
        if "lpips" in want:
            self.lpips = iqa.LPIPS(opts.lpips_net, opts.lpips_dir, device=opts.device)
            self._note("lpips", self.lpips.weights, self.lpips.skipped)
        if want & {"deg", "ids"}:
            self._load_arcface()
        if "dlib" in want:
            self._load_dlib()
        if "niqe" in want:
            self.weights["niqe"] = [metrics.file_record(iqa.NIQE_PARAMS)]
        if "musiq" in want:
            self.musiq = iqa.MUSIQ(opts.musiq_weights, opts.musiq_dataset, device=opts.device)
            self._note("musiq", self.musiq.weights, self.musiq.skipped)
        if "clipiqa" in want:
            self.clipiqa = iqa.CLIPIQA(opts.clipiqa_weights, opts.clipiqa_prompts, device=opts.device)
            self._note("clipiqa", self.clipiqa.weights, self.clipiqa.skipped)
        if "fid" in want:
            self.fid = iqa.FID(opts.fid_weights, device=opts.device)
            self._note("fid", self.fid.weights, self.fid.skipped)

    def _note(self, key: str, weights: list[dict], skipped: str | None) -> None:
        if skipped:
            self.skipped[key] = skipped
        else:
            self.weights[key] = list(weights)

    def _load_arcface(self) -> None:
        from .arcface import IdentityWeightsError, load_identity_model

        if not self.opts.arcface:
            why = ("Deg./IDS need an arcface_torch iresnet backbone (e.g. ms1mv3_arcface_r50_fp16 backbone.pth); "
                   "pass --arcface FILE (ComfyUI/models/bfr/identity/)")
        elif not Path(self.opts.arcface).is_file():
            why = f"Deg./IDS: --arcface {self.opts.arcface} does not exist"
        else:
            try:
                self.arcface = load_identity_model(self.opts.arcface, device=self.opts.device)
            except IdentityWeightsError as exc:
                why = f"Deg./IDS: {exc}"
            else:
                for k in ("deg", "ids"):
                    self.weights[k] = self.arcface.weights_info()
                return
        iqa.unavailable("Deg./IDS", why)
        self.skipped["deg"] = self.skipped["ids"] = why

    def _load_dlib(self) -> None:
        from .face_detect import FaceDetectorError
        from .identity import DlibIdentity

        try:
            self.dlib = DlibIdentity(self.opts.dlib_dir)
        except FaceDetectorError as exc:
            self.skipped["dlib"] = iqa.unavailable("dlib dist", str(exc)).skipped
        else:
            self.weights["dlib"] = self.dlib.weights_info()

    def _landmarks(self, img: np.ndarray) -> tuple[np.ndarray | None, str]:
        from .face_detect import detect

        name, found = detect(img, self.opts.lmd_detector, self.opts.face_models)
        if not found:
            return None, name
        return np.asarray(max(found, key=lambda d: d.area).landmarks, np.float64), name

    def score(self, restored: np.ndarray, hq: np.ndarray | None, hq_key: str | None = None) -> tuple[dict, list]:
        """(values, notes) for one uint8 (H, W, 3) restored image against its HQ (or None for LQ-only sets)."""
        want, out, notes = set(self.opts.metrics), {}, []
        if hq is not None and restored.shape != hq.shape:
            notes.append(f"restored {restored.shape[1]}x{restored.shape[0]} resized to the HQ "
                         f"{hq.shape[1]}x{hq.shape[0]} for the full-reference metrics")
            restored = resize_uint8(restored, hq.shape[0], hq.shape[1])
        if hq is not None:
            if "psnr" in want:
                out["psnr"] = metrics.psnr(restored, hq, y_channel=self.opts.y_channel)
            if "ssim" in want:
                out["ssim"] = metrics.ssim(restored, hq, y_channel=self.opts.y_channel)
            if self.lpips is not None and self.lpips.available:
                out["lpips"] = self.lpips(restored, hq).value
            if self.arcface is not None:
                import torch

                x = torch.from_numpy(np.stack([restored, hq])).permute(0, 3, 1, 2).float() / 255.0
                e = self.arcface.embed(x)
                cos = float(self.arcface.cosine(e[0:1], e[1:2]).reshape(-1)[0])
                out["ids"] = cos
                out["deg"] = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
            if self.dlib is not None:
                try:
                    out["dlib"] = float(self.dlib.distance(self.dlib.embed(restored, aligned=True),
                                                           self.dlib.embed(hq, aligned=True)))
                except ValueError as exc:
                    notes.append(f"dlib: {exc}")
            if "lmd" in want:
                key = hq_key or str(id(hq))
                if key not in self._hq_landmarks:
                    self._hq_landmarks[key], used = self._landmarks(hq)
                    self.weights.setdefault("lmd", [{"detector": used}])
                ref = self._hq_landmarks[key]
                pts, _ = self._landmarks(restored) if ref is not None else (None, "")
                if ref is None or pts is None:
                    notes.append("LMD: no face detected in the " + ("HQ" if ref is None else "restored") + " image")
                else:
                    out["lmd"] = metrics.lmd(pts, ref)
        if "niqe" in want:
            r = iqa.niqe(restored)
            if r.value is None:
                notes.append(f"NIQE: {r.skipped}")
            else:
                out["niqe"] = r.value
        if self.musiq is not None and self.musiq.available:
            out["musiq"] = self.musiq(restored).value
        if self.clipiqa is not None and self.clipiqa.available:
            out["clipiqa"] = self.clipiqa(restored).value
        return out, notes


# ------------------------------------------------------------------------------------------------ run logs
def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunLog:
    """``<out>/<label>/``: ``run.json`` (what ran, its hash), ``metrics.jsonl`` (one record per image, appended and
    flushed), ``images/<name>.png``. Reopening with another configuration is refused unless ``resume=False``."""

    def __init__(self, out_dir, label: str, config: dict, resume: bool = True):
        if not label or "/" in label or label.startswith("."):
            raise ValueError(f"label {label!r} must be a plain folder name (e.g. dr2, flipnet_phi1)")
        self.dir = Path(out_dir) / label
        self.images = self.dir / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.label, self.config = label, config
        self.report = self.dir / REPORT
        run = self.dir / RUN_JSON
        h = config_hash(config)
        if resume and run.is_file():
            old = json.loads(run.read_text(encoding="utf-8"))
            if old.get("hash") != h:
                diff = sorted(k for k in set(old.get("config", {})) | set(config)
                              if old.get("config", {}).get(k) != config.get(k))
                raise ValueError(f"{self.dir} holds a run with other settings (differs in {diff}); use another "
                                 "--label / --out, or --no-resume to start it over")
        if not resume:
            self.report.unlink(missing_ok=True)
        run.write_text(json.dumps({"label": label, "hash": h, "config": config}, indent=1, default=str),
                       encoding="utf-8")
        self.records = {r["name"]: r for r in read_jsonl_report(self.report, "--no-resume")}

    def done(self, name: str) -> bool:
        r = self.records.get(name)
        return r is not None and r.get("status") == "ok" and (self.images / f"{name}.png").is_file()

    def add(self, record: dict) -> None:
        record = {"method": self.label, **record}
        self.records[record["name"]] = record
        with open(self.report, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")
            fh.flush()


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(type(v).__name__)


def score_run(log: RunLog, pairs: Sequence, scorer: Scorer, rescore: bool = False) -> None:
    """Score every restored image of ``log`` whose record has no metrics yet (or all with ``rescore``)."""
    for pair in pairs:
        rec = log.records.get(pair.name)
        if rec is None or rec.get("status") != "ok" or ("metrics" in rec and not rescore):
            continue
        t0 = time.perf_counter()
        restored = read_rgb(log.images / f"{pair.name}.png")
        hq = read_rgb(pair.hq) if pair.hq is not None else None
        values, notes = scorer.score(restored, hq, str(pair.hq) if pair.hq else None)
        log.add({**rec, "metrics": values, "notes": rec.get("notes", []) + notes,
                 "score_seconds": round(time.perf_counter() - t0, 3)})


def aggregate(records: Sequence[dict]) -> dict:
    """Mean of every per-image metric over the images that have it (``inf`` PSNRs included as inf), plus counts."""
    ok = [r for r in records if r.get("status") == "ok"]
    out = {"n": len(ok), "failed": sum(1 for r in records if r.get("status") != "ok")}
    for key in PER_IMAGE:
        vals = [r["metrics"][key] for r in ok if r.get("metrics", {}).get(key) is not None]
        if vals:
            out[key] = float(np.mean(vals))
    return out


def set_fid(scorer: Scorer, images: Sequence[Path], reference: Sequence[Path]) -> float | None:
    if scorer.fid is None or not scorer.fid.available:
        return None
    return scorer.fid.files(images, reference).value


# ------------------------------------------------------------------------------------------------ outputs
def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def markdown_table(rows: Sequence[tuple[str, dict]], skipped: dict[str, str] | None = None,
                   weights: dict[str, list] | None = None, note: str = "") -> str:
    """The papers' table: one row per method (its aggregate), columns in :data:`COLUMNS` order; columns no method
    has are left out and listed with their skip reasons; the weights used are listed under the table."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for _, r in rows)]
    lines = []
    if note:
        lines += [note, ""]
    lines.append("| Method | n | " + " | ".join(c[1] for c in cols) + " |")
    lines.append("|---|---|" + "---|" * len(cols))
    for label, agg in rows:
        n = f"{agg.get('n', 0)}" + (f" ({agg['failed']} failed)" if agg.get("failed") else "")
        lines.append(f"| {label} | {n} | " + " | ".join(_fmt(agg.get(c[0])) for c in cols) + " |")
    if skipped:
        lines += ["", "Skipped metrics:"] + [f"- {k}: {v}" for k, v in sorted(skipped.items())]
    if weights:
        lines += ["", "Weights used:"]
        for k, recs in sorted(weights.items()):
            desc = ", ".join(f"{r['file']} (sha256 {r['sha256'][:12]})" if "sha256" in r else
                             ", ".join(f"{a}={b}" for a, b in r.items()) for r in recs)
            lines.append(f"- {k}: {desc or '–'}")
    return "\n".join(lines) + "\n"


def write_csv(records: Sequence[dict], path) -> Path:
    """One row per (method, image): status, error and every per-image metric."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "name", "status", "error", *PER_IMAGE])
        for r in records:
            m = r.get("metrics", {})
            w.writerow([r.get("method"), r.get("name"), r.get("status"), r.get("error", ""),
                        *("" if m.get(k) is None else m[k] for k in PER_IMAGE)])
    return path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def comparison_grid(rows: Sequence[Sequence[Path | None]], headers: Sequence[str], path, tile: int = 128) -> Path:
    """A labelled grid, one row per image and one column per header (LQ | methods | HQ); a missing image is grey."""
    from PIL import Image, ImageDraw

    head = 22
    grid = Image.new("RGB", (tile * len(headers), head + tile * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font(13)
    for j, h in enumerate(headers):
        draw.text((j * tile + 4, 4), h[:18], fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        for j, p in enumerate(row):
            if p is not None and Path(p).is_file():
                im = Image.fromarray(resize_uint8(read_rgb(p), tile, tile))
            else:
                im = Image.new("RGB", (tile, tile), (128, 128, 128))
            grid.paste(im, (j * tile, head + i * tile))
    grid.save(path)
    return Path(path)


_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def line_plot(xs: Sequence[float], series: dict[str, Sequence[float | None]], path, title: str = "",
              xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (480, 320)) -> Path:
    """A small line plot (PIL): one line per series over ``xs``, axes with min/max ticks and a legend."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 110, 28, 40
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = _font(11)
    vals = [v for ys in series.values() for v in ys if v is not None and math.isfinite(v)]
    x0, x1 = float(min(xs)), float(max(xs))
    y0, y1 = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    d.text((left, 6), title, fill=(0, 0, 0), font=font)
    d.text(((left + w - right) // 2 - 20, h - 16), xlabel, fill=(0, 0, 0), font=font)
    d.text((4, top), f"{y1:.4g}", fill=(0, 0, 0), font=font)
    d.text((4, h - bottom - 10), f"{y0:.4g}", fill=(0, 0, 0), font=font)
    d.text((4, (top + h - bottom) // 2), ylabel[:8], fill=(0, 0, 0), font=font)
    for x in xs:
        X, _ = px(float(x), y0)
        d.line([X, h - bottom, X, h - bottom + 4], fill=(0, 0, 0))
        d.text((X - 8, h - bottom + 6), f"{x:g}", fill=(0, 0, 0), font=font)
    for k, (name, ys) in enumerate(series.items()):
        colour = _PALETTE[k % len(_PALETTE)]
        pts = [px(float(x), float(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for X, Y in pts:
            d.ellipse([X - 3, Y - 3, X + 3, Y + 3], fill=colour)
        d.text((w - right + 6, top + 14 * k), name[:16], fill=colour, font=font)
    img.save(path)
    return Path(path)


@dataclass
class Restored:
    """What a runner hands back for one image: the PNG written, or the error."""

    name: str
    ok: bool
    error: str | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


Restorer = Callable[[np.ndarray], np.ndarray]  # (N, S, S, 3) float32 [0, 1] -> (N, S, S, 3) float32 [0, 1]


def options_dict(opts: MetricOptions) -> dict:
    return asdict(opts)


__all__ = ["ALL_METRICS", "COLUMNS", "MetricOptions", "PER_IMAGE", "REPORT", "Restored", "Restorer", "RunLog",
           "Scorer", "aggregate", "comparison_grid", "config_hash", "line_plot", "markdown_table", "options_dict",
           "score_run", "set_fid", "write_csv"]
