"""Whole photos in, whole photos out: detect -> select -> align and crop -> restore (one batch) -> colour fix ->
paste back. The CLI (``bfr restore --faces``, ``bfr demo``) runs this; the ComfyUI nodes chain the same steps
(:mod:`.face`, :mod:`.face_detect`, :mod:`.color`) as Detect / Crop / Paste Faces.

The restorer contract (:data:`RestoreCrops`): a callable that takes the aligned crops of every selected face of the
batch as ONE numpy float32 array (N, S, S, 3) in [0, 1] (S = ``crop_size``, RGB, in the order of the FaceSet: photo
by photo, then by face number) and returns the restored crops as a numpy array (N, S', S', 3) in [0, 1] (same N
and order; S' may differ from S, e.g. a 2x face model). It is called once per :func:`restore_photo_batch` call and
never with N = 0. Torch restorers convert at their edge (``torch.from_numpy(x).permute(0, 3, 1, 2)``).

Photos are numpy (H, W, C) with C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA), float32 in [0, 1] (uint8 and
uint16 are scaled). Faces are detected and restored in RGB; alpha is carried through untouched; a gray photo comes
back gray (the luma of the restored faces). Pixels outside the union of the paste masks are bit-identical to the
input. A photo without a (selected) face comes back unchanged with a warning in its result, never an exception.

:func:`read_photo` / :func:`write_photo` read and write such photos without losing what :func:`.image_io.read_rgb`
drops for training data: 16-bit precision (PNG/TIFF, written back as 16-bit PNG) and the alpha channel.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from . import color, face, face_detect, image_io
from .face import Detection, FaceSet
from .image_io import ImageFolderError

logger = logging.getLogger(__name__)

RestoreCrops = Callable[[np.ndarray], np.ndarray]
"""(N, S, S, 3) float32 aligned crops in [0, 1] -> (N, S', S', 3) restored crops in [0, 1]; see the module doc."""

# ITU-R BT.601 luma, for gray photos (the restorers work in RGB)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# ------------------------------------------------------------------------------------------------------ channels
def split_channels(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(H, W[, C]) photo -> (RGB float32 (H, W, 3), alpha (H, W, 1) or None, was_gray)."""
    arr = np.asarray(photo)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"a photo must be (H, W) or (H, W, C) with C = 1, 2, 3 or 4 channels, got shape "
                         f"{tuple(np.shape(photo))}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / np.float32(255.0)
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / np.float32(65535.0)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32, copy=False)
    else:
        raise ValueError(f"a photo must be float in [0, 1], uint8 or uint16, got dtype {arr.dtype}")
    c = arr.shape[2]
    gray = c in (1, 2)
    rgb = np.repeat(arr[..., :1], 3, axis=2) if gray else arr[..., :3]
    alpha = arr[..., c - 1:c] if c in (2, 4) else None
    return np.ascontiguousarray(rgb), alpha, gray


def merge_channels(rgb: np.ndarray, alpha: np.ndarray | None, gray: bool, original: np.ndarray,
                   mask: np.ndarray) -> np.ndarray:
    """The inverse of :func:`split_channels` for a pasted photo: gray photos get the luma of the pasted faces where
    ``mask`` > 0 and their own pixels elsewhere (bit-identical); alpha is appended unchanged."""
    if gray:
        src = split_channels(original)[0][..., :1]
        luma = np.clip(rgb @ _LUMA, 0.0, 1.0)[..., None]
        out = np.where(mask[..., None] > 0, luma, src).astype(np.float32)
    else:
        out = rgb
    return np.concatenate([out, alpha], axis=2) if alpha is not None else out


# ------------------------------------------------------------------------------------------------------ results
@dataclass
class PhotoResult:
    """One photo after :func:`restore_photo_batch`.

    ``photo``: the restored photo (H, W, C), float32, the input's channel layout; ``mask``: the union of the paste
    masks (H, W), 0 where the photo is bit-identical to the input; ``faces``: the selected faces of this photo alone
    (``image_index`` 0; ``faces.to_json()`` for reports, :meth:`.FaceSet.from_json` to paste again); ``numbered``:
    every detection large enough to be numbered, as (number, detection, selected) in the documented order (what the
    preview shows); ``crops`` (n, S, S, 3): the aligned crops given to the restorer; ``restored`` (n, S', S', 3):
    what was pasted (the restorer's output after the colour fix); ``warnings``: why nothing, or less than asked,
    was restored.
    """

    photo: np.ndarray
    mask: np.ndarray
    faces: FaceSet
    numbered: list[tuple[int, Detection, bool]]
    crops: np.ndarray
    restored: np.ndarray
    backend: str
    source: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return len(self.faces) > 0

    def preview(self) -> np.ndarray:
        """The input photo with every numbered face boxed (green = selected), as the Detect Faces node shows it."""
        base = self.source if self.source is not None else self.photo
        rgb = split_channels(base)[0]
        message = None
        if not self.numbered:
            message = "no face found"
        elif not self.changed:
            message = "no face selected"
        return face.draw_faces(rgb, self.numbered, message)

    def to_dict(self) -> dict:
        """JSON-ready: backend, counts, the FaceSet, every numbered detection, warnings."""
        return {"backend": self.backend, "detected": int(self.faces.detected[0]) if self.faces.detected else 0,
                "selected": len(self.faces), "faceset": face_json(self.faces),
                "detections": [{"number": n, "box": [round(float(v), 2) for v in d.box],
                                "score": round(float(d.score), 4), "selected": bool(s)} for n, d, s in self.numbered],
                "warnings": list(self.warnings)}


def face_json(faces: FaceSet) -> dict:
    """A FaceSet as a plain dict (the ``to_json`` content)."""
    import json

    return json.loads(faces.to_json())


def _check_restored(out, n: int) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        raise TypeError("the restorer returned a torch.Tensor; restore_photo_batch takes numpy (N, S, S, 3) float32 "
                        "crops in [0, 1] and expects the same back: end the restorer with "
                        "`.permute(0, 2, 3, 1).cpu().numpy()`")
    arr = np.asarray(out)
    if arr.ndim != 4 or arr.shape[0] != n or arr.shape[1] != arr.shape[2] or arr.shape[3] < 3:
        raise ValueError(f"the restorer must return (N, S, S, 3) crops for the {n} crop(s) it was given, got shape "
                         f"{tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"the restorer must return float crops in [0, 1], got dtype {arr.dtype}")
    arr = arr[..., :3].astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("the restorer returned NaN or infinite pixels (a numerical failure, e.g. fp16 overflow)")
    return np.clip(arr, 0.0, 1.0)


def color_fix_crops(restored: np.ndarray, reference: np.ndarray, method: str) -> np.ndarray:
    """:func:`.color.color_fix` on (N, S, S, 3) numpy crops ('none' returns ``restored`` as it is)."""
    if method == "none":
        return restored
    out = color.color_fix(torch.from_numpy(np.ascontiguousarray(restored)).permute(0, 3, 1, 2),
                          torch.from_numpy(np.ascontiguousarray(reference)).permute(0, 3, 1, 2), method)
    return np.ascontiguousarray(out.permute(0, 2, 3, 1).numpy(), dtype=np.float32)


def fix_and_paste(photos: Sequence[np.ndarray], restored: np.ndarray, faces: FaceSet, *, color_fix: str = "wavelet",
                  feather: float = 1.0, reference: np.ndarray | None = None,
                  parse: Callable[[np.ndarray], np.ndarray] | None = None,
                  on_face: Callable[[int], None] | None = None) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """The paste half of the pipeline, shared by the CLI and the Paste Faces node: colour-fix each restored crop
    (N, S, S, 3) against the original aligned crop at the restored size (``reference``, cut from ``photos`` when not
    given or of another size; ``color_fix`` none | wavelet | adain), optionally fuse a parsing mask computed on the
    fixed crops (``parse``: crops -> (N, S, S) masks), and paste back (:func:`.face.paste_faces`).
    Returns (photos, masks, the colour-fixed crops)."""
    size = restored.shape[1]
    if color_fix != "none":
        if reference is None or reference.shape[1] != size:
            reference = face.crop_faces(photos, faces, size)[..., :3]
        restored = color_fix_crops(restored, reference, color_fix)
    crop_masks = parse(restored) if parse is not None else None
    pasted, masks = face.paste_faces(photos, restored, faces, feather=feather, crop_masks=crop_masks, on_face=on_face)
    return pasted, masks, restored


def restore_photo_batch(photos: Sequence[np.ndarray], restore_crops: RestoreCrops, *, backend: str = "auto",
                        folders: Sequence[str | Path] = (), selection: str = "all", indices: Sequence[int] = (),
                        order: str = "area", min_size: float = 32, max_faces: int = 0, crop_size: int = 512,
                        feather: float = 1.0, color_fix: str = "wavelet", threshold: float | None = None,
                        max_side: int = face_detect.DEFAULT_MAX_SIDE,
                        detections: Sequence[Sequence[Detection]] | None = None,
                        masks: Sequence[np.ndarray | None] = (), device="cpu") -> list[PhotoResult]:
    """Restore the faces of a batch of whole photos; one :class:`PhotoResult` per photo, in order.

    Detects the faces of every photo (``backend`` / ``folders`` / ``threshold`` / ``max_side``: see
    :func:`.face_detect.detect`; or takes ``detections``, one list per photo, e.g. cached or edited), numbers and
    selects them (``selection`` all | largest | center | index (``indices``) | mask (``masks``); ``order``,
    ``min_size`` px, ``max_faces``: see :func:`.face.select_detections`), cuts the aligned ``crop_size`` crops, calls
    ``restore_crops`` ONCE with all crops of the batch, colour-fixes each restored crop against the original crop
    (``color_fix`` none | wavelet | adain, at the restored size) and pastes them back (``feather``: see
    :func:`.face.paste_faces`). Raises only for bad arguments, a detector that cannot run
    (:class:`.face_detect.FaceDetectorError`) or a restorer that fails or breaks the contract.
    """
    if color_fix not in color.METHODS:
        raise ValueError(f"color_fix must be one of {', '.join(color.METHODS)} (got {color_fix!r})")
    if selection not in face.SELECTIONS:
        raise face.FaceSelectionError(f"selection must be one of {', '.join(face.SELECTIONS)} (got {selection!r})")
    if selection == "index" and not list(indices):
        raise face.FaceSelectionError("selection 'index' needs the face numbers, e.g. indices=[0, 2] (the numbers "
                                      "on the preview)")
    if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 16:
        raise ValueError(f"crop_size must be an integer >= 16 px (512 = the FFHQ / SD 2.1-base size), got "
                         f"{crop_size!r}")
    split = [split_channels(p) for p in photos]
    rgbs = [s[0] for s in split]
    sizes = [rgb.shape[:2] for rgb in rgbs]
    if detections is None:
        used, per_image = face_detect.detect_batch(rgbs, backend, folders, threshold=threshold, max_side=max_side,
                                                   device=device)
    else:
        if len(detections) != len(photos):
            raise ValueError(f"detections has {len(detections)} lists for {len(photos)} photos; give one per photo")
        used, per_image = (backend if backend != "auto" else "given"), [list(d) for d in detections]
    faceset = face.build_faceset(per_image, sizes, selection, indices=list(indices), masks=list(masks),
                                 min_size=min_size, max_faces=max_faces, order=order, backend=used)
    crops = face.crop_faces(rgbs, faceset, crop_size)[..., :3]
    if len(faceset):
        restored = _check_restored(restore_crops(crops.copy()), len(faceset))
        pasted, paste_masks, restored = fix_and_paste(rgbs, restored, faceset, color_fix=color_fix, feather=feather,
                                                      reference=crops)
    else:
        restored = np.zeros((0, crop_size, crop_size, 3), np.float32)
        pasted, paste_masks = [rgb.copy() for rgb in rgbs], [np.zeros(s, np.float32) for s in sizes]

    results, start = [], 0
    for i, (photo, (_, alpha, gray)) in enumerate(zip(photos, split)):
        mine = tuple(dataclasses.replace(f, image_index=0) for f in faceset.faces if f.image_index == i)
        notes = tuple(n for n in faceset.notes if n.startswith(f"photo {i}:"))
        one = FaceSet(mine, (tuple(sizes[i]),), (faceset.detected[i],), used, order, notes)
        numbered = face.numbered_detections(per_image[i], faceset, i, min_size, order)
        warns = [n.split(": ", 1)[1] for n in notes]
        if not per_image[i]:
            warns.append(f"no face found ({used}); the photo is unchanged")
        elif not mine:
            warns.append(f"{len(per_image[i])} face(s) detected, none selected (selection {selection}"
                         + (f" {list(indices)}" if selection == "index" else "") + "); the photo is unchanged")
        if selection == "index":
            missing = sorted(j for j in set(indices) if j >= len(numbered))
            if missing and numbered:
                warns.append(f"face number(s) {missing} do not exist in this photo ({len(numbered)} face(s), "
                             f"numbered 0..{len(numbered) - 1})")
        photo_out = merge_channels(pasted[i], alpha, gray, photo, paste_masks[i])
        n = len(mine)
        results.append(PhotoResult(photo_out, paste_masks[i], one, numbered, crops[start:start + n],
                                   restored[start:start + n], used, np.asarray(photo), warns))
        start += n
    return results


def restore_photo(photo: np.ndarray, restore_crops: RestoreCrops, **kwargs) -> PhotoResult:
    """:func:`restore_photo_batch` for one photo."""
    return restore_photo_batch([photo], restore_crops, **kwargs)[0]


# ------------------------------------------------------------------------------------------------------ files
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
           7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1], 8: lambda a: np.swapaxes(a, 0, 1)[::-1]}


def read_photo(path: str | Path) -> tuple[np.ndarray, int]:
    """An image file -> (float32 (H, W, C) in [0, 1] with C = 1, 2, 3 or 4 as stored, bit depth 8 or 16).

    EXIF orientation is applied; 16-bit PNG/TIFF keep their precision (gray, RGB, RGBA); palette images become RGB
    (RGBA with transparency); other modes (CMYK, YCbCr, 1-bit) become RGB or gray. A missing, unreadable or corrupt
    file raises :class:`.image_io.ImageFolderError` naming the file.
    """
    path = image_io.require_image_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                sixteen = any(";16" in str(t[3]) for t in (im.tile or ()))  # before getexif(), which loads
                orientation = int(im.getexif().get(0x0112, 1) or 1)
                deep = None
                if sixteen and not im.mode.startswith("I"):
                    # PIL decodes 16-bit RGB(A) / LA PNG and TIFF to 8 bits; OpenCV keeps all 16
                    probe = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
                    if probe is not None and probe.dtype == np.uint16:
                        deep = probe
                if deep is not None:
                    arr = deep if deep.ndim == 3 else deep[..., None]
                    if arr.shape[2] == 3:
                        arr = arr[..., ::-1]
                    elif arr.shape[2] == 4:
                        arr = arr[..., [2, 1, 0, 3]]
                    arr = _ORIENT.get(orientation, lambda a: a)(arr)
                    return np.ascontiguousarray(arr.astype(np.float32) / np.float32(65535.0)), 16
                im = ImageOps.exif_transpose(im)
                if im.mode.startswith("I;16") or im.mode == "I":
                    a = np.asarray(im, dtype=np.float64)
                    scale = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
                    bits = 16 if scale > 255 else 8
                    return np.ascontiguousarray((np.clip(a, 0, scale) / scale).astype(np.float32)[..., None]), bits
                if im.mode == "F":
                    a = np.asarray(im, dtype=np.float32)
                    return np.ascontiguousarray(np.clip(a / max(float(a.max()), 1.0), 0, 1)[..., None]), 16
                has_alpha = "A" in im.mode or "transparency" in im.info
                if im.mode in ("1", "L", "LA", "La") or (im.mode == "P" and _palette_is_gray(im)):
                    target = "LA" if has_alpha else "L"
                else:
                    target = "RGBA" if has_alpha else "RGB"
                if im.mode != target:
                    im = im.convert(target)
                a = np.array(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageFolderError(f"Cannot read image {str(path)!r} ({exc}); the file is corrupt or not an image. Delete "
                               "or replace it.") from exc
    if a.ndim == 2:
        a = a[..., None]
    return np.ascontiguousarray(a.astype(np.float32) / np.float32(255.0)), 8


def _palette_is_gray(im: Image.Image) -> bool:
    pal = im.getpalette() or []
    rgb = np.asarray(pal[: len(pal) // 3 * 3]).reshape(-1, 3)
    return bool(len(rgb)) and bool((rgb == rgb[:, :1]).all())


def write_photo(path: str | Path, photo: np.ndarray, bits: int = 8) -> Path:
    """Write a photo (H, W, C) float in [0, 1] as PNG with ``bits`` 8 or 16 per channel, atomically (temporary
    file, then rename; folders created). Channels as given: gray, gray + alpha (written as RGBA), RGB, RGBA. The
    rounding is round-half-even of x * (2^bits - 1), so a photo read by :func:`read_photo` is written back with the
    same values."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits!r}")
    path = Path(path)
    arr = np.asarray(photo, np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 2:  # PNG via OpenCV has no gray + alpha: RGBA
        arr = np.concatenate([np.repeat(arr[..., :1], 3, axis=2), arr[..., 1:]], axis=2)
    top = 65535.0 if bits == 16 else 255.0
    q = np.clip(np.rint(np.nan_to_num(arr, nan=0.0) * np.float32(top)), 0, top).astype(np.uint16 if bits == 16
                                                                                       else np.uint8)
    if q.shape[2] == 3:
        q = q[..., ::-1]
    elif q.shape[2] == 4:
        q = q[..., [2, 1, 0, 3]]
    ok, data = cv2.imencode(".png", np.ascontiguousarray(q), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
