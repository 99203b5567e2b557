"""Face detectors with 5 landmarks behind one interface: RetinaFace (our implementation, the weight files
face-restoration users already have) and dlib (offline, CPU; the CI default).

Backends (``BACKENDS``):

- ``retinaface_resnet50`` / ``retinaface_mobilenet0.25``: :mod:`.retinaface` with ``detection_Resnet50_Final.pth``
  / ``detection_mobilenet0.25_Final.pth`` from a ``facedetection`` model folder (ComfyUI's ``models/facedetection``,
  the folder facerestore_cf / ReActor / CodeFormer use). Its 5 points are the FFHQ template's (eye centres, nose
  tip, mouth corners), so alignment uses them directly.
- ``dlib_cnn`` (dlib's MMOD CNN detector, robust, ~1.3 s per 512 px image on one CPU core) and ``dlib_hog`` (HOG +
  linear SVM, ~0.1 s, frontal faces only), both with dlib's 5-point shape predictor; from the optional extra
  ``pip install comfyui-bfr[faces]`` (``dlib-bin`` + ``face-recognition-models``, CC0 models).
  dlib's 5 points are the outer/inner corner of each eye and the point under the nose, NOT the FFHQ points, so they
  are aligned against their own template :data:`DLIB5_TEMPLATE_512`: where those 5 points sit in the FFHQ-aligned
  512 frame, calibrated by ``bench/dlib5_template.py`` (the 68-point model's eye centres / nose tip / mouth corners
  fitted to the FFHQ template, the dlib 5 points mapped through that fit, mirrored pairs averaged). The face's FFHQ
  landmarks are then the FFHQ template mapped back into the photo (mouth corners inferred, not detected). Measured
  alignment error: README "Faces" section.
- ``auto``: RetinaFace ResNet-50 if its file is present, else MobileNet-0.25 if present, else dlib CNN.

Large photos are detected on a copy whose longer side is at most ``max_side`` px (memory and time bounded); boxes
and points are scaled back to the photo's pixels. A missing backend is a :class:`FaceDetectorError` saying what to
install or which file to put where; nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from . import retinaface
from .face import FFHQ_TEMPLATE_512, Detection, alignment_affine, apply_affine, invert_affine

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "retinaface_resnet50", "retinaface_mobilenet0.25", "dlib_cnn", "dlib_hog")
RETINAFACE_FILES = {"retinaface_resnet50": "detection_Resnet50_Final.pth",
                    "retinaface_mobilenet0.25": "detection_mobilenet0.25_Final.pth"}
DLIB_FIVE_POINT = "shape_predictor_5_face_landmarks.dat"
DLIB_CNN = "mmod_human_face_detector.dat"
# Default score thresholds, each in its backend's own units: RetinaFace's face probability; dlib CNN's MMOD
# confidence; dlib HOG's SVM margin (0.3 drops the astronaut's suit-patch false positive at 0.12, keeps her face
# at 1.16).
DEFAULT_THRESHOLDS = {"retinaface_resnet50": 0.8, "retinaface_mobilenet0.25": 0.8, "dlib_cnn": 0.3, "dlib_hog": 0.3}
DEFAULT_MAX_SIDE = 1280
# dlib's CNN slides an 80x80 window over an image pyramid: smaller faces are found only on an upscaled copy
DLIB_CNN_MIN_FACE = 80

# dlib's 5 points in the FFHQ 512 frame, order as dlib gives them for an upright face: image-right eye outer and
# inner corner, image-left eye outer and inner corner, below the nose. From `python bench/dlib5_template.py`
# (astronaut + camera and their mirror images). Mean distance of the 68-point FFHQ landmarks from the template after
# aligning with these (LMEDS, 512 px crop): astronaut 13.9 px, camera (head turned down) 28.2 px; aligning with the
# 68-point landmarks themselves leaves 10.6 px (the two annotation conventions differ), so dlib costs ~3 px on a
# frontal face and more on a turned one.
DLIB5_TEMPLATE_512 = np.array([[342.0, 253.67], [294.05, 258.99], [176.14, 255.82], [222.97, 260.09], [258.61, 356.56]],
                              dtype=np.float64)


class FaceDetectorError(RuntimeError):
    """A detector backend that cannot run here (package not installed, weight file missing or unreadable)."""


def dlib_model_dir() -> Path:
    """The folder with face-recognition-models' .dat files, found without importing that package (its __init__
    needs pkg_resources, gone from recent setuptools)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceDetectorError("the dlib face detector needs the optional extra: pip install 'comfyui-bfr[faces]' "
                                "(dlib-bin + face-recognition-models, ~100 MB, offline CC0 models); or put a "
                                "RetinaFace file (detection_Resnet50_Final.pth) in models/facedetection")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _import_dlib():
    try:
        import dlib
    except ImportError:
        raise FaceDetectorError("the dlib backends need `pip install 'comfyui-bfr[faces]'` (the dlib-bin wheel and "
                                "face-recognition-models); or choose a RetinaFace backend with its weight file in "
                                "models/facedetection") from None
    return dlib


def _to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3] if img.shape[2] >= 3 else np.repeat(img[..., :1], 3, -1)
    if img.dtype != np.uint8:
        img = (np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return np.ascontiguousarray(img)


def ffhq_landmarks_from(points: np.ndarray, points_template: np.ndarray) -> np.ndarray:
    """The FFHQ 5 points implied by a detector's own points: the FFHQ template mapped back through the alignment
    (for RetinaFace the points are the FFHQ points already; for dlib the mouth corners are inferred)."""
    m = alignment_affine(points, points_template)
    return apply_affine(invert_affine(m), FFHQ_TEMPLATE_512)


class DlibDetector:
    """dlib CNN (MMOD) or HOG detector + the 5-point shape predictor (face-recognition-models)."""

    def __init__(self, kind: str = "cnn", upsample: int = 0):
        dlib = _import_dlib()
        models = dlib_model_dir()
        self.kind = kind
        self.upsample = int(upsample)
        try:
            self.predictor = dlib.shape_predictor(str(models / DLIB_FIVE_POINT))
            if kind == "cnn":
                self.detector = dlib.cnn_face_detection_model_v1(str(models / DLIB_CNN))
            elif kind == "hog":
                self.detector = dlib.get_frontal_face_detector()
            else:
                raise ValueError(f"dlib detector kind must be 'cnn' or 'hog' (got {kind!r})")
        except RuntimeError as exc:
            raise FaceDetectorError(f"could not load dlib's models from {models}: {exc}; reinstall "
                                    "face-recognition-models") from exc

    def detect(self, image: np.ndarray, threshold: float) -> list[Detection]:
        img = _to_uint8_rgb(image)
        if self.kind == "cnn":
            found = [(r.rect, float(r.confidence)) for r in self.detector(img, self.upsample)]
        else:
            rects, scores, _ = self.detector.run(img, self.upsample, -1.0)
            found = list(zip(rects, (float(s) for s in scores)))
        out = []
        for rect, score in found:
            if score < threshold:
                continue
            shape = self.predictor(img, rect)
            pts = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
            box = (float(rect.left()), float(rect.top()), float(rect.right() + 1), float(rect.bottom() + 1))
            out.append(Detection(box, score, ffhq_landmarks_from(pts, DLIB5_TEMPLATE_512), pts, DLIB5_TEMPLATE_512))
        return out


class RetinaFaceBackend:
    """:mod:`.retinaface` behind the common interface."""

    def __init__(self, path: Path, device="cpu", dtype=None):
        try:
            self.detector = retinaface.load_retinaface(path, device=device, dtype=dtype or torch.float32)
        except retinaface.RetinaFaceWeightsError as exc:
            raise FaceDetectorError(str(exc)) from exc

    def detect(self, image: np.ndarray, threshold: float) -> list[Detection]:
        (boxes, scores, lms), = self.detector.detect([_to_uint8_rgb(image)], conf_threshold=threshold)
        return [Detection(tuple(float(v) for v in b), float(s), np.asarray(lm, np.float64),
                          np.asarray(lm, np.float64), FFHQ_TEMPLATE_512) for b, s, lm in zip(boxes, scores, lms)]


def find_weight(name: str, folders: Sequence[str | Path]) -> Path | None:
    for folder in folders:
        p = Path(folder) / name
        if p.is_file():
            return p
    return None


def resolve_backend(backend: str, folders: Sequence[str | Path]) -> str:
    """``auto`` -> the best backend available here; any other name is checked and returned."""
    if backend not in BACKENDS:
        raise FaceDetectorError(f"detector backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if backend != "auto":
        return backend
    for name in ("retinaface_resnet50", "retinaface_mobilenet0.25"):
        if find_weight(RETINAFACE_FILES[name], folders) is not None:
            return name
    return "dlib_cnn"


_CACHE: dict = {}


def get_detector(backend: str, folders: Sequence[str | Path] = (), device="cpu", dtype=None):
    """A (cached) detector for a resolved backend name; a clear error for a missing file or package."""
    name = resolve_backend(backend, folders)
    if name.startswith("retinaface"):
        path = find_weight(RETINAFACE_FILES[name], folders)
        if path is None:
            where = ", ".join(str(f) for f in folders) or "(no facedetection folder configured)"
            raise FaceDetectorError(f"{name} needs {RETINAFACE_FILES[name]} in a facedetection model folder "
                                    f"(looked in: {where}). Put the file there (it is the one facerestore_cf / "
                                    "CodeFormer use), or choose backend dlib_cnn (pip install 'comfyui-bfr[faces]')")
        key = (name, str(path), str(device), str(dtype))
        if key not in _CACHE:
            _CACHE[key] = RetinaFaceBackend(path, device, dtype)
        return name, _CACHE[key]
    key = (name,)
    if key not in _CACHE:
        _CACHE[key] = DlibDetector("cnn" if name == "dlib_cnn" else "hog")
    return name, _CACHE[key]


def _scaled(d: Detection, s: float) -> Detection:
    # cv2.resize maps pixel centres as x = (x_small + 0.5) * s - 0.5; box edges scale plainly
    def pts(p):
        return None if p is None else np.asarray(p, np.float64) * s + 0.5 * (s - 1.0)
    return Detection(tuple(v * s for v in d.box), d.score, pts(d.landmarks), pts(d.points), d.template)


def detection_scale(height: int, width: int, backend: str, max_side: int, min_face: float) -> float:
    """Photo pixels per detection pixel: > 1 when a large photo is detected on a copy downscaled to ``max_side``;
    < 1 for ``dlib_cnn`` when faces down to ``min_face`` px need an upscaled copy to reach its 80 px window (never
    beyond ``max_side``)."""
    long = max(height, width)
    s = long / float(max_side) if max_side and long > max_side else 1.0
    if backend == "dlib_cnn" and min_face and min_face < DLIB_CNN_MIN_FACE * s:
        s = max(min_face / DLIB_CNN_MIN_FACE, long / float(max_side) if max_side else 0.0)
    return s


def detect(image: np.ndarray, backend: str = "auto", folders: Sequence[str | Path] = (), *,
           threshold: float | None = None, max_side: int = DEFAULT_MAX_SIDE, min_face: float = DLIB_CNN_MIN_FACE,
           device="cpu", dtype=None) -> tuple[str, list[Detection]]:
    """Faces of one photo (H, W, C; uint8 or float in [0, 1]) -> (backend used, detections in photo pixels).

    The photo is detected on a resized copy (:func:`detection_scale`): downscaled (area) to ``max_side`` px on its
    longer side when larger; for dlib's CNN upscaled so that ``min_face`` px faces are found, up to ``max_side``.
    ``threshold`` None = the backend's default (:data:`DEFAULT_THRESHOLDS`).
    """
    name, det = get_detector(backend, folders, device, dtype)
    thr = DEFAULT_THRESHOLDS[name] if threshold is None else float(threshold)
    img = _to_uint8_rgb(image)
    h, w = img.shape[:2]
    s = detection_scale(h, w, name, max_side, min_face)
    if s != 1.0:
        interp = cv2.INTER_AREA if s > 1 else cv2.INTER_LINEAR
        img = cv2.resize(img, (max(int(round(w / s)), 1), max(int(round(h / s)), 1)), interpolation=interp)
    found = det.detect(img, thr)
    if s != 1.0:
        found = [_scaled(d, s) for d in found]
    return name, found


def detect_batch(images: Sequence[np.ndarray], backend: str = "auto", folders: Sequence[str | Path] = (),
                 **kwargs) -> tuple[str, list[list[Detection]]]:
    """:func:`detect` on every photo of a batch -> (backend used, one detection list per photo)."""
    used, per_image = resolve_backend(backend, folders), []
    for image in images:
        used, dets = detect(image, backend, folders, **kwargs)
        per_image.append(list(dets))
    return used, per_image
