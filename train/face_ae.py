"""``bfr train face-ae --stage recon|assoc``: the HQ/LQ face autoencoders behind FlipNet's BFR face embeddings (§4.1).

* ``recon`` (paper: 200k iterations, batch 32): each autoencoder reconstructs its own images,
  L_ae = L_1 + 0.5 L_p + 0.8 L_adv, against a PatchGAN discriminator per autoencoder (hinge loss).
* ``assoc`` (paper: 80k iterations): start from the recon output and add the CLIP-style association of HQ and LQ
  patch tokens, L_asso = L_ae + (L_CE^x + L_CE^y) / 2 (Eq. 6).

The autoencoders are initialised from the SD VAE (``--init-vae``, a diffusers base folder or its ``vae/``) in the
recon stage, as in the paper. Output: ``face_ae_<stage>.safetensors`` (``lora/checkpoint.py``), which the next stage
(``--init-from``) and ``bfr train flipnet --face-ae`` read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..lora.checkpoint import load_face_ae_checkpoint, save_face_ae_checkpoint
from ..lora.face_embedder import FaceAEConfig, FaceAutoencoderPair, patchify_latent
from ..lora.losses import (
    PatchDiscriminator,
    VGGPerceptualLoss,
    association_loss,
    generator_adv_loss,
    hinge_d_loss,
    patch_similarity,
    reconstruction_loss,
    symmetric_patch_ce,
)
from .data import DegradationBatchConfig, FaceFolderDataset, fill_lq_on_the_fly
from .core import (
    MIXED_PRECISION,
    collate,
    prune_checkpoints,
    resolve_resume,
    save_image_grid,
    use_cpu,
)

logger = logging.getLogger(__name__)

STAGES = ("recon", "assoc")
DEFAULT_STEPS = {"recon": 200_000, "assoc": 80_000}


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class FaceAETrainConfig:
    """Face-autoencoder training configuration (paper defaults where the paper gives them)."""

    stage: str = _help("recon (reconstruction) or assoc (association, starts from --init-from)", default="recon")
    output_dir: str = _help("where checkpoints, validation images and face_ae_<stage>.safetensors go", default="")
    hq_dir: str = _help("folder of aligned HQ faces (FFHQ resized to 512)", default="")
    offshelf_dir: str | None = _help("off-shelf LQ folder (<stem>_<k>.png); otherwise LQ on the fly", default=None)
    offshelf_prob: float = _help("probability of an off-shelf LQ instead of on-the-fly (paper 0.5)", default=0.5)
    degradation_preset: str = _help("classical preset for on-the-fly LQ", default="flipnet")
    init_vae: str | None = _help("recon stage: initialise both AEs from this SD VAE (diffusers base folder or its "
                                 "vae/ folder), as in the paper", default=None)
    init_from: str | None = _help("assoc stage: the recon-stage face_ae_recon.safetensors", default=None)
    block_out_channels: tuple[int, ...] = _help("AE channels per level (SD VAE: 128 256 512 512)",
                                                default=(128, 256, 512, 512))
    layers_per_block: int = _help("ResNet blocks per AE level (SD VAE: 2)", default=2)
    latent_channels: int = _help("AE latent channels d (SD VAE: 4)", default=4)
    norm_num_groups: int = _help("GroupNorm groups in the AE (SD VAE: 32)", default=32)
    patch_size: int = _help("latent pixels per face token side (1 = the paper's N = h*w)", default=4)
    resolution: int = _help("training resolution in px", default=512)
    train_batch_size: int = _help("batch per process (paper: 32 in total)", default=4)
    gradient_accumulation_steps: int = _help("accumulate gradients over this many batches", default=1)
    max_train_steps: int | None = _help("optimizer steps (default: 200k recon, 80k assoc)", default=None)
    learning_rate: float = _help("AdamW learning rate of the autoencoders", default=5e-5)
    disc_learning_rate: float = _help("AdamW learning rate of the discriminators", default=5e-5)
    adam_beta1: float = _help("AdamW beta1", default=0.5)
    adam_beta2: float = _help("AdamW beta2", default=0.9)
    adam_weight_decay: float = _help("AdamW weight decay", default=0.0)
    lambda_perceptual: float = _help("lambda_p of L_ae (paper 0.5)", default=0.5)
    lambda_adv: float = _help("lambda_adv of L_ae (paper 0.8)", default=0.8)
    disc_start: int = _help("step at which the adversarial terms switch on", default=0)
    disc_channels: int = _help("base channels of the PatchGAN discriminator", default=64)
    disc_layers: int = _help("layers of the PatchGAN discriminator", default=3)
    temperature: float = _help("association: cosine-similarity temperature (<= 0: raw dot products)", default=0.07)
    vgg_weights: str | None = _help("local VGG19 weights for L_p (torchvision layout)", default=None)
    allow_random_vgg: bool = _help("tests only: allow a randomly initialised VGG19", default=False)
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", default=1.0)
    mixed_precision: str = _help("no | fp16 | bf16", default="no")
    cpu: bool = _help("force CPU (multi-process CPU runs under torchrun use gloo; automatic without CUDA)",
                      default=False)
    gradient_checkpointing: bool = _help("trade compute for memory in the autoencoders", default=False)
    seed: int = _help("global seed", default=0)
    checkpointing_steps: int = _help("save a resumable state + exported .safetensors every N steps", default=5000)
    checkpoints_total_limit: int | None = _help("keep at most this many checkpoint-* folders", default=3)
    resume_from_checkpoint: str | None = _help("'latest' or a checkpoint-* folder", default=None)
    validation_steps: int = _help("write reconstruction images every N steps (0 disables)", default=2000)
    num_validation_images: int = _help("validation images per run", default=4)
    dataloader_num_workers: int = _help("data loader worker processes", default=2)
    log_every: int = _help("log losses every N steps", default=50)
    report_to: str | None = _help("accelerate tracker or none", default=None)

    def __post_init__(self):
        if self.max_train_steps is None and self.stage in STAGES:
            self.max_train_steps = DEFAULT_STEPS[self.stage]
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"train face-ae: --{name.replace('_', '-')}={getattr(self, name)!r} {why}")

        if self.stage not in STAGES:
            bad("stage", f"must be one of {STAGES}.")
        if self.mixed_precision not in MIXED_PRECISION:
            bad("mixed_precision", f"must be one of {MIXED_PRECISION}.")
        if not self.hq_dir:
            bad("hq_dir", "is required (a folder of aligned HQ faces).")
        if self.stage == "assoc" and not self.init_from:
            bad("init_from", "is required for --stage assoc: pass the face_ae_recon.safetensors of the recon stage.")
        if self.stage == "recon" and self.init_from:
            logger.info("recon stage continues from %s", self.init_from)
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "layers_per_block",
                     "latent_channels", "patch_size", "checkpointing_steps", "num_validation_images", "log_every",
                     "disc_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer.")
        if self.train_batch_size < 2 and self.stage == "assoc":
            logger.info("assoc stage with batch 1: patches are contrasted within each image, which is fine.")
        if self.resolution < 64 or self.resolution % 64:
            bad("resolution", "must be a multiple of 64 (paper: 512).")
        for name in ("learning_rate", "disc_learning_rate"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0.")
        for name in ("lambda_perceptual", "lambda_adv", "disc_start", "max_grad_norm", "validation_steps",
                     "dataloader_num_workers"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0.")
        if not 0.0 <= self.offshelf_prob <= 1.0:
            bad("offshelf_prob", "must be a probability in [0, 1].")
        if self.lambda_perceptual > 0 and not self.vgg_weights and not self.allow_random_vgg:
            bad("vgg_weights", "is required for the perceptual term (lambda_perceptual > 0): pass a local VGG19 file "
                "or --lambda-perceptual 0.")
        side = self.resolution // 2 ** (len(self.block_out_channels) - 1)
        if side % self.patch_size:
            bad("patch_size", f"must divide the latent side {side} (resolution / AE downscale).")
        if self.resume_from_checkpoint not in (None, "latest") and not Path(self.resume_from_checkpoint).is_dir():
            bad("resume_from_checkpoint", "must be 'latest' or an existing checkpoint-* folder.")

    def ae_config(self) -> FaceAEConfig:
        return FaceAEConfig(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                            latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
                            patch_size=self.patch_size)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d


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
    """L_ae for both autoencoders (recon) or L_asso (assoc stage)."""

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

    if cfg.init_from:
        pair, meta = load_face_ae_checkpoint(cfg.init_from)
        if cfg.stage == "assoc" and meta.get("stage") != "recon":
            logger.warning("--init-from %s is a %r-stage file; the association stage normally starts from recon.",
                           cfg.init_from, meta.get("stage"))
        if pair.cfg.to_dict() != cfg.ae_config().to_dict():
            logger.warning("Using the autoencoder topology stored in %s (%s), not the command-line one.",
                           cfg.init_from, pair.cfg.to_dict())
        return pair
    pair = FaceAutoencoderPair(cfg.ae_config())
    if cfg.init_vae:
        from diffusers import AutoencoderKL

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
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from torch.utils.data import DataLoader


    cfg.validate()
    if not cfg.output_dir:
        raise ValueError("train face-ae: --output-dir is required.")
    accelerator = Accelerator(cpu=use_cpu(cfg.cpu), gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, log_with=cfg.report_to,
                              project_config=ProjectConfiguration(project_dir=cfg.output_dir))
    set_seed(cfg.seed, device_specific=True)
    device = accelerator.device
    pair = _init_pair(cfg)
    if cfg.gradient_checkpointing:
        pair.enable_gradient_checkpointing()
    gen_module = FaceAETrainModule(pair)
    disc = DiscriminatorPair(cfg.disc_channels, cfg.disc_layers)
    perceptual = VGGPerceptualLoss(cfg.vgg_weights, criterion="l1").to(device) if cfg.lambda_perceptual > 0 else None
    opt_g = torch.optim.AdamW(gen_module.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                              weight_decay=cfg.adam_weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                              weight_decay=cfg.adam_weight_decay)
    dataset = FaceFolderDataset(cfg.hq_dir, size=cfg.resolution, offshelf_dir=cfg.offshelf_dir,
                                offshelf_prob=cfg.offshelf_prob, seed=cfg.seed)
    val_batch = collate([dataset[i] for i in range(min(cfg.num_validation_images, len(dataset)))])
    loader = DataLoader(dataset, batch_size=cfg.train_batch_size, shuffle=True, num_workers=cfg.dataloader_num_workers,
                        collate_fn=collate, drop_last=len(dataset) >= cfg.train_batch_size * accelerator.num_processes,
                        generator=torch.Generator().manual_seed(cfg.seed))
    gen_module, disc, opt_g, opt_d, loader = accelerator.prepare(gen_module, disc, opt_g, opt_d, loader)
    if accelerator.is_main_process and cfg.report_to:
        accelerator.init_trackers("face_ae", config={k: v for k, v in cfg.to_dict().items()
                                                     if isinstance(v, (int, float, str, bool))})
    resume_dir, global_step = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        logger.info("Resumed from %s at step %d.", resume_dir, global_step)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.gradient_accumulation_steps))
    epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * cfg.gradient_accumulation_steps
    degradation = DegradationBatchConfig(preset=cfg.degradation_preset)
    unwrapped_pair = accelerator.unwrap_model(gen_module).pair
    raw_disc = accelerator.unwrap_model(disc)

    def export(path: Path) -> Path:
        return save_face_ae_checkpoint(path, accelerator.unwrap_model(gen_module).pair, stage=cfg.stage,
                                       image_size=cfg.resolution, train_config=cfg.to_dict())

    logger.info("Training face autoencoders (%s stage) for %d steps on %d processes.", cfg.stage,
                cfg.max_train_steps, accelerator.num_processes)
    while global_step < cfg.max_train_steps:
        dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        skip_batches = 0
        for batch in epoch_loader:
            hq = batch["hq"].to(device)
            lq_seed = (cfg.seed * 1_000_003 + global_step * accelerator.num_processes
                       + accelerator.process_index) & 0x7FFFFFFF
            lq = fill_lq_on_the_fly({"hq": hq, "lq": batch["lq"].to(device), "has_lq": batch["has_lq"]}, lq_seed,
                                    degradation)
            adversarial = cfg.lambda_adv > 0 and global_step >= cfg.disc_start
            with accelerator.accumulate(gen_module, disc):
                with accelerator.autocast():
                    outputs = gen_module(hq, lq)
                    # the generator's adversarial term goes through the unwrapped (frozen-for-now) discriminators
                    raw_disc.requires_grad_(False)
                    loss_g, logs = face_ae_generator_loss(outputs, hq, lq, raw_disc, perceptual, cfg, adversarial,
                                                          unwrapped_pair.cfg.patch_size)
                accelerator.backward(loss_g)
                raw_disc.requires_grad_(True)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(gen_module.parameters(), cfg.max_grad_norm)
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)
                if adversarial:
                    with accelerator.autocast():
                        loss_d = face_ae_discriminator_loss(disc, hq, lq, outputs[0], outputs[1])
                    accelerator.backward(loss_d)
                    opt_d.step()
                    opt_d.zero_grad(set_to_none=True)
                    logs["l_d"] = float(loss_d.detach())
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            logs["loss"] = float(loss_g.detach())
            if cfg.report_to:
                accelerator.log(logs, step=global_step)
            if global_step % cfg.log_every == 0 or global_step == 1:
                logger.info("step %d/%d %s", global_step, cfg.max_train_steps,
                            " ".join(f"{k}={v:.4f}" for k, v in logs.items()))
            if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps:
                ckpt_dir = Path(cfg.output_dir) / f"checkpoint-{global_step}"
                accelerator.save_state(str(ckpt_dir))
                if accelerator.is_main_process:
                    export(ckpt_dir / f"face_ae_{cfg.stage}.safetensors")
                    prune_checkpoints(cfg.output_dir, cfg.checkpoints_total_limit)
                accelerator.wait_for_everyone()
            if cfg.validation_steps and global_step % cfg.validation_steps == 0 and accelerator.is_main_process:
                _validate(cfg, unwrapped_pair, val_batch, degradation, device, global_step)
            if global_step >= cfg.max_train_steps:
                break
        epoch += 1
    accelerator.wait_for_everyone()
    final = Path(cfg.output_dir) / f"face_ae_{cfg.stage}.safetensors"
    if accelerator.is_main_process:
        export(final)
        (Path(cfg.output_dir) / f"train_config_{cfg.stage}.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


@torch.no_grad()
def _validate(cfg, pair: FaceAutoencoderPair, val_batch: dict, degradation, device, step: int) -> Path:
    """Rows of [HQ | HQ recon | LQ | LQ recon]."""

    was = pair.training
    pair.eval()
    try:
        hq = val_batch["hq"].to(device)
        lq = fill_lq_on_the_fly({"hq": hq, "lq": val_batch["lq"].to(device), "has_lq": val_batch["has_lq"]},
                                cfg.seed, degradation)
        x_hat, _ = pair.hq(hq)
        y_hat, _ = pair.lq(lq)
    finally:
        pair.train(was)
    path = Path(cfg.output_dir) / "validation" / f"{cfg.stage}_step_{step:07d}.png"
    save_image_grid([[a, b, c, d] for a, b, c, d in zip(hq, x_hat, lq, y_hat)], path)
    return path
