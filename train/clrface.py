"""``bfr train clr-face``: CLR-Face's conditional denoiser on SD2.1-base (CLR-Face §3.2, design.md §3.5).

The paper refines a VQGAN f=4 latent with a denoiser conditioned on the degraded latent z^d by concatenation and
samples it with EDM Heun; on SD2.1 the denoiser is SD2.1 + LoRA with E(x^d) concatenated (conv_in 4 -> 8, the new
channels zero-initialised: the same :class:`..lora.ldrm.ConcatConvIn` as DR-BFR) and no DR prompt. The objective is
:func:`.drbfr.conditional_ldm_loss` in the EDM parameterisation ComfyUI's ``heun`` + ``karras`` sample: noise levels
are drawn from EDM's training distribution ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Tab. 1: -1.2, 1.2)
and mapped to the nearest of SD2.1's 1000 discrete sigmas (the eps-prediction UNet is indexed by timestep); EDM's
loss weight lambda(sigma) = 1 / sigma^2 on the denoiser D = x - sigma eps makes the D-loss exactly the eps-MSE, so
the eps loss is kept. LQ faces come from the ``clr-face`` preset on the fly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..lora.cond_checkpoint import CLRFACE_FORMAT, save_conditional_checkpoint
from ..sd.diffusion import sigmas_from_alphas_cumprod
from .core import Stage, StepContext, StepResult, TrainConfig, TrainingRun, adamw, base_components, face_folder_dataset
from .core import flag, warmup_schedule
from .drbfr import ConditionalUNet, conditional_ldm_loss, prepare_conditional_unet
from .flipnet import place_sd_parts

logger = logging.getLogger(__name__)

EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # Karras et al. 2022, Table 1 (training noise distribution)


@dataclass
class CLRFaceTrainConfig(TrainConfig):
    """CLR-Face conditional denoiser training; ours where the paper is silent (said per flag)."""

    COMMAND = "train clr-face"
    FIRST_RUN = """\
CLR-Face's conditional denoiser on SD2.1-base: LoRA + the degraded latent concatenated to the UNet input, trained
at EDM's noise levels (sampled with heun + karras by the CLR-Face Sampler).

  bfr train clr-face --base-model SD21 --hq-dir FACES --output-dir RUN

A quick test: --resolution 256 --max-train-steps 200 --lora-rank 16."""

    base_model: str = flag("local SD2.1-base: diffusers folder or single-file .safetensors", "model", metavar="PATH",
                           default="")
    tokenizer: str | None = flag("CLIP tokenizer folder (needed with a single-file base model)", "model",
                                 metavar="DIR", default=None)
    captions: str | None = flag("caption sidecar for --hq-dir; none: empty prompts", "data", metavar="FILE",
                                default=None)
    degradation_preset: str = flag("classical preset for on-the-fly LQ (paper §4: `clr-face`)", "data",
                                   default="clr-face")
    lora_rank: int = flag("LoRA rank r (ours: 64)", "model", default=64)
    lora_alpha: float | None = flag("LoRA alpha (default: = rank)", "model", default=None)
    p_mean: float = flag("EDM training noise: mean of ln(sigma) (Karras et al.: -1.2)", "optim", default=EDM_P_MEAN)
    p_std: float = flag("EDM training noise: std of ln(sigma) (Karras et al.: 1.2)", "optim", default=EDM_P_STD)
    lambda_perceptual: float = flag("unused (L_LDM only)", "optim", default=0.0)
    text_drop_prob: float = flag("probability of dropping the caption, for CFG (ours: 0.1)", "optim", default=0.1)
    learning_rate: float = flag("AdamW learning rate (ours: 1e-4 for LoRA)", "optim", default=1e-4)
    lr_warmup_steps: int = flag("linear warm-up steps, then constant", "optim", default=0)
    max_train_steps: int = flag("optimizer steps", "schedule", default=100_000)

    def validate(self) -> None:
        if not self.hq_dir:
            self.bad("hq_dir", "is required (a folder of aligned HQ faces; LQ is made on the fly).")
        if self.lambda_perceptual:
            self.bad("lambda_perceptual", "must be 0: the denoiser's objective is L_LDM alone.")
        if not self.p_std > 0:
            self.bad("p_std", "must be > 0.")
        self.check_positive_ints("lora_rank")
        self.check_probabilities("text_drop_prob")
        super().validate()


def edm_timesteps(alphas_cumprod: torch.Tensor, n: int, p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """n discrete timesteps whose sigmas follow EDM's ln(sigma) ~ N(p_mean, p_std^2), each the nearest SD sigma."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.float().cpu())
    log_sigma = p_mean + p_std * torch.randn(n, generator=generator, device=generator.device if generator else "cpu")
    t = (torch.log(sigmas)[None] - log_sigma.cpu()[:, None]).abs().argmin(dim=1)
    return t.to(alphas_cumprod.device)


def train_clrface(cfg: CLRFaceTrainConfig, components: dict | None = None) -> Path:
    """Train the conditional denoiser; returns the exported ``clrface.safetensors`` (``clrface/1``)."""
    if components is None and not cfg.base_model:
        base_components(cfg, None)
    run = TrainingRun(cfg)
    dataset = face_folder_dataset(cfg, captions=cfg.captions)
    device, weight_dtype = run.device, run.weight_dtype
    components, prediction_type = base_components(cfg, components)
    unet = components["unet"]
    prepare_conditional_unet(unet, cfg.lora_rank, cfg.lora_alpha, "CLR-Face")
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    frozen = place_sd_parts(components, device, weight_dtype, prediction_type)
    module = ConditionalUNet(unet)
    params = [p for p in module.parameters() if p.requires_grad]
    logger.info("Trainable parameters: %.2f M (LoRA rank %d, conv_in extra channels).",
                sum(p.numel() for p in params) / 1e6, cfg.lora_rank)
    optimizer = adamw(params, cfg)
    stage = Stage("clrface", optimizer, params, cfg.max_grad_norm, warmup_schedule(optimizer, cfg.lr_warmup_steps))

    def step(batch: dict, models: tuple, ctx: StepContext) -> StepResult:
        t = edm_timesteps(frozen.alphas_cumprod, batch["hq"].shape[0], cfg.p_mean, cfg.p_std, ctx.generator)
        loss, logs = conditional_ldm_loss(models[0], frozen, batch["hq"], batch["lq"], list(batch["caption"]),
                                          cfg.text_drop_prob, ctx.generator, timesteps=t)
        return StepResult({"clrface": loss}, logs)

    def export(path: Path) -> Path:
        return save_conditional_checkpoint(path, module.unet, fmt=CLRFACE_FORMAT,
                                           defaults={"sampler": "heun", "scheduler": "karras", "steps": 40},
                                           train_config=cfg.to_dict(), dtype=run.export_dtype)

    return run.fit(name="clrface", title="CLR-Face denoiser", dataset=dataset, models=[module], stages=[stage],
                   step=step, export=export, export_name="clrface.safetensors", trainable_only=True)
