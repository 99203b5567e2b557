"""``bfr train face-ae --stage recon|assoc``: the HQ/LQ face autoencoders behind FlipNet's BFR face embeddings (§4.1).

* ``recon`` (paper: 200k iterations, batch 32): each autoencoder reconstructs its own images,
  L_ae = L_1 + 0.5 L_p + 0.8 L_adv, against a PatchGAN discriminator per autoencoder (hinge loss).
* ``assoc`` (paper: 80k iterations): start from the recon output and add the CLIP-style association of HQ and LQ
  patch tokens, L_asso = L_ae + (L_CE^x + L_CE^y) / 2 (Eq. 6).

The autoencoders are initialised from the SD VAE (``--init-vae``, a diffusers base folder or its ``vae/``) in the
recon stage, as in the paper. Output: ``face_ae_<stage>.safetensors`` (``lora/checkpoint.py``), which the next stage
(``--init-from``) and ``bfr train flipnet --face-ae`` read. Both stages may use one output folder: their resumable
checkpoints are ``checkpoint-recon-<step>`` and ``checkpoint-assoc-<step>`` (``train/core.py``).

Sizes at the paper's topology (the SD VAE, as the paper initialises from it): 83.65 M parameters per autoencoder
(encoder 34.16 M, decoder 49.49 M), 167.3 M for the pair: 669 MB per exported file in fp32, 335 MB in bf16 / fp16
(``--mixed-precision`` / ``--export-dtype``). A resumable checkpoint adds the fp32 weights and AdamW's two moments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import AutoencoderKL

from ..lora.checkpoint import load_face_ae_checkpoint, save_face_ae_checkpoint
from ..lora.face_embedder import FaceAEConfig, FaceAutoencoderPair, patchify_latent
from ..lora.losses import (
    PatchDiscriminator,
    association_loss,
    generator_adv_loss,
    hinge_d_loss,
    patch_similarity,
    reconstruction_loss,
    symmetric_patch_ce,
)
from .core import Stage, StepContext, StepResult, TrainConfig, TrainingRun, adamw, flag
from .core import face_folder_dataset, perceptual_loss, save_image_grid

logger = logging.getLogger(__name__)

STAGES = ("recon", "assoc")
DEFAULT_STEPS = {"recon": 200_000, "assoc": 80_000}


@dataclass
class FaceAETrainConfig(TrainConfig):
    """Face-autoencoder training configuration (paper defaults where the paper gives them)."""

    COMMAND = "train face-ae"
    RUN_FIELD = "stage"
    FIRST_RUN = """\
HQ/LQ face autoencoders for FlipNet's face embeddings, in two stages that may share one --output-dir (each stage keeps
its own resumable checkpoint-<stage>-<step> folders):

  bfr train face-ae --stage recon --hq-dir FACES --init-vae SD21_DIR --vgg-weights vgg19-dcbb9e9d.pth --output-dir RUN
  bfr train face-ae --stage assoc --init-from RUN/face_ae_recon.safetensors --hq-dir FACES \\
      --vgg-weights vgg19-dcbb9e9d.pth --output-dir RUN

A first run needs --stage, --hq-dir, --output-dir, and --vgg-weights FILE (torchvision's VGG19) or --lambda-perceptual
0; assoc also needs --init-from. Add --resume-from-checkpoint latest to continue an interrupted stage. Defaults are
the paper's (512 px, 200k recon + 80k assoc steps); a quick test: --resolution 128 --max-train-steps 200."""

    stage: str = flag("recon (reconstruction) or assoc (association, starts from --init-from)", "model",
                      metavar="recon|assoc", default="recon")
    init_vae: str | None = flag("recon: initialise both AEs from this SD VAE (diffusers base folder or its vae/), as "
                                "in the paper", "model", metavar="DIR", default=None)
    init_from: str | None = flag("assoc: the recon stage's face_ae_recon.safetensors", "model", metavar="FILE",
                                 default=None)
    block_out_channels: tuple[int, ...] = flag("AE channels per level (SD VAE: 128 256 512 512)", "model",
                                               default=(128, 256, 512, 512))
    layers_per_block: int = flag("ResNet blocks per AE level (SD VAE: 2)", "model", default=2)
    latent_channels: int = flag("AE latent channels d (SD VAE: 4)", "model", default=4)
    norm_num_groups: int = flag("GroupNorm groups in the AE (SD VAE: 32)", "model", default=32)
    patch_size: int = flag("latent pixels per face token side (1 = the paper's N = h*w)", "model", default=4)
    train_batch_size: int = flag("batch per process (paper: 32 in total)", "optim", default=4)
    max_train_steps: int | None = flag("optimizer steps (default: 200k recon, 80k assoc)", "schedule", default=None)
    disc_learning_rate: float = flag("AdamW learning rate of the discriminators", "optim", default=5e-5)
    adam_beta1: float = flag("AdamW beta1", "optim", default=0.5)
    adam_beta2: float = flag("AdamW beta2", "optim", default=0.9)
    adam_weight_decay: float = flag("AdamW weight decay", "optim", default=0.0)
    lambda_perceptual: float = flag("lambda_p of L_ae (paper 0.5; 0: no VGG19 needed)", "optim", default=0.5)
    lambda_adv: float = flag("lambda_adv of L_ae (paper 0.8)", "optim", default=0.8)
    disc_start: int = flag("step at which the adversarial terms switch on", "optim", default=0)
    disc_channels: int = flag("base channels of the PatchGAN discriminator", "model", default=64)
    disc_layers: int = flag("layers of the PatchGAN discriminator", "model", default=3)
    temperature: float = flag("association: cosine-similarity temperature (<= 0: raw dot products)", "optim",
                              default=0.07)

    def __post_init__(self):
        if self.max_train_steps is None and self.stage in STAGES:
            self.max_train_steps = DEFAULT_STEPS[self.stage]
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        super().__post_init__()

    def validate(self) -> None:
        if self.stage not in STAGES:
            self.bad("stage", f"must be one of {STAGES}.")
        if not self.hq_dir:
            self.bad("hq_dir", "is required (a folder of aligned HQ faces).")
        if self.stage == "assoc" and not self.init_from:
            self.bad("init_from", "is required for --stage assoc: pass the face_ae_recon.safetensors of the recon "
                     "stage.")
        self.check_positive_ints("layers_per_block", "latent_channels", "patch_size", "disc_layers")
        if not self.disc_learning_rate > 0:
            self.bad("disc_learning_rate", "must be > 0.")
        self.check_non_negative("lambda_adv", "disc_start")
        super().validate()
        side = self.resolution // 2 ** (len(self.block_out_channels) - 1)
        if side % self.patch_size:
            self.bad("patch_size", f"must divide the latent side {side} (resolution / AE downscale).")

    def ae_config(self) -> FaceAEConfig:
        return FaceAEConfig(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                            latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
                            patch_size=self.patch_size)


class FaceAETrainModule(nn.Module):
    """What DDP wraps for the generator step: both autoencoders."""

    def __init__(self, pair: FaceAutoencoderPair):
        super().__init__()
        self.pair = pair

    def forward(self, hq: torch.Tensor, lq: torch.Tensor):
        x_hat, z_x = self.pair.hq(hq)
        y_hat, z_y = self.pair.lq(lq)
        return x_hat, y_hat, z_x, z_y


class DiscriminatorPair(nn.Module):
    """One PatchGAN per autoencoder (HQ, LQ)."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        self.hq = PatchDiscriminator(3, channels, layers)
        self.lq = PatchDiscriminator(3, channels, layers)

    def forward(self, hq: torch.Tensor, lq: torch.Tensor):
        return self.hq(hq), self.lq(lq)


def face_ae_generator_loss(outputs, hq: torch.Tensor, lq: torch.Tensor, disc: nn.Module | None,
                           perceptual: nn.Module | None, cfg: FaceAETrainConfig, adversarial: bool,
                           patch_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """L_ae = L_1 + 0.5 L_p + 0.8 L_adv for both autoencoders (recon), plus the association of Eq. (6) (assoc)."""
    x_hat, y_hat, z_x, z_y = outputs
    logs: dict[str, float] = {}
    total = hq.new_zeros((), dtype=torch.float32)
    fakes = disc(x_hat, y_hat) if (adversarial and disc is not None) else (None, None)
    for name, img, rec, fake in (("x", hq, x_hat, fakes[0]), ("y", lq, y_hat, fakes[1])):
        l_p = perceptual(img, rec) if perceptual is not None and cfg.lambda_perceptual > 0 else img.new_zeros(())
        l_adv = generator_adv_loss(fake) if fake is not None else img.new_zeros(())
        l_ae, l1 = reconstruction_loss(img, rec, l_p, l_adv, cfg.lambda_perceptual, cfg.lambda_adv)
        total = total + l_ae
        logs.update({f"l1_{name}": float(l1.detach()), f"lp_{name}": float(l_p.detach()),
                     f"adv_{name}": float(l_adv.detach())})
    logs["l_ae"] = float(total.detach())
    if cfg.stage == "assoc":
        temp = cfg.temperature if cfg.temperature > 0 else None
        sim = patch_similarity(patchify_latent(z_x.float(), patch_size), patchify_latent(z_y.float(), patch_size),
                               temp)
        ce_x, ce_y = symmetric_patch_ce(sim)
        total = association_loss(total, ce_x, ce_y)
        logs.update(ce_x=float(ce_x.detach()), ce_y=float(ce_y.detach()))
    return total, logs


def face_ae_discriminator_loss(disc: nn.Module, hq, lq, x_hat, y_hat) -> torch.Tensor:
    """Hinge loss of both discriminators on real images vs detached reconstructions (one forward, DDP-safe)."""
    b = hq.shape[0]
    out_x, out_y = disc(torch.cat([hq, x_hat.detach()]), torch.cat([lq, y_hat.detach()]))
    return hinge_d_loss(out_x[:b], out_x[b:]) + hinge_d_loss(out_y[:b], out_y[b:])


def _init_pair(cfg: FaceAETrainConfig) -> FaceAutoencoderPair:
    """The autoencoder pair to train: ``--init-from`` (recon -> assoc), else fresh, optionally from the SD VAE."""
    if cfg.init_from:
        pair, meta = load_face_ae_checkpoint(cfg.init_from)
        logger.info("%s stage continues from %s (%s stage).", cfg.stage, cfg.init_from, meta.get("stage"))
        if cfg.stage == "assoc" and meta.get("stage") != "recon":
            logger.warning("--init-from %s is a %r-stage file; the association stage normally starts from recon.",
                           cfg.init_from, meta.get("stage"))
        if pair.cfg.to_dict() != cfg.ae_config().to_dict():
            logger.warning("Using the autoencoder topology stored in %s (%s), not the command-line one.",
                           cfg.init_from, pair.cfg.to_dict())
        return pair
    pair = FaceAutoencoderPair(cfg.ae_config())
    if cfg.init_vae:
        root = Path(cfg.init_vae)
        vae_dir = root / "vae" if (root / "vae").is_dir() else root
        if not (vae_dir / "config.json").is_file():
            raise FileNotFoundError(f"--init-vae {str(root)!r} is not a diffusers VAE folder (or a base folder with "
                                    "vae/); omit it to train from scratch.")
        vae = AutoencoderKL.from_pretrained(vae_dir)
        pair.init_from_vae(vae.state_dict(), str(vae_dir))
        logger.info("Initialised both face autoencoders from %s.", vae_dir)
    return pair


def train_face_ae(cfg: FaceAETrainConfig) -> Path:
    """Train one stage of the face autoencoders; returns ``output_dir/face_ae_<stage>.safetensors``."""
    run = TrainingRun(cfg)
    dataset = face_folder_dataset(cfg)
    pair = _init_pair(cfg)
    if cfg.gradient_checkpointing:
        pair.enable_gradient_checkpointing()
    gen_module = FaceAETrainModule(pair)
    disc = DiscriminatorPair(cfg.disc_channels, cfg.disc_layers)
    perceptual = perceptual_loss(cfg, criterion="l1")
    if perceptual is not None:
        perceptual.to(run.device)
    stages = [Stage("generator", adamw(gen_module.parameters(), cfg), list(gen_module.parameters()), cfg.max_grad_norm),
              Stage("discriminator", adamw(disc.parameters(), cfg, lr=cfg.disc_learning_rate))]

    def step(batch: dict, models: tuple, ctx: StepContext) -> StepResult:
        """L_ae / L_asso for the generator; the hinge loss for the discriminators once ``disc_start`` is reached."""
        gen, wrapped_disc = models
        hq, lq = batch["hq"], batch["lq"]
        adversarial = cfg.lambda_adv > 0 and ctx.global_step >= cfg.disc_start
        outputs = gen(hq, lq)
        # the generator's adversarial term goes through the unwrapped, temporarily frozen discriminators
        disc.requires_grad_(False)
        loss_g, logs = face_ae_generator_loss(outputs, hq, lq, disc, perceptual, cfg, adversarial,
                                              pair.cfg.patch_size)
        disc.requires_grad_(True)
        losses = {"generator": loss_g}
        if adversarial:
            losses["discriminator"] = face_ae_discriminator_loss(wrapped_disc, hq, lq, outputs[0], outputs[1])
            logs["l_d"] = float(losses["discriminator"].detach())
        return StepResult(losses, logs)

    def export(path: Path) -> Path:
        return save_face_ae_checkpoint(path, pair, stage=cfg.stage, image_size=cfg.resolution,
                                       train_config=cfg.to_dict(), dtype=run.export_dtype)

    return run.fit(name="face_ae", title=f"face autoencoders ({cfg.stage} stage)", dataset=dataset,
                   models=[gen_module, disc], stages=stages, step=step, export=export,
                   export_name=f"face_ae_{cfg.stage}.safetensors",
                   validate=lambda val_batch, global_step: _validate(cfg, pair, val_batch, global_step))


@torch.no_grad()
def _validate(cfg: FaceAETrainConfig, pair: FaceAutoencoderPair, val_batch: dict, step: int) -> Path:
    """Rows of [HQ | HQ recon | LQ | LQ recon]."""
    was = pair.training
    pair.eval()
    try:
        hq, lq = val_batch["hq"], val_batch["lq"]
        x_hat, _ = pair.hq(hq)
        y_hat, _ = pair.lq(lq)
    finally:
        pair.train(was)
    path = Path(cfg.output_dir) / "validation" / f"{cfg.stage}_step_{step:07d}.png"
    save_image_grid([[a, b, c, d] for a, b, c, d in zip(hq, x_hat, lq, y_hat)], path)
    return path
