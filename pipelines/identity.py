"""An offline CPU identity judge: dlib's face recognition ResNet (128-d descriptors), for scoring only.

The models are face-recognition-models' CC0 files (the optional extra ``pip install 'comfyui-bfr[faces]'``, with
the ``dlib-bin`` wheel): ``dlib_face_recognition_resnet_model_v1.dat`` (a ResNet-29 metric net trained by Davis
King; 99.38% on LFW) and ``shape_predictor_5_face_landmarks.dat``. Nothing is downloaded. Its descriptors are not
differentiable, so it is never a training loss: it judges restorations (the face pipeline's detections or aligned
crops) against their references.

- Euclidean distance between descriptors: below :data:`SAME_PERSON_THRESHOLD` (0.6, dlib's published threshold)
  reads as "the same person"; cosine similarity and the angle between descriptors are also given.
- How the face is located (dlib needs its own 5 points: eye corners and the point under the nose, which then align
  a 150 px chip with 25% padding inside dlib):

  * ``aligned=True`` (an FFHQ-aligned crop of any size, e.g. the 512 px crops the restorers see): the 5 points at
    their calibrated place in the FFHQ frame (:data:`.face_detect.DLIB5_TEMPLATE_512`, scaled), the whole crop as
    the face box, no detector and no predictor. So every crop of a batch is judged on the same region, and a blurry
    input cannot move the points. (Running the predictor with the whole crop as its box instead lands the points
    off the face: it expects a detector-sized box, and the astronaut-vs-cameraman distance falls from 0.86 to 0.54.)
  * ``detection`` from :func:`.face_detect.detect` with a dlib backend: its own 5 points; from another backend
    (FFHQ points only): dlib's 5-point predictor on its box.
  * neither: the largest face that :func:`.face_detect.detect` finds with the dlib CNN detector (or ``detector=``).
- :meth:`DlibIdentity.weights_info` lists the files used, ``{file, sha256}``, for a metric report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .face import TEMPLATE_SIZE, Detection
from .face_detect import DLIB5_TEMPLATE_512, DLIB_CNN, DLIB_FIVE_POINT, FaceDetectorError, detect, dlib_model_dir
from .metrics import file_record

logger = logging.getLogger(__name__)

RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
SAME_PERSON_THRESHOLD = 0.6  # dlib's: Euclidean distance < 0.6 -> same person (dlib_face_recognition.py example)
EMBEDDING_DIM = 128
_INSTALL = ("pip install 'comfyui-bfr[faces]' (the dlib-bin wheel + face-recognition-models: CC0 models, ~100 MB, "
            "offline)")


class IdentityModelError(FaceDetectorError):
    """The identity judge cannot run here: dlib or face-recognition-models missing, or a model file unreadable."""


class NoFaceError(ValueError):
    """No face was found in an image that was to be embedded without a detection."""


# ------------------------------------------------------------------------------------------------ comparisons
def distance(a, b) -> float | np.ndarray:
    """Euclidean distance between descriptors (along the last axis); < 0.6 reads as the same person."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    out = np.sqrt((d * d).sum(-1))
    return float(out) if out.ndim == 0 else out


def cosine(a, b) -> float | np.ndarray:
    """Cosine similarity between descriptors (along the last axis)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    out = np.clip(out, -1.0, 1.0)
    return float(out) if out.ndim == 0 else out


def angle_degrees(a, b) -> float | np.ndarray:
    """The angle between descriptors in degrees, as ``2 atan2(|u - v|, |u + v|)`` of the unit vectors (exactly 0
    for equal descriptors, unlike ``arccos`` of a rounded cosine)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    u = a / np.linalg.norm(a, axis=-1, keepdims=True)
    v = b / np.linalg.norm(b, axis=-1, keepdims=True)
    out = np.degrees(2.0 * np.arctan2(np.linalg.norm(u - v, axis=-1), np.linalg.norm(u + v, axis=-1)))
    return float(out) if out.ndim == 0 else out


# ------------------------------------------------------------------------------------------------ the judge
def _import_dlib():
    try:
        import dlib
    except ImportError:
        raise IdentityModelError(f"the dlib identity judge needs `{_INSTALL}`") from None
    return dlib


def default_model_dir() -> Path:
    """face-recognition-models' folder of .dat files."""
    try:
        return dlib_model_dir()
    except FaceDetectorError:
        raise IdentityModelError(f"the dlib identity judge needs face-recognition-models: {_INSTALL}") from None


def _uint8_rgb(image) -> np.ndarray:
    img = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3:
        raise ValueError(f"embed takes one image (H, W, C) or (H, W), got shape {img.shape}")
    img = np.repeat(img[..., :1], 3, -1) if img.shape[2] < 3 else img[..., :3]
    if img.dtype != np.uint8:
        if not np.issubdtype(img.dtype, np.floating):
            raise TypeError(f"embed takes uint8 or float images in [0, 1], got dtype {img.dtype}")
        img = (np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return np.ascontiguousarray(img)


_MODELS: dict[str, tuple] = {}


class DlibIdentity:
    """dlib's face recognition ResNet + 5-point predictor (models cached per folder).

    Args:
        model_dir: the folder with the ``.dat`` files; default: face-recognition-models' folder.
        detector: the :mod:`.face_detect` backend :meth:`embed` uses when it gets neither a detection nor
            ``aligned=True`` (``dlib_cnn`` or ``dlib_hog``: offline; a RetinaFace backend needs ``folders``).
        folders: model folders for a RetinaFace ``detector``.
        num_jitters: dlib's test-time augmentation: 0 = one pass, deterministic; n > 1 averages n randomly
            jittered passes (slightly more accurate, n times the cost, no longer deterministic).
        padding: dlib's chip padding around the 5-point box (0.25, what the net was trained with).
    """

    name = "dlib_resnet_v1"
    threshold = SAME_PERSON_THRESHOLD
    distance = staticmethod(distance)
    cosine = staticmethod(cosine)
    angle_degrees = staticmethod(angle_degrees)

    def __init__(self, model_dir: str | Path | None = None, *, detector: str = "dlib_cnn",
                 folders: Sequence[str | Path] = (), num_jitters: int = 0, padding: float = 0.25):
        self._dlib = _import_dlib()
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.detector = detector
        self.folders = tuple(folders)
        self.num_jitters = int(num_jitters)
        self.padding = float(padding)
        key = str(self.model_dir.resolve())
        if key not in _MODELS:
            files = [self.model_dir / RECOGNITION_MODEL, self.model_dir / DLIB_FIVE_POINT]
            for f in files:
                if not f.is_file():
                    raise IdentityModelError(f"the dlib identity judge needs {f.name} in {self.model_dir}; "
                                             f"{_INSTALL}, or reinstall face-recognition-models")
            try:
                _MODELS[key] = (self._dlib.face_recognition_model_v1(str(files[0])),
                                self._dlib.shape_predictor(str(files[1])))
            except RuntimeError as exc:
                raise IdentityModelError(f"could not load dlib's models from {self.model_dir}: {exc}; reinstall "
                                         "face-recognition-models") from exc
        self._net, self._predictor = _MODELS[key]
        self._used = [self.model_dir / RECOGNITION_MODEL, self.model_dir / DLIB_FIVE_POINT]

    # ---------------------------------------------------------------------------------------------- embedding
    def _shape(self, rect, points: np.ndarray):
        dlib = self._dlib
        parts = [dlib.point(int(round(x)), int(round(y))) for x, y in np.asarray(points, np.float64)]
        return dlib.full_object_detection(rect, parts)

    def _rect(self, box) -> object:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        return self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1)

    def locate(self, image, detection: Detection | None = None, *, aligned: bool = False):
        """The dlib ``full_object_detection`` (box + 5 points) :meth:`embed` uses; see the module docstring."""
        img = _uint8_rgb(image)
        h, w = img.shape[:2]
        if aligned:
            if detection is not None:
                raise ValueError("give either a detection or aligned=True, not both")
            if h != w:
                raise ValueError(f"aligned=True expects a square FFHQ-aligned crop, got {w}x{h}")
            return img, self._shape(self._dlib.rectangle(0, 0, w - 1, h - 1),
                                    DLIB5_TEMPLATE_512 * (w / TEMPLATE_SIZE))
        if detection is None:
            name, found = detect(img, self.detector, self.folders)
            if name == "dlib_cnn":
                self._note_used(self.model_dir / DLIB_CNN)
            if not found:
                raise NoFaceError(f"no face found in the {w}x{h} image by the {name} detector; pass a detection, or "
                                  "aligned=True for an aligned face crop")
            detection = max(found, key=lambda d: d.area)
        rect = self._rect(detection.box)
        if (detection.points is not None and detection.template is not None
                and np.shape(detection.points) == (5, 2) and np.allclose(detection.template, DLIB5_TEMPLATE_512)):
            return img, self._shape(rect, detection.points)
        return img, self._predictor(img, rect)

    def embed(self, image, detection: Detection | None = None, *, aligned: bool = False) -> np.ndarray:
        """The 128-d descriptor (float64) of one face: image (H, W, C) uint8 or float in [0, 1] (numpy or torch),
        located by ``detection``, by ``aligned=True`` for an FFHQ-aligned crop, or by detecting the largest face."""
        img, shape = self.locate(image, detection, aligned=aligned)
        d = self._net.compute_face_descriptor(img, shape, self.num_jitters, self.padding)
        return np.asarray(d, np.float64)

    # ---------------------------------------------------------------------------------------------- report
    def _note_used(self, path: Path) -> None:
        if path not in self._used:
            self._used.append(path)

    def weights_info(self) -> list[dict[str, str]]:
        """``[{file, sha256}, ...]``: the recognition net and the 5-point predictor, plus dlib's CNN detector file
        once this judge has detected a face with it (sha256 computed once per file, cached)."""
        return [file_record(p) for p in self._used]


__all__ = ["EMBEDDING_DIM", "RECOGNITION_MODEL", "SAME_PERSON_THRESHOLD", "DlibIdentity", "IdentityModelError",
           "NoFaceError", "angle_degrees", "cosine", "default_model_dir", "distance"]
