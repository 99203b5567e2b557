"""DR-driven DR2 (beyond both papers): choose DR2's (N, tau, omega) from the DR encoder's f_DR of the input.

DR2 (§3.3) leaves N (low-pass factor) and tau (output level) to the user and names automatic selection as future
work. Here:

* **Calibration** (:func:`calibrate`): HQ faces x degradations of known severity (the DR2 presets and the ``dr-bfr``
  preset, seeded) -> f_DR of every LQ (:func:`.dr_analysis.dr_features`); DR2 run over a grid of (N, tau) with omega
  = tau + T/4 (the paper's rule); each run scored by the **criterion**: PSNR of the DR2 output against the HQ face.
  Why PSNR to HQ: DR2's output is the input of an enhancer that adds detail but cannot restore content DR2 removed
  or invented, so the DR2 stage should be as close to the clean face as possible; PSNR is the fidelity measure DR2
  and DR-BFR report, needs no network (LPIPS is not available offline) and, unlike SSIM, does not reward keeping
  the degradation's structure.
* **Mapping** f_DR -> (N, tau) (:meth:`DR2AutoCalibration.choose`): the k nearest calibration images (z-scored
  features, Euclidean) vote with their whole score rows: the grid point with the best mean score over the k
  neighbours wins (a kNN regression of the score surface, then its argmax; k = 5). omega follows the paper's rule.
* **File** (``bfr_format = drbfr-dr2-auto/1``, :func:`save_calibration` / :func:`load_calibration`): tensors
  ``features`` (M, D), ``scores`` (M, G), ``feature_mean`` / ``feature_std`` (D); metadata ``grid`` (JSON [[N, tau],
  ...]), ``steps``, ``space``, ``k``, ``criterion``, ``restorer``, ``patch_size``, ``encoder_hash`` (the E_DR the
  features came from; another encoder is refused).

Restorers (``(images (B,3,H,W) [0,1], n, tau, omega, seed) -> images``): :func:`model_restorer` is DR2 on an SD
model (SD2.1 in use; the tiny test model in tests, whose outputs are noise); :func:`proxy_restorer` is the same DR2
loop (:func:`.ilvr.dr2_sample`, Eq. 9-11, pixel space) with the exact posterior-mean denoiser of a stationary
Gaussian model of faces (a radially averaged power spectrum fitted on the calibration HQ faces) instead of a UNet.
The proxy is what CPU tests can run: its (N, tau) trade-off is real (large N discards the input's detail, small
N keeps its noise), but it is a proxy for SD2.1, not SD2.1.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..lora.checkpoint import CheckpointError, _read, _write
from ..sd.diffusion import sd_alphas_cumprod, sigmas_from_alphas_cumprod
from . import degradation, dr2, ilvr
from .dr_analysis import dr_features
from .metrics import psnr

logger = logging.getLogger(__name__)

AUTO_FORMAT = "drbfr-dr2-auto/1"
CRITERION = "psnr_to_hq"
_D = degradation.DegradationConfig
# calibration severities (ours): from nearly clean to DR2's test presets, so the best (N, tau) differs between them
SEVERITIES = {
    "light": _D(name="light", blur_sigma=(0.3, 1.0), resize_scale=(1.0, 1.5), noise_sigma=(0.0, 3.0),
                jpeg_quality=(90, 100)),
    "noisy": _D(name="noisy", blur_sigma=(0.3, 0.8), resize_prob=0.0, noise_sigma=(15.0, 35.0), jpeg_prob=0.0),
    "blurry": _D(name="blurry", blur_sigma=(1.5, 3.0), resize_scale=(1.0, 2.0), noise_sigma=(0.0, 5.0),
                 jpeg_quality=(80, 100)),
    "dr-bfr": degradation.get_preset("dr-bfr"),
    "dr2-medium-x4": degradation.get_preset("dr2-medium-x4"),
    "dr2-severe-x8": degradation.get_preset("dr2-severe-x8"),
}
CALIBRATION_PRESETS = tuple(SEVERITIES)
DEFAULT_GRID = tuple((n, tau) for n in (1.0, 2.0, 4.0, 8.0) for tau in (1, 3, 6, 12, 25))

Restorer = Callable[[torch.Tensor, float, int, int, int], torch.Tensor]


def encoder_hash(encoder: torch.nn.Module) -> str:
    """A short hash of E_DR's weights (fp32), stored in the calibration so features stay comparable."""
    h = hashlib.sha256()
    for k, v in sorted(encoder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------------
# Restorers
# --------------------------------------------------------------------------------------------------------------------


def model_restorer(model, steps: int = ilvr.DR2_STEPS, space: str = "latent") -> Restorer:
    """DR2 on an SD model (:func:`.dr2.restore`)."""
    def restore(images, n, tau, omega, seed):
        cfg = dr2.DR2Config(n=float(n), tau=int(tau), omega=int(omega), steps=steps, space=space, seed=seed)
        return dr2.restore(model, images, cfg).images.float().clamp(0, 1)
    return restore


class GaussianFacePrior:
    """Stationary Gaussian model of faces in [-1, 1]: per-channel mean and a radially averaged power spectrum P(f),
    fitted on HQ faces (B, 3, S, S); :meth:`denoise` is the exact E[x0 | x_t] under it (a Wiener filter)."""

    def __init__(self, hq: torch.Tensor):
        x = hq.double() * 2 - 1
        self.size = tuple(x.shape[-2:])
        self.mean = x.mean((0, 2, 3), keepdim=True)
        power = torch.fft.fft2(x - self.mean).abs().pow(2).mean((0, 1)) / (x.shape[-1] * x.shape[-2])
        fy = torch.fft.fftfreq(self.size[0], dtype=torch.float64)[:, None]
        fx = torch.fft.fftfreq(self.size[1], dtype=torch.float64)[None, :]
        radius = ((fy ** 2 + fx ** 2).sqrt() * max(self.size)).round().long()
        sums = torch.zeros(int(radius.max()) + 1, dtype=torch.float64).index_add_(0, radius.flatten(), power.flatten())
        counts = torch.zeros_like(sums).index_add_(0, radius.flatten(), torch.ones_like(power.flatten()))
        self.power = (sums / counts.clamp(min=1))[radius].clamp(min=1e-10)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x0-hat for x_t = a x0 + b eps (DDPM form, sigma = b / a): mean + a P / (a^2 P + b^2) (X_t - a mean)."""
        a = 1.0 / (1.0 + sigma ** 2) ** 0.5
        b = sigma * a
        gain = a * self.power / (a * a * self.power + b * b)
        xt = x.double() - a * self.mean
        return (self.mean + torch.fft.ifft2(torch.fft.fft2(xt) * gain).real).to(x.dtype)


def proxy_restorer(prior: GaussianFacePrior, steps: int = ilvr.DR2_STEPS) -> Restorer:
    """DR2's loop (Eq. 9-11, pixel space, N in image px) with :class:`GaussianFacePrior` as the denoiser."""
    sigma_table = sigmas_from_alphas_cumprod(sd_alphas_cumprod())

    def restore(images, n, tau, omega, seed):
        if tuple(images.shape[-2:]) != prior.size:
            raise ValueError(f"the proxy prior was fitted at {prior.size} px, got images of "
                             f"{tuple(images.shape[-2:])}; calibrate and apply at one size.")
        schedule = ilvr.make_schedule(float(n), int(tau), int(omega), steps)
        sigmas = ilvr.schedule_sigmas(schedule, sigma_table)
        y = images.double() * 2 - 1
        out = ilvr.dr2_sample(lambda x, s, i: prior.denoise(x, s), y, sigmas, ilvr.DR2Noise(seed, y.shape),
                              ilvr.LatentRefiner(y, float(n), "ddpm"), "ddpm")
        return ((out.x0 + 1) / 2).clamp(0, 1).float()
    return restore


# --------------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DR2AutoCalibration:
    """Calibration table: features (M, D) of the calibration LQs, scores (M, G) of each grid point, the grid."""

    features: torch.Tensor
    scores: torch.Tensor
    grid: tuple[tuple[float, int], ...]
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    steps: int = ilvr.DR2_STEPS
    space: str = "latent"
    k: int = 5
    patch_size: int = 96
    restorer: str = "dr2"
    encoder_hash: str = ""
    criterion: str = CRITERION

    def omega(self, tau: int) -> int:
        return ilvr.omega_auto(int(tau), self.steps)

    def choose_index(self, features: np.ndarray | torch.Tensor) -> list[int]:
        """Grid index per query row: argmax of the mean score over the k nearest calibration images."""
        q = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        if q.ndim != 2 or q.shape[-1] != self.features.shape[-1]:
            raise ValueError(f"features of shape {tuple(q.shape)} do not match the calibration's "
                             f"{self.features.shape[-1]} dimensions: they come from different DR encoders; calibrate "
                             "with this encoder (`bfr calibrate-dr2`).")
        q = (q - self.feature_mean) / self.feature_std
        ref = (self.features.double() - self.feature_mean) / self.feature_std
        nearest = torch.cdist(q, ref).topk(min(self.k, ref.shape[0]), largest=False).indices
        return [int(self.scores.double()[row].mean(0).argmax()) for row in nearest]

    def choose(self, features) -> list[tuple[float, int, int]]:
        """(N, tau, omega) per query row."""
        return [(float(self.grid[i][0]), int(self.grid[i][1]), self.omega(self.grid[i][1]))
                for i in self.choose_index(features)]


def degrade_known(hq: torch.Tensor, presets=CALIBRATION_PRESETS, seed: int = 0) -> tuple[torch.Tensor, list, list]:
    """Every HQ image under every preset (seeded): (LQ (N*P, 3, H, W), preset names, image index)."""
    lqs, names, index = [], [], []
    for j, name in enumerate(presets):
        config = SEVERITIES[name] if name in SEVERITIES else degradation.get_preset(name)
        lq, _ = degradation.degrade(hq, config, seed=seed * 7919 + j)
        lqs.append(lq)
        names += [name] * hq.shape[0]
        index += list(range(hq.shape[0]))
    return torch.cat(lqs), names, index


@torch.no_grad()
def score_grid(restore: Restorer, lq: torch.Tensor, hq: torch.Tensor, grid, steps: int = ilvr.DR2_STEPS,
               seed: int = 0, batch: int = 16) -> torch.Tensor:
    """(M, G) criterion (PSNR of the DR2 output vs HQ) for every LQ row and grid point."""
    scores = torch.zeros(lq.shape[0], len(grid), dtype=torch.float64)
    for g, (n, tau) in enumerate(grid):
        omega = ilvr.omega_auto(int(tau), steps)
        for s in range(0, lq.shape[0], batch):
            out = restore(lq[s:s + batch], n, tau, omega, seed + s)
            scores[s:s + batch, g] = torch.as_tensor(psnr(out.permute(0, 2, 3, 1), hq[s:s + batch].permute(0, 2, 3, 1)),
                                                     dtype=torch.float64)
    return scores


def calibrate(encoder: torch.nn.Module, patch: int, restore: Restorer, hq: torch.Tensor, *, grid=DEFAULT_GRID,
              presets=CALIBRATION_PRESETS, steps: int = ilvr.DR2_STEPS, space: str = "latent", k: int = 5,
              seed: int = 0, restorer_name: str = "dr2") -> DR2AutoCalibration:
    """Build the table on HQ faces (N, 3, S, S): every preset, f_DR of each LQ, the criterion on the whole grid."""
    for n, tau in grid:
        ilvr.validate_parameters(float(n), int(tau), "auto", steps, space)
    lq, _, index = degrade_known(hq, presets, seed)
    feats = torch.as_tensor(dr_features(encoder, lq, patch))
    scores = score_grid(restore, lq, hq[index], grid, steps, seed)
    logger.info("DR2 auto calibration: %d LQ images x %d grid points (%s restorer)", lq.shape[0], len(grid),
                restorer_name)
    return DR2AutoCalibration(feats, scores, tuple((float(n), int(t)) for n, t in grid), feats.mean(0),
                              feats.std(0) + 1e-8, steps, space, k, patch, restorer_name, encoder_hash(encoder))


@torch.no_grad()
def evaluate_auto(cal: DR2AutoCalibration, encoder: torch.nn.Module, restore: Restorer, hq: torch.Tensor,
                  presets=CALIBRATION_PRESETS, seed: int = 1) -> dict:
    """Held-out comparison: auto (per image) vs the best single fixed grid point chosen on the calibration set
    (``fixed_calibrated``) and chosen on this test set itself (``fixed_oracle``, the strongest fixed choice), and
    the per-image oracle (upper bound). Mean criterion (PSNR dB) over all held-out LQs."""
    lq, names, index = degrade_known(hq, presets, seed)
    feats = dr_features(encoder, lq, cal.patch_size)
    scores = score_grid(restore, lq, hq[index], cal.grid, cal.steps, seed)
    chosen = cal.choose_index(feats)
    auto = scores[torch.arange(len(chosen)), torch.tensor(chosen)]
    cal_best = int(cal.scores.mean(0).argmax())
    test_best = int(scores.mean(0).argmax())
    per_preset = {p: {"auto": float(auto[[i for i, x in enumerate(names) if x == p]].mean()),
                      "fixed_calibrated": float(scores[[i for i, x in enumerate(names) if x == p], cal_best].mean())}
                  for p in presets}
    return {"auto": float(auto.mean()), "fixed_calibrated": float(scores[:, cal_best].mean()),
            "fixed_calibrated_params": list(cal.grid[cal_best]), "fixed_oracle": float(scores[:, test_best].mean()),
            "fixed_oracle_params": list(cal.grid[test_best]), "per_image_oracle": float(scores.max(1).values.mean()),
            "auto_choices": [list(cal.grid[i]) for i in chosen], "presets": names, "per_preset": per_preset,
            "images": int(hq.shape[0]), "lq_images": int(lq.shape[0])}


# --------------------------------------------------------------------------------------------------------------------
# File
# --------------------------------------------------------------------------------------------------------------------


def save_calibration(path: str | Path, cal: DR2AutoCalibration) -> Path:
    tensors = {"features": cal.features.float(), "scores": cal.scores.float(), "feature_mean": cal.feature_mean.float(),
               "feature_std": cal.feature_std.float()}
    meta = {"bfr_format": AUTO_FORMAT, "grid": json.dumps([list(g) for g in cal.grid]), "steps": str(cal.steps),
            "space": cal.space, "k": str(cal.k), "criterion": cal.criterion, "restorer": cal.restorer,
            "patch_size": str(cal.patch_size), "encoder_hash": cal.encoder_hash}
    path = _write(path, tensors, meta, None)
    logger.info("Saved the DR2 auto calibration (%d images x %d grid points) to %s", cal.features.shape[0],
                len(cal.grid), path)
    return path


def load_calibration(path: str | Path) -> DR2AutoCalibration:
    """A checked ``drbfr-dr2-auto/1`` file; anything else is a CheckpointError naming the file and the fix."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(path, f"expected a .safetensors calibration from `bfr calibrate-dr2`, got "
                                    f"{path.suffix or 'no extension'!r}.")
    tensors, meta = _read(path)
    fmt = meta.get("bfr_format")
    if fmt != AUTO_FORMAT:
        raise CheckpointError(path, f"bfr_format is {fmt!r}, expected {AUTO_FORMAT!r}: a DR2 auto calibration is "
                                    "written by `bfr calibrate-dr2` (a DR encoder file goes to the encoder input).")
    missing = [k for k in ("features", "scores", "feature_mean", "feature_std") if k not in tensors]
    if missing:
        raise CheckpointError(path, f"tensors {missing} are missing; re-run `bfr calibrate-dr2`.")
    try:
        grid = tuple((float(n), int(t)) for n, t in json.loads(meta["grid"]))
        steps, k, patch = int(meta["steps"]), int(meta["k"]), int(meta["patch_size"])
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"metadata grid / steps / k / patch_size unreadable ({exc}); re-run "
                                    "`bfr calibrate-dr2`.") from exc
    m, d = tensors["features"].shape
    if tuple(tensors["scores"].shape) != (m, len(grid)) or tensors["feature_mean"].shape[-1] != d:
        raise CheckpointError(path, f"scores {tuple(tensors['scores'].shape)} do not match {m} images x "
                                    f"{len(grid)} grid points; re-run `bfr calibrate-dr2`.")
    return DR2AutoCalibration(tensors["features"], tensors["scores"], grid, tensors["feature_mean"].double(),
                              tensors["feature_std"].double(), steps, meta.get("space", "latent"), k, patch,
                              meta.get("restorer", "dr2"), meta.get("encoder_hash", ""),
                              meta.get("criterion", CRITERION))


def auto_params(cal: DR2AutoCalibration, encoder: torch.nn.Module, images: torch.Tensor,
                per_image: bool = True) -> list[tuple[float, int, int]]:
    """(N, tau, omega) for images (B, 3, H, W) in [0, 1]: per image, or one choice from the batch's mean f_DR."""
    if cal.encoder_hash and encoder_hash(encoder) != cal.encoder_hash:
        raise ValueError(f"the DR encoder (weights {encoder_hash(encoder)}) is not the one this calibration was "
                         f"made with ({cal.encoder_hash}); run `bfr calibrate-dr2` with this encoder.")
    feats = dr_features(encoder, images, cal.patch_size)
    if not per_image:
        feats = feats.mean(0, keepdims=True)
    return cal.choose(feats)
