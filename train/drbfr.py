"""``bfr train drbfr``: the Latent Diffusion Restoration Module of DR-BFR (§3.2, Eq. 8) on SD2.1-base.

L_LDM = || eps - eps_theta(z_t, f_LQ, f_DR, t) ||^2 with f_LQ = E_VAE(y) concatenated to z_t (conv_in 4 -> 8, the new
channels zero-initialised) and f_DR = E_DR(y) as timestep-modulated prompt tokens appended to the text context
(Eq. 10). Trained: the LoRA on every attention projection, W_extra of the widened conv_in, and the DR prompt
(MLP(t) + projection); frozen: SD2.1, the VAE, the text encoder and E_DR (trained first by ``bfr train dr-encoder``,
§3.1: the DRM is trained on its own, then used to extract f_DR). The paper trains its LDM fully and without text;
on SD2.1 we keep the base frozen (LoRA, design.md §3.4) and drop the caption with ``--text-drop-prob`` so CFG works.
LQ images are made on the fly with the ``dr-bfr`` preset (one degradation per image, §4.1).

:func:`conditional_ldm_loss` is also CLR-Face's conditional-denoiser objective (no DR prompt).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..lora.checkpoint import check_sd21_unet
from ..lora.cond_checkpoint import DRBFR_FORMAT, save_conditional_checkpoint
from ..lora.dr_checkpoint import read_dr_checkpoint
from ..lora.dr_module import DegradationEncoder, DRConfig
from ..lora.face_embedder import drop_mask
from ..lora.ldrm import DRPrompt, DRPromptConfig, concat_unet_eps, install_concat_conv_in
from ..lora.lora_targets import add_flipnet_lora
from ..lora.losses import ldm_loss
from ..pipelines.drbfr import DRBFRPipeline, DRBFRSampleConfig
from ..sd.diffusion import diffusion_target, q_sample
from ..sd.vae import encode as vae_encode
from .core import Stage, StepContext, StepResult, TrainConfig, TrainingRun, adamw, base_components, face_folder_dataset
from .core import flag, save_image_grid, warmup_schedule
from .flipnet import FrozenParts, encode_text, place_sd_parts

logger = logging.getLogger(__name__)


@dataclass
class DRBFRTrainConfig(TrainConfig):
    """DR-BFR LDRM training; the paper's values where it states them, ours otherwise (said per flag)."""

    COMMAND = "train drbfr"
    FIRST_RUN = """\
DR-BFR on SD2.1-base: LoRA + the LQ latent concatenated to the UNet input + the degradation representation of
`bfr train dr-encoder` as timestep-modulated prompt tokens.

  bfr train dr-encoder --hq-dir FACES --output-dir RUN_DR
  bfr train drbfr --base-model SD21 --hq-dir FACES --dr-encoder RUN_DR/dr_encoder.safetensors --output-dir RUN

A first run needs --base-model, --hq-dir, --dr-encoder and --output-dir. A quick test: --resolution 256
--max-train-steps 200 --lora-rank 16. Add --resume-from-checkpoint latest to continue."""

    base_model: str = flag("local SD2.1-base: diffusers folder or single-file .safetensors", "model", metavar="PATH",
                           default="")
    tokenizer: str | None = flag("CLIP tokenizer folder (needed with a single-file base model)", "model",
                                 metavar="DIR", default=None)
    captions: str | None = flag("caption sidecar for --hq-dir (.json / .jsonl / .tsv); none: empty prompts",
                                "data", metavar="FILE", default=None)
    dr_encoder: str | None = flag("DR encoder .safetensors from `bfr train dr-encoder` (frozen here)", "model",
                                  metavar="FILE", default=None)
    allow_random_dr_encoder: bool = flag("tests only: a randomly initialised E_DR instead of --dr-encoder", "model",
                                         identity=False, default=False)
    degradation_preset: str = flag("classical preset for on-the-fly LQ (paper §4.1: `dr-bfr`)", "data",
                                   default="dr-bfr")
    lora_rank: int = flag("LoRA rank r (ours: 64, as FlipNet; the paper fine-tunes its whole LDM)", "model",
                          default=64)
    lora_alpha: float | None = flag("LoRA alpha (default: = rank)", "model", default=None)
    prompt_hidden: int = flag("hidden width of MLP(t) of Eq. 10 (ours)", "model", default=512)
    lambda_perceptual: float = flag("unused by DR-BFR (L_LDM only, Eq. 8)", "optim", default=0.0)
    text_drop_prob: float = flag("probability of dropping the caption, for CFG (ours: 0.1)", "optim", default=0.1)
    learning_rate: float = flag("AdamW learning rate (ours: 1e-4 for LoRA)", "optim", default=1e-4)
    lr_warmup_steps: int = flag("linear warm-up steps, then constant", "optim", default=0)
    max_train_steps: int = flag("optimizer steps", "schedule", default=100_000)
    validation_inference_steps: int = flag("DDIM steps for validation", "schedule", default=30)
    validation_guidance_scale: float = flag("CFG scale for validation (1 = none)", "schedule", default=1.0)

    def validate(self) -> None:
        if not self.hq_dir:
            self.bad("hq_dir", "is required (a folder of aligned HQ faces; LQ is made on the fly).")
        if not self.dr_encoder and not self.allow_random_dr_encoder:
            self.bad("dr_encoder", "is required: train E_DR first with `bfr train dr-encoder` (DR-BFR §3.1).")
        if self.dr_encoder and not Path(self.dr_encoder).is_file():
            self.bad("dr_encoder", "does not exist.")
        if self.lambda_perceptual:
            self.bad("lambda_perceptual", "must be 0: DR-BFR's objective is L_LDM alone (Eq. 8).")
        self.check_positive_ints("lora_rank", "prompt_hidden", "validation_inference_steps")
        self.check_probabilities("text_drop_prob")
        self.check_non_negative("lr_warmup_steps")
        if self.validation_guidance_scale < 1.0:
            self.bad("validation_guidance_scale", "must be >= 1 (1 = no CFG).")
        super().validate()


class ConditionalUNet(nn.Module):
    """What DDP wraps: the UNet (frozen base + LoRA + widened conv_in) and, for DR-BFR, the DR prompt; E_DR is
    frozen and runs outside the autograd graph."""

    def __init__(self, unet: nn.Module, dr_prompt: DRPrompt | None = None, dr_encoder: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.dr_prompt = dr_prompt
        self.dr_encoder = [dr_encoder]  # a list: not a submodule, so not in the trained / saved state

    def forward(self, z_t, t, text_context, lq_latent, lq_images=None):
        f_dr = None
        encoder = self.dr_encoder[0]
        if self.dr_prompt is not None and encoder is not None:
            with torch.no_grad():
                f_dr = encoder(lq_images.to(next(encoder.parameters()).dtype)).float()
        return concat_unet_eps(self.unet, z_t, t, text_context, lq_latent, self.dr_prompt, f_dr)


def prepare_conditional_unet(unet: nn.Module, rank: int, alpha: float | None, what: str) -> None:
    """Freeze SD2.1, add the LoRA on every attention projection and widen conv_in (W_extra = 0); LoRA + W_extra
    trainable."""
    check_sd21_unet(unet, what)
    unet.requires_grad_(False)
    add_flipnet_lora(unet, rank=rank, alpha=alpha)
    install_concat_conv_in(unet)
    for n, p in unet.named_parameters():
        if "lora_" in n or n == "conv_in.extra":
            p.requires_grad_(True)


def conditional_ldm_loss(module: nn.Module, frozen: FrozenParts, hq: torch.Tensor, lq: torch.Tensor,
                         captions: list[str], text_drop_prob: float, generator: torch.Generator | None = None,
                         timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L_LDM (DR-BFR Eq. 8) on a batch of HQ / LQ images in [0, 1]: z_t from E(x), condition E(y) (+ E_DR(y))."""
    device, b = hq.device, hq.shape[0]
    with torch.no_grad():
        z0 = vae_encode(frozen.vae, hq).float()
        z_lq = vae_encode(frozen.vae, lq).float()
    noise = torch.randn(z0.shape, generator=generator, device=device)
    t = timesteps if timesteps is not None else torch.randint(0, frozen.alphas_cumprod.shape[0], (b,),
                                                              generator=generator, device=device)
    z_t = q_sample(z0, noise, frozen.alphas_cumprod, t)
    target = diffusion_target(z0, noise, frozen.alphas_cumprod, t, frozen.prediction_type)
    drop = drop_mask(b, text_drop_prob, generator, device)
    text = encode_text(frozen, ["" if bool(d) else c for c, d in zip(captions, drop.tolist())])
    out = module(z_t.to(text.dtype), t, text, z_lq.to(text.dtype), lq).float()
    loss = ldm_loss(out, target)
    return loss, {"l_ldm": float(loss.detach())}


def load_dr_encoder(cfg: DRBFRTrainConfig) -> tuple[DegradationEncoder, DRConfig]:
    """E_DR of ``--dr-encoder`` (or a random one with ``--allow-random-dr-encoder``), frozen."""
    if cfg.dr_encoder:
        module, _ = read_dr_checkpoint(cfg.dr_encoder)
        encoder, dr_cfg = module.encoder, module.cfg
    else:
        logger.warning("train drbfr: E_DR is randomly initialised (--allow-random-dr-encoder): the DR tokens carry "
                       "no learned degradation information. Use it for tests only.")
        dr_cfg = DRConfig()
        encoder = DegradationEncoder(dr_cfg)
    return encoder.requires_grad_(False).eval(), dr_cfg


def train_drbfr(cfg: DRBFRTrainConfig, components: dict | None = None) -> Path:
    """Train the LDRM; returns the exported ``drbfr.safetensors`` (``drbfr/1``). ``components`` replaces loading
    ``cfg.base_model`` (tests)."""
    if components is None and not cfg.base_model:  # before the run is set up: a missing flag fails in a second
        base_components(cfg, None)
    run = TrainingRun(cfg)
    dataset = face_folder_dataset(cfg, captions=cfg.captions)
    device, weight_dtype = run.device, run.weight_dtype
    components, prediction_type = base_components(cfg, components)
    unet, vae, scheduler = components["unet"], components["vae"], components["scheduler"]
    prepare_conditional_unet(unet, cfg.lora_rank, cfg.lora_alpha, "DR-BFR")
    encoder, dr_cfg = load_dr_encoder(cfg)
    prompt = DRPrompt(DRPromptConfig(token_dim=dr_cfg.token_dim, num_tokens=dr_cfg.num_tokens,
                                     context_dim=unet.config.cross_attention_dim, hidden=cfg.prompt_hidden))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    frozen = place_sd_parts(components, device, weight_dtype, prediction_type)
    encoder.to(device, dtype=weight_dtype)
    prompt.to(device)
    module = ConditionalUNet(unet, prompt, encoder)
    params = [p for p in module.parameters() if p.requires_grad]
    logger.info("Trainable parameters: %.2f M (LoRA rank %d, conv_in extra channels, DR prompt %.2f M).",
                sum(p.numel() for p in params) / 1e6, cfg.lora_rank,
                sum(p.numel() for p in prompt.parameters()) / 1e6)
    optimizer = adamw(params, cfg)
    stage = Stage("drbfr", optimizer, params, cfg.max_grad_norm, warmup_schedule(optimizer, cfg.lr_warmup_steps))
    defaults = {"guidance_scale": cfg.validation_guidance_scale, "num_inference_steps": 50}

    def step(batch: dict, models: tuple, ctx: StepContext) -> StepResult:
        loss, logs = conditional_ldm_loss(models[0], frozen, batch["hq"], batch["lq"], list(batch["caption"]),
                                          cfg.text_drop_prob, ctx.generator)
        return StepResult({"drbfr": loss}, logs)

    def export(path: Path) -> Path:
        return save_conditional_checkpoint(path, module.unet, fmt=DRBFR_FORMAT,
                                           modules={"dr_encoder": encoder, "dr_prompt": module.dr_prompt},
                                           defaults=defaults, train_config=cfg.to_dict(), dtype=run.export_dtype)

    def validate(val_batch: dict, global_step: int) -> Path:
        was = module.training
        module.eval()
        try:
            pipe = DRBFRPipeline(module.unet, vae, components["text_encoder"], components["tokenizer"], scheduler,
                                 encoder, module.dr_prompt)
            out = pipe(val_batch["lq"], DRBFRSampleConfig(num_inference_steps=cfg.validation_inference_steps,
                                                          guidance_scale=cfg.validation_guidance_scale, seed=cfg.seed))
        finally:
            module.train(was)
        path = Path(cfg.output_dir) / "validation" / f"drbfr_step_{global_step:07d}.png"
        save_image_grid([[lq, o, hq] for lq, o, hq in zip(val_batch["lq"], out, val_batch["hq"])], path)
        logger.info("validation images -> %s", path)
        return path

    return run.fit(name="drbfr", title="DR-BFR", dataset=dataset, models=[module], stages=[stage], step=step,
                   export=export, export_name="drbfr.safetensors", validate=validate, trainable_only=True)
