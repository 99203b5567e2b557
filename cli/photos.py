"""``bfr restore --faces ... PHOTOS OUT``: restore the faces of whole photos (a file or a folder, recursively) with
:func:`..pipelines.photo.restore_photo` and any crop restorer (DR2, FlipNet: built in :mod:`.main`).

Outputs, per input ``PHOTOS/<rel>.<ext>``:

- ``OUT/<rel>.png``: the photo with its selected faces restored and pasted back (16-bit PNG for 16-bit inputs,
  alpha kept); a photo without a (selected) face is written unchanged (same pixels) and its report line says why;
- with ``--save-crops``: ``OUT/faces/<rel>_<k>.png`` (restored face number k, after the colour fix),
  ``OUT/faces/<rel>_<k>_input.png`` (its aligned crop before) and ``OUT/faces/<rel>_faces.png`` (the numbered
  detection preview);
- ``OUT/restore_report.jsonl``: one JSON line per photo: ``input``, ``output``, ``status`` (``restored`` |
  ``unchanged`` | ``error``), the faces (``faceset``: boxes, landmarks, alignment transforms; ``detections``:
  every numbered face with its score and whether it was selected), ``warnings``, ``error``, ``seconds``,
  ``config_hash`` and the ``config``.

Resumable the way ``bfr degrade`` is: a rerun skips photos whose line says restored/unchanged and whose output
exists, retries errors, drops a truncated last line, and refuses a report written with other options (another
method, model, selection, ...), naming what differs; ``--no-resume`` starts the report over. One bad photo (corrupt
file, a restorer error on it) is reported and the run goes on; a detector that cannot run stops the run at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..pipelines import color, face, face_detect, image_io, photo
from ..pipelines.image_io import IMAGE_EXTENSIONS, ImageFolderError, is_image_file, list_images, prepare_output_folder
from ..sd import loader

try:  # comes with huggingface_hub / diffusers; the bar is optional
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
except ImportError:  # pragma: no cover
    tqdm = logging_redirect_tqdm = None

logger = logging.getLogger("bfr")

REPORT_NAME = "restore_report.jsonl"
FACES_DIR = "faces"
FACE_FOLDER = "facedetection"
FACES_CHOICES = "all | largest | center | index:0,2"
DONE = ("restored", "unchanged")


def parse_faces(text: str) -> tuple[str, list[int]]:
    """``--faces``: all | largest | center | index:0,2 -> (selection, indices)."""
    value = (text or "").strip()
    if value in ("all", "largest", "center"):
        return value, []
    if value.lower().startswith("index"):
        return "index", face.parse_indices(value)
    raise ValueError(f"--faces must be one of {FACES_CHOICES} (got {text!r}); the numbers of index: are those of "
                     "the detection preview (--save-crops writes it), largest face first by default")


def face_model_dirs(explicit: str | None = None) -> list[Path]:
    """Where RetinaFace files are looked for: ``--face-models DIR``, else ComfyUI's ``models/facedetection`` found
    the way SD 2.1 is (``$BFR_COMFY_MODELS/facedetection``, ``$COMFYUI_PATH/models/facedetection``), else none
    (the detector is then dlib, from the [faces] extra)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise NotADirectoryError(f"--face-models {path} is not a folder; pass the folder that holds "
                                     "detection_Resnet50_Final.pth (e.g. ComfyUI/models/facedetection)")
        return [path]
    dirs = []
    if os.environ.get(loader.ENV_COMFY_MODELS):
        dirs.append(Path(os.environ[loader.ENV_COMFY_MODELS]) / FACE_FOLDER)
    if os.environ.get(loader.ENV_COMFY_PATH):
        dirs.append(Path(os.environ[loader.ENV_COMFY_PATH]) / "models" / FACE_FOLDER)
    return [d for d in dirs if d.is_dir()]


@dataclass
class PhotoOptions:
    """The whole-photo flags of ``bfr restore`` (the same for every method)."""

    faces: str = "all"
    face_order: str = "area"
    min_face: int = 32
    max_faces: int = 0
    detector: str = "auto"
    face_models: str | None = None
    detect_threshold: float | None = None
    max_side: int = face_detect.DEFAULT_MAX_SIDE
    color_fix: str = "wavelet"
    feather: float = 1.0
    crop_size: int = 512
    save_crops: bool = False
    resume: bool = True

    def validate(self) -> tuple[str, list[int]]:
        selection, indices = parse_faces(self.faces)
        if self.face_order not in face.ORDERS:
            raise ValueError(f"--face-order must be one of {', '.join(face.ORDERS)} (got {self.face_order!r})")
        if self.detector not in face_detect.BACKENDS:
            raise ValueError(f"--detector must be one of {', '.join(face_detect.BACKENDS)} (got {self.detector!r})")
        if self.color_fix not in color.METHODS:
            raise ValueError(f"--color-fix must be one of {', '.join(color.METHODS)} (got {self.color_fix!r})")
        for name, value, lo in (("--min-face", self.min_face, 0), ("--max-faces", self.max_faces, 0),
                                ("--max-side", self.max_side, 64)):
            if value < lo:
                raise ValueError(f"{name} must be >= {lo}, got {value}")
        if not 0.0 <= self.feather <= 8.0:
            raise ValueError(f"--feather must be in [0, 8] (1 = facexlib's edge, 0 = hard), got {self.feather}")
        if self.crop_size % 8 or self.crop_size < 64:
            raise ValueError(f"the face crop size (--size) must be a multiple of 8 and >= 64, got {self.crop_size}")
        return selection, indices


def _output_names(rels: list[str]) -> dict[str, str]:
    """``a/b.jpg`` -> ``a/b.png``; inputs that would share a name keep their extension (``b.jpg.png``)."""
    plain = {rel: Path(rel).with_suffix(".png").as_posix() for rel in rels}
    count: dict[str, int] = {}
    for name in plain.values():
        count[name] = count.get(name, 0) + 1
    return {rel: (name if count[name] == 1 else f"{rel}.png") for rel, name in plain.items()}


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_report(report: Path, chash: str, config: dict) -> dict[str, dict]:
    """The last record per input of an existing report; drops a truncated last line; refuses other options."""
    records = {}
    for rec in image_io.read_jsonl_report(report, "--no-resume"):
        if rec.get("config_hash") != chash:
            old = rec.get("config") or {}
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(old) | set(config))
                             if old.get(k) != config.get(k))
            raise ValueError(f"{report} was written with other options ({diff or 'unknown'}); use another output "
                             "folder, or --no-resume to restore every photo again with the new options")
        records[rec["input"]] = rec
    return records


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Bar:
    """A tqdm bar on a terminal (log lines routed around it), nothing otherwise."""

    def __init__(self, total: int, initial: int):
        self.bar = None
        self.redirect = None
        if tqdm is not None and _is_tty(sys.stderr) and total:
            self.bar = tqdm(total=total, initial=initial, desc="photos", unit="photo", file=sys.stderr,
                            dynamic_ncols=True)
            self.redirect = logging_redirect_tqdm()
            self.redirect.__enter__()

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.redirect.__exit__(None, None, None)


def restore_photo_folder(src: str | Path, out_dir: str | Path, opts: PhotoOptions,
                         make_restorer: Callable[[], photo.RestoreCrops], identity: dict, *,
                         device="cpu") -> dict:
    """Restore the faces of every photo of ``src`` (an image file or a folder, searched recursively) into
    ``out_dir`` (see the module doc). ``make_restorer()`` builds the crop restorer; it is called only when some
    photo needs restoring. ``identity`` (method, model, its settings) joins the options in the report's
    ``config_hash``. Returns a JSON-ready summary; ``summary["failed"]`` lists the photos that failed."""
    t0 = time.perf_counter()
    selection, indices = opts.validate()
    src, out_dir = Path(src).expanduser(), Path(out_dir).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"restore input {src} does not exist; pass a photo or a folder of photos "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
    if src.is_file():
        if not is_image_file(src):
            raise ImageFolderError(f"restore input {src} is not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        files, base = [src], src.parent
    else:
        out_resolved = out_dir.resolve()
        files = list_images(src, "photo folder", recursive=True,
                            exclude=out_resolved if src.resolve() in out_resolved.parents else None)
        base = src
    rels = [f.relative_to(base).as_posix() for f in files]
    names = _output_names(rels)
    prepare_output_folder(out_dir)
    folders = face_model_dirs(opts.face_models)
    backend = face_detect.resolve_backend(opts.detector, folders)
    config = {k: v for k, v in asdict(opts).items() if k not in ("save_crops", "resume", "face_models")}
    config.update(identity, detector=backend)
    chash = _config_hash(config)
    report = out_dir / REPORT_NAME
    if opts.resume:
        records = _load_report(report, chash, config)
    else:
        records = {}
        report.write_text("")
    pending = [(f, rel) for f, rel in zip(files, rels)
               if not (records.get(rel, {}).get("status") in DONE and (out_dir / names[rel]).exists())]
    skipped = len(files) - len(pending)
    logger.info("restore --faces %s: %d photo(s), %d already done; detector %s (face models: %s)", opts.faces,
                len(files), skipped, backend, ", ".join(map(str, folders)) or "none")
    counts = {"restored": 0, "unchanged": 0, "faces": 0}
    failed: list[dict] = []
    restorer = None
    if pending:
        face_detect.get_detector(backend, folders, device)  # a missing package / file stops here, before any model
        restorer = make_restorer()
    bar = _Bar(len(files), skipped)
    try:
        with open(report, "a", encoding="utf-8") as fh:
            for done, (path, rel) in enumerate(pending, skipped + 1):
                t1 = time.perf_counter()
                rec = {"input": rel, "output": None, "status": "error", "error": None}
                try:
                    image, bits = photo.read_photo(path)
                    result = photo.restore_photo(
                        image, restorer, backend=backend, folders=folders, selection=selection, indices=indices,
                        order=opts.face_order, min_size=opts.min_face, max_faces=opts.max_faces,
                        crop_size=opts.crop_size, feather=opts.feather, color_fix=opts.color_fix,
                        threshold=opts.detect_threshold, max_side=opts.max_side, device=device)
                    photo.write_photo(out_dir / names[rel], result.photo, bits)
                    if opts.save_crops:
                        _save_crops(out_dir / FACES_DIR, Path(names[rel]).with_suffix("").as_posix(), result)
                    rec.update(result.to_dict(), output=names[rel], bits=bits,
                               status="restored" if result.changed else "unchanged")
                    counts[rec["status"]] += 1
                    counts["faces"] += len(result.faces)
                    for w in result.warnings:
                        logger.warning("%s: %s", rel, w)
                except face_detect.FaceDetectorError:
                    raise  # the same for every photo: stop with the message that says what to install
                except Exception as exc:  # one bad photo must not stop a folder: reported, the rest go on
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    failed.append({"input": rel, "error": rec["error"]})
                    logger.error("%s failed: %s", rel, rec["error"], exc_info=logger.isEnabledFor(logging.DEBUG))
                rec.update(seconds=round(time.perf_counter() - t1, 3), config_hash=chash, config=config)
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                if rec["status"] != "error":
                    logger.info("[%d/%d] %s: %s, %d face(s) restored (%.1fs)", done, len(files), rel, rec["status"],
                                rec["selected"], rec["seconds"])
                bar.update()
    finally:
        bar.close()
    summary = {"input": str(src), "out_dir": str(out_dir), "report": str(report), "photos": len(files),
               "skipped": skipped, **counts, "failed": failed, "config_hash": chash,
               "seconds": round(time.perf_counter() - t0, 3)}
    logger.info("restore --faces: %d restored, %d unchanged (no face selected), %d failed, %d skipped in %.1fs",
                counts["restored"], counts["unchanged"], len(failed), skipped, summary["seconds"])
    return summary


def _save_crops(folder: Path, stem: str, result: photo.PhotoResult) -> None:
    photo.write_photo(folder / f"{stem}_faces.png", result.preview())
    for f, before, after in zip(result.faces.faces, result.crops, result.restored):
        photo.write_photo(folder / f"{stem}_{f.number}.png", after)
        photo.write_photo(folder / f"{stem}_{f.number}_input.png", before)
