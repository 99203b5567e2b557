"""Classical degradation throughput: torch backend, cv2 backend and `degrade_folder`, each against an independent
per-image numpy/cv2 GFPGAN-style reference chain timed in the same run (design.md §7).

    .venv/bin/python bench/degradation.py            # 512 px, batch 16, all cores for the folder tool
    .venv/bin/python bench/degradation.py --quick    # CI-sized
    .venv/bin/python bench/degradation.py --write    # also update the "Classical degradation" section of BENCHMARKS.md

The reference is written here from the published recipe (GFPGAN train_gfpgan_v1.yml: 41-px iso/aniso Gaussian via
cv2.filter2D, cv2.resize down INTER_LINEAR by r~U(0.8,8), Gaussian noise U(0,20)/255, cv2 JPEG q~U(60,100), resize
back INTER_LINEAR); our runs use the matching `dr-bfr` preset. Per-core figures use one thread.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from common import loadavg, require_pack

D, folder_tool, image_io, sample_data = require_pack("pipelines.degradation", "pipelines.degrade_folder",
                                                    "pipelines.image_io", "pipelines.sample_data")

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
SECTION = "## Classical degradation"


# ------------------------------------------------------------------------------------------ reference chain
def _ref_kernel(rng, size=41, sigma=(0.1, 10.0)):
    sx = rng.uniform(*sigma)
    if rng.random() < 0.5:
        sy, th = sx, 0.0
    else:
        sy, th = rng.uniform(*sigma), rng.uniform(-math.pi, math.pi)
    c, s = math.cos(th), math.sin(th)
    rot = np.array([[c, -s], [s, c]])
    inv = np.linalg.inv(rot @ np.diag([sx * sx, sy * sy]) @ rot.T)
    ax = np.arange(size) - size // 2
    x, y = np.meshgrid(ax, ax)
    k = np.exp(-0.5 * (inv[0, 0] * x * x + 2 * inv[0, 1] * x * y + inv[1, 1] * y * y))
    return (k / k.sum()).astype(np.float32)


def reference_chain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """GFPGAN-style LQ synthesis of one float32 RGB HWC image in [0,1] (independent of the library)."""
    h, w = img.shape[:2]
    out = cv2.filter2D(img, -1, _ref_kernel(rng))
    r = rng.uniform(0.8, 8.0)
    out = cv2.resize(out, (max(1, int(w // r)), max(1, int(h // r))), interpolation=cv2.INTER_LINEAR)
    out = np.clip(out + rng.standard_normal(out.shape, dtype=np.float32) * np.float32(rng.uniform(0, 20) / 255), 0, 1)
    q = int(rng.integers(60, 101))
    ok, buf = cv2.imencode(".jpg", (out * 255).round().astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, q])
    out = cv2.imdecode(buf, cv2.IMREAD_COLOR).astype(np.float32) / 255
    return cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)


# ------------------------------------------------------------------------------------------ timing helpers
def paired(case, ref, rounds: int) -> tuple[float, float, float, float]:
    """(case, ref) items per wall-second and per CPU-second, from callables returning (items, wall_s, cpu_s) run
    alternately ``rounds`` times so both see the same machine load (this machine is shared)."""
    acc = np.zeros((2, 3))
    for _ in range(rounds):
        acc[1] += ref()
        acc[0] += case()
    return acc[0, 0] / acc[0, 1], acc[1, 0] / acc[1, 1], acc[0, 0] / acc[0, 2], acc[1, 0] / acc[1, 2]


def clock(fn, n_items):
    def run():
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return n_items, time.perf_counter() - t0, time.process_time() - c0
    return run


class _Threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.torch, self.cv2 = torch.get_num_threads(), cv2.getNumThreads()
        torch.set_num_threads(self.n)
        cv2.setNumThreads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.torch)
        cv2.setNumThreads(self.cv2)


def bench(size: int, batch: int, workers: int, rounds: int, folder_images: int, per_image: int) -> list:
    hq = sample_data.sample_face(size)
    imgs = [np.ascontiguousarray(np.roll(hq, 7 * i, axis=1)) for i in range(batch)]
    f32 = [i.astype(np.float32) / 255 for i in imgs]
    x = torch.stack([torch.from_numpy(i).permute(2, 0, 1) for i in f32])
    cfg, flip = D.get_preset("dr-bfr"), D.get_preset("flipnet")
    rng = np.random.default_rng(0)
    seed = iter(range(10**6))
    def ref_batch():
        with _Threads(1):
            return [reference_chain(i, rng) for i in f32]

    ref_chain = clock(ref_batch, batch)
    rows = []

    def add(name, case_fn, n_items, threads):
        with _Threads(threads):
            case_fn()  # warm-up
            rows.append((name, *paired(clock(case_fn, n_items), ref_chain, rounds)))

    n_cpu = os.cpu_count() or 1
    for tt in sorted({1, n_cpu}):
        add(f"torch backend, batch {batch}, {tt} thread(s), libjpeg", lambda: D.degrade(x, cfg, seed=next(seed)),
            batch, tt)
        add(f"torch backend, batch {batch}, {tt} thread(s), differentiable JPEG",
            lambda: D.degrade(x, cfg, seed=next(seed), jpeg="differentiable"), batch, tt)
    add("degrade_numpy per image (the CLI's executor), 1 thread",
        lambda: [D.degrade_numpy(i, p) for i, p in zip(imgs, D.sample_params(cfg, batch, next(seed), size, size))],
        batch, 1)
    add("cv2 backend (degrade(..., backend='cv2'): tensor batch in/out), 1 thread",
        lambda: D.degrade(x, cfg, seed=next(seed), backend="cv2"), batch, 1)
    add("cv2 backend, flipnet preset (two passes, second shuffled), 1 thread",
        lambda: D.degrade(x, flip, seed=next(seed), backend="cv2"), batch, 1)

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hq"
        src.mkdir()
        for i in range(folder_images):
            image_io.save_png(src / f"{i:05d}.png", np.roll(hq, 5 * i, axis=0))

        def ref_io():
            t0, c0 = time.perf_counter(), time.process_time()
            for p in sorted(src.glob("*.png")):
                a = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
                for k in range(per_image):
                    o = reference_chain(a, rng)
                    cv2.imwrite(str(Path(tmp) / f"ref_{p.stem}_{k}.png"),
                                cv2.cvtColor((o * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR))
            return folder_images * per_image, time.perf_counter() - t0, time.process_time() - c0

        runs = iter(range(10**6))
        steady_rates = {}
        for n_workers in sorted({1, workers}):
            steady = []

            def folder(n_workers=n_workers, steady=steady):
                stamps = []
                t0, c0 = time.perf_counter(), time.process_time()
                s = folder_tool.degrade_folder(src, Path(tmp) / f"out{next(runs)}", preset="dr-bfr", per_image=per_image,
                                   workers=n_workers, progress=lambda done, total: stamps.append(time.perf_counter()))
                wall = time.perf_counter() - t0
                main_cpu = time.process_time() - c0
                cpu = s["cpu_seconds"] + (main_cpu if n_workers > 1 else 0.0)  # in-process: already counted
                if len(stamps) > n_workers + 1:  # after every worker delivered its first image
                    steady.append(((len(stamps) - n_workers) * per_image, stamps[-1] - stamps[n_workers - 1]))
                return s["written"], wall, cpu

            with _Threads(1):
                rate, ref_rate, crate, ref_crate = paired(folder, ref_io, rounds)
            rows.append((f"degrade_folder, {n_workers} worker(s), PNG in/out, end-to-end", rate, ref_rate, crate,
                         ref_crate))
            if steady:
                srate = sum(n for n, _ in steady) / sum(t for _, t in steady)
                steady_rates[n_workers] = srate
                rows.append((f"degrade_folder, {n_workers} worker(s), steady state (after worker start-up)", srate,
                             ref_rate, None, None))
        if len(steady_rates) == 2:
            one, many = steady_rates[1], steady_rates[max(steady_rates)]
            rows.append((f"scaling: {max(steady_rates)} workers vs 1 worker, steady state wall-clock = "
                         f"{many / one:.2f}x", many, None, None, None))
    return rows


def table(rows, header) -> str:
    lines = [header, "",
             "| case | images/s (wall) | reference images/s, same rounds | ratio (wall) | ratio per CPU-second |",
             "|---|---:|---:|---:|---:|"]
    for name, rate, ref, crate, ref_crate in rows:
        cells = [f"{rate:.1f}", "" if ref is None else f"{ref:.1f}", "" if ref is None else f"{rate / ref:.2f}",
                 "" if crate is None else f"{crate / ref_crate:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nMeasured side by side in one run on this machine; each section names the exact command.\n")
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + "\n" + (text[nxt + 1:] if nxt >= 0 else "")
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized: 256 px, batch 4, ~1 s per case")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=3, help="alternating case/reference rounds per case")
    ap.add_argument("--folder-images", type=int, default=24)
    ap.add_argument("--per-image", type=int, default=4)
    ap.add_argument("--write", action="store_true", help=f"update '{SECTION}' in BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.rounds, args.folder_images, args.per_image = 256, 4, 2, 8, 2
    load0 = loadavg()[0]
    rows = bench(args.size, args.batch, args.workers, args.rounds, args.folder_images, args.per_image)
    load1 = loadavg()[0]
    cmd = "python bench/degradation.py" + (" --quick" if args.quick else "") + (" --write" if args.write else "")
    header = (f"{SECTION}\n\n`{cmd}` — {args.size} px, batch {args.batch}, preset `dr-bfr` (= the reference's "
              f"GFPGAN ranges), {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
              f"torch {torch.__version__}, cv2 {cv2.__version__}; folder tool: {args.folder_images} HQ PNGs x "
              f"{args.per_image} LQ, against the reference with PNG read/write. Each case alternates with its "
              f"reference ({args.rounds} rounds) so both see the same load: the machine is shared with other jobs, "
              f"absolute numbers are noisy, the ratios are the result; 1-min load average {load0:.1f} at the start, "
              f"{load1:.1f} at the end (a load above ~1 leaves the folder tool's second worker without a free core)."
              f" Measured {time.strftime('%Y-%m-%d')}.")
    text = table(rows, header)
    print(text)
    if args.write:
        write_section(BENCHMARKS_MD, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
