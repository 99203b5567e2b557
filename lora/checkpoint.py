"""One self-describing ``.safetensors`` per trained FlipNet (design.md §4) and per face-autoencoder stage.

FlipNet file (``bfr_format = flipnet/1``):

* ``lora_unet_<diffusers path with underscores>.lora_down.weight / .lora_up.weight / .alpha`` -- kohya keys, so core
  ComfyUI ``LoraLoaderModelOnly`` applies the LoRA part on its own (comfyui-notes §4.2);
* ``boosthub.<attn1 path>.{q,k,v,out}_proj.*`` -- BoostHub of every self-attention layer;
* ``face_embedder.*`` -- the LQ face encoder (restoration mode only);
* ``adapter.*`` -- the face-token adapter tau (restoration mode only).

Metadata (all strings): ``bfr_format``, ``base_model`` (``sd2.1-base``), ``mode`` (restore|degrade), ``lora_rank``,
``lora_alpha``, ``phi``, ``t_y_policy``, ``t_y``, ``unet`` (JSON topology summary), ``face_ae_config``,
``adapter_config``, ``face_image_size``, ``train_config`` (JSON) and ``train_config_hash``.

Face-AE file (``bfr_format = flipnet-face-ae/1``): ``face_ae.hq.*`` / ``face_ae.lq.*`` (diffusers AutoencoderKL keys
under ``ae.``), metadata ``stage`` (recon|assoc), ``face_ae_config``, ``image_size``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .boosthub import BoostHubState, boosthub_state_dict, install_boosthub, load_boosthub_state_dict
from .face_embedder import AdapterConfig, FaceAdapter, FaceAEConfig, FaceAutoencoderPair, LQFaceEncoder
from .lora_targets import (
    ADAPTER_NAME,
    KOHYA_PREFIX,
    add_flipnet_lora,
    kohya_rank_alpha,
    load_lora_kohya,
    lora_state_dict_kohya,
)

logger = logging.getLogger(__name__)

FLIPNET_FORMAT = "flipnet/1"
FACE_AE_FORMAT = "flipnet-face-ae/1"
BASE_MODEL = "sd2.1-base"
FLIPNET_MODES = ("restore", "degrade")
T_Y_POLICIES = ("same", "fixed")
SD2_CONTEXT_DIM = 1024


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, of the wrong format, or does not fit the model; names the file."""

    def __init__(self, path: str | Path, message: str):
        super().__init__(f"{Path(path).name}: {message}")
        self.path = str(path)


def config_hash(config: dict) -> str:
    """Stable short hash of a JSON-serialisable training config."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def unet_signature(unet: nn.Module) -> dict:
    """Topology summary stored in the checkpoint and compared on load."""
    cfg = unet.config
    return {
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "cross_attention_dim": cfg.cross_attention_dim,
        "attention_head_dim": cfg.attention_head_dim if isinstance(cfg.attention_head_dim, int)
        else list(cfg.attention_head_dim),
        "in_channels": cfg.in_channels,
    }


def check_sd21_unet(unet: nn.Module, what: str = "FlipNet") -> None:
    """Raise unless the UNet looks like SD2.x (cross-attention width 1024, 4 latent channels)."""
    cfg = unet.config
    if cfg.cross_attention_dim != SD2_CONTEXT_DIM:
        raise ValueError(f"{what} needs an SD2.1-base UNet (cross-attention width {SD2_CONTEXT_DIM}), got a UNet with "
                         f"cross_attention_dim={cfg.cross_attention_dim} (SD1.x has 768, SDXL 2048). Load SD2.1-base.")
    if cfg.in_channels != 4:
        raise ValueError(f"{what} needs a 4-channel SD2.1-base UNet, got in_channels={cfg.in_channels}.")


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist; check the path (models/bfr/ in ComfyUI).")
    if path.suffix != ".safetensors":
        raise CheckpointError(path, f"expected a .safetensors file, got {path.suffix!r}. FlipNet checkpoints are "
                                    "written by `bfr train flipnet` as .safetensors.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError for damaged files
        raise CheckpointError(path, f"cannot be read as safetensors ({exc}). The file is corrupt or truncated; "
                                    "re-copy or re-export it.") from exc
    return tensors, meta


def _json_meta(path, meta: dict, key: str, default=None):
    if key not in meta:
        if default is not None:
            return default
        raise CheckpointError(path, f"metadata key {key!r} is missing; the file was not written by comfyui-bfr.")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise CheckpointError(path, f"metadata {key!r} is not valid JSON: {meta[key][:80]!r}.") from exc


# --------------------------------------------------------------------------------------------------------------------
# FlipNet
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class FlipNetDefaults:
    """Inference defaults stored with the checkpoint (design §3.3)."""

    phi: float = 1.0
    t_y_policy: str = "fixed"
    t_y: int = 100

    def __post_init__(self):
        if self.t_y_policy not in T_Y_POLICIES:
            raise ValueError(f"t_y_policy {self.t_y_policy!r} is not one of {T_Y_POLICIES}.")
        if not 0 <= int(self.t_y) < 1000:
            raise ValueError(f"t_y must be a timestep in [0, 999], got {self.t_y}.")
        if self.phi < 0:
            raise ValueError(f"phi must be >= 0 (paper default 1, range [0, 2]), got {self.phi}.")


@dataclass
class FlipNetCheckpoint:
    """A validated FlipNet file, split by namespace."""

    path: str
    mode: str
    rank: int
    alpha: float
    lora: dict[str, torch.Tensor]
    boosthub: dict[str, torch.Tensor]
    face_embedder: dict[str, torch.Tensor] = field(default_factory=dict)
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)
    face_ae_config: FaceAEConfig | None = None
    adapter_config: AdapterConfig | None = None
    face_image_size: int | None = None
    defaults: FlipNetDefaults = field(default_factory=FlipNetDefaults)
    unet: dict = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def has_face_embedder(self) -> bool:
        return bool(self.face_embedder)


def save_flipnet_checkpoint(
    path: str | Path,
    unet: nn.Module,
    *,
    mode: str,
    face_encoder: LQFaceEncoder | None = None,
    adapter: FaceAdapter | None = None,
    face_image_size: int | None = None,
    defaults: FlipNetDefaults | None = None,
    train_config: dict | None = None,
    base_model: str = BASE_MODEL,
) -> Path:
    """Write LoRA (kohya keys) + BoostHub (+ LQ face encoder + adapter for restore mode) with metadata."""
    from safetensors.torch import save_file

    if mode not in FLIPNET_MODES:
        raise ValueError(f"mode must be one of {FLIPNET_MODES}, got {mode!r}.")
    if (face_encoder is None) != (adapter is None):
        raise ValueError("Save the face encoder and the adapter together (or neither).")
    defaults = defaults or FlipNetDefaults()
    cfg = unet.peft_config[ADAPTER_NAME]
    tensors: dict[str, torch.Tensor] = {}
    tensors.update(lora_state_dict_kohya(unet))
    hub = boosthub_state_dict(unet)
    if not hub:
        raise ValueError("The UNet has no BoostHub processors; install_boosthub before saving a FlipNet checkpoint.")
    tensors.update({f"boosthub.{k}": v for k, v in hub.items()})
    meta = {
        "bfr_format": FLIPNET_FORMAT,
        "base_model": base_model,
        "mode": mode,
        "lora_rank": str(cfg.r),
        "lora_alpha": repr(float(cfg.lora_alpha)),
        "phi": repr(float(defaults.phi)),
        "t_y_policy": defaults.t_y_policy,
        "t_y": str(int(defaults.t_y)),
        "unet": json.dumps(unet_signature(unet)),
        "boosthub_layers": str(len({k.rsplit(".", 2)[0] for k in hub})),
    }
    if face_encoder is not None:
        tensors.update({f"face_embedder.{k}": v for k, v in face_encoder.state_dict().items()})
        tensors.update({f"adapter.{k}": v for k, v in adapter.state_dict().items()})
        meta["face_ae_config"] = json.dumps(face_encoder.cfg.to_dict())
        meta["adapter_config"] = json.dumps(adapter.cfg.to_dict())
        if face_image_size is None:
            raise ValueError("face_image_size (the face encoder's input size) is required with a face encoder.")
        meta["face_image_size"] = str(int(face_image_size))
    if train_config is not None:
        meta["train_config"] = json.dumps(train_config, sort_keys=True, default=str)
        meta["train_config_hash"] = config_hash(train_config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.safetensors")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    logger.info("Saved FlipNet %s checkpoint %s (%d tensors).", mode, path, len(tensors))
    return path


def read_flipnet_checkpoint(path: str | Path, expected_base_model: str = BASE_MODEL) -> FlipNetCheckpoint:
    """Read and validate a FlipNet file: format, base model, namespaces, one LoRA rank that matches the metadata."""
    tensors, meta = _read(path)
    fmt = meta.get("bfr_format")
    if fmt != FLIPNET_FORMAT:
        hint = " It is a face-autoencoder file: pass it as --face-ae to `bfr train flipnet`." \
            if fmt == FACE_AE_FORMAT else ""
        raise CheckpointError(path, f"bfr_format is {fmt!r}, expected {FLIPNET_FORMAT!r}.{hint}")
    base = meta.get("base_model")
    if base != expected_base_model:
        raise CheckpointError(path, f"was trained for base model {base!r}, but {expected_base_model!r} is in use. "
                                    f"Load it with an {base} checkpoint.")
    mode = meta.get("mode")
    if mode not in FLIPNET_MODES:
        raise CheckpointError(path, f"metadata mode is {mode!r}, expected one of {FLIPNET_MODES}.")
    groups: dict[str, dict[str, torch.Tensor]] = {"lora": {}, "boosthub": {}, "face_embedder": {}, "adapter": {}}
    unknown = []
    for key, value in tensors.items():
        if key.startswith(KOHYA_PREFIX):
            groups["lora"][key] = value
        else:
            prefix, _, rest = key.partition(".")
            if prefix in groups and prefix != "lora" and rest:
                groups[prefix][rest] = value
            else:
                unknown.append(key)
    if unknown:
        raise CheckpointError(path, f"{len(unknown)} tensors outside the known namespaces (e.g. {unknown[:3]}).")
    if not groups["boosthub"]:
        raise CheckpointError(path, "holds no 'boosthub.*' weights.")
    try:
        rank, alpha = kohya_rank_alpha(groups["lora"], Path(path).name)
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from exc
    meta_rank = int(meta.get("lora_rank", rank))
    if meta_rank != rank:
        raise CheckpointError(path, f"metadata says LoRA rank {meta_rank} but the weights have rank {rank}.")
    defaults = FlipNetDefaults(phi=float(meta.get("phi", 1.0)), t_y_policy=meta.get("t_y_policy", "fixed"),
                               t_y=int(meta.get("t_y", 100)))
    ckpt = FlipNetCheckpoint(path=str(path), mode=mode, rank=rank, alpha=alpha, lora=groups["lora"],
                             boosthub=groups["boosthub"], face_embedder=groups["face_embedder"],
                             adapter=groups["adapter"], defaults=defaults, unet=_json_meta(path, meta, "unet", {}),
                             metadata=meta)
    if bool(ckpt.face_embedder) != bool(ckpt.adapter):
        raise CheckpointError(path, "has only one of 'face_embedder.*' and 'adapter.*'; both are needed.")
    if ckpt.face_embedder:
        ckpt.face_ae_config = FaceAEConfig(**_json_meta(path, meta, "face_ae_config"))
        ckpt.adapter_config = AdapterConfig(**_json_meta(path, meta, "adapter_config"))
        ckpt.face_image_size = int(meta.get("face_image_size", 0)) or None
        if ckpt.adapter_config.in_dim != ckpt.face_ae_config.token_dim:
            raise CheckpointError(path, f"adapter input width {ckpt.adapter_config.in_dim} does not match face token "
                                        f"width {ckpt.face_ae_config.token_dim}.")
    return ckpt


def apply_flipnet_checkpoint(unet: nn.Module, ckpt: FlipNetCheckpoint, state: BoostHubState | None = None
                             ) -> BoostHubState:
    """Add LoRA (checkpoint rank/alpha), install BoostHub, and load both into a diffusers SD2.1 UNet."""
    check_sd21_unet(unet)
    sig = unet_signature(unet)
    if ckpt.unet and ckpt.unet != sig:
        diffs = {k: (ckpt.unet.get(k), sig.get(k)) for k in sig if ckpt.unet.get(k) != sig.get(k)}
        raise CheckpointError(ckpt.path, f"was trained on a different UNet topology: (checkpoint, this UNet) = {diffs}. "
                                         "Use the SD2.1-base model it was trained with.")
    if getattr(unet, "peft_config", None) and ADAPTER_NAME in unet.peft_config:
        have = unet.peft_config[ADAPTER_NAME].r
        if have != ckpt.rank:
            raise CheckpointError(ckpt.path, f"has LoRA rank {ckpt.rank} but the UNet already carries a FlipNet "
                                             f"adapter of rank {have}; start from a clean UNet.")
    else:
        add_flipnet_lora(unet, rank=ckpt.rank, alpha=ckpt.alpha)
    try:
        load_lora_kohya(unet, ckpt.lora, Path(ckpt.path).name)
        state = install_boosthub(unet, state, init_from_self_attention=False)
        load_boosthub_state_dict(unet, ckpt.boosthub, Path(ckpt.path).name)
    except CheckpointError:
        raise
    except ValueError as exc:
        raise CheckpointError(ckpt.path, str(exc)) from exc
    state.phi = ckpt.defaults.phi
    return state


def build_face_modules(ckpt: FlipNetCheckpoint) -> tuple[LQFaceEncoder, FaceAdapter]:
    """The LQ face encoder and adapter of a restoration checkpoint (strict loading, errors name the file)."""
    if not ckpt.has_face_embedder:
        raise CheckpointError(ckpt.path, f"is a {ckpt.mode}-mode checkpoint without a face embedder; restoration with "
                                         "face embeddings needs a restore-mode checkpoint.")
    encoder = LQFaceEncoder(ckpt.face_ae_config)
    adapter = FaceAdapter(ckpt.adapter_config)
    for module, sd, name in ((encoder, ckpt.face_embedder, "face_embedder"), (adapter, ckpt.adapter, "adapter")):
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(ckpt.path, f"'{name}.*' weights do not fit the stored config: {exc}") from exc
    return encoder.eval(), adapter.eval()


# --------------------------------------------------------------------------------------------------------------------
# Face autoencoders
# --------------------------------------------------------------------------------------------------------------------


def save_face_ae_checkpoint(path: str | Path, pair: FaceAutoencoderPair, *, stage: str, image_size: int,
                            train_config: dict | None = None) -> Path:
    """Write both face autoencoders (``face_ae.hq.*``, ``face_ae.lq.*``) with their config and stage."""
    from safetensors.torch import save_file

    if stage not in ("recon", "assoc"):
        raise ValueError(f"stage must be 'recon' or 'assoc', got {stage!r}.")
    tensors = {f"face_ae.{k}": v.detach().cpu().contiguous() for k, v in pair.state_dict().items()}
    meta = {"bfr_format": FACE_AE_FORMAT, "base_model": BASE_MODEL, "stage": stage,
            "face_ae_config": json.dumps(pair.cfg.to_dict()), "image_size": str(int(image_size))}
    if train_config is not None:
        meta["train_config"] = json.dumps(train_config, sort_keys=True, default=str)
        meta["train_config_hash"] = config_hash(train_config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.safetensors")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    logger.info("Saved face autoencoders (%s stage) to %s.", stage, path)
    return path


def load_face_ae_checkpoint(path: str | Path) -> tuple[FaceAutoencoderPair, dict[str, str]]:
    """Rebuild the HQ/LQ autoencoder pair from a face-AE file; returns (pair, metadata)."""
    tensors, meta = _read(path)
    fmt = meta.get("bfr_format")
    if fmt != FACE_AE_FORMAT:
        raise CheckpointError(path, f"bfr_format is {fmt!r}, expected {FACE_AE_FORMAT!r} (written by "
                                    "`bfr train face-ae`).")
    cfg = FaceAEConfig(**_json_meta(path, meta, "face_ae_config"))
    pair = FaceAutoencoderPair(cfg)
    sd = {k.removeprefix("face_ae."): v for k, v in tensors.items()}
    try:
        pair.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"face autoencoder weights do not fit the stored config: {exc}") from exc
    return pair, meta
