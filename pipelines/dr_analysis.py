"""What a DR encoder knows (DR-BFR §4.1, Fig. 6 / Fig. 7), measured on held-out images: ``bfr analyze-dr``.

* A grid of KNOWN degradations (:func:`degradation_grid`): clean, and one degradation type at a time at three fixed
  levels -- Gaussian blur sigma, Gaussian noise delta (/255), JPEG quality, bilinear down-scale factor (then resized
  back) -- built from :class:`.degradation.DegradationConfig` with fixed values (the other stages' probabilities 0).
* f_DR per degraded image (:func:`dr_features`): E_DR on the non-overlapping ``patch`` x ``patch`` windows of the
  image (the training patch size), tokens flattened (l*d) and averaged over the windows.
* A 2-D embedding of the features (:func:`tsne`, an exact t-SNE in numpy: scikit-learn is not a dependency), drawn
  coloured by type (hue) and level (lightness) (:func:`scatter_png`; Fig. 7).
* kNN probes (:func:`knn_probe`): predict the blur / noise / JPEG / scale level (0 = clean; on the clean and
  that-type images, 4 balanced classes), the type (5 classes incl. clean) and type + level (13) from the features, leave-one-content-out (every degraded version of the test image is held out, so
  content never leaks into the neighbours), z-scored on the training fold, k = 5, Euclidean. Controls: the same
  probe on a randomly initialised E_DR of the same config and on raw-pixel statistics (:func:`pixel_statistics`).
* G_LQ re-degradation (:func:`redegradation`; Fig. 6): LQ = ``dr-bfr``(HQ, seeded), PSNR/SSIM of
  G_LQ(HQ, E_DR(LQ)) against LQ, next to the baseline PSNR/SSIM(HQ, LQ) and a control that uses the DR of another
  image's LQ (another degradation) instead.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import degradation
from .image_io import ImageFolderError, image_grid, list_images, load_image, resize_square, save_png
from .metrics import psnr, ssim

logger = logging.getLogger(__name__)

TYPES = ("blur", "noise", "jpeg", "scale")
# three fixed levels per type, mild -> severe (blur sigma px, noise delta /255, JPEG quality, down-scale factor);
# ours, inside the dr-bfr training ranges (sigma [0.1, 10], delta [0, 20], r [0.8, 8]) except JPEG 30, which
# probes how the DR extrapolates past the training range's q 60
LEVELS = {"blur": (1.0, 2.5, 5.0), "noise": (4.0, 10.0, 20.0), "jpeg": (90, 60, 30), "scale": (2.0, 4.0, 8.0)}
PROBE_TASKS = (*TYPES, "type", "type+level")
# bins of each factor of Eq. 11 over the dr-bfr preset's ranges (terciles-ish, ours), mild -> severe; the factor
# probes use random dr-bfr-style combinations (every stage on, as in training) with each value drawn inside a bin
FACTOR_BINS = {"blur": ((0.1, 2.0), (2.0, 5.0), (5.0, 10.0)), "scale": ((0.8, 2.0), (2.0, 4.0), (4.0, 8.0)),
               "noise": ((0.0, 5.0), (5.0, 12.0), (12.0, 20.0)), "jpeg": ((86, 100), (71, 85), (60, 70))}


@dataclass(frozen=True)
class GridCell:
    """One known degradation: ``kind`` in ('clean', *TYPES), ``level`` 0 (clean) or 1..3, its value and config."""

    kind: str
    level: int
    value: float
    config: degradation.DegradationConfig

    @property
    def name(self) -> str:
        return "clean" if self.kind == "clean" else f"{self.kind}-{self.level}"

    def label(self, task: str) -> str:
        """The class of this cell in a probe task (:data:`PROBE_TASKS`)."""
        if task == "type":
            return self.kind
        if task == "type+level":
            return self.name
        if task not in TYPES:
            raise ValueError(f"unknown probe task {task!r}; choose one of {PROBE_TASKS}.")
        return str(self.level if self.kind == task else 0)


def degradation_grid(levels: dict[str, tuple] | None = None) -> list[GridCell]:
    """clean + every type at each of its fixed levels (one stage on, the others' probabilities 0)."""
    levels = LEVELS if levels is None else levels
    off = dict(blur_prob=0.0, resize_prob=0.0, noise_prob=0.0, jpeg_prob=0.0)
    cells = [GridCell("clean", 0, 0.0, degradation.DegradationConfig(name="clean", **off))]
    for kind in TYPES:
        for i, v in enumerate(levels[kind], 1):
            if kind == "blur":
                cfg = dict(off, blur_prob=1.0, kernel_types=("iso",), kernel_probs=(1.0,), blur_sigma=(v, v))
            elif kind == "noise":
                cfg = dict(off, noise_prob=1.0, noise_sigma=(v, v))
            elif kind == "jpeg":
                cfg = dict(off, jpeg_prob=1.0, jpeg_quality=(int(v), int(v)))
            else:
                cfg = dict(off, resize_prob=1.0, resize_scale=(v, v), resize_modes=("bilinear",))
            cells.append(GridCell(kind, i, float(v), degradation.DegradationConfig(name=f"{kind}-{i}", **cfg)))
    return cells


@dataclass(frozen=True)
class ComboCell:
    """One random dr-bfr-style degradation with every stage on: ``bins[factor]`` (0..2) and the drawn ``values``."""

    bins: dict
    values: dict
    config: degradation.DegradationConfig

    def label(self, task: str) -> str:
        if task not in TYPES:
            raise ValueError(f"unknown factor {task!r}; choose one of {TYPES}.")
        return str(self.bins[task])


def combo_grid(count: int, seed: int = 0) -> list[ComboCell]:
    """``count`` combinations: each factor's bin uniform over its 3 bins (independently), the value uniform in the
    bin; blur iso Gaussian, bilinear resize, Gaussian noise, libjpeg (the dr-bfr stages, fixed values)."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(count):
        bins = {f: int(rng.integers(0, 3)) for f in TYPES}
        vals = {}
        for f, b in bins.items():
            lo, hi = FACTOR_BINS[f][b]
            vals[f] = int(rng.integers(lo, hi + 1)) if f == "jpeg" else float(rng.uniform(lo, hi))
        cfg = degradation.DegradationConfig(
            name="combo", kernel_types=("iso",), kernel_probs=(1.0,), blur_sigma=(vals["blur"],) * 2,
            resize_scale=(vals["scale"],) * 2, resize_modes=("bilinear",), noise_sigma=(vals["noise"],) * 2,
            jpeg_quality=(vals["jpeg"],) * 2)
        cells.append(ComboCell(bins, vals, cfg))
    return cells


def apply_grid(hq: torch.Tensor, cells: list[GridCell], seed: int = 0) -> torch.Tensor:
    """(N, 3, H, W) HQ -> (N * len(cells), 3, H, W): row n * len(cells) + c is image n under cell c."""
    out = []
    for n in range(hq.shape[0]):
        for c, cell in enumerate(cells):
            lq, _ = degradation.degrade(hq[n:n + 1], cell.config, seed=seed * 1009 + n * 31 + c)
            out.append(lq)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------------------------


def check_patch_size(images: torch.Tensor, patch: int) -> None:
    h, w = images.shape[-2:]
    if min(h, w) < patch:
        raise ValueError(f"images of {w}x{h} px are smaller than the DR encoder's {patch} px patches; use larger "
                         f"images (--size >= {patch}).")


@torch.no_grad()
def dr_features(encoder: torch.nn.Module, images: torch.Tensor, patch: int, batch: int = 64) -> np.ndarray:
    """f_DR of each image (B, 3, H, W) in [0, 1]: E_DR on its non-overlapping ``patch`` windows, tokens flattened,
    mean over windows -> (B, l*d) float64."""
    check_patch_size(images, patch)
    b, c, h, w = images.shape
    gy, gx = h // patch, w // patch
    windows = images[:, :, :gy * patch, :gx * patch].unfold(2, patch, patch).unfold(3, patch, patch)
    windows = windows.permute(0, 2, 3, 1, 4, 5).reshape(b * gy * gx, c, patch, patch)
    param = next(encoder.parameters())
    feats = torch.cat([encoder(windows[i:i + batch].to(param.device, param.dtype)).flatten(1).float().cpu()
                       for i in range(0, windows.shape[0], batch)])
    return feats.reshape(b, gy * gx, -1).mean(1).double().numpy()


def pixel_statistics(images: torch.Tensor) -> np.ndarray:
    """The raw-pixel control: per-channel mean and std (6), log gradient energy mean(dx^2 + dy^2) and log
    high-frequency energy mean(Laplacian^2) (2) -> (B, 8)."""
    x = images.double()
    mean, std = x.mean((2, 3)), x.std((2, 3))
    gray = x.mean(1, keepdim=True)
    dx, dy = gray[..., :, 1:] - gray[..., :, :-1], gray[..., 1:, :] - gray[..., :-1, :]
    grad = dx.pow(2).mean((1, 2, 3)) + dy.pow(2).mean((1, 2, 3))
    lap = F.conv2d(gray, torch.tensor([[[[0, 1, 0], [1, -4, 1], [0, 1, 0]]]], dtype=x.dtype))
    hf = lap.pow(2).mean((1, 2, 3))
    return torch.cat([mean, std, torch.log(grad + 1e-8)[:, None], torch.log(hf + 1e-8)[:, None]], 1).numpy()


# --------------------------------------------------------------------------------------------------------------------
# kNN probe
# --------------------------------------------------------------------------------------------------------------------


def knn_probe(features: np.ndarray, labels: list, groups: list, k: int = 5) -> float:
    """Leave-one-group-out k-NN accuracy: for each group (content), neighbours come only from the other groups;
    features z-scored with the training fold's mean / std; majority vote, ties to the nearest tied class."""
    x = np.asarray(features, dtype=np.float64)
    labels, groups = np.asarray(labels), np.asarray(groups)
    if len(np.unique(groups)) < 2:
        raise ValueError("knn_probe needs at least 2 contents (groups): the probe is trained on the others.")
    correct = 0
    for g in np.unique(groups):
        test, train = groups == g, groups != g
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-8
        a, b = (x[train] - mu) / sd, (x[test] - mu) / sd
        d = ((b[:, None, :] - a[None, :, :]) ** 2).sum(-1)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        train_labels = labels[train]
        for truth, idx in zip(labels[test], order):
            votes: dict = {}
            for rank, j in enumerate(idx):
                cnt, first = votes.get(train_labels[j], (0, rank))
                votes[train_labels[j]] = (cnt + 1, first)
            pred = max(votes.items(), key=lambda kv: (kv[1][0], -kv[1][1]))[0]
            correct += int(pred == truth)
    return correct / len(labels)


def chance_level(labels: list) -> float:
    """Accuracy of always predicting the most frequent class."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / counts.sum())


# --------------------------------------------------------------------------------------------------------------------
# t-SNE (exact, numpy) and the scatter PNG
# --------------------------------------------------------------------------------------------------------------------


def _conditional_p(d2: np.ndarray, perplexity: float) -> np.ndarray:
    """Row-wise Gaussian affinities p_{j|i} with the bandwidth found by bisection to match the perplexity."""
    n = d2.shape[0]
    p = np.zeros((n, n))
    target = math.log(perplexity)
    for i in range(n):
        di = np.delete(d2[i], i)
        di = di - di.min()
        lo, hi, beta = 0.0, np.inf, 1.0
        for _ in range(64):
            w = np.exp(-di * beta)
            s = w.sum()
            entropy = math.log(s) + beta * float((di * w).sum() / s)
            if abs(entropy - target) < 1e-5:
                break
            if entropy > target:
                lo, beta = beta, beta * 2 if hi == np.inf else (beta + hi) / 2
            else:
                hi, beta = beta, (beta + lo) / 2
        p[i, np.arange(n) != i] = w / s
    return p


def tsne(x: np.ndarray, perplexity: float = 15.0, iterations: int = 600, seed: int = 0) -> np.ndarray:
    """Exact t-SNE (van der Maaten & Hinton 2008) of z-scored ``x`` (n, D) -> (n, 2): Gaussian affinities at the
    given perplexity, symmetrised; Student-t low-dimensional kernel; gradient descent with momentum 0.5 -> 0.8, early
    exaggeration 12 for the first 100 iterations, learning rate max(n / 12, 50)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}.")
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    p = _conditional_p(d2, min(perplexity, (n - 1) / 3))
    p = np.maximum((p + p.T) / (2 * n), 1e-12)
    y = np.random.default_rng(seed).normal(0, 1e-4, (n, 2))
    vel = np.zeros_like(y)
    lr = max(n / 12.0, 50.0)
    for it in range(iterations):
        pp = p * (12.0 if it < 100 else 1.0)
        diff = y[:, None] - y[None]
        num = 1.0 / (1.0 + (diff ** 2).sum(-1))
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        grad = 4.0 * (((pp - q) * num)[:, :, None] * diff).sum(1)
        vel = (0.5 if it < 250 else 0.8) * vel - lr * grad
        y = y + vel
        y = y - y.mean(0)
    return y


def cell_colour(kind: str, level: int) -> tuple[int, int, int]:
    """Hue by type, lightness by level (darker = more severe); clean is grey."""
    if kind == "clean":
        return (140, 140, 140)
    hue = {"blur": 0.58, "noise": 0.0, "jpeg": 0.33, "scale": 0.8}[kind]
    r, g, b = colorsys.hls_to_rgb(hue, 0.75 - 0.2 * level, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def scatter_png(path: str | Path, points: np.ndarray, cells: list[GridCell], title: str, size: int = 520) -> Path:
    """A 2-D scatter coloured by degradation type / level with a legend, drawn with PIL."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size + 150, size + 24), "white")
    draw = ImageDraw.Draw(img)
    lo, hi = points.min(0), points.max(0)
    xy = (points - lo) / np.maximum(hi - lo, 1e-9) * (size - 20) + 10
    for (px, py), cell in zip(xy, cells):
        draw.ellipse([px - 4, py + 20, px + 4, py + 28], fill=cell_colour(cell.kind, cell.level), outline=(0, 0, 0))
    draw.text((8, 4), title, fill=(0, 0, 0))
    seen: list[str] = []
    for cell in cells:
        if cell.name not in seen:
            seen.append(cell.name)
            y = 24 + 18 * (len(seen) - 1)
            draw.rectangle([size + 10, y, size + 22, y + 12], fill=cell_colour(cell.kind, cell.level))
            value = "" if cell.kind == "clean" else f" ({cell.value:g})"
            draw.text((size + 28, y), cell.name + value, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# G_LQ re-degradation (Fig. 6)
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def redegradation(module, hq: torch.Tensor, seed: int = 0, preset: str = "dr-bfr") -> dict:
    """LQ_i = preset(HQ_i) (seeded, one degradation per image); x_hat_i = G_LQ(HQ_i, E_DR(LQ_i)). PSNR/SSIM of x_hat
    vs LQ (``model``), of HQ vs LQ (``baseline``: no re-degradation) and of G_LQ(HQ_i, E_DR(LQ_j)), j = i-1 mod B
    (``other_dr``: another image's degradation). Returns means, per-image values and the images."""
    if hq.shape[0] < 2:
        raise ValueError("redegradation needs at least 2 images (the control uses another image's DR).")
    mult = module.degrader.multiple
    h, w = hq.shape[-2] // mult * mult, hq.shape[-1] // mult * mult
    hq = hq[..., :h, :w]
    lq, _ = degradation.degrade(hq, degradation.get_preset(preset), seed=seed)
    param = next(module.parameters())
    hq_d = hq.to(param.device, param.dtype)
    f = module.encoder(lq.to(param.device, param.dtype))
    x_hat = module.degrader(hq_d, f).clamp(0, 1).float().cpu()
    x_other = module.degrader(hq_d, f.roll(1, 0)).clamp(0, 1).float().cpu()
    ref = lq.permute(0, 2, 3, 1)
    out: dict = {}
    for name, img in (("model", x_hat), ("baseline", hq), ("other_dr", x_other)):
        p = [float(v) for v in psnr(img.permute(0, 2, 3, 1), ref)]
        s = [float(v) for v in ssim(img.permute(0, 2, 3, 1), ref)]
        out[name] = {"psnr": float(np.mean(p)), "ssim": float(np.mean(s)), "psnr_per_image": p, "ssim_per_image": s}
    out["images"] = (hq, lq, x_hat)
    return out


# --------------------------------------------------------------------------------------------------------------------
# The whole analysis
# --------------------------------------------------------------------------------------------------------------------


def load_images(folder: str | Path, size: int, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, list]:
    """Up to ``limit`` images of ``folder`` (a seeded sample when there are more), resized to ``size`` squares."""
    files = list_images(folder, "held-out HQ folder")
    if limit is not None and len(files) > limit:
        rng = np.random.default_rng(seed)
        files = sorted(files[i] for i in rng.choice(len(files), limit, replace=False))
    if len(files) < 2:
        raise ImageFolderError(f"held-out HQ folder {str(folder)!r} has {len(files)} image(s); the probe is trained on "
                               "the other contents, so it needs at least 2 (better 10+).")
    return torch.stack([resize_square(load_image(p), size) for p in files]), [p.stem for p in files]


def probe_table(features: dict[str, np.ndarray], cells_per_sample: list[GridCell], groups: list, k: int = 5) -> dict:
    """{task: {feature set: accuracy, 'chance': majority-class rate}} for every task of :data:`PROBE_TASKS`."""
    table = {}
    for task in PROBE_TASKS:
        # a factor's level is probed on the clean + that-type samples (4 balanced classes); type tasks on all
        keep = [i for i, c in enumerate(cells_per_sample) if task not in TYPES or c.kind in ("clean", task)]
        labels = [cells_per_sample[i].label(task) for i in keep]
        sub = [groups[i] for i in keep]
        row = {name: knn_probe(np.asarray(x)[keep], labels, sub, k) for name, x in features.items()}
        row["chance"] = chance_level(labels)
        table[task] = row
    return table


def analyze(module, random_module, hq: torch.Tensor, names: list[str], patch: int, out_dir: str | Path,
            seed: int = 0, k: int = 5, tsne_iterations: int = 600) -> dict:
    """Everything on held-out ``hq`` (N, 3, S, S): writes report.json, report.md, the t-SNE PNGs and the
    re-degradation grid into ``out_dir``; returns the report dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_patch_size(hq, patch)
    cells = degradation_grid()
    lq = apply_grid(hq, cells, seed)
    per_sample = [cell for _ in range(hq.shape[0]) for cell in cells]
    groups = [n for n in range(hq.shape[0]) for _ in cells]
    feats = {"trained E_DR": dr_features(module.encoder, lq, patch),
             "random E_DR": dr_features(random_module.encoder, lq, patch),
             "pixel stats": pixel_statistics(lq)}
    table = probe_table(feats, per_sample, groups, k)
    pngs = {}
    for key in ("trained E_DR", "random E_DR"):
        emb = tsne(feats[key], iterations=tsne_iterations, seed=seed)
        fname = "tsne_" + key.split()[0] + ".png"
        scatter_png(out / fname, emb, per_sample, f"t-SNE of f_DR ({key}), {hq.shape[0]} held-out images")
        pngs[key] = fname
    redeg = redegradation(module, hq, seed)
    hq_c, lq_c, x_hat = redeg.pop("images")
    save_png(out / "redegradation.png", image_grid([[a, b, c] for a, b, c in zip(hq_c[:8], lq_c[:8], x_hat[:8])]))
    report = {"images": names, "patch_size": patch, "image_size": int(hq.shape[-1]), "k": k, "seed": seed,
              "grid": [{"name": c.name, "type": c.kind, "level": c.level, "value": c.value} for c in cells],
              "probe": table, "redegradation": redeg, "embeddings": pngs, "redegradation_png": "redegradation.png"}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(report_markdown(report))
    logger.info("analyze-dr: report in %s", out / "report.md")
    return report


def report_markdown(report: dict) -> str:
    """The report as Markdown: the probe table, the re-degradation table, the embedding PNGs."""
    names = ["trained E_DR", "random E_DR", "pixel stats", "chance"]
    grid = ", ".join(g["name"] + (f" ({g['value']:g})" if g["level"] else "") for g in report["grid"])
    lines = [f"# DR analysis: {len(report['images'])} held-out images, {report['image_size']} px, patches "
             f"{report['patch_size']} px, seed {report['seed']}", "", f"Known degradations: {grid}.", "",
             f"## kNN probe (k = {report['k']}, leave-one-content-out accuracy)", "",
             "Tasks blur / noise / jpeg / scale: that stage's level 0-3 on the clean + that-type images; type: which "
             "stage (or clean); type+level: the 13 cells.", "",
             "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task, row in report["probe"].items():
        lines.append(f"| {task} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
    r = report["redegradation"]
    lines += ["", "## G_LQ re-degradation against the LQ image (Fig. 6; LQ from the `dr-bfr` preset)", "",
              "| | PSNR | SSIM |", "|---|---|---|",
              f"| G_LQ(HQ, E_DR(LQ)) | {r['model']['psnr']:.2f} | {r['model']['ssim']:.4f} |",
              f"| G_LQ(HQ, E_DR(another image's LQ)) | {r['other_dr']['psnr']:.2f} | {r['other_dr']['ssim']:.4f} |",
              f"| HQ itself (baseline) | {r['baseline']['psnr']:.2f} | {r['baseline']['ssim']:.4f} |", ""]
    lines += [f"![{k}]({v})" for k, v in report["embeddings"].items()]
    lines += [f"![HQ | LQ | G_LQ(HQ, E_DR(LQ))]({report['redegradation_png']})", ""]
    return "\n".join(lines)
