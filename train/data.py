"""Training data for FlipNet (§4.2, §5.1): FFHQ-style face folders with on-the-fly or off-shelf LQ, and paired
real-world folders (Dense-Haze, LOL, SIDD, RealBlur) for degradation mode.

Every item is a dict ``{"hq": (3,S,S), "lq": (3,S,S), "has_lq": bool, "caption": str, "name": str}`` with images in
[0, 1]. ``has_lq = False`` means "make the LQ on the fly": the training loop calls :func:`fill_lq_on_the_fly` on the
device, which degrades those rows with ``pipelines/degradation.py`` (preset ``flipnet``: Eq. 9 applied twice in
shuffled order) and keeps the off-shelf/paired rows.

Off-shelf LQ folders (``bfr synthesize`` output) hold ``<hq stem>_<k>.png`` (or ``<hq stem>.png``); each item picks one
variant at random. On-the-fly and off-shelf LQ are mixed per sample with probability ``offshelf_prob`` (paper: 0.5).

Captions come from an optional sidecar: a JSON object ``{"file name or relative path or stem": "caption"}``, JSON
lines ``{"file": ..., "caption": ...}``, or ``file<TAB>caption`` lines. Missing captions are empty prompts.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..pipelines import degradation
from ..pipelines.image_io import ImageFolderError, list_images, load_image, resize_square

logger = logging.getLogger(__name__)

PAIRED_LAYOUTS = ("auto", "hq-lq", "lol", "dense-haze", "sidd", "realblur")


class DatasetError(ImageFolderError):
    """A dataset folder or file is missing, empty, unpaired or unreadable; the message names it and the fix."""


# --------------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------------


def random_crop_pair(a: torch.Tensor, b: torch.Tensor, size: int, rng: random.Random
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random ``size`` x ``size`` window from two aligned images (shorter side resized up if needed)."""
    if a.shape[-2:] != b.shape[-2:]:
        h, w = a.shape[-2:]
        b = torch.nn.functional.interpolate(b[None], size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    h, w = a.shape[-2:]
    short = min(h, w)
    if short < size:
        scale = size / short
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        a = torch.nn.functional.interpolate(a[None], size=(nh, nw), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        b = torch.nn.functional.interpolate(b[None], size=(nh, nw), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        h, w = nh, nw
    top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    return a[:, top:top + size, left:left + size], b[:, top:top + size, left:left + size]


def load_captions(path: str | Path | None) -> dict[str, str]:
    """Read a caption sidecar (JSON object, JSON lines, or TSV) into ``{key: caption}``."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Caption file {str(path)!r} does not exist; pass a JSON/JSONL/TSV sidecar or omit it.")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"Caption file {str(path)!r} is not valid JSON ({exc.msg}, line {exc.lineno}).") from exc
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise DatasetError(f"Caption file {str(path)!r} must be a JSON object {{file: caption}} of strings.")
        return dict(data)
    captions = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                row = json.loads(line)
                key = row.get("file") or row.get("file_name") or row["image"]
                captions[str(key)] = str(row.get("caption", row.get("text", "")))
            except (json.JSONDecodeError, KeyError, AttributeError) as exc:
                raise DatasetError(f"Caption file {str(path)!r} line {n} is not a JSON object with 'file' and "
                                   f"'caption': {line[:80]!r}.") from exc
        else:
            if "\t" not in line:
                raise DatasetError(f"Caption file {str(path)!r} line {n} has no TAB between file and caption: "
                                   f"{line[:80]!r}. Use 'file<TAB>caption' lines, .json or .jsonl.")
            key, caption = line.split("\t", 1)
            captions[key.strip()] = caption.strip()
    return captions


def caption_for(captions: dict[str, str], path: Path, root: Path) -> str:
    """Look a caption up by relative path, file name, then stem."""
    if not captions:
        return ""
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.name
    for key in (rel, path.name, path.stem):
        if key in captions:
            return captions[key]
    return ""


# --------------------------------------------------------------------------------------------------------------------
# Face folders (restoration mode, face AE, faces in degradation mode)
# --------------------------------------------------------------------------------------------------------------------

def _item_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic per-item seed (independent of PYTHONHASHSEED and of the worker that loads it)."""
    return (seed * 1_000_003 + epoch * 7_919 + index) & 0xFFFFFFFF


_VARIANT = re.compile(r"^(?P<stem>.+)_(?P<k>\d+)$")


def index_offshelf(lq_dir: str | Path, hq_stems: Sequence[str]) -> dict[str, list[Path]]:
    """{HQ stem: [LQ variants]} for an off-shelf folder of ``<stem>_<k>.png`` or ``<stem>.png`` files."""
    stems = set(hq_stems)
    index: dict[str, list[Path]] = {}
    orphans = []
    for p in list_images(lq_dir, "off-shelf LQ folder"):
        m = _VARIANT.match(p.stem)
        if p.stem in stems:
            index.setdefault(p.stem, []).append(p)
        elif m and m.group("stem") in stems:
            index.setdefault(m.group("stem"), []).append(p)
        else:
            orphans.append(p.name)
    if not index:
        raise DatasetError(f"No file in off-shelf LQ folder {str(lq_dir)!r} matches an HQ image (expected "
                           f"'<hq stem>_<k>.png', e.g. '{next(iter(stems), '00000')}_0.png'; found e.g. {orphans[:3]}). "
                           "Was it synthesized from this HQ folder?")
    if orphans:
        logger.warning("%d off-shelf LQ files match no HQ image and are ignored (e.g. %s).", len(orphans), orphans[:3])
    return index


class FaceFolderDataset(Dataset):
    """HQ faces (FFHQ-style folder) + per-sample choice of off-shelf LQ (p = ``offshelf_prob``) or on-the-fly LQ."""

    def __init__(
        self,
        hq_dir: str | Path,
        size: int = 512,
        captions: str | Path | None = None,
        offshelf_dir: str | Path | None = None,
        offshelf_prob: float = 0.5,
        max_images: int | None = None,
        seed: int = 0,
    ):
        if size < 8 or size % 8:
            raise DatasetError(f"Training size must be a positive multiple of 8, got {size}.")
        if not 0.0 <= offshelf_prob <= 1.0:
            raise DatasetError(f"offshelf_prob must be in [0, 1], got {offshelf_prob}.")
        self.root = Path(hq_dir)
        files = list_images(self.root, "HQ face folder")
        if max_images is not None:
            if max_images <= 0:
                raise DatasetError(f"max_images must be positive, got {max_images}.")
            rng = random.Random(seed)
            files = sorted(rng.sample(files, min(max_images, len(files))))
        self.files = files
        self.size = size
        self.captions = load_captions(captions)
        self.offshelf = index_offshelf(offshelf_dir, [p.stem for p in files]) if offshelf_dir else {}
        self.offshelf_prob = offshelf_prob if self.offshelf else 0.0
        self.seed = seed
        self.epoch = 0
        if self.offshelf:
            logger.info("Face folder %s: %d images, %d with off-shelf LQ (p=%.2f).", hq_dir, len(files),
                        len(self.offshelf), self.offshelf_prob)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        rng = random.Random(_item_seed(self.seed, self.epoch, i))
        hq = resize_square(load_image(path), self.size)
        variants = self.offshelf.get(path.stem)
        if variants and rng.random() < self.offshelf_prob:
            lq = resize_square(load_image(rng.choice(variants)), self.size)
            has_lq = True
        else:
            lq = torch.zeros_like(hq)
            has_lq = False
        return {"hq": hq, "lq": lq, "has_lq": has_lq, "caption": caption_for(self.captions, path, self.root),
                "name": path.stem}


# --------------------------------------------------------------------------------------------------------------------
# Paired real-world folders (degradation mode)
# --------------------------------------------------------------------------------------------------------------------


def _subdir(root: Path, *names: str) -> Path | None:
    lower = {p.name.lower(): p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
    for name in names:
        if name.lower() in lower:
            return lower[name.lower()]
    return None


def detect_layout(root: str | Path) -> str:
    """Guess the paired layout of ``root`` (see :data:`PAIRED_LAYOUTS`)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Paired dataset folder {str(root)!r} does not exist.")
    if _subdir(root, "hq") and _subdir(root, "lq"):
        return "hq-lq"
    if _subdir(root, "low") and _subdir(root, "high"):
        return "lol"
    if _subdir(root, "hazy") and _subdir(root, "gt"):
        return "dense-haze"
    if any(p.name.upper().startswith("NOISY_SRGB") for p in root.rglob("*") if p.is_file()):
        return "sidd"
    if any(p.is_dir() and p.name.lower() == "blur" for p in root.rglob("*")):
        return "realblur"
    raise DatasetError(f"Cannot recognise the layout of {str(root)!r}. Expected hq/ + lq/, low/ + high/ (LOL), hazy/ + "
                       "GT/ (Dense-Haze), NOISY_SRGB_* + GT_SRGB_* (SIDD) or <scene>/blur + <scene>/gt (RealBlur); "
                       "or give the layout explicitly as PATH:LAYOUT.")


def _pair_by_key(lq_files: list[Path], hq_files: list[Path], lq_key, hq_key, root: Path
                 ) -> tuple[list[tuple[Path, Path]], list[str]]:
    hq = {hq_key(p): p for p in hq_files}
    pairs, unpaired = [], []
    for p in lq_files:
        partner = hq.get(lq_key(p))
        if partner is None:
            unpaired.append(str(p.relative_to(root)))
        else:
            pairs.append((p, partner))
    return pairs, unpaired


def find_pairs(root: str | Path, layout: str = "auto") -> list[tuple[Path, Path]]:
    """(LQ, HQ) file pairs of a paired real-world dataset; raises on empty folders and on unpaired LQ files."""
    root = Path(root)
    if layout not in PAIRED_LAYOUTS:
        raise DatasetError(f"Paired layout {layout!r} is not one of {PAIRED_LAYOUTS}.")
    if layout == "auto":
        layout = detect_layout(root)
    if layout in ("hq-lq", "lol"):
        lq_dir = _subdir(root, "lq" if layout == "hq-lq" else "low")
        hq_dir = _subdir(root, "hq" if layout == "hq-lq" else "high")
        if lq_dir is None or hq_dir is None:
            raise DatasetError(f"{str(root)!r} lacks the {layout} sub-folders ({'lq/ and hq/' if layout == 'hq-lq' else 'low/ and high/'}).")
        pairs, unpaired = _pair_by_key(list_images(lq_dir, f"{layout} LQ folder"), list_images(hq_dir, f"{layout} HQ folder"),
                                       lambda p: p.stem, lambda p: p.stem, root)
    elif layout == "dense-haze":
        lq_dir, hq_dir = _subdir(root, "hazy"), _subdir(root, "gt")
        if lq_dir is None or hq_dir is None:
            raise DatasetError(f"{str(root)!r} lacks Dense-Haze's hazy/ and GT/ sub-folders.")
        strip = re.compile(r"_(hazy|gt)$", re.IGNORECASE)
        pairs, unpaired = _pair_by_key(list_images(lq_dir, "Dense-Haze hazy folder"),
                                       list_images(hq_dir, "Dense-Haze GT folder"),
                                       lambda p: strip.sub("", p.stem), lambda p: strip.sub("", p.stem), root)
    elif layout == "sidd":
        files = list_images(root, "SIDD folder", recursive=True)
        noisy = [p for p in files if p.name.upper().startswith("NOISY_")]
        gt = [p for p in files if p.name.upper().startswith("GT_")]
        pairs, unpaired = _pair_by_key(noisy, gt, lambda p: (p.parent, p.name.upper()[len("NOISY_"):]),
                                       lambda p: (p.parent, p.name.upper()[len("GT_"):]), root)
    else:  # realblur
        files = list_images(root, "RealBlur folder", recursive=True)
        blur = [p for p in files if p.parent.name.lower() == "blur"]
        gt = [p for p in files if p.parent.name.lower() == "gt"]
        key = re.compile(r"^(blur|gt)_?", re.IGNORECASE)
        pairs, unpaired = _pair_by_key(blur, gt, lambda p: (p.parent.parent, key.sub("", p.stem)),
                                       lambda p: (p.parent.parent, key.sub("", p.stem)), root)
    if unpaired:
        raise DatasetError(f"{len(unpaired)} LQ files in {str(root)!r} ({layout} layout) have no HQ partner, e.g. "
                           f"{unpaired[:3]}. Remove them or fix the names so each LQ file has its GT.")
    if not pairs:
        raise DatasetError(f"No (LQ, HQ) pairs found in {str(root)!r} with the {layout} layout.")
    return pairs


def parse_paired_spec(spec: str) -> tuple[str, str, int | None]:
    """``PATH[:LAYOUT[:MAX_PAIRS]]`` -> (path, layout, max_pairs); e.g. ``/data/SIDD:sidd:1000`` (§4.2 subsets)."""
    parts = spec.split(":")
    path, layout, max_pairs = parts[0], "auto", None
    if len(parts) >= 2 and parts[1]:
        layout = parts[1]
    if len(parts) >= 3 and parts[2]:
        try:
            max_pairs = int(parts[2])
        except ValueError as exc:
            raise DatasetError(f"Paired dataset spec {spec!r}: MAX_PAIRS must be an integer.") from exc
    if len(parts) > 3:
        raise DatasetError(f"Paired dataset spec {spec!r} must be PATH[:LAYOUT[:MAX_PAIRS]].")
    if layout not in PAIRED_LAYOUTS:
        raise DatasetError(f"Paired dataset spec {spec!r}: layout {layout!r} is not one of {PAIRED_LAYOUTS}.")
    return path, layout, max_pairs


class PairedFolderDataset(Dataset):
    """Aligned (LQ, HQ) real-world pairs with a shared random ``size`` crop; ``has_lq`` is always True."""

    def __init__(self, root: str | Path, layout: str = "auto", size: int = 512, captions: str | Path | None = None,
                 max_pairs: int | None = None, seed: int = 0):
        self.root = Path(root)
        pairs = find_pairs(self.root, layout)
        if max_pairs is not None and max_pairs < len(pairs):
            pairs = sorted(random.Random(seed).sample(pairs, max_pairs))
        self.pairs = pairs
        self.size = size
        self.captions = load_captions(captions)
        self.seed = seed
        self.epoch = 0
        logger.info("Paired folder %s: %d pairs.", root, len(pairs))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        lq_path, hq_path = self.pairs[i]
        rng = random.Random(_item_seed(self.seed, self.epoch, i) ^ 0x5A5A)
        hq, lq = random_crop_pair(load_image(hq_path), load_image(lq_path), self.size, rng)
        return {"hq": hq, "lq": lq, "has_lq": True, "caption": caption_for(self.captions, hq_path, self.root),
                "name": hq_path.stem}


@dataclass
class DegradationBatchConfig:
    """Which classical preset makes on-the-fly LQ (``pipelines/degradation.py``)."""

    preset: str = "flipnet"
    backend: str = "torch"


def degrade_on_the_fly(hq: torch.Tensor, seed: int, cfg: DegradationBatchConfig | None = None) -> torch.Tensor:
    """Classical LQ from HQ (Eq. 9, second order, shuffled) via ``pipelines.degradation``; (B,3,H,W) in [0, 1]."""
    cfg = cfg or DegradationBatchConfig()
    config = degradation.get_preset(cfg.preset)
    lq, _params = degradation.degrade(hq, config, seed=seed, backend=cfg.backend)
    if lq.shape != hq.shape:
        raise RuntimeError(f"Degradation preset {cfg.preset!r} returned shape {tuple(lq.shape)} for input "
                           f"{tuple(hq.shape)}; LQ must be resized back to the input size.")
    return lq.to(hq.dtype).clamp(0.0, 1.0)


def fill_lq_on_the_fly(batch: dict, seed: int, cfg: DegradationBatchConfig | None = None, degrade_fn=None
                       ) -> torch.Tensor:
    """LQ for a collated batch: rows with ``has_lq`` keep theirs, the others are degraded on the fly."""
    hq, lq = batch["hq"], batch["lq"]
    has = torch.as_tensor(batch["has_lq"], dtype=torch.bool, device=hq.device)
    if bool(has.all()):
        return lq
    fn = degrade_fn or (lambda x, s: degrade_on_the_fly(x, s, cfg))
    need = (~has).nonzero().flatten()
    made = fn(hq[need], seed)
    out = lq.clone()
    out[need] = made.to(out.dtype)
    return out
