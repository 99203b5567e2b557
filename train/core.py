"""The training core every trainer plugs into (FlipNet §5.1 setup): :class:`TrainConfig`, the flags all trainers share,
and :class:`TrainingRun`, one ``accelerate`` loop (CPU/gloo detection, seeds, resume, gradient accumulation, clipping,
logging, checkpoints + pruning, validation cadence, final export). A trainer builds its models on
:attr:`TrainingRun.device` and hands :meth:`TrainingRun.fit` its optimizer :class:`Stage` s and a step function that
returns one loss per stage.

Resumable checkpoints are namespaced by the run's stage / mode (``checkpoint-recon-<step>``,
``checkpoint-restore-<step>``), so the stages of one trainer can share an output folder, and each holds a run record
(``bfr_run.json``: trainer, stage / mode, the hash of the config fields that define the run). A resume from a folder
of another stage, mode or config is refused with both named."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from ..lora.checkpoint import EXPORT_DTYPES, config_hash, give_umask_permissions
from ..lora.lora_targets import require_same_keys
from ..lora.losses import VGGPerceptualLoss, vgg19_weights_help
from ..pipelines.arcface import IdentityModel, build_iresnet, load_identity_model
from ..pipelines.image_io import image_grid, save_png
from ..sd.diffusion import PREDICTION_TYPES
from ..sd.loader import load_components
from .data import DegradationBatchConfig, FaceFolderDataset, fill_lq_on_the_fly

try:  # a dependency of huggingface_hub / diffusers; the bar is optional
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
except ImportError:  # pragma: no cover
    tqdm = logging_redirect_tqdm = None

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")
EXPORT_DTYPE_CHOICES = ("auto", *EXPORT_DTYPES)

# --help sections (``cli/args.py`` reads the ``group`` of every field), in this order
ARG_GROUPS = {
    "data": "data",
    "model": "model",
    "optim": "optimisation",
    "schedule": "schedule, checkpoints and validation",
    "hardware": "hardware",
    "logging": "logging",
}
# fields of these groups define a run (stored in each resumable checkpoint and compared on resume), unless a field
# says otherwise; schedule / output, hardware and logging knobs may change between a run and its resume
IDENTITY_GROUPS = ("data", "model", "optim")
PATH_METAVARS = ("DIR", "FILE", "PATH")  # compared as absolute paths


def flag(text: str, group: str, *, identity: bool | None = None, metavar: str | None = None, **kw):
    """A config field with its ``--flag`` help text, its ``--help`` section (:data:`ARG_GROUPS`) and whether it is
    part of the run's identity (default: its group is in :data:`IDENTITY_GROUPS`), read by ``cli/args.py``."""
    if group not in ARG_GROUPS:
        raise ValueError(f"flag group {group!r} is not one of {list(ARG_GROUPS)}.")
    meta = {"help": text, "group": group, "identity": group in IDENTITY_GROUPS if identity is None else identity}
    if metavar:
        meta["metavar"] = metavar
    return field(metadata=meta, **kw)


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The flags every trainer shares; a trainer subclasses it (re-declaring a field changes its default) and
    extends :meth:`validate`. ``COMMAND`` prefixes every error message."""

    COMMAND: ClassVar[str] = "train"
    RUN_FIELD: ClassVar[str | None] = None  # the field naming the stage / mode (namespaces the checkpoints)
    FIRST_RUN: ClassVar[str] = ""  # the --help description: which flags a first run needs
    ARG_GROUPS: ClassVar[dict[str, str]] = ARG_GROUPS

    output_dir: str = flag("where checkpoints, validation images and the exported .safetensors go", "schedule",
                           metavar="DIR", default="")
    hq_dir: str | None = flag("folder of aligned HQ faces (FFHQ at 512 px); LQ made on the fly unless --offshelf-dir "
                              "has one", "data", metavar="DIR", default=None)
    offshelf_dir: str | None = flag("off-shelf LQ folder (<stem>_<k>.png from `bfr synthesize`)", "data",
                                    metavar="DIR", default=None)
    offshelf_prob: float = flag("probability of an off-shelf LQ instead of on-the-fly (paper 0.5)", "data", default=0.5)
    degradation_preset: str = flag("classical preset for on-the-fly LQ (`bfr degrade --list-presets`)", "data",
                                   default="flipnet")
    resolution: int = flag("training resolution in px", "data", default=512)
    train_batch_size: int = flag("batch per process", "optim", default=2)
    gradient_accumulation_steps: int = flag("accumulate gradients over this many batches", "optim", default=1)
    max_train_steps: int | None = flag("optimizer steps", "schedule", default=None)
    learning_rate: float = flag("AdamW learning rate (paper 5e-5)", "optim", default=5e-5)
    adam_beta1: float = flag("AdamW beta1", "optim", default=0.9)
    adam_beta2: float = flag("AdamW beta2", "optim", default=0.999)
    adam_weight_decay: float = flag("AdamW weight decay", "optim", default=1e-2)
    adam_epsilon: float = flag("AdamW epsilon", "optim", default=1e-8)
    max_grad_norm: float = flag("gradient clipping norm (0 disables)", "optim", default=1.0)
    lambda_perceptual: float = flag("weight of the VGG19 perceptual loss (0: no VGG19 needed)", "optim", default=0.01)
    vgg_weights: str | None = flag("torchvision's VGG19 (vgg19-dcbb9e9d.pth) or a .safetensors with its "
                                   "features.<i> keys, for the perceptual loss", "optim", identity=False,
                                   metavar="FILE", default=None)
    allow_random_vgg: bool = flag("tests only: allow a randomly initialised VGG19", "optim", identity=False,
                                  default=False)
    mixed_precision: str = flag("no | fp16 | bf16 (also the dtype of the exported files, see --export-dtype)",
                                "hardware", metavar="no|fp16|bf16", default="no")
    cpu: bool = flag("force CPU (automatic without CUDA; torchrun on CPU uses gloo)", "hardware", default=False)
    gradient_checkpointing: bool = flag("trade compute for memory in the trained networks", "hardware", default=False)
    dataloader_num_workers: int = flag("data loader worker processes", "hardware", default=2)
    seed: int = flag("global seed (data order, noise, timesteps, drops)", "optim", default=0)
    checkpointing_steps: int = flag("save a resumable state + exported .safetensors every N steps", "schedule",
                                    default=5000)
    checkpoints_total_limit: int | None = flag("keep at most this many resumable checkpoint folders of this stage / "
                                               "mode", "schedule", default=2)
    resume_from_checkpoint: str | None = flag("'latest' (this stage's / mode's newest in --output-dir) or a "
                                              "checkpoint folder", "schedule", metavar="latest|DIR", default=None)
    export_dtype: str = flag("dtype of the exported .safetensors: auto (= --mixed-precision: bf16/fp16, else fp32), "
                             "fp32, fp16, bf16", "schedule", metavar="auto|fp32|fp16|bf16",
                             default="auto")
    validation_steps: int = flag("write validation images every N steps (0 disables)", "schedule", default=2000)
    num_validation_images: int = flag("validation images per run", "schedule", default=4)
    log_every: int = flag("log a line (losses, lr, it/s, ETA) every N steps", "logging", default=50)
    report_to: str | None = flag("accelerate tracker (tensorboard, wandb, ...)", "logging", default=None)

    def __post_init__(self):
        self.validate()

    def bad(self, name: str, why: str):
        """Raise ValueError naming the flag, its value and the fix."""
        raise ValueError(f"{self.COMMAND}: --{name.replace('_', '-')}={getattr(self, name)!r} {why}")

    def check_positive_ints(self, *names: str) -> None:
        for name in names:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                self.bad(name, "must be a positive integer.")

    def check_non_negative(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 0:
                self.bad(name, "must be >= 0.")

    def check_probabilities(self, *names: str) -> None:
        for name in names:
            if not 0.0 <= getattr(self, name) <= 1.0:
                self.bad(name, "must be a probability in [0, 1].")

    def uses_perceptual(self) -> bool:
        """Whether the objective has the VGG19 term (trainers narrow it, e.g. FlipNet restore mode only)."""
        return self.lambda_perceptual > 0

    def validate(self) -> None:
        """Raise ValueError naming the bad flag and the fix (subclasses check their own flags, then call this)."""
        if self.mixed_precision not in MIXED_PRECISION:
            self.bad("mixed_precision", f"must be one of {MIXED_PRECISION}.")
        if self.resolution < 64 or self.resolution % 64:
            self.bad("resolution", "must be a multiple of 64 (paper: 512).")
        self.check_positive_ints("train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                                 "checkpointing_steps", "num_validation_images", "log_every")
        if not self.learning_rate > 0:
            self.bad("learning_rate", "must be > 0 (paper: 5e-5).")
        self.check_probabilities("offshelf_prob")
        self.check_non_negative("lambda_perceptual", "max_grad_norm", "validation_steps", "dataloader_num_workers")
        if self.export_dtype not in EXPORT_DTYPE_CHOICES:
            self.bad("export_dtype", f"must be one of {EXPORT_DTYPE_CHOICES}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            self.bad("checkpoints_total_limit", "must be >= 1 (the newest resumable state is always kept).")
        if self.uses_perceptual() and not self.vgg_weights and not self.allow_random_vgg:
            self.bad("vgg_weights", f"is required for the perceptual loss (--lambda-perceptual "
                     f"{self.lambda_perceptual:g} > 0). {vgg19_weights_help()}")
        if self.resume_from_checkpoint not in (None, "latest") and not Path(self.resume_from_checkpoint).is_dir():
            self.bad("resume_from_checkpoint", "must be 'latest' or an existing checkpoint folder.")

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples as lists), stored in the exported checkpoint's metadata."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def run_tag(self) -> str | None:
        """The stage / mode this run trains (``recon``, ``restore``, ...), or None for a trainer without one."""
        return str(getattr(self, self.RUN_FIELD)) if self.RUN_FIELD else None

    def describe_run(self) -> str:
        tag = self.run_tag()
        return f"`bfr {self.COMMAND}" + (f" --{self.RUN_FIELD.replace('_', '-')} {tag}`" if tag else "`")

    def identity(self) -> dict:
        """The fields that define the run (data, model, objective, optimiser, seed), paths made absolute; not
        output, schedule, hardware or logging knobs (``identity`` metadata of each field)."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get("identity", False):
                continue
            value = getattr(self, f.name)
            if f.metadata.get("metavar") in PATH_METAVARS and isinstance(value, str) and value:
                value = os.path.abspath(value)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def identity_hash(self) -> str:
        return config_hash(self.identity())


def base_components(cfg: TrainConfig, components: dict | None) -> tuple[dict, str]:
    """SD2.1-base's parts (``cfg.base_model`` loaded on the CPU unless ``components`` are given: tests) and the
    scheduler's prediction type, checked."""
    if components is None:
        if not getattr(cfg, "base_model", None):
            raise ValueError(f"{cfg.COMMAND}: --base-model is required (a local SD2.1-base diffusers folder or file).")
        components = load_components(cfg.base_model, tokenizer=getattr(cfg, "tokenizer", None), device="cpu")
    prediction_type = components["scheduler"].config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Base scheduler prediction_type {prediction_type!r} is not supported ({PREDICTION_TYPES}).")
    return components, prediction_type


def face_folder_dataset(cfg: TrainConfig, **kw) -> FaceFolderDataset:
    """``--hq-dir`` faces with ``--offshelf-dir`` LQ mixed in at ``--offshelf-prob`` (§5.1)."""
    return FaceFolderDataset(cfg.hq_dir, size=cfg.resolution, offshelf_dir=cfg.offshelf_dir,
                             offshelf_prob=cfg.offshelf_prob, seed=cfg.seed, **kw)


def training_identity(cfg: TrainConfig, device, align: str = "template") -> IdentityModel:
    """The frozen identity network f_arc of a trainer: ``cfg.identity_model`` (an arcface_torch iresnet file), or a
    randomly initialised r18 when the config allows it (``--allow-random-identity``, tests only; said in the log)."""
    if cfg.identity_model:
        return load_identity_model(cfg.identity_model, device=device, align=align)
    logger.warning("%s: RANDOM r18 identity model (--allow-random-identity): for tests only.", cfg.COMMAND)
    return IdentityModel(build_iresnet("r18"), device=device, align=align)


def perceptual_loss(cfg: TrainConfig, criterion: str = "mse") -> VGGPerceptualLoss | None:
    """The VGG19 perceptual term (Eq. 8; face-AE L_p) when the objective uses it."""
    return VGGPerceptualLoss(cfg.vgg_weights, criterion=criterion) if cfg.uses_perceptual() else None


# --------------------------------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------------------------------


def collate(items: list[dict]) -> dict:
    return {
        "hq": torch.stack([it["hq"] for it in items]),
        "lq": torch.stack([it["lq"] for it in items]),
        "has_lq": torch.tensor([bool(it["has_lq"]) for it in items]),
        "caption": [it["caption"] for it in items],
        "name": [it["name"] for it in items],
    }


def use_cpu(force: bool) -> bool:
    """CPU mode: forced, or no CUDA device while launched as several processes (torchrun / accelerate), so that
    accelerate sets up a gloo process group instead of silently training independent copies."""
    if force:
        return True
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world > 1 and not torch.cuda.is_available()


def adamw(params, cfg: TrainConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with the config's betas, weight decay and epsilon (``lr`` defaults to ``--learning-rate``)."""
    return torch.optim.AdamW(params, lr=cfg.learning_rate if lr is None else lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant."""
    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_image_grid(rows: list[list[torch.Tensor]], path: Path) -> None:
    """Rows of (3,H,W) images in [0,1] -> one PNG."""
    save_png(path, image_grid(rows))


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint folders and the trainable-only resumable state
# --------------------------------------------------------------------------------------------------------------------

_CKPT = re.compile(r"^checkpoint-(?:(?P<tag>[A-Za-z][A-Za-z0-9_]*)-)?(?P<step>\d+)$")
RUN_RECORD = "bfr_run.json"  # written last into a checkpoint folder: which run it belongs to (and that it is complete)
RUN_RECORD_FORMAT = "bfr-run/1"


def checkpoint_name(tag: str | None, step: int) -> str:
    """``checkpoint-<stage|mode>-<step>`` (``checkpoint-<step>`` for a trainer without stages)."""
    return f"checkpoint-{tag}-{step}" if tag else f"checkpoint-{step}"


def list_checkpoints(output_dir: str | Path, tag: str | None = None, complete_only: bool = False
                     ) -> list[tuple[int, Path]]:
    """(step, folder) of this stage's / mode's checkpoint folders in ``output_dir``, oldest first (``complete_only``:
    only those with a run record, i.e. fully written)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m["step"]), p) for p in out.iterdir()
             if p.is_dir() and (m := _CKPT.match(p.name)) and m["tag"] == tag
             and (not complete_only or (p / RUN_RECORD).is_file())]
    return sorted(found)


def _foreign_checkpoints(output_dir: str | Path, tag: str | None) -> list[str]:
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.is_dir() and (m := _CKPT.match(p.name)) and m["tag"] != tag)


def resolve_resume(output_dir: str | Path, resume: str | None, tag: str | None = None) -> tuple[Path | None, int]:
    """(checkpoint folder, global step) to resume from, or (None, 0). ``latest`` is the newest complete folder of
    this stage / mode (``tag``); the folders of other stages / modes in the same output folder are not looked at."""
    if resume is None:
        return None, 0
    if resume == "latest":
        found = list_checkpoints(output_dir, tag, complete_only=True)
        if not found:
            others = _foreign_checkpoints(output_dir, tag)
            also = f" (it holds {', '.join(others[:4])}: another stage / mode, not resumed)" if others else ""
            logger.warning("--resume-from-checkpoint latest: no %s folder in %s%s; starting fresh.",
                           checkpoint_name(tag, 0).replace("-0", "-<step>"), output_dir, also)
            return None, 0
        incomplete = [p.name for s, p in list_checkpoints(output_dir, tag) if s > found[-1][0]]
        if incomplete:
            logger.warning("Skipping %s: no %s (interrupted while saving).", ", ".join(incomplete), RUN_RECORD)
        return found[-1][1], found[-1][0]
    path = Path(resume)
    m = _CKPT.match(path.name)
    if not m:
        raise ValueError(f"Resume folder {str(path)!r} is not named {checkpoint_name(tag, 0).replace('-0', '-<step>')}"
                         " (a folder written by `bfr train`).")
    return path, int(m["step"])


def prune_checkpoints(output_dir: str | Path, limit: int | None, tag: str | None = None) -> None:
    """Delete the oldest folders of this stage / mode beyond ``limit`` (other stages' folders are never touched)."""
    if limit is None:
        return
    found = list_checkpoints(output_dir, tag)
    for _, path in found[: max(0, len(found) - limit)]:
        shutil.rmtree(path, ignore_errors=True)


def run_record(cfg: TrainConfig, step: int) -> dict:
    """What a resumable checkpoint belongs to: trainer, stage / mode, the identity fields and their hash."""
    return {"format": RUN_RECORD_FORMAT, "trainer": cfg.COMMAND, "run_field": cfg.RUN_FIELD, "run": cfg.run_tag(),
            "step": step, "config_hash": cfg.identity_hash(), "config": cfg.identity()}


def write_run_record(ckpt_dir: Path, cfg: TrainConfig, step: int) -> Path:
    path = ckpt_dir / RUN_RECORD
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(run_record(cfg, step), indent=1, sort_keys=True, default=str))
    tmp.replace(path)
    return path


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_run_record(ckpt_dir: Path, cfg: TrainConfig) -> dict:
    """Refuse to resume ``cfg`` from a checkpoint of another trainer, stage / mode or config (ValueError naming
    both runs, the fields that differ and the fix)."""
    fix = ("Pass another --output-dir for this run, or drop --resume-from-checkpoint to start it fresh.")
    path = Path(ckpt_dir) / RUN_RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{cfg.COMMAND}: cannot resume from {ckpt_dir}: it has no {RUN_RECORD} (written by an older "
                         "version, or interrupted while saving), so nothing says which stage, mode and config it "
                         f"belongs to. {fix}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg.COMMAND}: cannot resume from {ckpt_dir}: {path.name} is unreadable ({exc}). "
                         f"{fix}") from exc
    theirs_run = record.get("run")
    theirs = f"`bfr {record.get('trainer')}" + (f" --{str(record.get('run_field')).replace('_', '-')} {theirs_run}`"
                                                 if theirs_run else "`")
    mine = cfg.describe_run()
    if record.get("trainer") != cfg.COMMAND or theirs_run != cfg.run_tag():
        raise ValueError(f"{cfg.COMMAND}: cannot resume from {ckpt_dir}: it belongs to {theirs} (config "
                         f"{record.get('config_hash')}), but this run is {mine} (config {cfg.identity_hash()}). {fix}")
    if record.get("config_hash") != cfg.identity_hash():
        stored, now = record.get("config") or {}, cfg.identity()
        diffs = [f"--{k.replace('_', '-')} {_short(stored.get(k))} -> {_short(now.get(k))}"
                 for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
        raise ValueError(f"{cfg.COMMAND}: cannot resume from {ckpt_dir}: it belongs to {theirs} with config "
                         f"{record.get('config_hash')}, but this run's config is {cfg.identity_hash()}; they differ "
                         f"in {'; '.join(diffs[:6]) or 'fields this version does not know'}"
                         f"{' (and more)' if len(diffs) > 6 else ''}. Resume with the same flags, or: {fix}")
    return record


def give_umask_permissions_tree(folder: Path) -> None:
    """Every file under ``folder`` gets the usual ``0666 & ~umask`` mode (safetensors writes 0600)."""
    for f in Path(folder).rglob("*"):
        if f.is_file():
            give_umask_permissions(f)


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that require grad (e.g. LoRA, BoostHub, adapter): the resumable part of the model."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy :func:`trainable_state_dict` output back; every key and shape must match."""
    own = {n: p for n, p in module.named_parameters() if p.requires_grad}
    require_same_keys(own, sd, f"Resume state {source} does not fit this model",
                      "Resume with the same mode, rank and base model.")
    with torch.no_grad():
        for n, p in own.items():
            if p.shape != sd[n].shape:
                raise ValueError(f"Resume state {source}: {n} has shape {tuple(sd[n].shape)}, expected "
                                 f"{tuple(p.shape)} (different --lora-rank?).")
            p.copy_(sd[n].to(p.dtype))


# --------------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One optimizer update per step, driven by the step function's loss of the same ``name``."""

    name: str
    optimizer: torch.optim.Optimizer
    params: Sequence[nn.Parameter] = ()
    max_grad_norm: float = 0.0  # clip ``params`` to this norm (0: no clipping)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None


@dataclass
class StepContext:
    """What a step function may need besides the batch and the prepared models."""

    global_step: int  # optimizer steps completed so far
    generator: torch.Generator  # noise / timesteps / drops, seeded per process and resume step


@dataclass
class StepResult:
    losses: dict[str, torch.Tensor]  # stage name -> loss; a stage left out is not updated this step
    logs: dict[str, float]


StepFn = Callable[[dict, tuple, StepContext], StepResult]


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (``Nd H:MM:SS`` past a day; ``?`` before there is a rate)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86_400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{h}:{m:02d}:{s:02d}"


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class TrainingProgress:
    """One log line per ``log_every`` steps (and the first and last): losses, lr, it/s and ETA; and a tqdm bar on the
    main process when ``stream`` (stderr) is a terminal, with log records routed around it. Other processes are
    silent."""

    def __init__(self, total: int, start: int, desc: str, log_every: int, main_process: bool = True, stream=None):
        self.total, self.log_every, self.main = total, log_every, main_process
        self.stream = sys.stderr if stream is None else stream
        self.bar = None
        if main_process and tqdm is not None and _is_tty(self.stream):
            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", file=self.stream, dynamic_ncols=True)
        self._redirect = None
        self._last_time, self._last_step = time.perf_counter(), start

    def __enter__(self) -> TrainingProgress:
        if self.bar is not None and logging_redirect_tqdm is not None:
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(*exc)

    def update(self, step: int, logs: dict[str, float], lr: float) -> str | None:
        """Advance to ``step``; returns the line it logged (None when this step has none)."""
        if not self.main:
            return None
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}", refresh=False)
        if not (step % self.log_every == 0 or step == 1 or step == self.total):
            return None
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        values = " ".join(f"{k}={v:.4f}" for k, v in logs.items())
        line = (f"step {step}/{self.total} {values} lr={lr:.2e} | {rate:.3g} it/s, ETA {format_eta(eta)}")
        logger.info("%s", line)
        return line


class TrainingRun:
    """One ``accelerate`` run: build the models on :attr:`device` / :attr:`weight_dtype`, then :meth:`fit`."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        if not cfg.output_dir:
            raise ValueError(f"{cfg.COMMAND}: --output-dir is required.")
        self.cfg = cfg
        self.accelerator = Accelerator(
            cpu=use_cpu(cfg.cpu),
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=cfg.report_to,
            project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                                logging_dir=str(Path(cfg.output_dir) / "logs")),
        )
        set_seed(cfg.seed, device_specific=True)
        self.degradation = DegradationBatchConfig(preset=cfg.degradation_preset)
        # the resume folder is found and checked before any model is built: a wrong one fails in seconds
        self.tag = cfg.run_tag()
        self.resume_dir, self.resume_step = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint, self.tag)
        if self.resume_dir is not None:
            check_run_record(self.resume_dir, cfg)
        elif self.accelerator.is_main_process and list_checkpoints(cfg.output_dir, self.tag):
            names = [p.name for _, p in list_checkpoints(cfg.output_dir, self.tag)]
            logger.warning("%s already holds %s from an earlier %s run; this run starts fresh and its checkpoints "
                           "replace those folders (pruned by step). To continue that run instead, add "
                           "--resume-from-checkpoint latest; to keep it, pass another --output-dir.",
                           cfg.output_dir, ", ".join(names[-3:]), cfg.describe_run())

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def weight_dtype(self) -> torch.dtype:
        """Compute dtype of the frozen parts (trainable parameters stay fp32)."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)

    @property
    def export_dtype(self) -> torch.dtype:
        """dtype of the exported .safetensors: ``--export-dtype``, by default the training dtype (bf16 / fp16 under
        mixed precision, else fp32). Resumable states keep fp32."""
        if self.cfg.export_dtype == "auto":
            return self.weight_dtype
        return EXPORT_DTYPES[self.cfg.export_dtype]

    def fill_lq(self, batch: dict, seed: int) -> dict:
        """The batch on the device with its on-the-fly LQ rows degraded (``has_lq`` rows kept)."""
        hq = batch["hq"].to(self.device)
        lq = fill_lq_on_the_fly({"hq": hq, "lq": batch["lq"].to(self.device), "has_lq": batch["has_lq"]}, seed,
                                self.degradation)
        return dict(batch, hq=hq, lq=lq)

    def _register_trainable_state_hooks(self) -> None:
        acc, command = self.accelerator, self.cfg.COMMAND

        def save_hook(models, weights, output_dir):
            if acc.is_main_process:
                for i, m in enumerate(models):
                    save_file(trainable_state_dict(acc.unwrap_model(m)),
                              str(Path(output_dir) / f"trainable_{i}.safetensors"))
            weights.clear()

        def load_hook(models, input_dir):
            while models:
                m = models.pop()
                path = Path(input_dir) / f"trainable_{len(models)}.safetensors"
                if not path.is_file():
                    raise FileNotFoundError(f"Resume folder {input_dir} lacks {path.name}; it was not written by "
                                            f"`bfr {command}`.")
                load_trainable_state_dict(acc.unwrap_model(m), load_file(str(path)), str(path))

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    def fit(self, *, name: str, title: str, dataset: Dataset, models: Sequence[nn.Module], stages: Sequence[Stage],
            step: StepFn, export: Callable[[Path], Path], export_name: str,
            validate: Callable[[dict, int], Path] | None = None, trainable_only: bool = False,
            config_name: str | None = None) -> Path:
        """Train to ``max_train_steps``; returns ``output_dir/export_name``.

        ``step(batch, prepared_models, ctx)`` runs under autocast and returns one loss per stage; the core does the
        backward, clipping, optimizer and scheduler steps in stage order. ``export(path)`` writes the model (main
        process, at every checkpoint and at the end); ``validate(val_batch, step)`` runs every ``validation_steps``
        on the main process with a fixed batch whose on-the-fly LQ is made once. ``trainable_only`` keeps only
        parameters that require grad in the resumable state (``trainable_<i>.safetensors``). Checkpoint folders are
        ``checkpoint-<stage|mode>-<step>`` with a run record; ``config_name`` defaults to
        ``train_config_<stage|mode>.json``.
        """
        cfg, acc = self.cfg, self.accelerator
        if len(dataset) == 0:
            raise ValueError(f"{cfg.COMMAND}: the dataset is empty.")
        val_batch = self.fill_lq(collate([dataset[i] for i in range(min(cfg.num_validation_images, len(dataset)))]),
                                 cfg.seed)
        val_batch["has_lq"] = torch.ones_like(val_batch["has_lq"])
        loader = DataLoader(dataset, batch_size=cfg.train_batch_size, shuffle=True,
                            num_workers=cfg.dataloader_num_workers, collate_fn=collate,
                            drop_last=len(dataset) >= cfg.train_batch_size * acc.num_processes,
                            generator=torch.Generator().manual_seed(cfg.seed))
        if trainable_only:
            self._register_trainable_state_hooks()
        schedulers = [s.scheduler for s in stages if s.scheduler is not None]
        prepared = acc.prepare(*models, *(s.optimizer for s in stages), *schedulers, loader)
        n_models, n_stages = len(models), len(stages)
        models = tuple(prepared[:n_models])
        optimizers = prepared[n_models:n_models + n_stages]
        sched_iter = iter(prepared[n_models + n_stages:-1])
        loader = prepared[-1]
        stages = [dataclasses.replace(s, optimizer=o, scheduler=next(sched_iter) if s.scheduler is not None else None)
                  for s, o in zip(stages, optimizers)]
        if acc.is_main_process and cfg.report_to:
            acc.init_trackers(name, config={k: v for k, v in cfg.to_dict().items()
                                            if isinstance(v, (int, float, str, bool))})

        resume_dir, global_step = self.resume_dir, self.resume_step
        if resume_dir is not None:
            # model weights are safetensors; optimizer / scheduler / RNG pickles load with weights_only=True
            acc.load_state(str(resume_dir), load_kwargs={"weights_only": True})
            logger.info("Resumed %s from %s at step %d.", cfg.describe_run(), resume_dir, global_step)
            if global_step >= cfg.max_train_steps:
                logger.warning("%s is at step %d >= --max-train-steps %d: nothing left to train; exporting that state."
                               " Raise --max-train-steps to train on.", resume_dir, global_step, cfg.max_train_steps)
        steps_per_epoch = max(1, math.ceil(len(loader) / cfg.gradient_accumulation_steps))
        epoch = global_step // steps_per_epoch
        skip_batches = (global_step % steps_per_epoch) * cfg.gradient_accumulation_steps
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed * 7919 + acc.process_index + global_step)
        for m in models:
            m.train()

        logger.info("Training %s for %d steps on %d processes, batch %d x %d accumulation.", title,
                    cfg.max_train_steps, acc.num_processes, cfg.train_batch_size, cfg.gradient_accumulation_steps)
        progress = TrainingProgress(cfg.max_train_steps, global_step, title, cfg.log_every, acc.is_main_process)
        with progress:
            while global_step < cfg.max_train_steps:
                for part in getattr(dataset, "datasets", [dataset]):
                    if hasattr(part, "set_epoch"):
                        part.set_epoch(epoch)
                epoch_loader = acc.skip_first_batches(loader, skip_batches) if skip_batches else loader
                skip_batches = 0
                for batch in epoch_loader:
                    lq_seed = (cfg.seed * 1_000_003 + global_step * acc.num_processes + acc.process_index) & 0x7FFFFFFF
                    batch = self.fill_lq(batch, lq_seed)
                    with acc.accumulate(*models):
                        with acc.autocast():
                            result = step(batch, models, StepContext(global_step, generator))
                        self._update(stages, result.losses)
                    if not acc.sync_gradients:
                        continue
                    global_step += 1
                    logs = {"loss": float(result.losses[stages[0].name].detach()), **result.logs}
                    lr = float(stages[0].optimizer.param_groups[0]["lr"])
                    if cfg.report_to:
                        acc.log(dict(logs, lr=lr), step=global_step)
                    progress.update(global_step, logs, lr)
                    if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps:
                        self._save_checkpoint(global_step, export, export_name)
                    if (validate is not None and cfg.validation_steps and global_step % cfg.validation_steps == 0
                            and acc.is_main_process):
                        validate(val_batch, global_step)
                    if global_step >= cfg.max_train_steps:
                        break
                epoch += 1
        acc.wait_for_everyone()
        final = Path(cfg.output_dir) / export_name
        if acc.is_main_process:
            export(final)
            name = config_name or (f"train_config_{self.tag}.json" if self.tag else "train_config.json")
            (Path(cfg.output_dir) / name).write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
        acc.wait_for_everyone()
        acc.end_training()
        return final

    def _save_checkpoint(self, global_step: int, export: Callable[[Path], Path], export_name: str) -> Path:
        """Resumable state + export into ``checkpoint-<tag>-<step>``, the run record last (it marks the folder
        complete), usual file permissions, then prune this stage's / mode's old folders."""
        cfg, acc = self.cfg, self.accelerator
        ckpt_dir = Path(cfg.output_dir) / checkpoint_name(self.tag, global_step)
        if acc.is_main_process:  # a folder of an earlier run with this name: not complete until re-recorded
            (ckpt_dir / RUN_RECORD).unlink(missing_ok=True)
        acc.wait_for_everyone()
        acc.save_state(str(ckpt_dir))
        acc.wait_for_everyone()
        if acc.is_main_process:
            export(ckpt_dir / export_name)
            give_umask_permissions_tree(ckpt_dir)
            write_run_record(ckpt_dir, cfg, global_step)
            prune_checkpoints(cfg.output_dir, cfg.checkpoints_total_limit, self.tag)
            size = sum(f.stat().st_size for f in ckpt_dir.rglob("*") if f.is_file())
            logger.info("checkpoint %s (%.1f MB; keeping %s of this %s)", ckpt_dir, size / 1e6,
                        cfg.checkpoints_total_limit or "all", cfg.RUN_FIELD or "run")
        acc.wait_for_everyone()
        return ckpt_dir

    def _update(self, stages: Sequence[Stage], losses: dict[str, torch.Tensor]) -> None:
        """backward -> clip -> optimizer step -> scheduler step, stage by stage (the accelerate optimizers only step
        when gradients sync)."""
        acc = self.accelerator
        for stage in stages:
            if stage.name not in losses:
                continue
            acc.backward(losses[stage.name])
            if acc.sync_gradients and stage.max_grad_norm > 0:
                acc.clip_grad_norm_(stage.params, stage.max_grad_norm)
            stage.optimizer.step()
            if stage.scheduler is not None:
                stage.scheduler.step()
            stage.optimizer.zero_grad(set_to_none=True)
