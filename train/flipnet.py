"""``bfr train flipnet --mode restore|degrade``: LoRA (rank 64) + BoostHub (+ face adapter) on SD2.1-base (FlipNet §4).

Restoration mode (§4.1): HQ latent x and LQ latent y are noised with independent noise and timesteps (Eq. 1),
concatenated on the batch axis (HQ first) and both denoised; cross-attention sees the caption (dropped with p 0.5)
and the BFR face tokens tau(z_y) (dropped with p 0.3); the objective is
L_r = L_ldm + 1.0 * MSE(x, D(z0_hat)) + 0.01 * VGG19(x, D(z0_hat)) with z0_hat from Eq. (3).

Degradation mode (§4.2): the same with the inputs flipped (LQ first, HQ the condition), text only and L_ldm only.

This module supplies the step (the joint-batch objective) to the training core (``train/core.py``: accelerate,
resume, checkpoints, validation cadence). Only the trainable parameters (LoRA, BoostHub, adapter) are kept in the
resumable state; the exported model is one ``.safetensors`` (``lora/checkpoint.py``); both modes may share one output
folder (``checkpoint-restore-<step>`` / ``checkpoint-degrade-<step>``).

Sizes on SD2.1-base: LoRA rank 64 on the 128 attention projections 13.28 M parameters, BoostHub on the 16
self-attention layers 49.57 M, LQ face encoder 34.16 M + adapter 1.12 M (restore mode): 98.1 M parameters, 393 MB per
restore-mode file in fp32 (196 MB in bf16 / fp16), 251 MB in degrade mode; the LoRA part alone
(``bfr export-lora``) 53 MB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import ConcatDataset

from ..lora.boosthub import BoostHubState, install_boosthub
from ..lora.checkpoint import (
    FLIPNET_MODES,
    FlipNetDefaults,
    check_sd21_unet,
    load_face_ae_checkpoint,
    save_flipnet_checkpoint,
)
from ..lora.face_embedder import AdapterConfig, FaceAdapter, LQFaceEncoder, append_face_tokens, drop_mask, encode_face
from ..lora.lora_targets import add_flipnet_lora
from ..lora.losses import VGGPerceptualLoss, image_mse, ldm_loss, restoration_loss
from ..pipelines.flipnet import FlipNetPipeline, FlipNetSampleConfig, joint_batch, mode_streams
from ..sd.diffusion import diffusion_target, predict_x0, q_sample
from ..sd.loader import encode_prompts
from ..sd.vae import decode as vae_decode
from ..sd.vae import encode as vae_encode
from .core import Stage, StepContext, StepResult, TrainConfig, TrainingRun, adamw, base_components, flag
from .core import warmup_schedule
from .core import face_folder_dataset, perceptual_loss, save_image_grid
from .data import PairedFolderDataset, parse_paired_spec

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class FlipNetTrainConfig(TrainConfig):
    """FlipNet training configuration; defaults are the paper's (§5.1) except data paths."""

    COMMAND = "train flipnet"
    RUN_FIELD = "mode"
    FIRST_RUN = """\
FlipNet on SD2.1-base: LoRA (rank 64) + BoostHub (+ face tokens in restore mode). Both modes may share one
--output-dir (resumable checkpoint-<mode>-<step> folders are kept per mode).

  restore: bfr train flipnet --mode restore --base-model SD21 --hq-dir FACES --output-dir RUN \\
               --face-ae face_ae_assoc.safetensors --vgg-weights vgg19-dcbb9e9d.pth
  degrade: bfr train flipnet --mode degrade --base-model SD21 --paired-dirs DIR [DIR ...] --hq-dir FACES \\
               --output-dir RUN

A first run needs --mode, --base-model and --output-dir, plus data: --hq-dir (restore), --paired-dirs and/or --hq-dir
(degrade); restore also needs --face-ae (from `bfr train face-ae`, or --no-use-face-embedding) and --vgg-weights FILE
(torchvision's VGG19, or --lambda-perceptual 0). Add --resume-from-checkpoint latest to continue. Defaults are the
paper's (512 px, 90k steps); a quick test: --resolution 256 --max-train-steps 200 --lora-rank 16."""

    mode: str = flag("restore (HQ denoised, LQ condition) or degrade (flipped)", "model",
                     metavar="restore|degrade", default="restore")
    base_model: str = flag("local SD2.1-base: diffusers folder or single-file .safetensors", "model", metavar="PATH",
                           default="")
    tokenizer: str | None = flag("CLIP tokenizer folder (needed with a single-file base model)", "model",
                                 metavar="DIR", default=None)
    captions: str | None = flag("caption sidecar for --hq-dir (.json / .jsonl / .tsv)", "data", metavar="FILE",
                                default=None)
    paired_dirs: list[str] = flag("degrade mode: paired real-world folders PATH[:LAYOUT[:MAX_PAIRS]] (layouts hq-lq, "
                                  "lol, dense-haze, sidd, realblur; a captions.json inside is used)", "data",
                                  default_factory=list)
    max_face_images: int | None = flag("use at most this many faces from --hq-dir (paper: 4000 in degrade mode)",
                                       "data", default=None)
    face_ae: str | None = flag("face-autoencoder .safetensors from `bfr train face-ae --stage assoc`", "model",
                               metavar="FILE", default=None)
    use_face_embedding: bool = flag("restore mode: append BFR face tokens to the text context", "model", default=True)
    adapter_layers: int = flag("linear layers in the face adapter", "model", default=2)
    train_batch_size: int = flag("batch per process (paper: 16 in total, e.g. 8 GPUs x 2)", "optim", default=2)
    max_train_steps: int = flag("optimizer steps (paper: 90k)", "schedule", default=90_000)
    lr_warmup_steps: int = flag("linear warm-up steps, then constant", "optim", default=0)
    lora_rank: int = flag("LoRA rank r (paper 64)", "model", default=64)
    lora_alpha: float | None = flag("LoRA alpha (default: = rank, i.e. scale 1)", "model", default=None)
    phi: float = flag("BoostHub enhance weight during training and as the saved default (paper 1)", "model",
                      default=1.0)
    lambda_mse: float = flag("weight of MSE(x, x0_hat) in restore mode (paper 1.0)", "optim", default=1.0)
    lambda_perceptual: float = flag("weight of the VGG19 perceptual loss in restore mode (paper 0.01; 0: no VGG19 "
                                    "needed)", "optim", default=0.01)
    text_drop_prob: float = flag("probability of dropping the caption (paper 0.5)", "optim", default=0.5)
    face_drop_prob: float = flag("probability of dropping the face embedding (paper 0.3)", "optim", default=0.3)
    t_y_policy: str = flag("saved inference default for the condition timestep: same | fixed", "model",
                           identity=False, metavar="same|fixed", default="fixed")
    t_y: int = flag("saved inference default condition timestep for the fixed policy", "model", identity=False,
                    default=100)
    validation_inference_steps: int = flag("sampling steps for validation", "schedule", default=30)
    validation_guidance_scale: float = flag("CFG scale for validation (paper 1.5)", "schedule", default=1.5)
    negative_prompt: str | None = flag("validation negative prompt (default: 'low quality, blurry, ...' in restore "
                                       "mode, empty in degrade mode)", "schedule", default=None)

    def uses_perceptual(self) -> bool:
        return self.mode == "restore" and self.lambda_perceptual > 0

    def validate(self) -> None:
        if self.mode not in FLIPNET_MODES:
            self.bad("mode", f"must be one of {FLIPNET_MODES}.")
        if self.t_y_policy not in ("same", "fixed"):
            self.bad("t_y_policy", "must be 'same' or 'fixed'.")
        if self.mode == "restore":
            if not self.hq_dir:
                self.bad("hq_dir", "is required in restore mode (a folder of aligned HQ faces).")
            if self.paired_dirs:
                self.bad("paired_dirs", "is for degrade mode; restore mode uses --hq-dir (+ --offshelf-dir).")
            if self.use_face_embedding and not self.face_ae:
                self.bad("face_ae", "is required when --use-face-embedding: train it with `bfr train face-ae` "
                         "(recon, then assoc) or pass --no-use-face-embedding.")
        else:
            if not self.paired_dirs and not self.hq_dir:
                self.bad("paired_dirs", "is empty and there is no --hq-dir: degrade mode needs paired real-world "
                         "folders and/or faces to degrade on the fly.")
            if self.offshelf_dir:
                self.bad("offshelf_dir", "is for restore mode; degrade mode learns from paired real-world folders.")
        self.check_positive_ints("lora_rank", "validation_inference_steps", "adapter_layers")
        self.check_probabilities("text_drop_prob", "face_drop_prob")
        self.check_non_negative("phi", "lambda_mse", "lr_warmup_steps")
        if self.validation_guidance_scale < 1.0:
            self.bad("validation_guidance_scale", "must be >= 1 (paper: 1.5).")
        if not 0 <= self.t_y < 1000:
            self.bad("t_y", "must be a timestep in [0, 999].")
        super().validate()


# --------------------------------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------------------------------


class FlipNetTrainModule(nn.Module):
    """What DDP wraps: the UNet (frozen base + LoRA + BoostHub) and, in restore mode, the face adapter tau."""

    def __init__(self, unet: nn.Module, adapter: FaceAdapter | None = None):
        super().__init__()
        self.unet = unet
        self.adapter = adapter

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, text_context: torch.Tensor,
                face_latent_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(cat[x_t, y_t], cat[t_x, t_y], c) with c = (c_tx, tau(z_y)) repeated for both halves (Eq. 7)."""
        context = text_context
        if face_latent_tokens is not None:
            if self.adapter is None:
                raise ValueError("Face tokens were given but the module has no adapter.")
            context = append_face_tokens(text_context, self.adapter(face_latent_tokens))
        if z_t.shape[0] == 2 * context.shape[0]:
            context = torch.cat([context, context], dim=0)
        return self.unet(z_t, t, context).sample


def prepare_flipnet_unet(unet: nn.Module, rank: int, alpha: float | None, phi: float) -> BoostHubState:
    """Freeze the base UNet, add LoRA on all attention projections and BoostHub on all self-attention layers."""
    check_sd21_unet(unet)
    unet.requires_grad_(False)
    add_flipnet_lora(unet, rank=rank, alpha=alpha)
    state = install_boosthub(unet, BoostHubState(phi=phi))
    for n, p in unet.named_parameters():
        if "lora_" in n or ".processor.hub." in n:
            p.requires_grad_(True)
    return state


@dataclass
class FrozenParts:
    """Everything the loss needs that is not trained."""

    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    face_encoder: LQFaceEncoder | None = None
    face_image_size: int | None = None
    perceptual: VGGPerceptualLoss | None = None


def place_sd_parts(components: dict, device, weight_dtype: torch.dtype, prediction_type: str,
                   **extra) -> FrozenParts:
    """The UNet on the device in the compute dtype with its trainable parameters in fp32, the VAE and text encoder
    frozen in the compute dtype; returns the :class:`FrozenParts` of the loss (``extra``: its optional fields)."""
    unet, vae, text_encoder = components["unet"], components["vae"], components["text_encoder"]
    unet.to(device, dtype=weight_dtype)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    vae.to(device, dtype=weight_dtype).requires_grad_(False).eval()
    text_encoder.to(device, dtype=weight_dtype).requires_grad_(False).eval()
    return FrozenParts(vae=vae, text_encoder=text_encoder, tokenizer=components["tokenizer"],
                       alphas_cumprod=components["scheduler"].alphas_cumprod.to(device),
                       prediction_type=prediction_type, **extra)


def encode_text(frozen: FrozenParts, captions: list[str]) -> torch.Tensor:
    """Frozen CLIP text context of the (possibly dropped) captions."""
    with torch.no_grad():
        return encode_prompts(frozen.tokenizer, frozen.text_encoder, captions)


def joint_clean_latents(mode: str, z_hq: torch.Tensor, z_lq: torch.Tensor) -> torch.Tensor:
    """The clean joint batch of one step: restore = cat[z_x, z_y], degrade = cat[z_y, z_x] (the flip, §4.2)."""
    return joint_batch(*mode_streams(mode, z_hq, z_lq))


def flipnet_loss(module: nn.Module, frozen: FrozenParts, hq: torch.Tensor, lq: torch.Tensor, captions: list[str],
                 cfg: FlipNetTrainConfig, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """One FlipNet objective on a batch of images in [0,1]: restore L_r (Eq. 7-8) or degrade L_ldm (§4.2)."""
    device = hq.device
    b = hq.shape[0]
    with torch.no_grad():
        z_hq = vae_encode(frozen.vae, hq).float()
        z_lq = vae_encode(frozen.vae, lq).float()
    z0 = joint_clean_latents(cfg.mode, z_hq, z_lq)
    num_t = frozen.alphas_cumprod.shape[0]
    noise = torch.randn(z0.shape, generator=generator, device=device)  # eps_x, eps_y independent
    t = torch.randint(0, num_t, (2 * b,), generator=generator, device=device)  # t_x, t_y independent (§4.1)
    z_t = q_sample(z0, noise, frozen.alphas_cumprod, t)
    target = diffusion_target(z0, noise, frozen.alphas_cumprod, t, frozen.prediction_type)

    drop_text = drop_mask(b, cfg.text_drop_prob, generator, device)
    captions = ["" if bool(d) else c for c, d in zip(captions, drop_text.tolist())]
    text = encode_text(frozen, captions)
    face_tokens = None
    if cfg.mode == "restore" and frozen.face_encoder is not None:
        with torch.no_grad():
            face_tokens = encode_face(frozen.face_encoder, lq, frozen.face_image_size).float()
        drop_face = drop_mask(b, cfg.face_drop_prob, generator, device)
        face_tokens = torch.where(drop_face.view(-1, 1, 1), torch.zeros_like(face_tokens), face_tokens)
    model_out = module(z_t.to(text.dtype), t, text, face_tokens).float()
    l_ldm = ldm_loss(model_out, target)
    logs = {"l_ldm": float(l_ldm.detach())}
    if cfg.mode == "degrade":
        return l_ldm, logs
    # image-level constraints on the HQ half (restore mode input stream), Eq. (3) + Eq. (8)
    z0_hat = predict_x0(z_t[:b].float(), model_out[:b], frozen.alphas_cumprod, t[:b], frozen.prediction_type)
    l_mse = l_p = torch.zeros((), device=device)
    if cfg.lambda_mse > 0 or cfg.lambda_perceptual > 0:
        x0_hat = vae_decode(frozen.vae, z0_hat, clamp=False)
        if cfg.lambda_mse > 0:
            l_mse = image_mse(hq, x0_hat)
        if cfg.lambda_perceptual > 0 and frozen.perceptual is not None:
            l_p = frozen.perceptual(hq, x0_hat.clamp(-0.5, 1.5))
    loss = restoration_loss(l_ldm, l_mse, l_p, cfg.lambda_mse, cfg.lambda_perceptual)
    logs.update(l_mse=float(l_mse.detach()), l_p=float(l_p.detach()))
    return loss, logs


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def build_dataset(cfg: FlipNetTrainConfig):
    """Restore: the face folder (+ off-shelf LQ). Degrade: paired real-world folders + faces (on-the-fly LQ)."""
    parts = []
    if cfg.hq_dir:
        parts.append(face_folder_dataset(cfg, captions=cfg.captions, max_images=cfg.max_face_images))
    if cfg.mode == "degrade":
        for spec in cfg.paired_dirs:
            path, layout, max_pairs = parse_paired_spec(spec)
            side = next((Path(path) / f"captions{ext}" for ext in (".json", ".jsonl", ".tsv")
                         if (Path(path) / f"captions{ext}").is_file()), None)
            parts.append(PairedFolderDataset(path, layout, cfg.resolution, captions=side, max_pairs=max_pairs,
                                             seed=cfg.seed))
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def run_validation(cfg: FlipNetTrainConfig, unet, frozen: FrozenParts, adapter, scheduler, state: BoostHubState,
                   val_batch: dict, step: int) -> Path:
    """Sample with the current weights (CFG 1.5, negative prompt) and save [condition | output | target] rows."""
    was_training = unet.training
    unet.eval()
    try:
        pipe = FlipNetPipeline(unet, frozen.vae, frozen.text_encoder, frozen.tokenizer, scheduler, state,
                               frozen.face_encoder, adapter, frozen.face_image_size,
                               FlipNetDefaults(phi=cfg.phi, t_y_policy=cfg.t_y_policy, t_y=cfg.t_y))
        target, condition = mode_streams(cfg.mode, val_batch["hq"], val_batch["lq"])
        sample = FlipNetSampleConfig(mode=cfg.mode, num_inference_steps=cfg.validation_inference_steps,
                                     guidance_scale=cfg.validation_guidance_scale,
                                     negative_prompt=cfg.negative_prompt, phi=cfg.phi, seed=cfg.seed)
        out = pipe(condition, sample)
    finally:
        unet.train(was_training)
    path = Path(cfg.output_dir) / "validation" / f"{cfg.mode}_step_{step:07d}.png"
    save_image_grid([[c, o, t] for c, o, t in zip(condition, out, target)], path)
    logger.info("validation images -> %s", path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


def _load_face_parts(cfg: FlipNetTrainConfig, cross_dim: int):
    """The frozen LQ face encoder E_y of ``--face-ae`` and a fresh adapter tau (§4.1)."""
    pair, meta = load_face_ae_checkpoint(cfg.face_ae)
    if meta.get("stage") != "assoc":
        logger.warning("Face autoencoder %s is from the %r stage; the paper uses the association stage (§5.2.1).",
                       cfg.face_ae, meta.get("stage"))
    encoder = LQFaceEncoder.from_pair(pair).requires_grad_(False).eval()
    adapter = FaceAdapter(AdapterConfig(in_dim=pair.cfg.token_dim, out_dim=cross_dim, hidden_dim=cross_dim,
                                        num_layers=cfg.adapter_layers))
    return encoder, adapter, int(meta.get("image_size", cfg.resolution))


def train_flipnet(cfg: FlipNetTrainConfig, components: dict | None = None) -> Path:
    """Train FlipNet in ``cfg.mode``; returns the exported ``flipnet_<mode>.safetensors``.

    ``components`` (unet, vae, text_encoder, tokenizer, scheduler) replaces loading ``cfg.base_model`` (tests).
    """
    if components is None and not cfg.base_model:  # before the run is set up: a missing flag fails in a second
        base_components(cfg, None)
    run = TrainingRun(cfg)
    dataset = build_dataset(cfg)
    device, weight_dtype = run.device, run.weight_dtype
    components, prediction_type = base_components(cfg, components)
    unet, vae, scheduler = components["unet"], components["vae"], components["scheduler"]
    state = prepare_flipnet_unet(unet, cfg.lora_rank, cfg.lora_alpha, cfg.phi)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if getattr(vae, "_supports_gradient_checkpointing", False):
            vae.enable_gradient_checkpointing()

    face_encoder = adapter = face_size = None
    if cfg.mode == "restore" and cfg.use_face_embedding:
        face_encoder, adapter, face_size = _load_face_parts(cfg, unet.config.cross_attention_dim)
        face_encoder.to(device, dtype=weight_dtype)
    perceptual = perceptual_loss(cfg)

    # frozen parts in the compute dtype, trainable parts in fp32
    frozen = place_sd_parts(components, device, weight_dtype, prediction_type, face_encoder=face_encoder,
                            face_image_size=face_size,
                            perceptual=perceptual.to(device) if perceptual is not None else None)

    module = FlipNetTrainModule(unet, adapter)
    params = [p for p in module.parameters() if p.requires_grad]
    logger.info("Trainable parameters: %.2f M (LoRA rank %d, BoostHub%s).", sum(p.numel() for p in params) / 1e6,
                cfg.lora_rank, ", adapter" if adapter is not None else "")
    optimizer = adamw(params, cfg)
    stage = Stage("flipnet", optimizer, params, cfg.max_grad_norm, warmup_schedule(optimizer, cfg.lr_warmup_steps))

    def step(batch: dict, models: tuple, ctx: StepContext) -> StepResult:
        loss, logs = flipnet_loss(models[0], frozen, batch["hq"], batch["lq"], list(batch["caption"]), cfg,
                                  ctx.generator)
        return StepResult({"flipnet": loss}, logs)

    def export(path: Path) -> Path:
        enc, ada = (face_encoder, module.adapter) if module.adapter is not None else (None, None)
        return save_flipnet_checkpoint(path, module.unet, mode=cfg.mode, face_encoder=enc, adapter=ada,
                                       face_image_size=face_size,
                                       defaults=FlipNetDefaults(cfg.phi, cfg.t_y_policy, cfg.t_y),
                                       train_config=cfg.to_dict(), dtype=run.export_dtype)

    def validate(val_batch: dict, global_step: int) -> Path:
        return run_validation(cfg, module.unet, frozen, module.adapter, scheduler, state, val_batch, global_step)

    return run.fit(name="flipnet", title=f"FlipNet ({cfg.mode})", dataset=dataset, models=[module], stages=[stage],
                   step=step, export=export, export_name=f"flipnet_{cfg.mode}.safetensors", validate=validate,
                   trainable_only=True)
