"""Find and load Stable Diffusion 2.1 into diffusers modules, offline: the one loader every method uses.

Resolution order (:func:`resolve_base_model`), the same for DR2, FlipNet, training and the demo:

1. an explicit path (CLI ``--base-model``): a diffusers folder (``unet/`` + ``vae/``) or a single ``.safetensors``;
2. the environment variable ``BFR_SD21_CHECKPOINT``;
3. the ComfyUI models folder: ``$COMFYUI_PATH/models/checkpoints`` (or ``$BFR_COMFY_MODELS/checkpoints``), first
   file whose name looks like SD 2.1 base (``*2[-_.]1*base*`` / ``v2-1_512*``);
4. only when asked (``download=True``, CLI ``--download``): a diffusers snapshot of ``repo_id`` (default
   ``$BFR_SD21_REPO`` or :data:`DEFAULT_REPO`; SD 2.1 is no longer on Stability's pages, mirrors exist).

:func:`load_model` (UNet + VAE, DR2) and :func:`load_components` (+ text encoder, tokenizer, scheduler: FlipNet,
training) both resolve through it. With none of those, :func:`load_model` returns a tiny random model and logs
loudly that the output is not a real restoration; :func:`load_components` raises :class:`ModelNotFoundError`. Weights load only through safetensors (or ``torch.load(weights_only=True)`` for ``.bin``); single
files go through :mod:`.convert` with local SD2.1 configs, so nothing reaches the network unless downloading.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import convert
from .diffusion import sd_alphas_cumprod

logger = logging.getLogger(__name__)

ENV_CHECKPOINT = "BFR_SD21_CHECKPOINT"
ENV_REPO = "BFR_SD21_REPO"
ENV_COMFY_MODELS = "BFR_COMFY_MODELS"
ENV_COMFY_PATH = "COMFYUI_PATH"
DEFAULT_REPO = "Manojb/stable-diffusion-2-1-base"
_SD21_NAME = re.compile(r"(2[-_.]?1.*(base|512))|(v2-1_512)", re.IGNORECASE)
MODEL_PARTS = ("unet", "vae", "scheduler")  # what DR2 (load_model) needs
COMPONENT_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # what FlipNet and training need
_PART_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
               "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
_DOWNLOAD_PATTERNS = {"unet": ["unet/*.json", "unet/*.safetensors"], "vae": ["vae/*.json", "vae/*.safetensors"],
                      "text_encoder": ["text_encoder/*.json", "text_encoder/*.safetensors"],
                      "tokenizer": ["tokenizer/*"], "scheduler": ["scheduler/*"]}


class ModelNotFoundError(FileNotFoundError):
    """No SD 2.1 checkpoint where one was asked for; the message says where we looked and what to do."""


@dataclass
class SDModel:
    """The parts of an SD model DR2 needs, in diffusers form."""

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL or AutoencoderTiny (encode/decode with ``config.scaling_factor``)
    alphas_cumprod: torch.Tensor = field(default_factory=sd_alphas_cumprod)  # float64, per training step
    prediction_type: str = "epsilon"  # or "v_prediction"
    source: str = ""
    is_real: bool = True  # False for the tiny random fallback

    @property
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def vae_scale_factor(self) -> int:
        cfg = self.vae.config  # AutoencoderKL: block_out_channels; AutoencoderTiny: encoder_block_out_channels
        levels = getattr(cfg, "block_out_channels", None) or cfg.encoder_block_out_channels
        return 2 ** (len(levels) - 1)


# ------------------------------------------------------------------------------------------------ resolution


def comfy_checkpoint_dirs() -> list[Path]:
    """ComfyUI ``models/checkpoints`` folders named by the environment (nothing is imported from ComfyUI)."""
    dirs = []
    if os.environ.get(ENV_COMFY_MODELS):
        dirs.append(Path(os.environ[ENV_COMFY_MODELS]) / "checkpoints")
    if os.environ.get(ENV_COMFY_PATH):
        dirs.append(Path(os.environ[ENV_COMFY_PATH]) / "models" / "checkpoints")
    return [d for d in dirs if d.is_dir()]


def find_in_comfy_models(dirs: list[Path] | None = None) -> Path | None:
    """First ``*.safetensors`` under the ComfyUI checkpoint folders whose name looks like SD 2.1 base."""
    for folder in comfy_checkpoint_dirs() if dirs is None else dirs:
        hits = sorted(p for p in folder.rglob("*.safetensors") if _SD21_NAME.search(p.name))
        if hits:
            return hits[0]
    return None


def download_snapshot(repo_id: str | None = None, cache_dir: str | Path | None = None,
                      parts: tuple[str, ...] = MODEL_PARTS) -> Path:
    """Explicit download of a diffusers SD 2.1 folder (only ``parts``, e.g. UNet, VAE, scheduler) from a
    configurable repo."""
    repo_id = repo_id or os.environ.get(ENV_REPO) or DEFAULT_REPO
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - comes with diffusers
        raise ModelNotFoundError("downloading needs huggingface_hub (`pip install huggingface_hub`)") from exc
    patterns = ["model_index.json"] + [pat for part in parts for pat in _DOWNLOAD_PATTERNS[part]]
    logger.info("downloading SD 2.1 (%s) from %s", ", ".join(parts), repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir))
    except Exception as exc:  # network, auth, missing repo: say which repo and how to change it
        raise ModelNotFoundError(
            f"could not download SD 2.1 from {repo_id!r} ({exc}); set {ENV_REPO} or --repo to a mirror, or pass "
            "--base-model with a local file/folder") from exc


def resolve_base_model(base_model: str | Path | None = None, *, download: bool = False,
                       repo_id: str | None = None, cache_dir: str | Path | None = None,
                       parts: tuple[str, ...] = MODEL_PARTS) -> Path | None:
    """Apply the resolution order above; None when nothing is found and downloading was not asked for.

    ``parts`` are the diffusers sub-folders a download fetches (:data:`MODEL_PARTS` or :data:`COMPONENT_PARTS`)."""
    if base_model:
        path = Path(base_model).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"--base-model {path} does not exist; give an SD 2.1-base .safetensors file or "
                                     "a diffusers folder with unet/ and vae/")
        return path
    env = os.environ.get(ENV_CHECKPOINT)
    if env:
        path = Path(env).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"{ENV_CHECKPOINT}={path} does not exist; fix or unset it, or pass --base-model")
        logger.info("using SD 2.1 from %s: %s", ENV_CHECKPOINT, path)
        return path
    found = find_in_comfy_models()
    if found:
        logger.info("using SD 2.1 from the ComfyUI models folder: %s", found)
        return found
    if download:
        return download_snapshot(repo_id, cache_dir, parts)
    return None


# --------------------------------------------------------------------------------------------------- loading


def _check_diffusers_folder(folder: Path, parts: tuple[str, ...]) -> None:
    """Every part's config file is there, or ModelNotFoundError naming what is missing."""
    missing = [f"{part}/{_PART_FILES[part]}" for part in parts if not (folder / part / _PART_FILES[part]).is_file()]
    if missing:
        raise ModelNotFoundError(f"{folder} lacks {', '.join(missing)}: not a diffusers SD 2.1 folder (expected the "
                                 f"save_pretrained layout with {', '.join(p + '/' for p in parts)}); pass "
                                 "--base-model with such a folder or a single .safetensors file")


def _check_single_file(path: Path) -> None:
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ValueError(f"{path}: only .safetensors single files are loaded (no pickle); convert it first")


def _scheduler_settings(folder: Path) -> tuple[torch.Tensor, str]:
    cfg_path = folder / "scheduler" / _PART_FILES["scheduler"]
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if cfg.get("beta_schedule", "scaled_linear") != "scaled_linear" or cfg.get("trained_betas"):
        raise ValueError(f"{cfg_path}: only the scaled_linear schedule of SD 1.x/2.x is supported")
    ab = sd_alphas_cumprod(int(cfg.get("num_train_timesteps", 1000)), float(cfg.get("beta_start", 0.00085)),
                           float(cfg.get("beta_end", 0.012)))
    return ab, str(cfg.get("prediction_type", "epsilon"))


def _load_unet_vae(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """UNet + VAE (AutoencoderKL, or AutoencoderTiny when ``vae/config.json`` names it) of a diffusers folder."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    vae_cls = json.loads((folder / "vae" / _PART_FILES["vae"]).read_text()).get("_class_name", "AutoencoderKL")
    vae_type = AutoencoderTiny if vae_cls == "AutoencoderTiny" else AutoencoderKL
    kw = dict(torch_dtype=dtype, local_files_only=True)
    return (UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw),
            vae_type.from_pretrained(folder, subfolder="vae", **kw))


def load_diffusers_folder(folder: Path, dtype: torch.dtype = torch.float32) -> SDModel:
    """UNet + VAE (AutoencoderKL, or AutoencoderTiny under ``vae/`` with its class in the config) from a folder."""
    _check_diffusers_folder(folder, ("unet", "vae"))
    unet, vae = _load_unet_vae(folder, dtype)
    ab, pred = _scheduler_settings(folder)
    return SDModel(unet.eval(), vae.eval(), ab, pred, source=str(folder))


def load_single_file(path: Path, dtype: torch.dtype = torch.float32) -> SDModel:
    """A ComfyUI/LDM single-file SD 2.x ``.safetensors`` through :mod:`.convert` (local configs, offline)."""
    _check_single_file(path)
    parts = convert.load_single_file_components(path, dtype=dtype, text_encoder=False, vae=True)
    if parts["vae"] is None:
        raise ValueError(f"{path} has no VAE weights (first_stage_model.*); DR2 needs the VAE")
    pred = "v_prediction" if _looks_v_prediction(path) else "epsilon"
    return SDModel(parts["unet"].eval(), parts["vae"].eval(), sd_alphas_cumprod(), pred, source=str(path))


def _looks_v_prediction(path: Path) -> bool:
    """SD 2.x 768-v single files do not say so; follow the file name (``768-v``/``v-pred``), as users name them."""
    name = path.name.lower()
    return "768-v" in name or "v-pred" in name or "vpred" in name


def load_sd(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> SDModel:
    """Load a diffusers folder or a single file."""
    path = Path(path)
    model = load_diffusers_folder(path, dtype) if path.is_dir() else load_single_file(path, dtype)
    model.unet.to(device)
    model.vae.to(device)
    return model


def tiny_random_model(seed: int = 0) -> SDModel:
    """A tiny randomly initialised SD-shaped UNet + TAESD-shaped VAE: runs the code path, restores nothing."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024, attention_head_dim=2, norm_num_groups=8, use_linear_projection=True)
    vae = AutoencoderTiny.from_config(dict(convert.TAESD_CONFIG, scaling_factor=convert.SD_LATENT_SCALE))
    return SDModel(unet.eval(), vae.eval(), sd_alphas_cumprod(), "epsilon",
                   source="tiny random model (NOT SD 2.1)", is_real=False)


TINY_WARNING = ("\n" + "!" * 100 + "\n"
                "!!  No SD 2.1 checkpoint found: running a TINY RANDOM model. The output is NOT a real restoration.\n"
                f"!!  Pass --base-model PATH, set {ENV_CHECKPOINT}, put SD 2.1 base in ComfyUI's models/checkpoints\n"
                f"!!  (with {ENV_COMFY_PATH} set), or add --download (repo from --repo / {ENV_REPO}).\n"
                + "!" * 100)
NOT_FOUND = (f"No SD 2.1-base found. Pass --base-model PATH (a .safetensors file or a diffusers folder), set "
             f"{ENV_CHECKPOINT}, put SD 2.1 base in ComfyUI's models/checkpoints (with {ENV_COMFY_PATH} or "
             f"{ENV_COMFY_MODELS} set), or add --download (repo from --repo / {ENV_REPO}).")


def load_model(base_model: str | Path | None = None, *, download: bool = False, repo_id: str | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               allow_tiny: bool = True) -> SDModel:
    """Resolve and load SD 2.1 (UNet + VAE); fall back to :func:`tiny_random_model` with a loud warning when allowed."""
    path = resolve_base_model(base_model, download=download, repo_id=repo_id)
    if path is None:
        if not allow_tiny:
            raise ModelNotFoundError(NOT_FOUND)
        logger.warning(TINY_WARNING)
        model = tiny_random_model()
        model.unet.to(device)
        model.vae.to(device)
        return model
    logger.info("loading SD model from %s", path)
    return load_sd(path, dtype, device)


def load_components(base_model: str | Path | None = None, *, tokenizer: str | Path | None = None,
                    download: bool = False, repo_id: str | None = None, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> dict:
    """UNet, VAE, text encoder, tokenizer and DDPM scheduler of SD2.1-base (what training and FlipNet need),
    found with the same order as :func:`load_model` (no tiny fallback). A single file carries no BPE vocabulary,
    so it needs a CLIP ``tokenizer`` folder (``vocab.json`` + ``merges.txt``); one also overrides a folder's."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    base = resolve_base_model(base_model, download=download, repo_id=repo_id, parts=COMPONENT_PARTS)
    if base is None:
        raise ModelNotFoundError(NOT_FOUND)
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise ModelNotFoundError(f"--tokenizer {tokenizer} is not a folder; pass a CLIP tokenizer folder (vocab.json "
                                 "+ merges.txt), e.g. the tokenizer/ folder of any SD2.x diffusers model.")
    logger.info("loading SD 2.1 components from %s", base)
    if base.is_dir():
        _check_diffusers_folder(base, COMPONENT_PARTS if tokenizer is None else
                                tuple(p for p in COMPONENT_PARTS if p != "tokenizer"))
        unet, vae = _load_unet_vae(base, dtype)
        comps = {"unet": unet, "vae": vae,
                 "text_encoder": CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=dtype,
                                                               local_files_only=True),
                 "tokenizer": CLIPTokenizer.from_pretrained(tokenizer or base / "tokenizer"),
                 "scheduler": DDPMScheduler.from_pretrained(base, subfolder="scheduler")}
    else:
        _check_single_file(base)
        if tokenizer is None:
            raise ModelNotFoundError(
                f"Single-file base model {str(base)!r} needs a CLIP tokenizer folder (vocab.json + merges.txt). Pass "
                "--tokenizer PATH (e.g. the tokenizer/ folder of any SD2.x diffusers model).")
        loaded = convert.load_single_file_components(base, dtype=dtype)
        if loaded.get("vae") is None or loaded.get("text_encoder") is None:
            raise ValueError(f"Single-file base model {str(base)!r} lacks a VAE or text encoder; it needs both (pass "
                             "--base-model with a full SD 2.1-base checkpoint).")
        comps = {k: loaded[k] for k in ("unet", "vae", "text_encoder", "scheduler")}
        comps["tokenizer"] = CLIPTokenizer.from_pretrained(tokenizer)
    for name in ("unet", "vae", "text_encoder"):
        comps[name].to(device).requires_grad_(False).eval()
    return comps


def encode_prompts(tokenizer, text_encoder, prompts) -> torch.Tensor:
    """Prompts -> text context (B, 77, 1024) from the SD2.1 text encoder's output hidden states."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]
