"""Folder-level synthesis of LQ training images with the classical degradation (``bfr degrade``; design.md §3.1).

For every HQ image ``in_dir/<rel>/<stem>.<ext>`` (searched recursively, so FFHQ's ``00000/`` sub-folders work) it
writes ``per_image`` LQ versions ``out_dir/<rel>/<stem>_<k>.png`` and one JSON line per output to
``out_dir/params.jsonl`` with every sampled parameter. Properties:

* deterministic: the seed of output (image, k) is derived from (seed, relative path, k), so results do not depend
  on the number of workers, the processing order or on other files in the folder;
* resumable: lines are appended (and flushed) as outputs complete, PNGs are written atomically; on resume an
  output is skipped when its PNG exists and its line is in the report (a truncated last line is dropped; an
  output with a PNG but no line is regenerated, identically). A report made with another configuration or seed
  is refused, so one folder never mixes settings (use ``resume=False`` or another folder);
* parallel: ``workers`` single-threaded processes (default: all cores) forked from a forkserver that imported the
  library once (``set_forkserver_preload`` with this module), or spawned where forkserver does not exist; if the
  pool cannot run, the remaining images are processed in this process (logged);
* unreadable / corrupt images are skipped, logged and listed under ``"failed"`` in the returned summary; a
  missing or empty input folder raises. Alpha is dropped, gray is replicated to RGB, 16-bit is reduced to 8-bit;
* ``size`` resizes HQ images first (PIL bicubic, antialiased): square images to ``size`` x ``size``, others so the
  shorter side is ``size``; the resized HQ image is saved to ``out_dir/hq/<rel>/<stem>.png`` (``save_hq``) so the
  pairs match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import numpy as np

from .degradation import DegradationConfig, degrade_numpy, get_preset, sample_params
from .image_io import (IMAGE_EXTENSIONS, list_images, prepare_output_folder, read_jsonl_report, read_rgb, resize_uint8,
                       save_png)

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "REPORT_NAME", "degrade_folder", "derive_seed", "list_images"]

REPORT_NAME = "params.jsonl"
HQ_DIR = "hq"


def derive_seed(seed: int, rel_path: str, k: int) -> int:
    """Seed of output ``k`` of image ``rel_path`` (posix, relative to the input folder); < 2**53 (JSON-safe)."""
    digest = hashlib.sha256(f"{int(seed)}\0{rel_path}\0{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**53 - 1)


# Bumped whenever the same config and seed give other pixels (2: a blur after the downsample acts in the LR grid,
# area resizes on torch's kernel), so a resumed folder never mixes outputs of two sampler versions.
SAMPLER_VERSION = 2


def config_hash(config: DegradationConfig) -> str:
    payload = {"config": config.to_dict(), "sampler_version": SAMPLER_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _resize_hq(img: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` (squares to ``size`` x ``size``), with the image module's one resize rule."""
    h, w = img.shape[:2]
    if h == w:
        nh = nw = size
    elif h < w:
        nh, nw = size, max(1, round(w * size / h))
    else:
        nh, nw = max(1, round(h * size / w)), size
    return resize_uint8(img, nh, nw)


def _pool_context():
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


def _worker_init() -> None:
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


@contextlib.contextmanager
def _single_thread():
    """One intra-op thread while working in-process (per-image ops are small), restored afterwards."""
    import cv2
    import torch

    before = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


def _process_image(task: dict) -> dict:
    """Degrade one HQ image into its pending outputs; never raises (errors are returned)."""
    cpu0 = time.process_time()
    src, rel, out_dir = Path(task["src"]), task["rel"], Path(task["out_dir"])
    result = {"rel": rel, "outputs": [], "error": None, "cpu_seconds": 0.0}
    try:
        hq = read_rgb(src)
        hq_rel = None
        if task["size"]:
            hq = _resize_hq(hq, task["size"])
            if task["save_hq"]:
                hq_rel = (Path(HQ_DIR) / Path(rel).with_suffix(".png")).as_posix()
                if not (out_dir / hq_rel).exists():
                    save_png(out_dir / hq_rel, hq)
        h, w = hq.shape[:2]
        for k in task["ks"]:
            seed = derive_seed(task["seed"], rel, k)
            params = sample_params(task["config"], 1, seed, h, w)[0]
            lq = degrade_numpy(hq, params)
            out_rel = Path(rel).with_name(f"{Path(rel).stem}_{k}.png").as_posix()
            save_png(out_dir / out_rel, lq)
            result["outputs"].append({"output": out_rel, "input": rel, "hq": hq_rel, "hq_size": [h, w], "k": k,
                                      "seed": seed, "params": params})
    except Exception as exc:  # a bad file must not stop a 70k-image run: reported in the summary
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["cpu_seconds"] = time.process_time() - cpu0
    return result


def _load_report(report: Path, chash: str, base_seed: int) -> set[str]:
    """Outputs recorded in an existing report; drops a truncated last line; refuses another configuration."""
    done = set()
    for rec in read_jsonl_report(report, "resume=False."):
        if rec.get("config_hash") != chash or rec.get("base_seed") != base_seed:
            raise ValueError(f"{report} was written with another configuration or seed (config_hash "
                             f"{rec.get('config_hash')}, seed {rec.get('base_seed')}; now {chash}, seed {base_seed}). "
                             "Use another out_dir, or resume=False to start over.")
        done.add(rec["output"])
    return done


def _run_pool(tasks: list[dict], n_workers: int, consume: Callable) -> None:
    """Run ``_process_image`` over ``tasks`` in worker processes, feeding results to ``consume`` as they complete.

    Not plain fork: forking a process whose torch/OpenMP pools are running can deadlock. A forkserver that has
    imported the library once forks workers quickly (spawn would re-import torch in every worker); spawn where
    forkserver does not exist. If the pool cannot run (workers die, a task cannot be sent, e.g. a ``__main__`` that
    cannot be re-imported) the remaining images run in this process instead of hanging or failing.
    """
    remaining = dict(enumerate(tasks))

    def results(pool, futures):
        for fut in as_completed(futures):
            res = fut.result()  # raises only if the pool itself failed: _process_image returns its errors
            remaining.pop(futures[fut], None)
            yield res

    try:
        with ProcessPoolExecutor(n_workers, mp_context=_pool_context(), initializer=_worker_init) as pool:
            futures = {pool.submit(_process_image, t): i for i, t in remaining.items()}
            try:
                consume(results(pool, futures))
            except Exception:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    except Exception as exc:  # BrokenProcessPool, pickling/import errors in workers
        logger.warning("worker processes failed (%s: %s); continuing %d image(s) in this process",
                       type(exc).__name__, exc, len(remaining))
        with _single_thread():
            consume(_process_image(t) for t in remaining.values())


def degrade_folder(in_dir, out_dir, preset="flipnet", per_image=5, seed=0, workers=None, overrides=None, size=None,
                   resume=True, *, save_hq: bool = True,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Write ``per_image`` degraded PNGs per HQ image of ``in_dir`` plus a JSONL parameter report; see module doc.

    ``preset`` is a preset name or a ``DegradationConfig``; ``overrides`` a dict for ``with_overrides``.
    ``progress(done, total)`` is called after each HQ image. Returns a JSON-serialisable summary.
    """
    t0 = time.perf_counter()
    in_dir, out_dir = Path(in_dir).expanduser(), Path(out_dir).expanduser()
    if not in_dir.exists():
        raise FileNotFoundError(f"input folder not found: {in_dir}. Pass a folder of HQ face images "
                                f"({', '.join(IMAGE_EXTENSIONS)}).")
    if not in_dir.is_dir():
        raise NotADirectoryError(f"input must be a folder of images, got a file: {in_dir}.")
    config = preset if isinstance(preset, DegradationConfig) else get_preset(preset)
    if overrides:
        if not isinstance(overrides, dict):
            raise ValueError(f"overrides must be a JSON object of DegradationConfig fields, got "
                             f"{type(overrides).__name__}: {overrides!r}.")
        config = config.with_overrides(**overrides)
    for name, value, lo in (("per_image", per_image, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}.")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive integer (pixels) or None, got {size!r}.")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None (all cores), got {workers!r}.")

    out_resolved = out_dir.resolve()
    files = list_images(in_dir, "input folder", recursive=True, allow_empty=True,
                        exclude=out_resolved if in_dir.resolve() in out_resolved.parents else None)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {in_dir}.")
    prepare_output_folder(out_dir)
    report = out_dir / REPORT_NAME
    chash = config_hash(config)
    if resume:
        done = _load_report(report, chash, seed)
    else:
        done = set()
        report.write_text("")

    tasks, skipped = [], 0
    for f in files:
        rel = f.relative_to(in_dir).as_posix()
        ks = []
        for k in range(per_image):
            out_rel = Path(rel).with_name(f"{Path(rel).stem}_{k}.png").as_posix()
            if out_rel in done and (out_dir / out_rel).exists():
                skipped += 1
            else:
                ks.append(k)
        if ks:
            tasks.append({"src": str(f), "rel": rel, "ks": ks, "seed": seed, "config": config, "size": size,
                          "save_hq": save_hq, "out_dir": str(out_dir)})
    n_workers = max(1, min(workers, len(tasks)))
    written, failed, n_done = 0, [], len(files) - len(tasks)
    logger.info("degrade_folder: %d images (%d already done), preset %s, %d per image, %d worker(s)",
                len(files), n_done, config.name, per_image, n_workers)

    cpu = 0.0

    def consume(results):
        nonlocal written, n_done, cpu
        with open(report, "a", encoding="utf-8") as fh:
            for res in results:
                cpu += res["cpu_seconds"]
                for rec in res["outputs"]:
                    rec.update(preset=config.name, base_seed=seed, config_hash=chash)
                    fh.write(json.dumps(rec) + "\n")
                    written += 1
                fh.flush()
                if res["error"]:
                    logger.warning("skipping %s: %s", res["rel"], res["error"])
                    failed.append({"input": res["rel"], "error": res["error"]})
                n_done += 1
                if progress is not None:
                    progress(n_done, len(files))

    if n_workers == 1:
        with _single_thread():
            consume(_process_image(t) for t in tasks)
    elif tasks:
        _run_pool(tasks, n_workers, consume)
    seconds = time.perf_counter() - t0
    summary = {"in_dir": str(in_dir), "out_dir": str(out_dir), "report": str(report), "preset": config.name,
               "config_hash": chash, "seed": seed, "per_image": per_image, "images": len(files), "written": written,
               "skipped": skipped, "failed": failed, "workers": n_workers, "seconds": round(seconds, 3),
               "images_per_second": round(written / seconds, 3) if seconds > 0 else None,
               "cpu_seconds": round(cpu, 3),  # in the workers' image processing (read, degrade, write)
               "images_per_cpu_second": round(written / cpu, 3) if cpu > 0 else None}
    logger.info("degrade_folder: wrote %d, skipped %d existing, %d failed in %.1fs", written, skipped, len(failed),
                seconds)
    return summary
