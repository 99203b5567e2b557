"""Evaluation test sets: seeded LQ/HQ pairs from any HQ folder (CelebA-Test style), and LQ-only real-world folders.

A test set folder holds ``hq/<name>.png``, ``lq/<name>.png`` and ``testset.json``: the preset and its full
configuration, the base seed, the size and, per pair, the derived seed and every sampled degradation parameter
(:func:`.degradation.sample_params`), so any pair can be regenerated and a paper's split is documented. The seed of a
pair depends only on (seed, relative path) (:func:`.degrade_folder.derive_seed`), not on the other files.

``faces=True``: every HQ file is a whole photo; faces are detected (:func:`.face_detect.detect`), the largest one
(or all) aligned to the FFHQ template (:func:`.face.build_faceset` + :func:`.face.crop_faces`) at ``size`` px, and
the aligned crop is the HQ image, as CelebA-Test / FFHQ crops are made.

:func:`read_testset` reads such a folder, an ``lq/`` + ``hq/`` folder pair without the JSON (paired by stem), or any
folder of images as an LQ-only set (WIDER-Test, LFW-Test, WebPhoto-Test: no HQ, so only no-reference metrics).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import face, face_detect
from .degrade_folder import SAMPLER_VERSION, _resize_hq, derive_seed
from .degradation import degrade_numpy, get_preset, sample_params
from .image_io import list_images, prepare_output_folder, read_rgb, save_png, to_uint8

logger = logging.getLogger(__name__)

TESTSET_JSON = "testset.json"
FORMAT = 1


@dataclass(frozen=True)
class Pair:
    """One evaluation item: a name (unique in the set), the LQ file, the HQ file (None for LQ-only sets)."""

    name: str
    lq: Path
    hq: Path | None = None


@dataclass(frozen=True)
class TestSet:
    root: Path
    pairs: tuple[Pair, ...]
    info: dict

    @property
    def has_hq(self) -> bool:
        return bool(self.pairs) and all(p.hq is not None for p in self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


def _name(rel: Path) -> str:
    """A flat, unique file stem for a relative path (``a/b.jpg`` -> ``a__b``)."""
    return "__".join(rel.with_suffix("").parts)


def _aligned_faces(photo: np.ndarray, size: int, which: str, detector: str, folders) -> list[np.ndarray]:
    used, dets = face_detect.detect(photo, detector, folders)
    fs = face.build_faceset([dets], [photo.shape[:2]], "largest" if which == "largest" else "all", backend=used)
    if not len(fs):
        return []
    crops = face.crop_faces([photo.astype(np.float32) / 255.0], fs, size)
    return [to_uint8(c) for c in crops]


def make_testset(hq_dir, out_dir, preset: str = "dr2-medium-x8", seed: int = 0, size: int | None = 512,
                 faces: bool = False, which_faces: str = "largest", detector: str = "auto",
                 face_models=(), overrides: dict | None = None, limit: int = 0) -> TestSet:
    """Write ``out_dir/{hq,lq}/<name>.png`` + ``testset.json`` from the images of ``hq_dir`` (recursive).

    ``size``: HQ resized (squares to size x size, else shorter side) before degrading; None keeps it. With
    ``faces`` the aligned crops are ``size`` px (default 512) and ``which_faces`` is ``largest`` or ``all``
    (``<name>_<k>``). ``limit`` > 0 keeps the first that many files (sorted order). Existing pairs are rewritten
    identically (deterministic)."""
    if which_faces not in ("largest", "all"):
        raise ValueError(f"which_faces must be 'largest' or 'all', got {which_faces!r}")
    cfg = get_preset(preset)
    if overrides:
        if not isinstance(overrides, dict):
            raise ValueError(f"overrides must be a dict of DegradationConfig fields, got {type(overrides).__name__}")
        cfg = cfg.with_overrides(**overrides)
    src = Path(hq_dir)
    files = list_images(src, "HQ folder", recursive=True)
    if limit:
        files = files[:int(limit)]
    out = prepare_output_folder(out_dir)
    (out / "hq").mkdir(exist_ok=True)
    (out / "lq").mkdir(exist_ok=True)
    records, skipped = [], []
    for path in files:
        rel = path.relative_to(src)
        try:
            img = read_rgb(path)
        except (OSError, ValueError) as exc:
            skipped.append({"source": rel.as_posix(), "why": f"{type(exc).__name__}: {exc}"})
            logger.warning("skipping %s: %s", path, exc)
            continue
        if faces:
            crops = _aligned_faces(img, size or face.TEMPLATE_SIZE, which_faces, detector, face_models)
            if not crops:
                skipped.append({"source": rel.as_posix(), "why": "no face detected"})
                logger.warning("no face found in %s; skipped", path)
                continue
            items = [(f"{_name(rel)}_{k}" if which_faces == "all" else _name(rel), c, k) for k, c in enumerate(crops)]
        else:
            items = [(_name(rel), _resize_hq(img, size) if size else img, 0)]
        for name, hq, k in items:
            pair_seed = derive_seed(seed, rel.as_posix(), k)
            params = sample_params(cfg, 1, pair_seed, hq.shape[0], hq.shape[1])[0]
            lq = degrade_numpy(hq, params)
            save_png(out / "hq" / f"{name}.png", hq)
            save_png(out / "lq" / f"{name}.png", lq)
            records.append({"name": name, "source": rel.as_posix(), "face": k if faces else None,
                            "hq": f"hq/{name}.png", "lq": f"lq/{name}.png", "size": list(hq.shape[:2]),
                            "seed": pair_seed, "params": params})
    if not records:
        raise ValueError(f"no pair was made from {src}: {skipped[:3]}")
    info = {"format": FORMAT, "kind": "paired", "preset": preset, "config": cfg.to_dict(), "overrides": overrides,
            "seed": int(seed), "size": size, "faces": bool(faces), "which_faces": which_faces if faces else None,
            "detector": detector if faces else None, "sampler_version": SAMPLER_VERSION,
            "source": str(src.resolve()), "pairs": records, "skipped": skipped}
    (out / TESTSET_JSON).write_text(json.dumps(info, indent=1, default=_jsonable), encoding="utf-8")
    logger.info("test set %s: %d pairs (%s, seed %d), %d source(s) skipped", out, len(records), preset, seed,
                len(skipped))
    return read_testset(out)


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def read_testset(root) -> TestSet:
    """A test set folder (``testset.json``), an ``lq/`` + ``hq/`` pair of folders, or any image folder (LQ only)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"test set {root} is not a folder; make one with `bfr make-testset HQ_DIR {root}` "
                                "or pass a folder of LQ images")
    meta = root / TESTSET_JSON
    if meta.is_file():
        info = json.loads(meta.read_text(encoding="utf-8"))
        pairs = tuple(Pair(r["name"], root / r["lq"], root / r["hq"] if r.get("hq") else None)
                      for r in info["pairs"])
        missing = [str(p.lq) for p in pairs if not p.lq.is_file()] + [str(p.hq) for p in pairs
                                                                       if p.hq is not None and not p.hq.is_file()]
        if missing:
            raise FileNotFoundError(f"test set {root}: {len(missing)} file(s) listed in {TESTSET_JSON} are missing, "
                                    f"e.g. {missing[0]}; rerun bfr make-testset")
        return TestSet(root, pairs, {k: v for k, v in info.items() if k != "pairs"})
    if (root / "lq").is_dir():
        lqs = list_images(root / "lq", "LQ folder", recursive=True)
        hq_dir = root / "hq"
        hq_by_name = ({_name(p.relative_to(hq_dir)): p for p in list_images(hq_dir, "HQ folder", recursive=True)}
                      if hq_dir.is_dir() else {})
        pairs = tuple(Pair(_name(p.relative_to(root / "lq")), p, hq_by_name.get(_name(p.relative_to(root / "lq"))))
                      for p in lqs)
        kind = "paired" if hq_by_name and all(p.hq for p in pairs) else "lq-only"
        return TestSet(root, pairs, {"kind": kind, "source": str(root)})
    lqs = list_images(root, "LQ folder", recursive=True)
    return TestSet(root, tuple(Pair(_name(p.relative_to(root)), p) for p in lqs),
                   {"kind": "lq-only", "source": str(root)})


__all__ = ["Pair", "TESTSET_JSON", "TestSet", "make_testset", "read_testset"]
