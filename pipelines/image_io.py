"""Image files and uint8 conversion: the one place the pack reads, lists and writes images.

Every command and trainer uses these, so one set of extensions, one EXIF/alpha/16-bit rule and one rounding rule
(round half to even of x * 255, clipped) hold everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class ImageFolderError(ValueError):
    """A missing or empty image folder, or an unreadable image; the message names the path and the fix."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def list_images(folder: str | Path, what: str = "image folder", *, recursive: bool = False,
                exclude: Path | None = None, allow_empty: bool = False) -> list[Path]:
    """Sorted image files of ``folder`` (recursive on request), skipping anything inside ``exclude``."""
    folder = Path(folder)
    if not folder.is_dir():
        kind = "is a file, not a folder" if folder.is_file() else "does not exist"
        raise ImageFolderError(f"{what} {str(folder)!r} {kind}; pass a folder of images.")
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in it if is_image_file(p) and not (exclude is not None and exclude in p.parents))
    if not files and not allow_empty:
        raise ImageFolderError(f"{what} {str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}). Point it at "
                               "the folder that " + ("contains" if recursive else "directly contains") + " the images.")
    return files


def read_jsonl_report(report: Path, fresh_start: str) -> list[dict]:
    """The records of a resumable JSONL report ([] when absent). A truncated last line (an interrupted run) is
    dropped from the file with a warning; a corrupt line is an error that says to delete the file or use
    ``fresh_start`` (the caller's way to start over, e.g. ``--no-resume``)."""
    if not report.exists():
        return []
    data = report.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        logger.warning("%s ends with a truncated line (interrupted run); dropping it", report)
        with open(report, "r+b") as fh:
            fh.truncate(cut)
        data = data[:cut]
    records = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{report}:{n} is not valid JSON ({exc.msg}); delete the file or use {fresh_start}") \
                from exc
    return records


def require_image_file(path: str | Path) -> Path:
    """``path`` as a Path if it is a file; else an :class:`ImageFolderError` saying what it is instead."""
    path = Path(path)
    if not path.is_file():
        kind = "is a folder, not an image file" if path.is_dir() else "does not exist"
        raise ImageFolderError(f"image {str(path)!r} {kind}; pass an image file ({', '.join(IMAGE_EXTENSIONS)}).")
    return path


def read_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    """uint8 RGB HWC (a fresh, writable array): EXIF orientation applied, alpha dropped (not composited), gray
    replicated, 16-bit scaled to 8-bit (round(v * 255 / 65535)); optionally resized to a ``size`` square
    (:func:`resize_uint8`). Missing or unreadable files raise :class:`ImageFolderError`."""
    path = require_image_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                if im.mode.startswith("I;16") or im.mode == "I":
                    arr = np.asarray(im, dtype=np.float64)
                    # "I;16*" is 16-bit; plain "I" (32-bit) holds 16-bit data from some codecs, or 8-bit values
                    scale = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
                    gray = np.clip(np.rint(arr * (255.0 / scale)), 0, 255).astype(np.uint8)
                    arr = np.repeat(gray[..., None], 3, axis=-1)
                else:
                    if im.mode != "RGB":
                        im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
                    arr = np.array(im)[..., :3]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageFolderError(f"Cannot read image {str(path)!r} ({exc}); the file is corrupt or not an image. Delete "
                               "or replace it.") from exc
    if size:
        arr = resize_uint8(arr, size, size)
    return np.ascontiguousarray(arr)


def resize_uint8(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 HWC -> (height, width) with PIL bicubic (antialiased when shrinking); unchanged when already that size."""
    if arr.shape[:2] == (height, width):
        return arr
    return np.array(Image.fromarray(np.ascontiguousarray(arr)).resize((width, height), Image.Resampling.BICUBIC))


def from_uint8(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float tensor (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Image file -> float tensor (3, H, W) in [0, 1] (see :func:`read_rgb`)."""
    return from_uint8(read_rgb(path, size))


def to_uint8(image) -> np.ndarray:
    """A float image in [0, 1] (or a uint8 array) -> uint8 HWC RGB.

    Layout: a tensor is (C,H,W) when its first axis has 1 or 3 entries (the pack's convention), else (H,W,C); an
    array is (H,W,C) when its last axis has 1 or 3 entries, else (C,H,W); 2-D is gray. The one rounding rule:
    round half to even of ``x * 255`` in float32, clipped to [0, 255]; NaN -> 0, +-inf -> 255 / 0."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        arr = (arr if arr.dtype == torch.uint8 else arr.float()).numpy()
        chw = arr.ndim == 3 and arr.shape[0] in (1, 3)
    else:
        arr = np.asarray(image)
        chw = arr.ndim == 3 and arr.shape[-1] not in (1, 3) and arr.shape[0] in (1, 3)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"to_uint8 takes one image (C,H,W), (H,W,C) or (H,W), got shape {arr.shape}; index the "
                         "batch first.")
    if chw:
        arr = np.transpose(arr, (1, 2, 0))
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"to_uint8 takes float images in [0, 1] or uint8, got dtype {arr.dtype}; scale integer "
                             "images to [0, 1] first (e.g. x / 65535 for 16-bit).")
        arr = np.nan_to_num(arr.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
        arr = np.clip(np.rint(arr * np.float32(255.0)), 0, 255).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


def save_png(path: str | Path, image) -> Path:
    """Write an image (see :func:`to_uint8`) as PNG atomically (a temporary file, then rename); creates folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        Image.fromarray(to_uint8(image)).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def prepare_output_folder(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (and parents) and check it is a writable folder; the error names the path and the fix."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output {out_dir} is an existing file, not a folder; pass a folder path.")
    above = next((p for p in out_dir.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise NotADirectoryError(f"cannot create the output folder {out_dir}: {above} is a file; pass a folder path "
                                 "that is not inside a file.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".bfr-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"cannot write into the output folder {out_dir} ({exc.strerror or exc}); choose a "
                              "folder you can write to.") from exc
    return out_dir


def resize_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (3,H,W) to (3,size,size) with antialiased bicubic (FFHQ 1024 -> 512)."""
    if img.shape[-2:] == (size, size):
        return img
    out = F.interpolate(img[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp(0.0, 1.0)


def image_grid(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """Rows of (3,H,W) images in [0,1] -> one (3, rows*H, cols*W) image."""
    tiles = [torch.cat([img.float().clamp(0, 1).cpu() for img in row], dim=2) for row in rows]
    return torch.cat(tiles, dim=1)
