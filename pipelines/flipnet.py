"""FlipNet inference on diffusers components (FlipNet §4, design §3.3): restoration and degradation mode.

One sampler serves both modes; only the roles flip:

* ``restore``: the condition is the LQ image; the HQ image is generated; text + BFR face tokens (LQ encoder ->
  adapter) in cross-attention; negative prompt "low quality, blurry, ..."; CFG 1.5.
* ``degrade``: the condition is the HQ image; the LQ image is generated; text only (null prompt by default).

Each step the UNet sees the joint batch ``cat([x_t, y_{t_y}])`` (BoostHub convention, ``lora/boosthub.py``): the
condition latent diffused to ``t_y`` (policy ``same``: t_y = t; ``fixed``: a constant with a fixed noise draw). Under
``fixed`` the condition stream never changes, so the LQ cache (``lq_cache=True``) runs it once to record every
BoostHub layer's K/V and then denoises the input stream alone.

Also here: :func:`load_sd_components` (a local SD2.1-base diffusers folder or single file; no downloads),
:func:`restore_folder` (``bfr restore --method flipnet``) and :func:`synthesize_degraded` (``bfr synthesize --mode
degrade``, sharded across accelerate processes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..lora.losses import predict_x0, q_sample

logger = logging.getLogger(__name__)

DEFAULT_NEGATIVE_PROMPT = ("low quality, blurry, poorly rendered hands, deformed, jpeg artifacts, noisy, "
                           "out of focus, low resolution")
MODES = ("restore", "degrade")


# --------------------------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------------------------


def load_sd_components(base: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       tokenizer: str | Path | None = None) -> dict:
    """SD2.1-base components, offline: a local diffusers folder (``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/``) or a single-file ``.safetensors`` (ComfyUI ``models/checkpoints``) plus a CLIP
    ``tokenizer`` folder (single files carry no BPE vocabulary)."""
    from transformers import CLIPTokenizer

    base = Path(base)
    if base.is_dir():
        from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (base / d).is_dir()]
        if missing:
            raise FileNotFoundError(f"Base model folder {str(base)!r} lacks {missing}; expected a diffusers "
                                    "StableDiffusionPipeline folder (save_pretrained layout) of SD2.1-base.")
        vae_cfg = (base / "vae" / "config.json").read_text()
        vae_cls = AutoencoderTiny if "AutoencoderTiny" in vae_cfg else AutoencoderKL
        comps = {
            "unet": UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=dtype),
            "vae": vae_cls.from_pretrained(base / "vae", torch_dtype=dtype),
            "text_encoder": CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=dtype),
            "tokenizer": CLIPTokenizer.from_pretrained(tokenizer or base / "tokenizer"),
            "scheduler": DDPMScheduler.from_pretrained(base / "scheduler"),
        }
    elif base.is_file():
        from ..lora.convert import load_single_file_components

        if tokenizer is None or not Path(tokenizer).is_dir():
            raise FileNotFoundError(f"Single-file base model {str(base)!r} needs a CLIP tokenizer folder (vocab.json "
                                    f"+ merges.txt), got tokenizer={tokenizer!r}. Pass --tokenizer PATH (e.g. the "
                                    "tokenizer/ folder of any SD2.x diffusers model).")
        loaded = load_single_file_components(base, dtype=dtype)
        if loaded.get("vae") is None or loaded.get("text_encoder") is None:
            raise ValueError(f"Single-file base model {str(base)!r} lacks a VAE or text encoder; FlipNet needs both.")
        comps = {k: loaded[k] for k in ("unet", "vae", "text_encoder", "scheduler")}
        comps["tokenizer"] = CLIPTokenizer.from_pretrained(tokenizer)
    else:
        raise FileNotFoundError(f"Base model {str(base)!r} does not exist; pass a local SD2.1-base diffusers folder "
                                "or .safetensors checkpoint.")
    for name in ("unet", "vae", "text_encoder"):
        comps[name].to(device).requires_grad_(False).eval()
    return comps


def vae_encode(vae: nn.Module, images: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = False) -> torch.Tensor:
    """Images (B,3,H,W) in [0,1] -> latents times the VAE scaling factor (AutoencoderKL or AutoencoderTiny)."""
    x = images.to(device=vae.device, dtype=vae.dtype) * 2.0 - 1.0
    enc = vae.encode(x)
    if hasattr(enc, "latent_dist"):
        z = enc.latent_dist.sample(generator) if sample else enc.latent_dist.mean
    else:
        z = enc.latents
    return z * vae.config.scaling_factor


def vae_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents (scaled) -> images in [0, 1] (unclamped; clamp for display)."""
    out = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (out.float() + 1.0) * 0.5


def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
    """Prompts -> text context (B, 77, 1024) from the SD2.1 text encoder's output hidden states."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def mode_streams(mode: str, hq: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input stream, condition stream): restore = (HQ, LQ), degrade = (LQ, HQ) -- "simply flipping the inputs"."""
    if mode == "restore":
        return hq, lq
    if mode == "degrade":
        return lq, hq
    raise ValueError(f"FlipNet mode must be one of {MODES}, got {mode!r}.")


def joint_batch(input_stream: torch.Tensor, condition_stream: torch.Tensor) -> torch.Tensor:
    """cat([input, condition]) on the batch axis: row i pairs with row B+i in BoostHub (§4.1)."""
    if input_stream.shape != condition_stream.shape:
        raise ValueError(f"Input and condition latents must have the same shape, got {tuple(input_stream.shape)} "
                         f"and {tuple(condition_stream.shape)}.")
    return torch.cat([input_stream, condition_stream], dim=0)


# --------------------------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class FlipNetSampleConfig:
    """Sampling settings (paper §5.1: CFG 1.5, negative prompt for restoration, null prompt for degradation)."""

    mode: str = "restore"
    num_inference_steps: int = 50
    guidance_scale: float = 1.5
    prompt: str = ""
    negative_prompt: str | None = None  # None: DEFAULT_NEGATIVE_PROMPT (restore) / "" (degrade)
    phi: float | None = None  # None: the checkpoint's default
    t_y_policy: str | None = None  # "same" | "fixed"; None: the checkpoint's default
    t_y: int | None = None
    lq_cache: bool = True
    use_face_embedding: bool = True
    seed: int = 0
    seeds: list[int] | None = None  # one seed per image (overrides ``seed``); results then ignore batching

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}.")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (paper: 1.5), got {self.guidance_scale}.")
        if self.phi is not None and self.phi < 0:
            raise ValueError(f"phi must be >= 0 (paper: 1, range [0, 2]), got {self.phi}.")
        if self.t_y_policy is not None and self.t_y_policy not in ("same", "fixed"):
            raise ValueError(f"t_y_policy must be 'same' or 'fixed', got {self.t_y_policy!r}.")
        if self.t_y is not None and not 0 <= self.t_y < 1000:
            raise ValueError(f"t_y must be in [0, 999], got {self.t_y}.")


class FlipNetPipeline:
    """Diffusers-based FlipNet sampler: a UNet carrying the FlipNet LoRA + BoostHub, the SD VAE/text encoder, a
    scheduler (DDIM by default) and, for restoration, the LQ face encoder + adapter."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, boosthub_state, face_encoder=None, adapter=None,
                 face_image_size: int | None = None, defaults=None, sampling_scheduler=None):
        from diffusers import DDIMScheduler

        from ..lora.checkpoint import FlipNetDefaults

        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        # the training (DDPM) schedule defines q(y_t | y); sampling uses DDIM on the same betas unless given
        self.train_alphas = scheduler.alphas_cumprod
        self.scheduler = sampling_scheduler or DDIMScheduler.from_config(scheduler.config)
        self.state = boosthub_state
        self.face_encoder, self.adapter = face_encoder, adapter
        self.face_image_size = face_image_size
        self.defaults = defaults or FlipNetDefaults()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @classmethod
    def from_checkpoint(cls, base: str | Path | None, checkpoint: str | Path, device="cpu", dtype=torch.float32,
                        components: dict | None = None, tokenizer: str | Path | None = None) -> FlipNetPipeline:
        """Base SD2.1 components (``base`` path, or ready ``components``) + a FlipNet ``.safetensors``."""
        from ..lora.checkpoint import apply_flipnet_checkpoint, build_face_modules, read_flipnet_checkpoint

        if components is None and not base:
            raise ValueError("FlipNetPipeline.from_checkpoint needs the SD2.1-base model path (--base-model).")
        comps = components or load_sd_components(base, device, dtype, tokenizer=tokenizer)
        ckpt = read_flipnet_checkpoint(checkpoint)
        state = apply_flipnet_checkpoint(comps["unet"], ckpt)
        comps["unet"].to(device=device, dtype=dtype).eval()
        enc = ada = None
        if ckpt.has_face_embedder:
            enc, ada = build_face_modules(ckpt)
            enc.to(device=device, dtype=dtype)
            ada.to(device=device, dtype=dtype)
        return cls(comps["unet"], comps["vae"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"], state,
                   enc, ada, ckpt.face_image_size, ckpt.defaults)

    def face_tokens(self, lq_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tau(z_y), tau(0)) for the conditional and unconditional branches."""
        from ..lora.face_embedder import null_face_tokens, resize_for_face_encoder

        size = self.face_image_size or lq_images.shape[-1]
        p = next(self.adapter.parameters())
        z = self.face_encoder(resize_for_face_encoder(lq_images, size).to(p.device, p.dtype))
        return self.adapter(z), null_face_tokens(self.adapter, z.shape[0], z.shape[1])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, cfg: FlipNetSampleConfig | None = None,
                 callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Condition images (B,3,H,W) in [0,1] (LQ to restore, or HQ to degrade) -> generated images in [0,1]."""
        cfg = cfg or FlipNetSampleConfig()
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FlipNet expects images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
        if images.shape[-1] % 8 or images.shape[-2] % 8:
            raise ValueError(f"Image size {tuple(images.shape[-2:])} must be a multiple of 8 (512 recommended).")
        if not torch.isfinite(images).all():
            raise ValueError("Input images contain NaN/inf values.")
        device, dtype = self.device, next(self.unet.parameters()).dtype
        b = images.shape[0]
        phi = self.defaults.phi if cfg.phi is None else cfg.phi
        policy = cfg.t_y_policy or self.defaults.t_y_policy
        t_y_fixed = self.defaults.t_y if cfg.t_y is None else cfg.t_y
        negative = cfg.negative_prompt if cfg.negative_prompt is not None else (
            DEFAULT_NEGATIVE_PROMPT if cfg.mode == "restore" else "")
        seeds = list(cfg.seeds) if cfg.seeds is not None else [cfg.seed + i for i in range(b)]
        if len(seeds) != b:
            raise ValueError(f"FlipNetSampleConfig.seeds has {len(seeds)} entries for a batch of {b} images.")

        cond_latent = vae_encode(self.vae, images.to(device)).to(dtype)
        pos = encode_prompts(self.tokenizer, self.text_encoder, [cfg.prompt] * b).to(dtype)
        use_face = cfg.mode == "restore" and cfg.use_face_embedding and self.face_encoder is not None
        neg = encode_prompts(self.tokenizer, self.text_encoder, [negative] * b).to(dtype)
        if use_face:
            c_id, c_null = self.face_tokens(images.to(device))
            pos = torch.cat([pos, c_id.to(dtype)], dim=1)
            neg = torch.cat([neg, c_null.to(dtype)], dim=1)
        do_cfg = cfg.guidance_scale > 1.0 and (negative != cfg.prompt or use_face)
        context = torch.cat([neg, pos]) if do_cfg else pos
        reps = 2 if do_cfg else 1

        self.scheduler.set_timesteps(cfg.num_inference_steps, device=device)
        x, eps_y = _per_row_noise(cond_latent.shape, seeds)
        x = x.to(device, dtype) * self.scheduler.init_noise_sigma
        eps_y = eps_y.to(device, dtype)
        alphas = self.train_alphas.to(device)
        self.state.phi = float(phi)
        cache = cfg.lq_cache and policy == "fixed"

        def cond_at(t_y: int) -> torch.Tensor:
            return q_sample(cond_latent, eps_y, alphas, torch.full((b,), t_y, device=device, dtype=torch.long))

        old_mode = self.state.cache_mode
        try:
            if cache:
                y = cond_at(t_y_fixed).repeat(reps, 1, 1, 1)
                self.state.kv_cache.clear()
                self.state.cache_mode = "record"
                self.unet(y, torch.full((y.shape[0],), t_y_fixed, device=device), context)
                self.state.cache_mode = "replay"
            total = len(self.scheduler.timesteps)
            for i, t in enumerate(self.scheduler.timesteps):
                x_in = self.scheduler.scale_model_input(x, t).repeat(reps, 1, 1, 1)
                tt = torch.full((x_in.shape[0],), int(t), device=device)
                if cache:
                    out = self.unet(x_in, tt, context).sample
                else:
                    t_y = int(t) if policy == "same" else t_y_fixed
                    y = cond_at(t_y).repeat(reps, 1, 1, 1)
                    ty = torch.full((y.shape[0],), t_y, device=device)
                    out = self.unet(joint_batch(x_in, y), torch.cat([tt, ty]), torch.cat([context, context])
                                    ).sample[: x_in.shape[0]]
                if do_cfg:
                    uncond, cond = out.chunk(2)
                    out = uncond + cfg.guidance_scale * (cond - uncond)
                x = self.scheduler.step(out, t, x).prev_sample
                if callback is not None:
                    callback(i + 1, total)
        finally:
            self.state.cache_mode = old_mode
            self.state.kv_cache.clear()
        return vae_decode(self.vae, x).clamp(0.0, 1.0)


def _per_row_noise(shape: Sequence[int], seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial noise and condition noise, each row drawn from its own seed (CPU generator, device independent)."""
    xs, ys = [], []
    for s in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(s))
        xs.append(torch.randn(tuple(shape[1:]), generator=g))
        ys.append(torch.randn(tuple(shape[1:]), generator=g))
    return torch.stack(xs), torch.stack(ys)


def one_step_x0(unet, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, alphas_cumprod: torch.Tensor,
                prediction_type: str = "epsilon") -> torch.Tensor:
    """Eq. (3) through a UNet call on a joint batch (helper for tests and diagnostics)."""
    out = unet(z_t, t, context).sample
    return predict_x0(z_t, out, alphas_cumprod, t, prediction_type)


# --------------------------------------------------------------------------------------------------------------------
# Folder-level entry points (CLI)
# --------------------------------------------------------------------------------------------------------------------


def _save_png(img: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _load_resized(path: Path, size: int) -> torch.Tensor:
    from ..lora.data import load_image, resize_square

    return resize_square(load_image(path), size)


def _h(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class RestoreConfig:
    """``bfr restore --method flipnet INPUT OUT_DIR``: restore aligned face crops with a restore-mode checkpoint."""

    input: str = _h("an aligned LQ face image or a folder of them", "")
    out_dir: str = _h("output folder (<stem>.png per input)", "")
    checkpoint: str = _h("restore-mode FlipNet .safetensors (models/bfr/)", "")
    base_model: str = _h("local SD2.1-base: diffusers folder or single-file .safetensors", "")
    tokenizer: str | None = _h("CLIP tokenizer folder (needed with a single-file base model)", None)
    size: int = _h("working resolution in px (inputs are resized to it)", 512)
    batch_size: int = _h("images per sampling batch", 1)
    num_inference_steps: int = _h("DDIM steps", 50)
    guidance_scale: float = _h("classifier-free guidance scale (paper 1.5)", 1.5)
    prompt: str = _h("text prompt", "")
    negative_prompt: str | None = _h("negative prompt (default: 'low quality, blurry, ...')", None)
    phi: float | None = _h("BoostHub enhance weight (default: the checkpoint's, paper 1; range [0, 2])", None)
    t_y_policy: str | None = _h("condition timestep policy: same | fixed (default: the checkpoint's)", None)
    t_y: int | None = _h("condition timestep for the fixed policy (default: the checkpoint's)", None)
    seed: int = _h("seed (image i uses seed + i)", 0)
    device: str = _h("auto | cpu | cuda | cuda:N", "auto")

    def validate(self) -> None:
        for name in ("input", "out_dir", "checkpoint", "base_model"):
            if not getattr(self, name):
                raise ValueError(f"restore: --{name.replace('_', '-')} is required.")
        if self.size % 8 or self.size < 64:
            raise ValueError(f"restore: --size must be a multiple of 8 and >= 64, got {self.size}.")
        if self.batch_size < 1:
            raise ValueError(f"restore: --batch-size must be >= 1, got {self.batch_size}.")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def restore_folder(cfg: RestoreConfig, pipeline: FlipNetPipeline | None = None) -> list[Path]:
    """Restore every image of ``cfg.input`` (file or folder) into ``cfg.out_dir/<stem>.png``."""
    from ..lora.data import list_images

    cfg.validate()
    src = Path(cfg.input)
    files = [src] if src.is_file() else list_images(src, "restore input folder")
    pipe = pipeline or FlipNetPipeline.from_checkpoint(cfg.base_model, cfg.checkpoint, device=_device(cfg.device),
                                                       tokenizer=cfg.tokenizer)
    sample = FlipNetSampleConfig(mode="restore", num_inference_steps=cfg.num_inference_steps,
                                 guidance_scale=cfg.guidance_scale, prompt=cfg.prompt,
                                 negative_prompt=cfg.negative_prompt, phi=cfg.phi, t_y_policy=cfg.t_y_policy,
                                 t_y=cfg.t_y, seed=cfg.seed)
    out_dir = Path(cfg.out_dir)
    written = []
    for start in range(0, len(files), cfg.batch_size):
        chunk = files[start:start + cfg.batch_size]
        batch = torch.stack([_load_resized(p, cfg.size) for p in chunk])
        restored = pipe(batch, sample)
        for p, img in zip(chunk, restored):
            _save_png(img, out_dir / f"{p.stem}.png")
            written.append(out_dir / f"{p.stem}.png")
        logger.info("restored %d/%d", min(start + cfg.batch_size, len(files)), len(files))
    return written


@dataclass
class SynthesizeConfig:
    """``bfr synthesize --mode degrade HQ_DIR OUT_DIR --per-image 5``: off-shelf LQ with a degrade-mode checkpoint.

    Writes ``OUT_DIR/<stem>_<k>.png`` (k = 0..per_image-1), the layout ``lora.data`` reads as an off-shelf folder.
    Existing outputs are skipped (resumable). Launch with ``accelerate launch`` to shard over processes.
    """

    hq_dir: str = _h("folder of aligned HQ faces", "")
    out_dir: str = _h("output folder (<stem>_<k>.png)", "")
    checkpoint: str = _h("degrade-mode FlipNet .safetensors", "")
    base_model: str = _h("local SD2.1-base: diffusers folder or single-file .safetensors", "")
    tokenizer: str | None = _h("CLIP tokenizer folder (needed with a single-file base model)", None)
    mode: str = _h("only 'degrade' (FlipNet degradation mode)", "degrade")
    per_image: int = _h("degraded variants per HQ face (paper 5)", 5)
    size: int = _h("working resolution in px", 512)
    batch_size: int = _h("images per sampling batch", 4)
    num_inference_steps: int = _h("DDIM steps", 50)
    guidance_scale: float = _h("CFG scale (no effect with the default null prompt)", 1.5)
    prompt: str = _h("text prompt (paper: null prompt in degradation mode)", "")
    t_y_policy: str | None = _h("condition timestep policy: same | fixed (default: the checkpoint's)", None)
    t_y: int | None = _h("condition timestep for the fixed policy", None)
    seed: int = _h("base seed; variant k of image i uses its own derived seed", 0)

    def validate(self) -> None:
        for name in ("hq_dir", "out_dir", "checkpoint", "base_model"):
            if not getattr(self, name):
                raise ValueError(f"synthesize: {name.replace('_', '-').upper() if 'dir' in name else '--' + name.replace('_', '-')} is required.")
        if self.mode != "degrade":
            raise ValueError(f"synthesize: only --mode degrade is supported, got {self.mode!r}.")
        if self.per_image < 1:
            raise ValueError(f"synthesize: --per-image must be >= 1, got {self.per_image}.")
        if self.size % 8 or self.size < 64:
            raise ValueError(f"synthesize: --size must be a multiple of 8 and >= 64, got {self.size}.")
        if self.batch_size < 1:
            raise ValueError(f"synthesize: --batch-size must be >= 1, got {self.batch_size}.")


def synthesis_jobs(files: Sequence[Path], per_image: int, out_dir: Path) -> list[tuple[Path, int, Path]]:
    """(HQ path, variant k, output path) for every output that does not exist yet."""
    jobs = []
    for p in files:
        for k in range(per_image):
            out = out_dir / f"{p.stem}_{k}.png"
            if not out.exists():
                jobs.append((p, k, out))
    return jobs


def synthesize_degraded(cfg: SynthesizeConfig, pipeline: FlipNetPipeline | None = None) -> int:
    """Degrade every HQ face ``per_image`` times with FlipNet's degradation mode; returns outputs written here."""
    from accelerate import PartialState

    from ..lora.data import list_images
    from ..lora.train_flipnet import use_cpu

    cfg.validate()
    # Without CUDA, several processes (torchrun / accelerate launch) must ask for CPU mode explicitly, or each one
    # believes it is process 0 of 1 and they all synthesize every job (found by the two-process test).
    state = PartialState(cpu=use_cpu(False))
    files = list_images(cfg.hq_dir, "HQ face folder")
    out_dir = Path(cfg.out_dir)
    jobs = synthesis_jobs(files, cfg.per_image, out_dir)
    pipe = pipeline or FlipNetPipeline.from_checkpoint(cfg.base_model, cfg.checkpoint, device=state.device,
                                                       tokenizer=cfg.tokenizer)
    written = 0
    position = {p: i for i, p in enumerate(files)}
    with state.split_between_processes(jobs) as mine:
        logger.info("process %d: %d of %d synthesis jobs", state.process_index, len(mine), len(jobs))
        for start in range(0, len(mine), cfg.batch_size):
            chunk = mine[start:start + cfg.batch_size]
            # one seed per (image, variant): the result does not depend on sharding or batch size
            seeds = [(cfg.seed * 1_000_003 + position[p] * cfg.per_image + k) & 0x7FFFFFFF for p, k, _ in chunk]
            sample = FlipNetSampleConfig(mode="degrade", num_inference_steps=cfg.num_inference_steps,
                                         guidance_scale=cfg.guidance_scale, prompt=cfg.prompt, negative_prompt="",
                                         t_y_policy=cfg.t_y_policy, t_y=cfg.t_y, seeds=seeds)
            images = pipe(torch.stack([_load_resized(p, cfg.size) for p, _, _ in chunk]), sample)
            for (_, _, out), img in zip(chunk, images):
                _save_png(img, out)
                written += 1
    state.wait_for_everyone()
    return written


# --------------------------------------------------------------------------------------------------------------------
# CLI glue (the lead wires these into `bfr restore --method flipnet` and `bfr synthesize --mode degrade`)
# --------------------------------------------------------------------------------------------------------------------


def add_restore_arguments(parser, positionals: bool = True, skip: tuple[str, ...] = ()) -> None:
    """FlipNet flags of ``bfr restore --method flipnet INPUT OUT_DIR``; ``positionals=False`` / ``skip`` (field names)
    leave out what the caller's shared ``restore`` parser already defines (the values must still reach ``ns``)."""
    from ..lora.train_flipnet import add_dataclass_arguments

    if positionals:
        parser.add_argument("input", help="an aligned face image or a folder of them (LQ)")
        parser.add_argument("out_dir", help="output folder (<stem>.png per input)")
    add_dataclass_arguments(parser, RestoreConfig, skip=("input", "out_dir") + tuple(skip))


def restore_main(ns) -> int:
    """Entry point for ``bfr restore --method flipnet``."""
    from ..lora.train_flipnet import dataclass_from_namespace

    cfg = dataclass_from_namespace(RestoreConfig, ns)
    written = restore_folder(cfg)
    logger.info("restored %d image(s) into %s", len(written), cfg.out_dir)
    return 0


def add_synthesize_arguments(parser, positionals: bool = True, skip: tuple[str, ...] = ()) -> None:
    """Flags of ``bfr synthesize --mode degrade HQ_DIR OUT_DIR --per-image 5``."""
    from ..lora.train_flipnet import add_dataclass_arguments

    if positionals:
        parser.add_argument("hq_dir", help="folder of aligned HQ faces")
        parser.add_argument("out_dir", help="output folder (<stem>_<k>.png, the off-shelf LQ layout)")
    add_dataclass_arguments(parser, SynthesizeConfig, skip=("hq_dir", "out_dir") + tuple(skip))


def synthesize_main(ns) -> int:
    """Entry point for ``bfr synthesize`` (shards over processes when run under ``accelerate launch``/torchrun)."""
    from ..lora.train_flipnet import dataclass_from_namespace

    cfg = dataclass_from_namespace(SynthesizeConfig, ns)
    n = synthesize_degraded(cfg)
    logger.info("wrote %d degraded image(s) into %s", n, cfg.out_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m comfyui_bfr.pipelines.flipnet restore|synthesize ...`` (usable under ``accelerate launch``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="flipnet", description="FlipNet restoration / degradation synthesis")
    sub = parser.add_subparsers(dest="command", required=True)
    add_restore_arguments(sub.add_parser("restore", help="restore faces with a restore-mode checkpoint"))
    add_synthesize_arguments(sub.add_parser("synthesize", help="off-shelf LQ with a degrade-mode checkpoint"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ns = parser.parse_args(argv)
    return restore_main(ns) if ns.command == "restore" else synthesize_main(ns)


if __name__ == "__main__":
    raise SystemExit(main())
