"""Whole-photo face handling: the face records, selection, FFHQ alignment, crops, and seamless paste-back.

Geometry follows the facexlib ``FaceRestoreHelper`` that GFPGAN / CodeFormer users know (algorithm-notes §4.1):
the 5-point FFHQ template at 512 px (scaled for other crop sizes), a 4-DoF similarity fitted with
``cv2.estimateAffinePartial2D(LMEDS)``, the inverse warp for paste-back, and a soft mask that is the warped crop
footprint eroded and Gaussian-feathered with an edge of ``sqrt(area) / 20`` px. Differences, each on purpose:

- every warp works on the face's region of interest only (a 6000 px photo costs what its faces cost), and a warp
  that shrinks by more than 2x is antialiased (area resize first) instead of point-sampled;
- pixels outside the union of the selected faces' masks are bit-identical to the input (the blend is written only
  where the mask is > 0), and faces are pasted in a defined order (see :func:`paste_faces`);
- a ``feather`` factor scales the edge (1 = facexlib's, 0 = a hard paste of the eroded footprint).

Images here are numpy float32 (H, W, C) in [0, 1] (C = 3, or 4 with an alpha channel that is carried through);
the detectors live in :mod:`.face_detect`, the colour fixes in :mod:`.color`, the parsing nets in
:mod:`.face_parsing`. No ComfyUI imports: the nodes and the CLI wrap these functions.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

logger = logging.getLogger(__name__)

TEMPLATE_SIZE = 512
# facexlib's FFHQ 5-point template at 512 px (x, y): image-left eye, image-right eye, nose tip, image-left mouth
# corner, image-right mouth corner (algorithm-notes §4.1).
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float64)
# facexlib's border colour for crops that reach past the photo: (135, 133, 132) in BGR
BORDER_RGB = (132 / 255.0, 133 / 255.0, 135 / 255.0)

SELECTIONS = ("all", "largest", "center", "index", "mask")
ORDERS = ("area", "left_to_right")


class FaceSelectionError(ValueError):
    """A selection that cannot be carried out (bad index list, mask of the wrong size, ...)."""


@dataclass(frozen=True)
class Detection:
    """One detected face in photo pixels: box (x0, y0, x1, y1), detector score, the 5 FFHQ-semantic landmarks
    (5, 2) and the detector's own points with the template they are aligned against (``points``/``template``:
    for RetinaFace the same 5 points and the FFHQ template; for dlib its 5 points and the calibrated dlib
    template of :mod:`.face_detect`)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray
    points: np.ndarray | None = None
    template: np.ndarray | None = None

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def size(self) -> float:
        """The shorter side of the box in pixels (what ``min_size`` compares with)."""
        return min(self.width, self.height)

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0


@dataclass(frozen=True)
class Face:
    """A selected face: which photo of the batch, its number in the documented order of that photo (the number on
    the preview), the detection, and the similarity from photo pixels to the 512 px aligned crop (2x3)."""

    image_index: int
    number: int
    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray
    affine: np.ndarray

    def crop_affine(self, crop_size: int) -> np.ndarray:
        """Photo -> crop of ``crop_size`` px: the 512 transform scaled like the template (facexlib)."""
        return self.affine * (crop_size / TEMPLATE_SIZE)

    def to_dict(self) -> dict:
        return {"image_index": self.image_index, "number": self.number, "box": [float(v) for v in self.box],
                "score": float(self.score), "landmarks": np.asarray(self.landmarks).round(3).tolist(),
                "affine": np.asarray(self.affine).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Face":
        return cls(int(d["image_index"]), int(d["number"]), tuple(float(v) for v in d["box"]), float(d["score"]),
                   np.asarray(d["landmarks"], np.float64), np.asarray(d["affine"], np.float64))


@dataclass(frozen=True)
class FaceSet:
    """The BFR_FACES value: the selected faces of a batch of photos, in crop-batch order (photo by photo, then by
    number), plus what is needed to paste back and to report: each photo's (height, width), how many faces were
    detected in each photo, the backend and the order used."""

    faces: tuple[Face, ...]
    image_sizes: tuple[tuple[int, int], ...]
    detected: tuple[int, ...]
    backend: str = ""
    order: str = "area"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.faces)

    def report(self) -> str:
        """One line per photo: faces detected/selected with number, box size and score."""
        lines = []
        for i, (h, w) in enumerate(self.image_sizes):
            mine = [f for f in self.faces if f.image_index == i]
            desc = ", ".join(f"#{f.number} ({f.box[2] - f.box[0]:.0f} px, score {f.score:.2f})" for f in mine)
            lines.append(f"photo {i} ({w}x{h}): {self.detected[i]} detected, {len(mine)} selected"
                         + (f": {desc}" if desc else ""))
        lines.extend(self.notes)
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"faces": [f.to_dict() for f in self.faces], "image_sizes": self.image_sizes,
                           "detected": self.detected, "backend": self.backend, "order": self.order,
                           "notes": list(self.notes)})

    @classmethod
    def from_json(cls, text: str) -> "FaceSet":
        d = json.loads(text)
        return cls(tuple(Face.from_dict(f) for f in d["faces"]), tuple(tuple(s) for s in d["image_sizes"]),
                   tuple(d["detected"]), d.get("backend", ""), d.get("order", "area"), tuple(d.get("notes", ())))


# ------------------------------------------------------------------------------------------------------ geometry
def template(crop_size: int = TEMPLATE_SIZE, points: np.ndarray = FFHQ_TEMPLATE_512) -> np.ndarray:
    """A 512 px template scaled to ``crop_size`` (facexlib scales the template by face_size / 512)."""
    return np.asarray(points, np.float64) * (crop_size / TEMPLATE_SIZE)


def apply_affine(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (N, 2) through a 2x3 affine."""
    p = np.asarray(points, np.float64)
    return p @ np.asarray(m, np.float64)[:, :2].T + np.asarray(m, np.float64)[:, 2]


def invert_affine(m: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(m, np.float64))


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 4-DoF similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst`` (Umeyama
    without reflection, closed form). Used where every point counts (calibration, 2-3 points)."""
    s, d = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = s.mean(0), d.mean(0)
    a, b = s - ms, d - md
    den = (a ** 2).sum()
    if den <= 1e-12:
        raise ValueError("landmarks are degenerate (all points coincide); cannot fit a similarity")
    c = ((a * b).sum()) / den  # s*cos
    si = ((a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]).sum()) / den  # s*sin
    rot = np.array([[c, -si], [si, c]])
    return np.hstack([rot, (md - rot @ ms)[:, None]])


def alignment_affine(points: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Photo -> aligned crop: ``cv2.estimateAffinePartial2D(points, target, LMEDS)`` as facexlib; falls back to the
    least-squares fit when LMEDS finds no model (it needs at least 2 well-spread points)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    tgt = np.asarray(target, np.float64).reshape(-1, 2)
    m = None
    if len(pts) >= 3:
        m, _ = cv2.estimateAffinePartial2D(pts.astype(np.float32), tgt.astype(np.float32), method=cv2.LMEDS)
    if m is None or not np.isfinite(m).all():
        m = fit_similarity(pts, tgt)
    return m.astype(np.float64)


def affine_scale(m: np.ndarray) -> float:
    """The uniform scale of a similarity (sqrt |det| of its linear part)."""
    return math.sqrt(abs(float(np.linalg.det(np.asarray(m, np.float64)[:, :2]))))


def _region(m_inv: np.ndarray, out_w: int, out_h: int, src_w: int, src_h: int, margin: float):
    """Source-pixel bounding box (clipped) of the output rectangle mapped back through ``m_inv`` (output -> source),
    grown by ``margin``. Returns (x0, y0, x1, y1) ints, or None when it misses the source."""
    corners = np.array([[0, 0], [out_w, 0], [0, out_h], [out_w, out_h]], np.float64) - 0.5
    p = apply_affine(m_inv, corners)
    x0 = max(int(math.floor(p[:, 0].min() - margin)), 0)
    y0 = max(int(math.floor(p[:, 1].min() - margin)), 0)
    x1 = min(int(math.ceil(p[:, 0].max() + margin)) + 1, src_w)
    y1 = min(int(math.ceil(p[:, 1].max() + margin)) + 1, src_h)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def warp(src: np.ndarray, m: np.ndarray, out_w: int, out_h: int, *, border_value=0.0,
         interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """``cv2.warpAffine(src, m, (out_w, out_h))`` with a constant border, computed on the source region it reads
    (cheap for a small face in a huge photo: the region's margin covers the interpolation footprint, so only the
    photo's own edges see the border), with an area-resize prefilter when ``m`` shrinks by more than 2x (no
    aliasing from point sampling).
    """
    src = np.asarray(src, np.float32)
    squeeze = src.ndim == 3 and src.shape[2] == 1
    if squeeze:
        src = src[..., 0]
    h, w = src.shape[:2]
    ch = 1 if src.ndim == 2 else src.shape[2]
    fill = tuple(border_value) if isinstance(border_value, (tuple, list)) else (float(border_value),) * ch
    out_shape = (out_h, out_w) if src.ndim == 2 else (out_h, out_w, ch)
    m = np.asarray(m, np.float64)
    scale = affine_scale(m)
    region = _region(invert_affine(m), out_w, out_h, w, h, margin=2.0 / max(scale, 1e-6) + 2.0)
    if region is None:
        out = np.broadcast_to(np.asarray(fill[:ch], np.float32).reshape(-1)[:ch], (out_h, out_w, ch)).copy()
    elif ch > 4:  # cv2 warps at most 4 channels at once
        out = np.stack([warp(src[..., c], m, out_w, out_h, border_value=fill[c], interpolation=interpolation)
                        for c in range(ch)], -1)
    else:
        x0, y0, x1, y1 = region
        roi = np.ascontiguousarray(src[y0:y1, x0:x1])
        m_roi = m.copy()
        m_roi[:, 2] += m[:, :2] @ np.array([x0, y0], np.float64)  # roi pixel -> output
        if scale < 0.5:
            rh, rw = roi.shape[:2]
            nw, nh = max(int(round(rw * scale * 1.5)), 1), max(int(round(rh * scale * 1.5)), 1)
            roi = cv2.resize(roi, (nw, nh), interpolation=cv2.INTER_AREA)
            fx, fy = nw / rw, nh / rh
            # cv2.resize maps x_small = (x + 0.5) * f - 0.5, so x = (x_small + 0.5) / f - 0.5
            back = np.array([[1 / fx, 0.0, 0.5 / fx - 0.5], [0.0, 1 / fy, 0.5 / fy - 0.5], [0.0, 0.0, 1.0]])
            m_roi = (np.vstack([m_roi, [0.0, 0.0, 1.0]]) @ back)[:2]
        out = cv2.warpAffine(roi, m_roi, (out_w, out_h), flags=interpolation, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=fill[:ch] if ch > 1 else fill[0])
    out = np.asarray(out, np.float32).reshape(out_shape)
    return out[..., None] if squeeze else out


# ------------------------------------------------------------------------------------------------------ selection
def order_detections(dets: Sequence[Detection], order: str = "area") -> list[Detection]:
    """The documented, deterministic order: ``area`` = largest box first, ties left to right then top to bottom;
    ``left_to_right`` = by box centre x, ties top to bottom then larger first."""
    if order == "area":
        key = lambda d: (-round(d.area, 3), round(d.center[0], 3), round(d.center[1], 3))  # noqa: E731
    elif order == "left_to_right":
        key = lambda d: (round(d.center[0], 3), round(d.center[1], 3), -round(d.area, 3))  # noqa: E731
    else:
        raise FaceSelectionError(f"order must be one of {', '.join(ORDERS)} (got {order!r})")
    return sorted(dets, key=key)


def numbered_detections(dets: Sequence[Detection], faces: "FaceSet", image_index: int, min_size: float = 0.0,
                        order: str = "area") -> list[tuple[int, Detection, bool]]:
    """Every detection of one photo large enough to be numbered, as (number, detection, selected in ``faces``), in
    the documented order: what the preview draws and the reports list."""
    chosen = {f.number for f in faces.faces if f.image_index == image_index}
    return [(n, d, n in chosen) for n, d in enumerate(order_detections([d for d in dets if d.size >= min_size],
                                                                       order))]


def parse_indices(text: str) -> list[int]:
    """'0,2' / '0 2' / 'index:0,2' -> [0, 2]; rejects anything else with the expected form."""
    body = text.strip()
    if body.lower().startswith("index:"):
        body = body[6:]
    parts = [p for p in body.replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        out = [int(p) for p in parts]
    except ValueError:
        raise FaceSelectionError(f"face indices must be whole numbers separated by commas, e.g. '0,2' "
                                 f"(got {text!r})") from None
    if not out or any(i < 0 for i in out):
        raise FaceSelectionError(f"give at least one face index >= 0, e.g. '0' or '0,2' (got {text!r}); the numbers "
                                 "are those on the Detect Faces preview")
    return out


def select_detections(dets: Sequence[Detection], image_size: tuple[int, int], selection: str = "all", *,
                      indices: Sequence[int] = (), mask: np.ndarray | None = None, min_size: float = 0.0,
                      max_faces: int = 0, order: str = "area") -> list[tuple[int, Detection]]:
    """Number the faces of one photo in ``order`` (after dropping boxes smaller than ``min_size`` px) and keep the
    selected ones as (number, detection).

    selection: ``all``; ``largest`` (the largest box); ``center`` (box centre closest to the photo centre);
    ``index`` (the numbers in ``indices``; numbers that do not exist are skipped with a log line); ``mask`` (faces
    whose landmark centre lies where ``mask`` (H, W) > 0.5). ``max_faces`` > 0 keeps the first that many, in order.
    """
    if selection not in SELECTIONS:
        raise FaceSelectionError(f"selection must be one of {', '.join(SELECTIONS)} (got {selection!r})")
    numbered = list(enumerate(order_detections([d for d in dets if d.size >= min_size], order)))
    h, w = image_size
    if not numbered:
        return []
    if selection == "largest":
        keep = [max(numbered, key=lambda nd: (nd[1].area, -nd[0]))]
    elif selection == "center":
        cx, cy = w / 2.0, h / 2.0
        keep = [min(numbered, key=lambda nd: ((nd[1].center[0] - cx) ** 2 + (nd[1].center[1] - cy) ** 2, nd[0]))]
    elif selection == "index":
        wanted = set(int(i) for i in indices)
        missing = sorted(i for i in wanted if i >= len(numbered))
        if missing:
            logger.warning("face numbers %s do not exist in this photo (%d faces numbered 0..%d); skipped",
                           missing, len(numbered), len(numbered) - 1)
        keep = [nd for nd in numbered if nd[0] in wanted]
    elif selection == "mask":
        if mask is None:
            raise FaceSelectionError("selection 'mask' needs a MASK (connect one, painted over the faces to keep)")
        m = np.asarray(mask, np.float32)
        if m.shape != (h, w):
            raise FaceSelectionError(f"the MASK is {m.shape[1]}x{m.shape[0]} but the photo is {w}x{h}; give a mask "
                                     "of the photo's size (e.g. from the photo's own LoadImage mask or a painted one)")
        keep = []
        for nd in numbered:
            x, y = np.asarray(nd[1].landmarks, np.float64).mean(0)
            xi, yi = min(max(int(round(x)), 0), w - 1), min(max(int(round(y)), 0), h - 1)
            if m[yi, xi] > 0.5:
                keep.append(nd)
    else:
        keep = numbered
    if max_faces and max_faces > 0:
        keep = keep[:max_faces]
    return keep


def build_faceset(per_image: Sequence[Sequence[Detection]], image_sizes: Sequence[tuple[int, int]],
                  selection: str = "all", *, indices: Sequence[int] = (), masks: Sequence[np.ndarray | None] = (),
                  min_size: float = 0.0, max_faces: int = 0, order: str = "area", backend: str = "") -> FaceSet:
    """Select and align the faces of a batch of photos (one detection list per photo) into a :class:`FaceSet`."""
    faces, notes = [], []
    for i, (dets, size) in enumerate(zip(per_image, image_sizes)):
        mask = masks[i] if i < len(masks) else (masks[-1] if masks else None)
        kept = select_detections(dets, size, selection, indices=indices, mask=mask, min_size=min_size,
                                 max_faces=max_faces, order=order)
        small = sum(1 for d in dets if d.size < min_size)
        if small:
            notes.append(f"photo {i}: {small} face(s) smaller than min_size={min_size:g} px ignored")
        for number, d in kept:
            pts = d.points if d.points is not None else d.landmarks
            tpl = d.template if d.template is not None else FFHQ_TEMPLATE_512
            faces.append(Face(i, number, tuple(float(v) for v in d.box), float(d.score),
                              np.asarray(d.landmarks, np.float64), alignment_affine(pts, tpl)))
    return FaceSet(tuple(faces), tuple((int(h), int(w)) for h, w in image_sizes),
                   tuple(len(d) for d in per_image), backend, order, tuple(notes))


# ------------------------------------------------------------------------------------------------------ crop/paste
def crop_face(photo: np.ndarray, face: Face, crop_size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The aligned (crop_size, crop_size, C) crop of one face; outside the photo: facexlib's grey (alpha 1)."""
    c = photo.shape[2]
    fill = BORDER_RGB + (1.0,) * (c - 3) if c >= 3 else (BORDER_RGB[1],) * c
    return warp(photo, face.crop_affine(crop_size), crop_size, crop_size, border_value=fill)


def crop_faces(photos: Sequence[np.ndarray], faces: FaceSet, crop_size: int = TEMPLATE_SIZE) -> np.ndarray:
    """All faces of the set as one (N, crop_size, crop_size, C) batch, in the set's order."""
    if not len(faces):
        return np.zeros((0, crop_size, crop_size, photos[0].shape[2] if len(photos) else 3), np.float32)
    return np.stack([crop_face(photos[f.image_index], f, crop_size) for f in faces.faces])


def soft_mask(face: Face, crop_size: int, photo_size: tuple[int, int], feather: float = 1.0,
              crop_mask: np.ndarray | None = None) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """The paste-back mask of one face in photo space, on its region: ((x0, y0, x1, y1), mask float32 in [0, 1]).

    facexlib: warp a ones(crop) footprint back, erode 2x2 (drops the interpolated rim), edge w = sqrt(area) // 20,
    erode by a 2w x 2w kernel and Gaussian-blur with a (2w+1)^2 kernel (sigma from the size). ``feather`` scales w
    (0 = the eroded footprint, a hard paste). ``crop_mask`` (crop_size^2, e.g. a face-parsing mask) is warped the
    same way and fused with the soft mask by the element-wise minimum (CodeFormer's fuse). None when the face lies
    outside the photo.
    """
    h, w = photo_size
    inv = invert_affine(face.crop_affine(crop_size))
    region = _region(inv, crop_size, crop_size, w, h, margin=2.0)
    if region is None:
        return None
    x0, y0, x1, y1 = region
    inv_roi = inv.copy()
    inv_roi[:, 2] -= (x0, y0)
    rw, rh = x1 - x0, y1 - y0
    ones = np.ones((crop_size, crop_size), np.float32)
    foot = cv2.warpAffine(ones, inv_roi, (rw, rh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)
    foot = cv2.erode(foot, np.ones((2, 2), np.uint8))
    edge = int(math.sqrt(float(foot.sum()))) // 20
    edge = int(round(edge * max(float(feather), 0.0)))
    if edge > 0:
        center = cv2.erode(foot, np.ones((2 * edge, 2 * edge), np.uint8))
        mask = cv2.GaussianBlur(center, (2 * edge + 1, 2 * edge + 1), 0)
    else:
        mask = foot
    if crop_mask is not None:
        cm = cv2.warpAffine(np.asarray(crop_mask, np.float32), inv_roi, (rw, rh), flags=cv2.INTER_CUBIC,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        mask = np.minimum(mask, np.clip(cm, 0.0, 1.0))
    return (x0, y0, x1, y1), np.clip(mask, 0.0, 1.0).astype(np.float32)


def paste_faces(photos: Sequence[np.ndarray], restored: np.ndarray, faces: FaceSet, *, feather: float = 1.0,
                crop_masks: np.ndarray | None = None,
                on_face: Callable[[int], None] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Paste restored crops (N, S, S, C>=3, the set's order) back into their photos.

    Returns (photos, masks): each photo (H, W, C) with its faces blended as ``mask * face + (1 - mask) * photo``,
    written only where the mask is > 0 (every other pixel is bit-identical to the input, alpha untouched), and the
    union (max) of the masks (H, W). Overlapping faces: pasted from the last number to the first, so face #0 (the
    largest in ``area`` order) ends on top. ``crop_masks`` (N, S, S): optional parsing masks fused into the soft
    masks. ``on_face(k)`` is called after each face (progress / cancel).
    """
    if len(restored) != len(faces):
        raise ValueError(f"{len(restored)} restored crops for {len(faces)} faces: the crops must be the Crop Faces "
                         "output (one per face, same order), restored as one batch")
    outs = [np.array(p, dtype=np.float32, copy=True) for p in photos]
    masks = [np.zeros(p.shape[:2], np.float32) for p in photos]
    if not len(faces):
        return outs, masks
    size = restored.shape[1]
    order = sorted(range(len(faces)), key=lambda k: (faces.faces[k].image_index, -faces.faces[k].number))
    for done, k in enumerate(order):
        f = faces.faces[k]
        out = outs[f.image_index]
        h, w = out.shape[:2]
        res = soft_mask(f, size, (h, w), feather, None if crop_masks is None else crop_masks[k])
        if res is not None:
            (x0, y0, x1, y1), m = res
            inv = invert_affine(f.crop_affine(size))
            inv[:, 2] -= (x0, y0)
            rgb = np.asarray(restored[k, ..., :3], np.float32)
            face_px = cv2.warpAffine(rgb, inv, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REPLICATE)
            face_px = np.clip(face_px, 0.0, 1.0)
            region = out[y0:y1, x0:x1, :3]
            sel = m > 0
            blend = m[..., None] * face_px + (1.0 - m[..., None]) * region
            region[sel] = blend[sel]
            mm = masks[f.image_index][y0:y1, x0:x1]
            np.maximum(mm, m, out=mm)
        if on_face is not None:
            on_face(done + 1)
    return outs, masks


# ------------------------------------------------------------------------------------------------------ preview
def draw_faces(photo: np.ndarray, dets_numbered: Sequence[tuple[int, Detection, bool]],
               message: str | None = None) -> np.ndarray:
    """A preview (H, W, 3) float: each face's box (green when selected, grey otherwise), its 5 landmarks and its
    number; ``message`` (e.g. 'no face found') written at the top."""
    img = np.ascontiguousarray((np.clip(photo[..., :3], 0, 1) * 255).round().astype(np.uint8))
    h, w = img.shape[:2]
    thick = max(1, int(round(max(h, w) / 400)))
    scale = max(0.4, max(h, w) / 900)
    for number, d, selected in dets_numbered:
        color = (40, 220, 60) if selected else (160, 160, 160)
        x0, y0, x1, y1 = (int(round(v)) for v in d.box)
        cv2.rectangle(img, (x0, y0), (x1, y1), color, thick)
        for x, y in np.asarray(d.landmarks):
            cv2.circle(img, (int(round(x)), int(round(y))), thick + 1, (255, 60, 60), -1)
        label = str(number)
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        ty = max(y0 - 4, th + 2)
        cv2.rectangle(img, (x0, ty - th - 3), (x0 + tw + 4, ty + 2), color, -1)
        cv2.putText(img, label, (x0 + 2, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)
    if message:
        cv2.putText(img, message, (8, int(30 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 80, 80), thick + 1,
                    cv2.LINE_AA)
    return img.astype(np.float32) / 255.0


def detections_dicts(dets: Sequence[Detection]) -> list[dict]:
    """Detections as plain dicts (reports, JSON)."""
    return [{"box": list(d.box), "score": d.score, "landmarks": np.asarray(d.landmarks).tolist()} for d in dets]


