"""``bfr train irn``: CLR-Face's Identity Recovery Network f_phi (CLR-Face §3.3, Eq. 11) on the training core.

HQ faces x from ``--hq-dir`` are degraded on the fly with the ``clr-face`` preset (CLR-Face §4.1: blur, down-scaling
s in [1, 32], noise delta in [0, 20], JPEG q in [30, 90]; ``--offshelf-dir`` LQ mixed in as in every trainer), and
f_phi (:class:`..lora.irn.IRN`) minimises Eq. 11 (:func:`..pipelines.irn.irn_loss`) under a frozen ArcFace-style
identity model f_arc (``--identity-model``, an arcface_torch iresnet; mind its licence):

    L_IRN = alpha L1(f_phi(x^d), x) + D_cos(f_arc(f_phi(x^d)), f_arc(x)).

The paper states only the loss and the data (512 px FFHQ); the rest is ours, said per flag. alpha (default 1.0): the
paper trains "emphasizing the identity-preserving loss, with a small amount of L1 loss for better stability"; with
faces in [0, 1], the L1 of a clr-face-degraded face to its original is ~0.05-0.1 while D_cos under a pretrained
ArcFace is ~0.3-0.8 (cosine similarities of restorations to the ground truth are 0.4-0.6 in the paper's Table 1), so
alpha = 1 makes L1 about a tenth of the objective: identity leads, L1 keeps colours and structure. Optimiser: Adam
2e-4 without weight decay (SwinIR's, the paper's IRN), batch 8, constant after an optional warm-up. f_phi starts as
the identity map (zero-initialised last layer), so step 0 scores x_id = x^d. Validation: LQ | IRN | HQ per face.
The export is ``clrface-irn/1`` (:mod:`..lora.irn`): put it into ComfyUI/models/bfr and load it with 'BFR Load
CLR-Face IRN'.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..lora.irn import DEFAULT_ALPHA, IRN, IRNConfig, parameter_count, save_irn_checkpoint
from ..pipelines.arcface import ALIGNS, IdentityModel
from ..pipelines.irn import irn_loss
from .core import Stage, StepContext, StepResult, TrainConfig, TrainingRun, adamw, face_folder_dataset, flag
from .core import save_image_grid, training_identity, warmup_schedule

logger = logging.getLogger(__name__)


@dataclass
class IRNTrainConfig(TrainConfig):
    """Training configuration of f_phi; paper values where it states them (the loss, the data), ours elsewhere."""

    COMMAND = "train irn"
    FIRST_RUN = """\
CLR-Face's Identity Recovery Network f_phi (a compact residual conv encoder-decoder, 4.7 M parameters) trained with
Eq. 11: alpha * L1 + the cosine distance of the identity embeddings, on HQ faces degraded on the fly (clr-face):

  bfr train irn --hq-dir FACES --identity-model backbone.pth --output-dir RUN

A first run needs --hq-dir, --identity-model (an arcface_torch iresnet r18/r34/r50/r100 backbone; mind its licence)
and --output-dir. No SD model is involved. The file is irn.safetensors (clrface-irn/1); put it into
ComfyUI/models/bfr, load it with 'BFR Load CLR-Face IRN' and run 'BFR CLR-Face IRN' to get x_id for the CLR-Face
sampler. A quick test: --resolution 128 --max-train-steps 200."""

    degradation_preset: str = flag("classical preset for on-the-fly LQ (paper §4.1: `clr-face`)", "data",
                                   default="clr-face")
    identity_model: str | None = flag("arcface_torch iresnet backbone (.pth / .safetensors): f_arc of Eq. 11", "model",
                                      metavar="FILE", default=None)
    allow_random_identity: bool = flag("tests only: a randomly initialised r18 instead of --identity-model", "model",
                                       identity=False, default=False)
    identity_align: str = flag("FFHQ crop -> ArcFace input: template (5-point warp) or resize", "model",
                               metavar="|".join(ALIGNS), default="template")
    alpha: float = flag("alpha of Eq. 11, the L1 weight (paper: 'a small amount'; ours: 1.0, see the module doc)",
                        "optim", default=DEFAULT_ALPHA)
    irn_widths: tuple[int, ...] = flag("f_phi widths per level, finest first (ours: 32 64 128 256)", "model",
                                       default=(32, 64, 128, 256))
    irn_blocks: int = flag("residual blocks per level and side (ours: 2)", "model", default=2)
    irn_mid_blocks: int = flag("residual blocks at the coarsest level (ours: 2)", "model", default=2)
    train_batch_size: int = flag("batch per process (ours: 8)", "optim", default=8)
    learning_rate: float = flag("Adam learning rate (SwinIR's 2e-4)", "optim", default=2e-4)
    adam_weight_decay: float = flag("AdamW weight decay (SwinIR: none)", "optim", default=0.0)
    lr_warmup_steps: int = flag("linear warm-up steps, then constant", "optim", default=0)
    lambda_perceptual: float = flag("unused: Eq. 11 has no perceptual term", "optim", default=0.0)
    max_train_steps: int = flag("optimizer steps (ours)", "schedule", default=50_000)

    def __post_init__(self):
        self.irn_widths = tuple(int(w) for w in self.irn_widths)
        super().__post_init__()

    def validate(self) -> None:
        if not self.hq_dir:
            self.bad("hq_dir", "is required (a folder of aligned HQ faces; LQ is made on the fly).")
        if not self.identity_model and not self.allow_random_identity:
            self.bad("identity_model", "is required: an arcface_torch iresnet backbone.pth (r18/r34/r50/r100), f_arc "
                                       "of Eq. 11.")
        if self.identity_align not in ALIGNS:
            self.bad("identity_align", f"must be one of {ALIGNS}.")
        if self.lambda_perceptual:
            self.bad("lambda_perceptual", "must be 0: the IRN's objective is Eq. 11 (alpha L1 + D_cos).")
        if not self.alpha >= 0:
            self.bad("alpha", "must be >= 0 (0: identity loss only).")
        if not self.irn_widths or any(w < 1 for w in self.irn_widths):
            self.bad("irn_widths", "must be one or more positive integers.")
        self.check_non_negative("irn_blocks", "irn_mid_blocks", "lr_warmup_steps")
        super().validate()

    def irn_config(self) -> IRNConfig:
        return IRNConfig(widths=self.irn_widths, blocks=self.irn_blocks, mid_blocks=self.irn_mid_blocks)


def irn_step_loss(net: nn.Module, identity: IdentityModel, hq: torch.Tensor, lq: torch.Tensor, alpha: float
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """One training step's objective: Eq. 11 of f_phi(x^d) against x (the core's step calls this)."""
    return irn_loss(net(lq), hq, identity, alpha)


def identity_record(identity: IdentityModel) -> dict:
    """What the export says about f_arc: arch, align, file + sha256 (or that it was random)."""
    info = identity.weights_info()
    record = {"arch": identity.arch, "align": identity.align}
    record.update(info[0] if info else {"file": "random weights (tests)"})
    return record


def train_irn(cfg: IRNTrainConfig) -> Path:
    """Train f_phi with Eq. 11; returns the exported ``irn.safetensors`` (``clrface-irn/1``)."""
    run = TrainingRun(cfg)
    dataset = face_folder_dataset(cfg)
    identity = training_identity(cfg, run.device, cfg.identity_align)
    net = IRN(cfg.irn_config())
    logger.info("IRN: %d parameters, widths %s; f_arc %s.", parameter_count(net), list(cfg.irn_widths), identity)
    params = list(net.parameters())
    optimizer = adamw(params, cfg)
    stage = Stage("irn", optimizer, params, cfg.max_grad_norm, warmup_schedule(optimizer, cfg.lr_warmup_steps))

    def step(batch: dict, models: tuple, ctx: StepContext) -> StepResult:
        loss, logs = irn_step_loss(models[0], identity, batch["hq"], batch["lq"], cfg.alpha)
        return StepResult({"irn": loss}, logs)

    def export(path: Path) -> Path:
        return save_irn_checkpoint(path, run.accelerator.unwrap_model(net), alpha=cfg.alpha,
                                   identity_model=identity_record(identity), train_config=cfg.to_dict(),
                                   dtype=run.export_dtype)

    def validate(val_batch: dict, global_step: int) -> Path:
        model = run.accelerator.unwrap_model(net)
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(val_batch["lq"])
            _, before = irn_loss(val_batch["lq"], val_batch["hq"], identity, cfg.alpha)
            _, after = irn_loss(out, val_batch["hq"], identity, cfg.alpha)
        model.train(was)
        logger.info("validation step %d: L1 %.4f -> %.4f, L_arc %.4f -> %.4f (LQ -> IRN)", global_step,
                    before["l1"], after["l1"], before["l_arc"], after["l_arc"])
        path = Path(cfg.output_dir) / "validation" / f"irn_step_{global_step:07d}.png"
        rows = [[lq, x_id.clamp(0, 1), hq] for lq, x_id, hq in zip(val_batch["lq"], out, val_batch["hq"])]
        save_image_grid(rows, path)  # LQ | IRN | HQ
        logger.info("validation images -> %s", path)
        return path

    return run.fit(name="irn", title="CLR-Face IRN", dataset=dataset, models=[net], stages=[stage], step=step,
                   export=export, export_name="irn.safetensors", validate=validate)
