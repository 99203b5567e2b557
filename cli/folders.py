"""Folder-level entry points of the ``bfr`` command: read images, call a pipeline, write images.

``bfr restore --method dr2|flipnet`` (:func:`restore_dr2`, :func:`restore_flipnet`) and ``bfr synthesize --mode
degrade`` (:func:`synthesize_degraded`, sharded across ``accelerate launch`` / torchrun processes). For whole photos
(``bfr restore --faces``, :mod:`.photos`) the same models are wrapped as crop restorers with the contract of
:data:`..pipelines.photo.RestoreCrops` (:func:`dr2_crop_restorer`, :func:`flipnet_crop_restorer`).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from ..lora.id_mask import load_mask_checkpoint
from ..lora.irn import load_irn_checkpoint
from ..lora.ldrm import ConcatConvIn
from ..pipelines import dr2
from ..pipelines.arcface import ALIGNS, load_identity_model
from ..pipelines.clrface import PAPER_STEPS, CLRFaceConfig, CLRFacePipeline
from ..pipelines.drbfr import DRBFRPipeline, DRBFRSampleConfig
from ..pipelines.flipnet import FlipNetPipeline, FlipNetSampleConfig
from ..pipelines.irn import run_irn
from ..pipelines.image_io import (IMAGE_EXTENSIONS, ImageFolderError, is_image_file, list_images, load_image,
                                  prepare_output_folder, save_png)
from ..sd.loader import DEFAULT_REPO, ENV_REPO, SDModel, load_components, load_model, resolve_base_model
from ..train.core import use_cpu

logger = logging.getLogger(__name__)


def _h(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class _SDRunConfig:
    """What every SD2.1 sampling command shares: where SD 2.1-base comes from (the same flags as DR2's) and size."""

    base_model: str | None = _h("SD2.1-base: diffusers folder or single-file .safetensors (default: "
                                "$BFR_SD21_CHECKPOINT, then ComfyUI's models/checkpoints)", None)
    tokenizer: str | None = _h("CLIP tokenizer folder (needed with a single-file base model)", None)
    download: bool = _h("allow downloading SD 2.1-base from --repo when no local one is found", False)
    repo: str | None = _h("repo id for --download (default $BFR_SD21_REPO or a community mirror)", None)
    size: int = _h("working resolution in px (inputs are resized to it)", 512)
    num_inference_steps: int = _h("DDIM steps", 50)

    def _check_sampling(self, command: str, batch_size: int) -> None:
        if self.size % 8 or self.size < 64:
            raise ValueError(f"{command}: --size must be a multiple of 8 and >= 64, got {self.size}.")
        if batch_size < 1:
            raise ValueError(f"{command}: --batch-size must be >= 1, got {batch_size}.")


@dataclass
class _FlipNetRunConfig(_SDRunConfig):
    """FlipNet sampling: CFG and the condition timestep."""

    guidance_scale: float = _h("classifier-free guidance scale (paper 1.5; no effect with a null prompt)", 1.5)
    t_y_policy: str | None = _h("condition timestep policy: same | fixed (default: the checkpoint's)", None)
    t_y: int | None = _h("condition timestep for the fixed policy (default: the checkpoint's)", None)


@dataclass
class RestoreConfig(_FlipNetRunConfig):
    """``bfr restore --method flipnet INPUT OUT_DIR``: restore aligned face crops with a restore-mode checkpoint."""

    input: str = _h("an aligned LQ face image or a folder of them", "")
    out_dir: str = _h("output folder (<stem>.png per input)", "")
    checkpoint: str = _h("restore-mode FlipNet .safetensors (models/bfr/)", "")
    batch_size: int = _h("images per sampling batch", 1)
    prompt: str = _h("text prompt", "")
    negative_prompt: str | None = _h("negative prompt (default: 'low quality, blurry, ...')", None)
    phi: float | None = _h("BoostHub enhance weight (default: the checkpoint's, paper 1; range [0, 2])", None)
    seed: int = _h("seed (image i uses seed + i)", 0)
    device: str = _h("auto | cpu | cuda | cuda:N", "auto")

    def validate(self) -> None:
        for name in ("input", "out_dir", "checkpoint"):
            if not getattr(self, name):
                raise ValueError(f"restore: --{name.replace('_', '-')} is required.")
        self._check_sampling("restore", self.batch_size)


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` is CUDA when present, else CPU; anything else is a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N.") from exc


def _flipnet_pipeline(cfg: RestoreConfig | SynthesizeConfig, device: torch.device) -> FlipNetPipeline:
    """SD 2.1 through the one lookup order (``--base-model``, env var, ComfyUI folder, ``--download``) + the
    FlipNet ``--checkpoint``."""
    components = load_components(cfg.base_model, tokenizer=cfg.tokenizer, download=cfg.download, repo_id=cfg.repo,
                                 device=device)
    return FlipNetPipeline.from_checkpoint(cfg.base_model, cfg.checkpoint, device=device, components=components)


def restore_flipnet(cfg: RestoreConfig, pipeline: FlipNetPipeline | None = None) -> list[Path]:
    """``bfr restore --method flipnet``: every image of ``cfg.input`` (file or folder) -> ``cfg.out_dir/<stem>.png``."""
    cfg.validate()
    files, out_dir = _input_files(cfg)  # before the model loads: a bad folder fails in a second
    pipe = pipeline or _flipnet_pipeline(cfg, resolve_device(cfg.device))
    sample = FlipNetSampleConfig(mode="restore", num_inference_steps=cfg.num_inference_steps,
                                 guidance_scale=cfg.guidance_scale, prompt=cfg.prompt,
                                 negative_prompt=cfg.negative_prompt, phi=cfg.phi, t_y_policy=cfg.t_y_policy,
                                 t_y=cfg.t_y, seed=cfg.seed)
    return _restore_files(cfg, files, out_dir, lambda batch, seed: pipe(batch, replace(sample, seed=seed)))


def _input_files(cfg) -> tuple[list[Path], Path]:
    src = Path(cfg.input)
    files = [src] if src.is_file() else list_images(src, "restore input folder")
    return files, prepare_output_folder(cfg.out_dir)


def _restore_files(cfg, files: list[Path], out_dir: Path, run) -> list[Path]:
    """``run(batch, seed)`` over ``cfg.batch_size`` images at a time (image i seeded ``cfg.seed + i``)."""
    written = []
    for start in range(0, len(files), cfg.batch_size):
        chunk = files[start:start + cfg.batch_size]
        restored = run(torch.stack([load_image(p, cfg.size) for p in chunk]), cfg.seed + start)
        for p, img in zip(chunk, restored):
            save_png(out_dir / f"{p.stem}.png", img)
            written.append(out_dir / f"{p.stem}.png")
        logger.info("restored %d/%d", min(start + cfg.batch_size, len(files)), len(files))
    return written


@dataclass
class DRBFRRestoreConfig(_SDRunConfig):
    """``bfr restore --method drbfr INPUT OUT_DIR``: restore aligned face crops with a ``drbfr/1`` checkpoint."""

    guidance_scale: float = _h("classifier-free guidance scale (1 = none: DR-BFR is trained mostly without text)", 1.0)
    input: str = _h("an aligned LQ face image or a folder of them", "")
    out_dir: str = _h("output folder (<stem>.png per input)", "")
    checkpoint: str = _h("DR-BFR .safetensors (bfr_format drbfr/1, from `bfr train drbfr`)", "")
    batch_size: int = _h("images per sampling batch", 1)
    prompt: str = _h("text prompt", "")
    negative_prompt: str = _h("negative prompt (used with --guidance-scale > 1)", "")
    use_dr_prompt: bool = _h("append the degradation-representation tokens (off: the 'w/o DR' ablation)", True)
    seed: int = _h("seed (image i uses seed + i)", 0)
    device: str = _h("auto | cpu | cuda | cuda:N", "auto")

    def validate(self) -> None:
        for name in ("input", "out_dir", "checkpoint"):
            if not getattr(self, name):
                raise ValueError(f"restore --method drbfr: --{name.replace('_', '-')} is required.")
        self._check_sampling("restore", self.batch_size)

    def sample_config(self, seed: int) -> DRBFRSampleConfig:
        return DRBFRSampleConfig(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                                 prompt=self.prompt, negative_prompt=self.negative_prompt,
                                 use_dr_prompt=self.use_dr_prompt, seed=seed)


def drbfr_pipeline(cfg: DRBFRRestoreConfig) -> DRBFRPipeline:
    device = resolve_device(cfg.device)
    components = load_components(cfg.base_model, tokenizer=cfg.tokenizer, download=cfg.download, repo_id=cfg.repo,
                                 device=device)
    return DRBFRPipeline.from_checkpoint(cfg.base_model, cfg.checkpoint, device=device, components=components)


def restore_drbfr(cfg: DRBFRRestoreConfig, pipeline: DRBFRPipeline | None = None) -> list[Path]:
    """``bfr restore --method drbfr``: every image of ``cfg.input`` (file or folder) -> ``cfg.out_dir/<stem>.png``."""
    cfg.validate()
    files, out_dir = _input_files(cfg)  # before the model loads: a bad folder fails in a second
    pipe = pipeline or drbfr_pipeline(cfg)
    return _restore_files(cfg, files, out_dir, lambda batch, seed: pipe(batch, cfg.sample_config(seed)))


def drbfr_crop_restorer(cfg: DRBFRRestoreConfig, pipeline: DRBFRPipeline | None = None):
    """DR-BFR as a crop restorer, ``cfg.batch_size`` crops per sampling batch, crop i seeded ``cfg.seed + i``."""
    pipe = pipeline or drbfr_pipeline(cfg)

    def restore(crops: np.ndarray) -> np.ndarray:
        return np.concatenate([pipe(x.float(), cfg.sample_config(cfg.seed + start)).permute(0, 2, 3, 1).cpu().numpy()
                               for start, x in _chunks(crops, cfg.batch_size)])

    return restore


CLRFACE_INITS = ("dr2", "irn", "lq")


@dataclass
class CLRFaceRestoreConfig(_SDRunConfig):
    """``bfr restore --method clrface INPUT OUT_DIR``: CLR-Face refinement of aligned face crops (CLR-Face §3.2-3.3 on
    SD2.1): x_id from ``--init`` (DR2 on the LQ face, the LQ face itself, or a folder of any restorer's outputs),
    E(x_id) noised to sigma_start, Heun with the masked identity guidance toward f_arc(x_id)."""

    num_inference_steps: int = _h("Heun steps after sigma_start (paper 40; two model calls each)", PAPER_STEPS)
    input: str = _h("an aligned LQ face image or a folder of them", "")
    out_dir: str = _h("output folder (<stem>.png per input)", "")
    checkpoint: str = _h("CLR-Face conditional denoiser .safetensors (bfr_format clrface/1, from `bfr train "
                         "clr-face`); empty: the plain SD 2.1 prior refines (not the paper's conditional denoiser)", "")
    identity_model: str = _h("ArcFace-style iresnet weights (arcface_torch backbone.pth or .safetensors) for the "
                             "identity guidance; mind their licence. Needed unless --guidance-scale 0", "")
    identity_align: str = _h("template: FFHQ crop -> ArcFace template warp | resize: whole crop to 112 px", "template")
    mask: str = _h("learned identity mask (clrface-mask/1, `bfr train id-mask`); empty: uniform mask = plain "
                   "classifier guidance", "")
    init: str = _h("initial estimate x_id: dr2 (DR2 on the LQ face, --dr2-* options) | irn (the IRN of --irn, Eq. "
                   "11) | lq (the LQ face itself) | a folder of x_id images named like the inputs (any restorer's "
                   "output)", "dr2")
    irn: str = _h("Identity Recovery Network for --init irn (clrface-irn/1, `bfr train irn`)", "")
    dr2_n: float = _h("DR2 low-pass factor N for --init dr2 (latent px)", 2.0)
    dr2_tau: int = _h("DR2 output level tau for --init dr2", 35)
    dr2_steps: int = _h("DR2 respaced steps T for --init dr2", 100)
    denoise: float = _h("where refinement starts (BasicScheduler's denoise: 1 = pure noise at sigma_max; 0.5 = the last "
                        "steps of 2x steps Karras levels)", 0.5)
    guidance_scale: float = _h("identity guidance scale s (D - s M grad L_arc; 0 = unguided Heun)", 1.0)
    decode: str = _h("how the guidance decodes z0_hat: full (exact) | window (only the latent cells the identity "
                     "network reads, +2; ~0.66x the cost of a guidance call)", "full")
    prompt: str = _h("text prompt (default empty, as the denoiser is trained)", "")
    batch_size: int = _h("images per sampling batch", 1)
    seed: int = _h("seed (image i uses seed + i)", 0)
    device: str = _h("auto | cpu | cuda | cuda:N", "auto")

    def validate(self) -> None:
        for name in ("input", "out_dir"):
            if not getattr(self, name):
                raise ValueError(f"restore --method clrface: --{name.replace('_', '-')} is required.")
        self.check_settings()

    def check_settings(self) -> None:
        """Everything but the input/output folders (what ``bfr eval`` and whole photos also need)."""
        self._check_sampling("clrface", self.batch_size)
        if self.guidance_scale > 0 and not self.identity_model:
            raise ValueError("restore --method clrface: the identity guidance needs --identity-model FILE (an "
                             "arcface_torch iresnet backbone.pth); or pass --guidance-scale 0 for unguided Heun.")
        if self.identity_align not in ALIGNS:
            raise ValueError(f"--identity-align must be one of {', '.join(ALIGNS)}, got {self.identity_align!r}.")
        if self.init not in CLRFACE_INITS and not Path(self.init).is_dir():
            raise ValueError(f"--init {self.init!r}: use dr2, irn, lq, or a folder of x_id images named like the "
                             "inputs.")
        if (self.init == "irn") != bool(self.irn):
            raise ValueError("--init irn and --irn FILE (a clrface-irn/1 file from `bfr train irn`) go together.")
        self.sample_config(self.seed)
        self.dr2_config(0).validate()

    def dr2_config(self, seed: int) -> dr2.DR2Config:
        return dr2.DR2Config(n=self.dr2_n, tau=self.dr2_tau, steps=self.dr2_steps, seed=seed)

    def sample_config(self, seed: int) -> CLRFaceConfig:
        return CLRFaceConfig(steps=self.num_inference_steps, denoise=self.denoise,
                             guidance_scale=self.guidance_scale, seed=seed, decode=self.decode)


@dataclass
class CLRFaceRunner:
    """The loaded CLR-Face models: the pipeline and, for ``--init dr2``, DR2 on the plain SD2.1 UNet (a copy is kept
    when a clrface/1 file patches the pipeline's UNet)."""

    pipeline: CLRFacePipeline
    dr2_model: SDModel | None
    irn: torch.nn.Module | None = None

    def initial_estimate(self, lq: torch.Tensor, cfg: CLRFaceRestoreConfig, seed: int) -> torch.Tensor:
        """x_id for ``--init dr2`` / ``irn`` / ``lq`` (a folder is read by the caller)."""
        if cfg.init == "lq":
            return lq
        if cfg.init == "irn":
            return run_irn(self.irn, lq, cfg.batch_size)
        return dr2.restore(self.dr2_model, lq, cfg.dr2_config(seed)).images.float().cpu()

    def __call__(self, lq: torch.Tensor, x_id: torch.Tensor, cfg: CLRFaceRestoreConfig, seed: int) -> torch.Tensor:
        device = next(self.pipeline.unet.parameters()).device
        lq_images = lq.to(device) if isinstance(self.pipeline.unet.conv_in, ConcatConvIn) else None
        return self.pipeline(x_id.to(device), cfg.sample_config(seed), lq_images=lq_images).images.float().cpu()


def clrface_runner(cfg: CLRFaceRestoreConfig, components: dict | None = None) -> CLRFaceRunner:
    """SD 2.1-base components + the clrface/1 file, identity model and mask of ``cfg``."""
    device = resolve_device(cfg.device)
    comps = components or load_components(cfg.base_model, tokenizer=cfg.tokenizer, download=cfg.download,
                                          repo_id=cfg.repo, device=device)
    dr2_model = None
    if cfg.init == "dr2":
        unet = copy.deepcopy(comps["unet"]) if cfg.checkpoint else comps["unet"]
        sched = comps["scheduler"]
        dr2_model = SDModel(unet=unet, vae=comps["vae"], alphas_cumprod=sched.alphas_cumprod.double(),
                            prediction_type=sched.config.prediction_type, source="clrface --init dr2")
    identity = (load_identity_model(cfg.identity_model, device=device, align=cfg.identity_align)
                if cfg.identity_model and cfg.guidance_scale > 0 else None)
    mask = load_mask_checkpoint(cfg.mask).mask.to(device) if cfg.mask else None
    irn = load_irn_checkpoint(cfg.irn).net.to(device).eval() if cfg.init == "irn" else None
    pipe = CLRFacePipeline.from_components(comps, cfg.checkpoint or None, identity, mask, cfg.prompt)
    return CLRFaceRunner(pipe, dr2_model, irn)


def _x_id_file(folder: Path, stem: str) -> Path:
    found = [p for p in sorted(folder.iterdir()) if p.stem == stem and is_image_file(p)]
    if not found:
        raise ImageFolderError(f"--init {folder}: no x_id image named {stem}.* for input {stem}; name each initial "
                               "estimate like its input.")
    return found[0]


def restore_clrface(cfg: CLRFaceRestoreConfig, runner: CLRFaceRunner | None = None) -> list[Path]:
    """``bfr restore --method clrface``: every image of ``cfg.input`` -> ``cfg.out_dir/<stem>.png`` (x_id of each
    input from ``--init``)."""
    cfg.validate()
    files, out_dir = _input_files(cfg)
    init_dir = Path(cfg.init) if cfg.init not in CLRFACE_INITS else None
    x_id_files = [_x_id_file(init_dir, p.stem) for p in files] if init_dir else None  # fail before loading
    run = runner or clrface_runner(cfg)

    def restore(batch: torch.Tensor, seed: int) -> torch.Tensor:
        if x_id_files is None:
            x_id = run.initial_estimate(batch, cfg, seed)
        else:
            start = seed - cfg.seed
            x_id = torch.stack([load_image(p, cfg.size) for p in x_id_files[start:start + batch.shape[0]]])
        return run(batch, x_id, cfg, seed)

    return _restore_files(cfg, files, out_dir, restore)


def clrface_crop_restorer(cfg: CLRFaceRestoreConfig, runner: CLRFaceRunner | None = None):
    """CLR-Face as a crop restorer (x_id from ``--init dr2 | lq``), ``cfg.batch_size`` crops per batch, crop i seeded
    ``cfg.seed + i``."""
    cfg.check_settings()
    if cfg.init not in CLRFACE_INITS:
        raise ValueError(f"--init {cfg.init}: whole photos and bfr eval compute x_id themselves; use --init dr2, irn "
                         "or lq.")
    run = runner or clrface_runner(cfg)

    def restore(crops: np.ndarray) -> np.ndarray:
        outs = []
        for start, x in _chunks(crops, cfg.batch_size):
            x = x.float()
            outs.append(run(x, run.initial_estimate(x, cfg, cfg.seed + start), cfg, cfg.seed + start)
                        .permute(0, 2, 3, 1).numpy())
        return np.concatenate(outs)

    return restore


@dataclass
class SynthesizeConfig(_FlipNetRunConfig):
    """``bfr synthesize --mode degrade HQ_DIR OUT_DIR --per-image 5``: off-shelf LQ with a degrade-mode checkpoint.

    Writes ``OUT_DIR/<stem>_<k>.png`` (k = 0..per_image-1), the layout ``lora.data`` reads as an off-shelf folder.
    Existing outputs are skipped (resumable). Launch with ``accelerate launch`` to shard over processes.
    """

    hq_dir: str = _h("folder of aligned HQ faces", "")
    out_dir: str = _h("output folder (<stem>_<k>.png)", "")
    checkpoint: str = _h("degrade-mode FlipNet .safetensors", "")
    mode: str = _h("only 'degrade' (FlipNet degradation mode)", "degrade")
    per_image: int = _h("degraded variants per HQ face (paper 5)", 5)
    batch_size: int = _h("images per sampling batch", 4)
    prompt: str = _h("text prompt (paper: null prompt in degradation mode)", "")
    seed: int = _h("base seed; variant k of image i uses its own derived seed", 0)

    def validate(self) -> None:
        for name, flag in (("hq_dir", "HQ_DIR"), ("out_dir", "OUT_DIR"), ("checkpoint", "--checkpoint")):
            if not getattr(self, name):
                raise ValueError(f"synthesize: {flag} is required.")
        if self.mode != "degrade":
            raise ValueError(f"synthesize: only --mode degrade is supported, got {self.mode!r}.")
        if self.per_image < 1:
            raise ValueError(f"synthesize: --per-image must be >= 1, got {self.per_image}.")
        self._check_sampling("synthesize", self.batch_size)


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
    cfg.validate()
    # Without CUDA, several processes (torchrun / accelerate launch) must ask for CPU mode explicitly, or each one
    # believes it is process 0 of 1 and they all synthesize every job.
    state = PartialState(cpu=use_cpu(False))
    files = list_images(cfg.hq_dir, "HQ face folder")
    out_dir = prepare_output_folder(cfg.out_dir)
    jobs = synthesis_jobs(files, cfg.per_image, out_dir)
    pipe = pipeline or _flipnet_pipeline(cfg, state.device)
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
            images = pipe(torch.stack([load_image(p, cfg.size) for p, _, _ in chunk]), sample)
            for (_, _, out), img in zip(chunk, images):
                save_png(out, img)
                written += 1
    state.wait_for_everyone()
    return written




def restore_dr2(image: str | Path, out: str | Path, config: dr2.DR2Config, *, model: SDModel | None = None,
                base_model: str | Path | None = None, download: bool = False, repo_id: str | None = None,
                size: int | None = None, device: str = "auto") -> Path:
    """``bfr restore --method dr2 IMAGE --out OUT``: restore one image file (or every image in a folder).

    ``out`` is a file for one image, a folder for a folder. The model comes from ``model`` or the resolution
    order of :func:`..sd.loader.load_model` (tiny random fallback, loudly). ``size`` resizes to a square first.
    """
    image, out = Path(image), Path(out)
    config.validate()
    if image.is_dir():
        sources = list_images(image, "restore input folder")
    elif not image.exists():
        raise FileNotFoundError(f"restore input {image} does not exist; pass an image file or a folder of images.")
    elif not is_image_file(image):
        raise ImageFolderError(f"restore input {image} is not an image file ({', '.join(IMAGE_EXTENSIONS)}); pass an "
                               "image or a folder of images.")
    else:
        sources = [image]
    to_folder = image.is_dir() or out.suffix.lower() not in IMAGE_EXTENSIONS
    if to_folder:
        prepare_output_folder(out)
    if model is None:
        model = load_model(base_model, download=download, repo_id=repo_id, device=resolve_device(device))
    for src in sources:
        x = load_image(src, size)[None]
        result = dr2.restore(model, x, config,
                             progress=lambda d, t: logger.debug("DR2 %s: %d/%d", src.name, d, t))
        dst = out / f"{src.stem}_dr2.png" if to_folder else out
        save_png(dst, result.images[0])
        logger.info("DR2 restored %s -> %s", src, dst)
    if not model.is_real:
        logger.warning("the output above came from the TINY RANDOM model: it is NOT a real restoration")
    return out


# ------------------------------------------------------------------------------------- crop restorers (photos)
def model_identity(base_model: str | Path | None, download: bool = False, repo_id: str | None = None) -> str:
    """What SD 2.1 a run would use, without loading it (for report hashes): the resolved path, the download repo,
    or the tiny random fallback."""
    path = resolve_base_model(base_model, download=False)
    if path is not None:
        return str(Path(path).resolve())
    if download:
        return f"download:{repo_id or os.environ.get(ENV_REPO) or DEFAULT_REPO}"
    return "tiny random model (NOT SD 2.1)"


def _chunks(crops: np.ndarray, batch_size: int):
    for start in range(0, len(crops), max(int(batch_size), 1)):
        yield start, torch.from_numpy(np.ascontiguousarray(crops[start:start + batch_size])).permute(0, 3, 1, 2)


def dr2_crop_restorer(model: SDModel, config: dr2.DR2Config, batch_size: int = 4):
    """DR2 as a crop restorer: (N, S, S, 3) numpy crops -> (N, S, S, 3), ``batch_size`` crops per model call."""
    config.validate()

    def restore(crops: np.ndarray) -> np.ndarray:
        outs = []
        for start, x in _chunks(crops, batch_size):
            out = dr2.restore(model, x.float(), config,
                              progress=lambda d, t: logger.debug("DR2 crops %d+: %d/%d", start, d, t)).images
            outs.append(out.permute(0, 2, 3, 1).float().cpu().numpy())
        return np.concatenate(outs)

    return restore


def flipnet_crop_restorer(cfg: RestoreConfig, pipeline: FlipNetPipeline | None = None):
    """FlipNet (restore mode) as a crop restorer, ``cfg.batch_size`` crops per sampling batch, crop i seeded with
    ``cfg.seed + i``."""
    pipe = pipeline or _flipnet_pipeline(cfg, resolve_device(cfg.device))

    def restore(crops: np.ndarray) -> np.ndarray:
        outs = []
        for start, x in _chunks(crops, cfg.batch_size):
            sample = FlipNetSampleConfig(mode="restore", num_inference_steps=cfg.num_inference_steps,
                                         guidance_scale=cfg.guidance_scale, prompt=cfg.prompt,
                                         negative_prompt=cfg.negative_prompt, phi=cfg.phi, t_y_policy=cfg.t_y_policy,
                                         t_y=cfg.t_y, seed=cfg.seed + start)
            outs.append(pipe(x.float(), sample).permute(0, 2, 3, 1).float().cpu().numpy())
        return np.concatenate(outs)

    return restore
