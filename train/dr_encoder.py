"""``bfr train dr-encoder``: DR-BFR's Degradation Representation Module (§3.1, Eq. 1-7) on the training core.

Per image i of a batch: its own random degradation phi_i (the ``dr-bfr`` preset, made on the fly by the core, Eq. 1),
then two patches at random positions, the same in the HQ and the LQ image (Eq. 2): LQ p1, p2 and HQ r2 (at p2's
position). The objective is ``DRModule.loss`` (Eq. 7): L_recon (G_LQ re-degrades r2 with E_DR(p1), L1 to p2, Eq. 4)
+ lambda1 InfoNCE over the MLP projections (the two patches of an image positive, the other images negative, Eq. 5)
+ lambda2 energy distance to N(0, I) (Eq. 6). The paper states no patch size, batch size or schedule: patches of
96 px from 512 px faces (ours; DASR trains on 48 px LR patches at x4, i.e. 192 px HQ), batch 16, Adam 1e-4 (DASR's
encoder stage).

Beyond the paper (ours, ``--content-repeats R``, default 1 = the paper): each HQ image of a batch appears R times
with R independent degradations and the SAME patch positions, so the in-batch negatives include the same content
under other degradations; InfoNCE can then only be solved by the degradation, not by colour or content (with few
training images, content is otherwise a shortcut: two patches of one photo share its palette).

Two defaults that differ from the bare :class:`DRConfig` (both ours, measured in tests/test_dr_train.py and README
"DR-BFR degradation representation"): ``--input-norm standardize`` (E_DR sees each patch with its channel means
removed and its RMS contrast divided out: the degradations of Eq. 11 keep the local mean, so those statistics are
content; without it a test-sized training gave features ~99 % content by variance) and lambda2 = 0.01 (ReDSR's
weight of its energy-distance term, which DR-BFR's Eq. 6 takes from ReDSR; 0.1 pulled the features toward the
N(0, I) spread faster than the contrastive term could fill it with degradation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..lora.dr_checkpoint import save_dr_checkpoint
from ..lora.dr_module import DRConfig, DRModule
from .core import Stage, StepContext, StepResult, TrainConfig, TrainingRun, adamw, face_folder_dataset, flag
from .core import save_image_grid, warmup_schedule
from .data import degrade_on_the_fly

logger = logging.getLogger(__name__)


@dataclass
class DREncoderTrainConfig(TrainConfig):
    """DRM training; every default that the paper does not state is marked as ours."""

    COMMAND = "train dr-encoder"
    FIRST_RUN = """\
DR-BFR's degradation representation: E_DR (+ G_LQ and the contrastive MLP) on HQ faces degraded on the fly.

  bfr train dr-encoder --hq-dir FACES --output-dir RUN_DR

then `bfr train drbfr --dr-encoder RUN_DR/dr_encoder.safetensors ...`. A quick test: --resolution 128
--patch-size 48 --max-train-steps 200 --train-batch-size 8."""

    degradation_preset: str = flag("classical preset for on-the-fly LQ (paper §4.1: `dr-bfr`)", "data",
                                   default="dr-bfr")
    patch_size: int = flag("side of the two patches per image, px (ours: 96; the same positions in HQ and LQ, Eq. 2)",
                           "data", default=96)
    train_batch_size: int = flag("images per batch: the contrastive negatives (ours: 16)", "optim", default=16)
    learning_rate: float = flag("Adam learning rate (DASR's encoder stage: 1e-4)", "optim", default=1e-4)
    adam_weight_decay: float = flag("AdamW weight decay", "optim", default=0.0)
    lambda_perceptual: float = flag("unused by the DRM (L_DR, Eq. 7)", "optim", default=0.0)
    lambda_contras: float = flag("lambda1 of Eq. 7 (ours: 0.1)", "model", default=0.1)
    lambda_distribution: float = flag("lambda2 of Eq. 7 (ReDSR's 0.01 for the energy distance)", "model",
                                      default=0.01)
    temperature: float = flag("InfoNCE temperature tau (DASR's 0.07)", "model", default=0.07)
    num_tokens: int = flag("DR tokens l (a g x g pooling grid; ours: 4)", "model", default=4)
    token_dim: int = flag("DR token width d (DASR's 256)", "model", default=256)
    max_train_steps: int = flag("optimizer steps (ours)", "schedule", default=100_000)
    lr_warmup_steps: int = flag("linear warm-up steps, then constant", "optim", default=0)
    encoder_channels: tuple[int, ...] = flag("E_DR widths per VGG block, two 3x3 convs each, a 2x2 max-pool between "
                                             "(DASR's 64 128 256)", "model", default=(64, 128, 256))
    gen_channels: tuple[int, ...] = flag("G_LQ U-Net widths per level (ours: 32 64 128)", "model",
                                         default=(32, 64, 128))
    input_norm: str = flag("what E_DR does to a patch first: standardize = remove its channel means, divide by its "
                           "RMS contrast (ours: those are content, Eq. 11 keeps them); none = 2x - 1", "model",
                           default="standardize")
    content_repeats: int = flag("each image R times per batch with R different degradations at the same patch "
                                "positions: same-content negatives (ours; 1 = the paper)", "model", default=1)

    def __post_init__(self):
        self.encoder_channels = tuple(int(c) for c in self.encoder_channels)
        self.gen_channels = tuple(int(c) for c in self.gen_channels)
        super().__post_init__()

    def validate(self) -> None:
        if not self.hq_dir:
            self.bad("hq_dir", "is required (a folder of aligned HQ faces; LQ is made on the fly).")
        if self.lambda_perceptual:
            self.bad("lambda_perceptual", "must be 0: the DRM's objective is L_DR (Eq. 7).")
        self.check_positive_ints("patch_size", "num_tokens", "token_dim", "content_repeats")
        if self.input_norm not in DRConfig.INPUT_NORMS:
            self.bad("input_norm", f"must be one of {DRConfig.INPUT_NORMS}, got {self.input_norm!r}.")
        if self.patch_size > self.resolution:
            self.bad("patch_size", f"is larger than --resolution {self.resolution}: the patches are cut from the "
                     "training images.")
        multiple = 2 ** (len(self.gen_channels) - 1)
        if self.patch_size % multiple:
            self.bad("patch_size", f"must be a multiple of {multiple} (G_LQ's U-Net halves it "
                     f"{len(self.gen_channels) - 1} times).")
        if self.patch_size < 2 ** (len(self.encoder_channels) - 1):
            self.bad("patch_size", f"must be >= {2 ** (len(self.encoder_channels) - 1)} (E_DR max-pools "
                     f"{len(self.encoder_channels) - 1} times).")
        if self.train_batch_size < 2:
            self.bad("train_batch_size", "must be >= 2: the other images of a batch are the contrastive negatives.")
        super().validate()

    def dr_config(self) -> DRConfig:
        return DRConfig(encoder_blocks=tuple((c, c) for c in self.encoder_channels), gen_channels=self.gen_channels,
                        num_tokens=self.num_tokens, token_dim=self.token_dim, temperature=self.temperature,
                        lambda_contras=self.lambda_contras, lambda_distribution=self.lambda_distribution,
                        input_norm=self.input_norm)


def patch_pairs(hq: torch.Tensor, lq: torch.Tensor, size: int, generator: torch.Generator | None = None,
                repeats: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p1, p2, r1, r2): per image two random ``size`` x ``size`` windows, each at the same position in LQ (p) and HQ
    (r) (Eq. 2). Images (B, 3, H, W), H and W >= size. ``repeats`` R: rows i, i + B/R, i + 2B/R, ... (one content
    under R degradations) share their positions."""
    if hq.shape != lq.shape:
        raise ValueError(f"HQ {tuple(hq.shape)} and LQ {tuple(lq.shape)} must have one shape (LQ resized back to HQ).")
    b, _, h, w = hq.shape
    if min(h, w) < size:
        raise ValueError(f"images of {w}x{h} px are smaller than the {size} px patches; lower --patch-size or raise "
                         "--resolution.")
    if repeats < 1 or b % repeats:
        raise ValueError(f"repeats={repeats} must be a positive divisor of the batch {b}.")
    device = hq.device
    ys = torch.randint(0, h - size + 1, (2, b // repeats), generator=generator, device=device).repeat(1, repeats).tolist()
    xs = torch.randint(0, w - size + 1, (2, b // repeats), generator=generator, device=device).repeat(1, repeats).tolist()

    def cut(t, k):
        return torch.stack([t[i, :, ys[k][i]:ys[k][i] + size, xs[k][i]:xs[k][i] + size] for i in range(b)])

    return cut(lq, 0), cut(lq, 1), cut(hq, 0), cut(hq, 1)


def _repeat_seed(seed: int, step: int, process: int, copy: int) -> int:
    """Degradation seed of the ``copy``-th extra copy of a batch (independent of the core's LQ seeds)."""
    return int(np.random.SeedSequence([seed, step, process, copy, 0xD2]).generate_state(1)[0]) & 0x7FFFFFFF


class DRLoss(torch.nn.Module):
    """What DDP wraps: ``forward`` is L_DR, so gradient synchronisation sees the call."""

    def __init__(self, dr: DRModule):
        super().__init__()
        self.dr = dr

    def forward(self, p1, p2, r2, generator=None) -> dict[str, torch.Tensor]:
        return self.dr.loss(p1, p2, r2, generator)


def train_dr_encoder(cfg: DREncoderTrainConfig) -> Path:
    """Train the DRM; returns the exported ``dr_encoder.safetensors`` (``drbfr-dr/1``)."""
    run = TrainingRun(cfg)
    dataset = face_folder_dataset(cfg)
    module = DRModule(cfg.dr_config()).to(run.device)
    params = list(module.parameters())
    logger.info("DR module: E_DR %.2f M, projection %.2f M, G_LQ %.2f M parameters.",
                *(sum(p.numel() for p in m.parameters()) / 1e6
                  for m in (module.encoder, module.projection, module.degrader)))
    optimizer = adamw(params, cfg)
    stage = Stage("dr", optimizer, params, cfg.max_grad_norm, warmup_schedule(optimizer, cfg.lr_warmup_steps))

    def step(batch: dict, models: tuple, ctx: StepContext) -> StepResult:
        hq, lq = batch["hq"], batch["lq"]
        if cfg.content_repeats > 1:  # the same images again, each copy with its own fresh degradation
            extra = [degrade_on_the_fly(hq, _repeat_seed(cfg.seed, ctx.global_step, run.accelerator.process_index, k),
                                        run.degradation) for k in range(1, cfg.content_repeats)]
            hq, lq = hq.repeat(cfg.content_repeats, 1, 1, 1), torch.cat([lq, *extra])
        p1, p2, _, r2 = patch_pairs(hq, lq, cfg.patch_size, ctx.generator, cfg.content_repeats)
        losses = models[0](p1, p2, r2, ctx.generator)
        return StepResult({"dr": losses["total"]}, {k: float(v.detach()) for k, v in losses.items() if k != "total"})

    def export(path: Path) -> Path:
        return save_dr_checkpoint(path, module, patch_size=cfg.patch_size, train_config=cfg.to_dict(),
                                  dtype=run.export_dtype)

    def validate(val_batch: dict, global_step: int) -> Path:
        was = module.training
        module.eval()
        g = torch.Generator(device=run.device).manual_seed(cfg.seed)
        with torch.no_grad():
            p1, p2, _, r2 = patch_pairs(val_batch["hq"], val_batch["lq"], cfg.patch_size, g)
            redegraded = module.degrader(r2, module.encoder(p1)).clamp(0, 1)
            if p1.shape[0] >= 2:  # the fixed batch's L_DR terms (InfoNCE needs two images)
                terms = module.loss(p1, p2, r2, torch.Generator(device=run.device).manual_seed(cfg.seed))
                logger.info("validation step %d: %s", global_step,
                            " ".join(f"{k}={float(v):.4f}" for k, v in terms.items()))
        module.train(was)
        path = Path(cfg.output_dir) / "validation" / f"dr_step_{global_step:07d}.png"
        save_image_grid([[a, b, c] for a, b, c in zip(r2, p2, redegraded)], path)  # HQ r2 | LQ p2 | G_LQ(r2, E(p1))
        logger.info("validation images -> %s", path)
        return path

    return run.fit(name="dr_encoder", title="DR encoder", dataset=dataset, models=[DRLoss(module)], stages=[stage],
                   step=step,
                   export=export, export_name="dr_encoder.safetensors", validate=validate)
