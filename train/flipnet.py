"""``bfr train flipnet --mode restore|degrade``: LoRA (rank 64) + BoostHub (+ face adapter) on SD2.1-base (FlipNet §4).

Restoration mode (§4.1): HQ latent x and LQ latent y are noised with independent noise and timesteps (Eq. 1),
concatenated on the batch axis (HQ first) and both denoised; cross-attention sees the caption (dropped with p 0.5)
and the BFR face tokens tau(z_y) (dropped with p 0.3); the objective is
L_r = L_ldm + 1.0 * MSE(x, D(z0_hat)) + 0.01 * VGG19(x, D(z0_hat)) with z0_hat from Eq. (3).

Degradation mode (§4.2): the same with the inputs flipped (LQ first, HQ the condition), text only and L_ldm only.

Everything runs through ``accelerate`` (one or many GPUs / nodes, mixed precision, gradient accumulation,
resumable state, periodic validation images). Only the trainable parameters (LoRA, BoostHub, adapter) are kept in
the resumable state; the exported model is one ``.safetensors`` (``lora/checkpoint.py``).
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
from ..sd.diffusion import PREDICTION_TYPES, diffusion_target, predict_x0, q_sample
from ..sd.loader import encode_prompts, load_components
from ..sd.vae import decode as vae_decode
from ..sd.vae import encode as vae_encode
from .core import MIXED_PRECISION, _lr_lambda, collate, prune_checkpoints, resolve_resume, save_image_grid, use_cpu
from .data import DegradationBatchConfig, FaceFolderDataset, PairedFolderDataset, fill_lq_on_the_fly, parse_paired_spec

logger = logging.getLogger(__name__)



def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class FlipNetTrainConfig:
    """Training configuration; defaults are the paper's (§5.1) except data paths."""

    mode: str = _help("restore (HQ denoised, LQ condition) or degrade (flipped)", default="restore")
    base_model: str = _help("local SD2.1-base: diffusers folder or single-file .safetensors", default="")
    tokenizer: str | None = _help("CLIP tokenizer folder (needed with a single-file base model)", default=None)
    output_dir: str = _help("where checkpoints, validation images and the final .safetensors go", default="")
    hq_dir: str | None = _help("folder of aligned HQ faces (FFHQ resized to 512); LQ made on the fly", default=None)
    captions: str | None = _help("caption sidecar for hq_dir (.json / .jsonl / .tsv)", default=None)
    offshelf_dir: str | None = _help("off-shelf LQ folder (<stem>_<k>.png from `bfr synthesize`)", default=None)
    offshelf_prob: float = _help("probability of an off-shelf LQ instead of on-the-fly (paper 0.5)", default=0.5)
    paired_dirs: list[str] = _help("degrade mode: paired real-world folders PATH[:LAYOUT[:MAX_PAIRS]] "
                                   "(layouts hq-lq, lol, dense-haze, sidd, realblur; captions.json inside is used)",
                                   default_factory=list)
    max_face_images: int | None = _help("use at most this many faces from hq_dir (paper: 4000 in degrade mode)",
                                        default=None)
    degradation_preset: str = _help("classical preset for on-the-fly LQ (pipelines/degradation.py)", default="flipnet")
    face_ae: str | None = _help("face-autoencoder .safetensors from `bfr train face-ae --stage assoc`", default=None)
    use_face_embedding: bool = _help("restore mode: append BFR face tokens to the text context", default=True)
    adapter_layers: int = _help("linear layers in the face adapter", default=2)
    resolution: int = _help("training resolution in px", default=512)
    train_batch_size: int = _help("batch per process (paper: 16 in total, e.g. 8 GPUs x 2)", default=2)
    gradient_accumulation_steps: int = _help("accumulate gradients over this many batches", default=1)
    max_train_steps: int = _help("optimizer steps (paper: 90k)", default=90_000)
    learning_rate: float = _help("AdamW learning rate (paper 5e-5)", default=5e-5)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.999)
    adam_weight_decay: float = _help("AdamW weight decay", default=1e-2)
    adam_epsilon: float = _help("AdamW epsilon", default=1e-8)
    lr_warmup_steps: int = _help("linear warm-up steps, then constant", default=0)
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", default=1.0)
    lora_rank: int = _help("LoRA rank r (paper 64)", default=64)
    lora_alpha: float | None = _help("LoRA alpha (default: = rank, i.e. scale 1)", default=None)
    phi: float = _help("BoostHub enhance weight during training and as the saved default (paper 1)", default=1.0)
    lambda_mse: float = _help("weight of MSE(x, x0_hat) in restore mode (paper 1.0)", default=1.0)
    lambda_perceptual: float = _help("weight of the VGG19 perceptual loss in restore mode (paper 0.01)", default=0.01)
    vgg_weights: str | None = _help("local VGG19 weights (torchvision layout, .pth or .safetensors)", default=None)
    allow_random_vgg: bool = _help("tests only: allow a randomly initialised VGG19", default=False)
    text_drop_prob: float = _help("probability of dropping the caption (paper 0.5)", default=0.5)
    face_drop_prob: float = _help("probability of dropping the face embedding (paper 0.3)", default=0.3)
    t_y_policy: str = _help("saved inference default for the condition timestep: same | fixed", default="fixed")
    t_y: int = _help("saved inference default condition timestep for the fixed policy", default=100)
    mixed_precision: str = _help("no | fp16 | bf16", default="no")
    cpu: bool = _help("force CPU (multi-process CPU runs under torchrun use gloo; automatic without CUDA)",
                      default=False)
    gradient_checkpointing: bool = _help("trade compute for memory in the UNet (and VAE decoder)", default=False)
    seed: int = _help("global seed (data order, noise, timesteps, drops)", default=0)
    checkpointing_steps: int = _help("save a resumable state + exported .safetensors every N steps", default=5000)
    checkpoints_total_limit: int | None = _help("keep at most this many checkpoint-* folders", default=3)
    resume_from_checkpoint: str | None = _help("'latest' or a checkpoint-* folder to resume from", default=None)
    validation_steps: int = _help("write validation images every N steps (0 disables)", default=2000)
    num_validation_images: int = _help("validation images per run", default=4)
    validation_inference_steps: int = _help("sampling steps for validation", default=30)
    validation_guidance_scale: float = _help("CFG scale for validation (paper 1.5)", default=1.5)
    negative_prompt: str | None = _help("validation negative prompt (default: 'low quality, blurry, ...' in "
                                        "restore mode, empty in degrade mode)", default=None)
    dataloader_num_workers: int = _help("data loader worker processes", default=2)
    log_every: int = _help("log losses every N steps", default=50)
    report_to: str | None = _help("accelerate tracker (tensorboard, wandb, ...) or none", default=None)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad value and the fix."""
        def bad(name, why):
            raise ValueError(f"train flipnet: --{name.replace('_', '-')}={getattr(self, name)!r} {why}")

        if self.mode not in FLIPNET_MODES:
            bad("mode", f"must be one of {FLIPNET_MODES}.")
        if self.mixed_precision not in MIXED_PRECISION:
            bad("mixed_precision", f"must be one of {MIXED_PRECISION}.")
        if self.t_y_policy not in ("same", "fixed"):
            bad("t_y_policy", "must be 'same' or 'fixed'.")
        if self.resolution < 64 or self.resolution % 64:
            bad("resolution", "must be a multiple of 64 (paper: 512).")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "lora_rank",
                     "checkpointing_steps", "num_validation_images", "validation_inference_steps", "log_every",
                     "adapter_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer.")
        for name in ("learning_rate",):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0 (paper: 5e-5).")
        for name in ("offshelf_prob", "text_drop_prob", "face_drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, "must be a probability in [0, 1].")
        for name in ("phi", "lambda_mse", "lambda_perceptual", "max_grad_norm", "lr_warmup_steps",
                     "validation_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0.")
        if self.validation_guidance_scale < 1.0:
            bad("validation_guidance_scale", "must be >= 1 (paper: 1.5).")
        if not 0 <= self.t_y < 1000:
            bad("t_y", "must be a timestep in [0, 999].")
        if self.mode == "restore":
            if not self.hq_dir:
                bad("hq_dir", "is required in restore mode (a folder of aligned HQ faces).")
            if self.paired_dirs:
                bad("paired_dirs", "is for degrade mode; restore mode uses --hq-dir (+ --offshelf-dir).")
            if self.use_face_embedding and not self.face_ae:
                bad("face_ae", "is required when --use-face-embedding: train it with `bfr train face-ae` (recon, "
                    "then assoc) or pass --no-use-face-embedding.")
            if self.lambda_perceptual > 0 and not self.vgg_weights and not self.allow_random_vgg:
                bad("vgg_weights", "is required for the perceptual loss (lambda_perceptual > 0): pass a local VGG19 "
                    "file, or --lambda-perceptual 0.")
        else:
            if not self.paired_dirs and not self.hq_dir:
                bad("paired_dirs", "is empty and there is no --hq-dir: degrade mode needs paired real-world folders "
                    "and/or faces to degrade on the fly.")
            if self.offshelf_dir:
                bad("offshelf_dir", "is for restore mode; degrade mode learns from paired real-world folders.")
        if self.resume_from_checkpoint not in (None, "latest") and not Path(self.resume_from_checkpoint).is_dir():
            bad("resume_from_checkpoint", "must be 'latest' or an existing checkpoint-* folder.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that require grad (LoRA, BoostHub, adapter): the resumable part of the model."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    own = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"Resume state {source} does not fit this model: {len(missing)} missing (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}). Resume with the same mode, rank "
                         "and base model.")
    with torch.no_grad():
        for n, p in own.items():
            if p.shape != sd[n].shape:
                raise ValueError(f"Resume state {source}: {n} has shape {tuple(sd[n].shape)}, expected "
                                 f"{tuple(p.shape)} (different --lora-rank?).")
            p.copy_(sd[n].to(p.dtype))


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


def encode_text(frozen: FrozenParts, captions: list[str]) -> torch.Tensor:

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
    from torch.utils.data import ConcatDataset


    parts = []
    if cfg.hq_dir:
        parts.append(FaceFolderDataset(cfg.hq_dir, size=cfg.resolution, captions=cfg.captions,
                                       offshelf_dir=cfg.offshelf_dir if cfg.mode == "restore" else None,
                                       offshelf_prob=cfg.offshelf_prob, max_images=cfg.max_face_images, seed=cfg.seed))
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
        hq, lq = val_batch["hq"], val_batch["lq"]
        target, condition = mode_streams(cfg.mode, hq, lq)
        sample = FlipNetSampleConfig(mode=cfg.mode, num_inference_steps=cfg.validation_inference_steps,
                                     guidance_scale=cfg.validation_guidance_scale,
                                     negative_prompt=cfg.negative_prompt, phi=cfg.phi, seed=cfg.seed)
        out = pipe(condition, sample)
    finally:
        unet.train(was_training)
    path = Path(cfg.output_dir) / "validation" / f"step_{step:07d}.png"
    save_image_grid([[c, o, t] for c, o, t in zip(condition, out, target)], path)
    logger.info("validation images -> %s", path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------------------------------


def _load_face_parts(cfg: FlipNetTrainConfig, cross_dim: int):

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
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader


    cfg.validate()
    if not cfg.output_dir:
        raise ValueError("train flipnet: --output-dir is required.")
    if components is None and not cfg.base_model:
        raise ValueError("train flipnet: --base-model is required (a local SD2.1-base diffusers folder or file).")
    accelerator = Accelerator(
        cpu=use_cpu(cfg.cpu),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
    )
    set_seed(cfg.seed, device_specific=True)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device

    if components is None:

        components = load_components(cfg.base_model, tokenizer=cfg.tokenizer, device="cpu")
    unet, vae, scheduler = components["unet"], components["vae"], components["scheduler"]
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Base scheduler prediction_type {prediction_type!r} is not supported ({PREDICTION_TYPES}).")
    state = prepare_flipnet_unet(unet, cfg.lora_rank, cfg.lora_alpha, cfg.phi)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if getattr(vae, "_supports_gradient_checkpointing", False):
            vae.enable_gradient_checkpointing()

    face_encoder = adapter = None
    face_size = None
    if cfg.mode == "restore" and cfg.use_face_embedding:
        face_encoder, adapter, face_size = _load_face_parts(cfg, unet.config.cross_attention_dim)
        face_encoder.to(device, dtype=weight_dtype)
    perceptual = None
    if cfg.mode == "restore" and cfg.lambda_perceptual > 0:
        perceptual = VGGPerceptualLoss(cfg.vgg_weights).to(device)

    # frozen parts in the compute dtype, trainable parts in fp32
    unet.to(device, dtype=weight_dtype)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    vae.to(device, dtype=weight_dtype).requires_grad_(False).eval()
    components["text_encoder"].to(device, dtype=weight_dtype).requires_grad_(False).eval()
    frozen = FrozenParts(vae=vae, text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
                         alphas_cumprod=scheduler.alphas_cumprod.to(device), prediction_type=prediction_type,
                         face_encoder=face_encoder, face_image_size=face_size, perceptual=perceptual)

    module = FlipNetTrainModule(unet, adapter)
    params = [p for p in module.parameters() if p.requires_grad]
    logger.info("Trainable parameters: %.2f M (LoRA rank %d, BoostHub%s).", sum(p.numel() for p in params) / 1e6,
                cfg.lora_rank, ", adapter" if adapter is not None else "")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.lr_warmup_steps))

    dataset = build_dataset(cfg)
    if len(dataset) == 0:
        raise ValueError("train flipnet: the dataset is empty.")
    val_batch = collate([dataset[i] for i in range(min(cfg.num_validation_images, len(dataset)))])
    loader = DataLoader(dataset, batch_size=cfg.train_batch_size, shuffle=True, num_workers=cfg.dataloader_num_workers,
                        collate_fn=collate, drop_last=len(dataset) >= cfg.train_batch_size * accelerator.num_processes,
                        generator=torch.Generator().manual_seed(cfg.seed))

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, m in enumerate(models):
                save_file(trainable_state_dict(accelerator.unwrap_model(m)),
                          str(Path(output_dir) / f"trainable_{i}.safetensors"))
        weights.clear()

    def load_hook(models, input_dir):
        for i in range(len(models)):
            m = models.pop()
            idx = len(models)
            path = Path(input_dir) / f"trainable_{idx}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"Resume folder {input_dir} lacks {path.name}; it was not written by "
                                        "`bfr train flipnet`.")
            load_trainable_state_dict(accelerator.unwrap_model(m), load_file(str(path)), str(path))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    module, optimizer, loader, lr_scheduler = accelerator.prepare(module, optimizer, loader, lr_scheduler)
    if accelerator.is_main_process and cfg.report_to:
        accelerator.init_trackers("flipnet", config={k: v for k, v in cfg.to_dict().items()
                                                     if isinstance(v, (int, float, str, bool))})

    resume_dir, global_step = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        logger.info("Resumed from %s at step %d.", resume_dir, global_step)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.gradient_accumulation_steps))
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * cfg.gradient_accumulation_steps
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + accelerator.process_index + global_step)
    degradation = DegradationBatchConfig(preset=cfg.degradation_preset)
    module.train()
    unwrapped = accelerator.unwrap_model(module)

    def export(path: Path) -> Path:
        m = accelerator.unwrap_model(module)
        enc = ada = None
        if m.adapter is not None:
            enc, ada = face_encoder, m.adapter
        return save_flipnet_checkpoint(path, m.unet, mode=cfg.mode, face_encoder=enc, adapter=ada,
                                       face_image_size=face_size,
                                       defaults=FlipNetDefaults(cfg.phi, cfg.t_y_policy, cfg.t_y),
                                       train_config=cfg.to_dict())

    logger.info("Training FlipNet (%s) for %d steps on %d processes, batch %d x %d accumulation.", cfg.mode,
                cfg.max_train_steps, accelerator.num_processes, cfg.train_batch_size, cfg.gradient_accumulation_steps)
    epoch = first_epoch
    while global_step < cfg.max_train_steps:
        for part in getattr(dataset, "datasets", [dataset]):
            part.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        skip_batches = 0
        for batch in epoch_loader:
            with accelerator.accumulate(module):
                hq = batch["hq"].to(device)
                lq_seed = (cfg.seed * 1_000_003 + global_step * accelerator.num_processes
                           + accelerator.process_index) & 0x7FFFFFFF
                lq = fill_lq_on_the_fly({"hq": hq, "lq": batch["lq"].to(device), "has_lq": batch["has_lq"]},
                                        lq_seed, degradation)
                with accelerator.autocast():
                    loss, logs = flipnet_loss(module, frozen, hq, lq, list(batch["caption"]), cfg, gen)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            logs["loss"] = float(loss.detach())
            if cfg.report_to:
                accelerator.log(logs, step=global_step)
            if global_step % cfg.log_every == 0 or global_step == 1:
                logger.info("step %d/%d %s", global_step, cfg.max_train_steps,
                            " ".join(f"{k}={v:.4f}" for k, v in logs.items()))
            if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps:
                ckpt_dir = Path(cfg.output_dir) / f"checkpoint-{global_step}"
                accelerator.save_state(str(ckpt_dir))
                if accelerator.is_main_process:
                    export(ckpt_dir / f"flipnet_{cfg.mode}.safetensors")
                    prune_checkpoints(cfg.output_dir, cfg.checkpoints_total_limit)
                accelerator.wait_for_everyone()
            if cfg.validation_steps and global_step % cfg.validation_steps == 0 and accelerator.is_main_process:
                run_validation(cfg, unwrapped.unet, frozen, unwrapped.adapter, scheduler, state,
                               {k: v.to(device) if torch.is_tensor(v) else v for k, v in
                                _val_with_lq(val_batch, degradation, cfg.seed).items()}, global_step)
            if global_step >= cfg.max_train_steps:
                break
        epoch += 1
    accelerator.wait_for_everyone()
    final = Path(cfg.output_dir) / f"flipnet_{cfg.mode}.safetensors"
    if accelerator.is_main_process:
        export(final)
        (Path(cfg.output_dir) / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _val_with_lq(val_batch: dict, degradation, seed: int) -> dict:
    """The fixed validation batch with its on-the-fly LQ made once, deterministically."""

    if "_lq_filled" not in val_batch:
        val_batch["lq"] = fill_lq_on_the_fly(val_batch, seed, degradation)
        val_batch["has_lq"] = torch.ones_like(val_batch["has_lq"])
        val_batch["_lq_filled"] = True
    return {k: v for k, v in val_batch.items() if k != "_lq_filled"}
