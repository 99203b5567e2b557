"""``bfr train id-mask``: CLR-Face's latent mask f_M (CLR-Face §3.3) on a frozen SD2.1 denoiser, VAE and identity model.

One step, per face (our reading of §3.3, "we first update the score to obtain the corresponding z0_hat and project it
back to pixel space"):

1. ``x = E(x_start) + sigma eps`` with sigma log-uniform in ``[--sigma-min, --sigma-max]`` (x_start: the degraded
   face, ``--start lq``, as refinement starts from an imperfect estimate; or the HQ face);
2. ``z0_hat = D(x, sigma)`` (frozen UNet, no graph) and ``g = grad_{z0_hat} L_arc(G(z0_hat), x)`` toward the identity
   of the HQ face (the identity an ideal IRN recovers), no graph kept (:func:`..pipelines.clrface.identity_gradient`);
3. ``M = f_M(x / sqrt(1 + sigma^2))``, the guided estimate ``z~ = z0_hat - s M (.) g`` (the sampler's
   :func:`..pipelines.clrface.apply_identity_guidance`), ``x~ = G(z~)`` with the graph through G into f_M;
4. ``L = lambda_p VGG(x~, x) + lambda_id (1 - cos(f_arc(x~), f_arc(x))) + lambda_s mean(M)``.

LPIPS is not available offline; the perceptual term is the pack's VGG19 feature loss (``--vgg-weights``, or
``--lambda-perceptual 0``). Only f_M is trained (~10 k parameters); the export is ``clrface-mask/1``
(:mod:`..lora.id_mask`) with the s it was trained at.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..lora.id_mask import IdentityMask, IdentityMaskConfig, save_mask_checkpoint
from ..lora.losses import VGGPerceptualLoss
from ..pipelines import clrface
from ..pipelines.arcface import IdentityModel
from ..sd.vae import encode as vae_encode
from .core import Stage, StepContext, StepResult, TrainConfig, TrainingRun, adamw, base_components, face_folder_dataset
from .core import flag, perceptual_loss, training_identity

logger = logging.getLogger(__name__)

STARTS = ("lq", "hq")


@dataclass
class IdMaskTrainConfig(TrainConfig):
    """Training configuration of f_M; the paper gives no numbers, these defaults are ours."""

    COMMAND = "train id-mask"
    FIRST_RUN = """\
CLR-Face's identity mask f_M (a few convolutions + sigmoid on the noisy latent) on a frozen SD2.1-base and a frozen
ArcFace-style identity model:

  bfr train id-mask --base-model SD21 --identity-model backbone.pth --hq-dir FACES --output-dir RUN \\
      --vgg-weights vgg19-dcbb9e9d.pth

A first run needs --base-model, --identity-model (an arcface_torch iresnet; mind its licence), --hq-dir and
--output-dir, plus --vgg-weights FILE (or --lambda-perceptual 0). The file is clrface-mask.safetensors
(clrface-mask/1); put it into ComfyUI/models/bfr and load it with 'BFR Load CLR-Face Mask'."""

    base_model: str = flag("local SD2.1-base: diffusers folder or single-file .safetensors", "model", metavar="PATH",
                           default="")
    tokenizer: str | None = flag("CLIP tokenizer folder (needed with a single-file base model)", "model",
                                 metavar="DIR", default=None)
    identity_model: str | None = flag("arcface_torch iresnet backbone (.pth / .safetensors): f_arc", "model",
                                      metavar="FILE", default=None)
    allow_random_identity: bool = flag("tests only: a randomly initialised r18 instead of --identity-model", "model",
                                       identity=False, default=False)
    guidance_scale: float = flag("s of the guided estimate during training, saved as the sampler's scale", "model",
                                 default=1.0)
    start: str = flag("what is noised: lq (the degraded face, as refinement starts from an estimate) or hq", "data",
                      metavar="lq|hq", default="lq")
    sigma_min: float = flag("lowest training noise level (k-diffusion sigma)", "optim", default=0.03)
    sigma_max: float = flag("highest training noise level (40 Karras steps at denoise 0.5 start at ~1.0)", "optim",
                            default=2.0)
    mask_width: int = flag("hidden channels of f_M", "model", default=32)
    mask_layers: int = flag("convolutions in f_M (>= 2)", "model", default=3)
    lambda_id: float = flag("weight of the identity loss 1 - cos(f_arc(x~), f_arc(x))", "optim", default=1.0)
    lambda_sparsity: float = flag("weight of the sparsity penalty mean(M)", "optim", default=0.01)
    lambda_perceptual: float = flag("weight of the VGG19 perceptual loss (the offline stand-in for LPIPS; 0: no "
                                    "VGG19 needed)", "optim", default=1.0)
    learning_rate: float = flag("AdamW learning rate", "optim", default=1e-4)
    max_train_steps: int = flag("optimizer steps", "schedule", default=5000)

    def validate(self) -> None:
        if self.start not in STARTS:
            self.bad("start", f"must be one of {STARTS}.")
        if not self.hq_dir:
            self.bad("hq_dir", "is required (a folder of aligned HQ faces).")
        if not self.identity_model and not self.allow_random_identity:
            self.bad("identity_model", "is required: an arcface_torch iresnet backbone.pth (r18/r34/r50/r100).")
        if not 0 < self.sigma_min < self.sigma_max:
            self.bad("sigma_min", f"must be > 0 and below --sigma-max {self.sigma_max}.")
        self.check_non_negative("guidance_scale", "lambda_id", "lambda_sparsity")
        self.check_positive_ints("mask_width")
        if self.mask_layers < 2:
            self.bad("mask_layers", "must be >= 2.")
        super().validate()


@dataclass
class IdMaskFrozen:
    unet: nn.Module
    vae: nn.Module
    identity: IdentityModel
    context: torch.Tensor
    perceptual: VGGPerceptualLoss | None = None
    prediction_type: str = "epsilon"


def id_mask_loss(mask: nn.Module, frozen: IdMaskFrozen, hq: torch.Tensor, lq: torch.Tensor, cfg: IdMaskTrainConfig,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The f_M objective of one batch of faces in [0, 1] (module docstring, steps 1-4)."""
    device = hq.device
    b = hq.shape[0]
    with torch.no_grad():
        z_start = vae_encode(frozen.vae, lq if cfg.start == "lq" else hq).float()
        ref = frozen.identity.embed(hq)
    u = torch.rand(b, generator=generator, device=device)
    sigma = torch.exp(math.log(cfg.sigma_min) + u * (math.log(cfg.sigma_max) - math.log(cfg.sigma_min)))
    noise = torch.randn(z_start.shape, generator=generator, device=device)
    x = z_start + sigma.view(-1, 1, 1, 1) * noise
    decode = clrface.vae_decoder(frozen.vae)
    with torch.no_grad():
        z0_hat = clrface.diffusers_denoiser(frozen.unet, frozen.context, prediction_type=frozen.prediction_type)(x, sigma)
    l_before, grad = clrface.identity_gradient(z0_hat, decode, frozen.identity, ref)
    m = mask(x / torch.sqrt(1.0 + sigma.view(-1, 1, 1, 1) ** 2))
    image = decode(clrface.apply_identity_guidance(z0_hat, grad, m, cfg.guidance_scale))
    l_id = clrface.identity_loss(image, frozen.identity, ref).mean()
    l_sp = m.mean()
    l_p = torch.zeros((), device=device)
    if cfg.lambda_perceptual > 0 and frozen.perceptual is not None:
        l_p = frozen.perceptual(hq, image.clamp(-0.5, 1.5))
    loss = cfg.lambda_perceptual * l_p + cfg.lambda_id * l_id + cfg.lambda_sparsity * l_sp
    logs = {"l_id": float(l_id.detach()), "l_id_unguided": float(l_before.mean()), "l_p": float(l_p.detach()),
            "mask_mean": float(l_sp.detach())}
    return loss, logs


def train_id_mask(cfg: IdMaskTrainConfig, components: dict | None = None) -> Path:
    """Train f_M; returns the exported ``clrface-mask.safetensors``. ``components`` (unet, vae) replaces loading
    ``cfg.base_model`` (tests)."""
    run = TrainingRun(cfg)
    dataset = face_folder_dataset(cfg)
    device, dtype = run.device, run.weight_dtype
    components, prediction_type = base_components(cfg, components)
    unet = components["unet"].to(device, dtype=dtype).requires_grad_(False).eval()
    vae = components["vae"].to(device, dtype=dtype).requires_grad_(False).eval()
    perceptual = perceptual_loss(cfg)
    frozen = IdMaskFrozen(unet, vae, training_identity(cfg, device),
                          torch.zeros(1, 77, int(unet.config.cross_attention_dim), device=device),
                          perceptual.to(device) if perceptual is not None else None, prediction_type)
    mask = IdentityMask(IdentityMaskConfig(width=cfg.mask_width, layers=cfg.mask_layers))
    params = list(mask.parameters())
    optimizer = adamw(params, cfg)
    stage = Stage("id_mask", optimizer, params, cfg.max_grad_norm)

    def step(batch: dict, models: tuple, ctx: StepContext) -> StepResult:
        loss, logs = id_mask_loss(models[0], frozen, batch["hq"], batch["lq"], cfg, ctx.generator)
        return StepResult({"id_mask": loss}, logs)

    def export(path: Path) -> Path:
        net = run.accelerator.unwrap_model(mask)
        return save_mask_checkpoint(path, net, guidance_scale=cfg.guidance_scale, train_config=cfg.to_dict(),
                                    dtype=torch.float32)

    return run.fit(name="id_mask", title="CLR-Face identity mask", dataset=dataset, models=[mask], stages=[stage],
                   step=step, export=export, export_name="clrface-mask.safetensors")
