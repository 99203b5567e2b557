"""The training core every trainer plugs into (FlipNet §5.1 setup): :class:`TrainConfig`, the flags all trainers share,
and :class:`TrainingRun`, one ``accelerate`` loop (CPU/gloo detection, seeds, resume, gradient accumulation, clipping,
logging, checkpoints + pruning, validation cadence, final export). A trainer builds its models on
:attr:`TrainingRun.device` and hands :meth:`TrainingRun.fit` its optimizer :class:`Stage` s and a step function that
returns one loss per stage."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
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

from ..lora.lora_targets import require_same_keys
from ..lora.losses import VGGPerceptualLoss
from ..pipelines.image_io import image_grid, save_png
from .data import DegradationBatchConfig, FaceFolderDataset, fill_lq_on_the_fly

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")


def flag(text: str, **kw):
    """A config field with its ``--flag`` help text (read by ``cli/args.py``)."""
    return field(metadata={"help": text}, **kw)


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The flags every trainer shares; a trainer subclasses it (re-declaring a field changes its default) and
    extends :meth:`validate`. ``COMMAND`` prefixes every error message."""

    COMMAND: ClassVar[str] = "train"

    output_dir: str = flag("where checkpoints, validation images and the exported .safetensors go", default="")
    hq_dir: str | None = flag("folder of aligned HQ faces (FFHQ resized to 512); LQ made on the fly unless "
                              "--offshelf-dir has one", default=None)
    offshelf_dir: str | None = flag("off-shelf LQ folder (<stem>_<k>.png from `bfr synthesize`)", default=None)
    offshelf_prob: float = flag("probability of an off-shelf LQ instead of on-the-fly (paper 0.5)", default=0.5)
    degradation_preset: str = flag("classical preset for on-the-fly LQ (pipelines/degradation.py)", default="flipnet")
    resolution: int = flag("training resolution in px", default=512)
    train_batch_size: int = flag("batch per process", default=2)
    gradient_accumulation_steps: int = flag("accumulate gradients over this many batches", default=1)
    max_train_steps: int | None = flag("optimizer steps", default=None)
    learning_rate: float = flag("AdamW learning rate (paper 5e-5)", default=5e-5)
    adam_beta1: float = flag("AdamW beta1", default=0.9)
    adam_beta2: float = flag("AdamW beta2", default=0.999)
    adam_weight_decay: float = flag("AdamW weight decay", default=1e-2)
    adam_epsilon: float = flag("AdamW epsilon", default=1e-8)
    max_grad_norm: float = flag("gradient clipping norm (0 disables)", default=1.0)
    lambda_perceptual: float = flag("weight of the VGG19 perceptual loss", default=0.01)
    vgg_weights: str | None = flag("local VGG19 weights (torchvision layout, .pth or .safetensors)", default=None)
    allow_random_vgg: bool = flag("tests only: allow a randomly initialised VGG19", default=False)
    mixed_precision: str = flag("no | fp16 | bf16", default="no")
    cpu: bool = flag("force CPU (multi-process CPU runs under torchrun use gloo; automatic without CUDA)",
                     default=False)
    gradient_checkpointing: bool = flag("trade compute for memory in the trained networks", default=False)
    seed: int = flag("global seed (data order, noise, timesteps, drops)", default=0)
    checkpointing_steps: int = flag("save a resumable state + exported .safetensors every N steps", default=5000)
    checkpoints_total_limit: int | None = flag("keep at most this many checkpoint-* folders", default=3)
    resume_from_checkpoint: str | None = flag("'latest' or a checkpoint-* folder to resume from", default=None)
    validation_steps: int = flag("write validation images every N steps (0 disables)", default=2000)
    num_validation_images: int = flag("validation images per run", default=4)
    dataloader_num_workers: int = flag("data loader worker processes", default=2)
    log_every: int = flag("log losses every N steps", default=50)
    report_to: str | None = flag("accelerate tracker (tensorboard, wandb, ...) or none", default=None)

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
        if self.uses_perceptual() and not self.vgg_weights and not self.allow_random_vgg:
            self.bad("vgg_weights", "is required for the perceptual loss (lambda_perceptual > 0): pass a local VGG19 "
                     "file, or --lambda-perceptual 0.")
        if self.resume_from_checkpoint not in (None, "latest") and not Path(self.resume_from_checkpoint).is_dir():
            self.bad("resume_from_checkpoint", "must be 'latest' or an existing checkpoint-* folder.")

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples as lists), stored in the exported checkpoint's metadata."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def face_folder_dataset(cfg: TrainConfig, **kw) -> FaceFolderDataset:
    """``--hq-dir`` faces with ``--offshelf-dir`` LQ mixed in at ``--offshelf-prob`` (§5.1)."""
    return FaceFolderDataset(cfg.hq_dir, size=cfg.resolution, offshelf_dir=cfg.offshelf_dir,
                             offshelf_prob=cfg.offshelf_prob, seed=cfg.seed, **kw)


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

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return sorted(found)


def resolve_resume(output_dir: str | Path, resume: str | None) -> tuple[Path | None, int]:
    """(checkpoint folder, global step) to resume from, or (None, 0)."""
    if resume is None:
        return None, 0
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("--resume-from-checkpoint latest: no checkpoint-* folder in %s; starting fresh.", output_dir)
            return None, 0
        return found[-1][1], found[-1][0]
    path = Path(resume)
    m = _CKPT.match(path.name)
    if not m:
        raise ValueError(f"Resume folder {str(path)!r} is not named checkpoint-<step>.")
    return path, int(m.group(1))


def prune_checkpoints(output_dir: str | Path, limit: int | None) -> None:
    if limit is None:
        return
    found = list_checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - limit)]:
        shutil.rmtree(path, ignore_errors=True)


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

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def weight_dtype(self) -> torch.dtype:
        """Compute dtype of the frozen parts (trainable parameters stay fp32)."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)

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
            config_name: str = "train_config.json") -> Path:
        """Train to ``max_train_steps``; returns ``output_dir/export_name``.

        ``step(batch, prepared_models, ctx)`` runs under autocast and returns one loss per stage; the core does the
        backward, clipping, optimizer and scheduler steps in stage order. ``export(path)`` writes the model (main
        process, at every checkpoint and at the end); ``validate(val_batch, step)`` runs every ``validation_steps``
        on the main process with a fixed batch whose on-the-fly LQ is made once. ``trainable_only`` keeps only
        parameters that require grad in the resumable state (``trainable_<i>.safetensors``).
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

        resume_dir, global_step = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
        if resume_dir is not None:
            # model weights are safetensors; optimizer / scheduler / RNG pickles load with weights_only=True
            acc.load_state(str(resume_dir), load_kwargs={"weights_only": True})
            logger.info("Resumed from %s at step %d.", resume_dir, global_step)
        steps_per_epoch = max(1, math.ceil(len(loader) / cfg.gradient_accumulation_steps))
        epoch = global_step // steps_per_epoch
        skip_batches = (global_step % steps_per_epoch) * cfg.gradient_accumulation_steps
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed * 7919 + acc.process_index + global_step)
        for m in models:
            m.train()

        logger.info("Training %s for %d steps on %d processes, batch %d x %d accumulation.", title,
                    cfg.max_train_steps, acc.num_processes, cfg.train_batch_size, cfg.gradient_accumulation_steps)
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
                logs = dict(result.logs, loss=float(result.losses[stages[0].name].detach()))
                self._log(logs, global_step)
                if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps:
                    ckpt_dir = Path(cfg.output_dir) / f"checkpoint-{global_step}"
                    acc.save_state(str(ckpt_dir))
                    if acc.is_main_process:
                        export(ckpt_dir / export_name)
                        prune_checkpoints(cfg.output_dir, cfg.checkpoints_total_limit)
                    acc.wait_for_everyone()
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
            (Path(cfg.output_dir) / config_name).write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
        acc.wait_for_everyone()
        acc.end_training()
        return final

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

    def _log(self, logs: dict[str, float], global_step: int) -> None:
        cfg = self.cfg
        if cfg.report_to:
            self.accelerator.log(logs, step=global_step)
        if global_step % cfg.log_every == 0 or global_step == 1:
            logger.info("step %d/%d %s", global_step, cfg.max_train_steps,
                        " ".join(f"{k}={v:.4f}" for k, v in logs.items()))
