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

LoRA-only file (``bfr_format = flipnet-lora/1``, :func:`export_lora_only`, ``bfr export-lora``): the kohya keys of a
FlipNet file alone, with the ``ss_*`` / ``modelspec.*`` metadata LoRA files usually carry, for core
``LoraLoaderModelOnly`` (which would log every BoostHub / face key of the full file as "lora key not loaded").

Every file is written through a temporary file and a rename; it gets the usual ``0666 & ~umask`` mode (safetensors
writes its temporary 0600, which another user, e.g. the one ComfyUI runs as, could not read). ``dtype`` stores the
floating-point tensors in bf16 / fp16 (the training dtype under mixed precision; metadata ``dtype``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..sd.convert import SD21_BASE_UNET_CONFIG
from .boosthub import (
    BoostHubState,
    boosthub_state_dict,
    check_boosthub_layer,
    install_boosthub,
    load_boosthub_state_dict,
)
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
FLIPNET_LORA_FORMAT = "flipnet-lora/1"
DRBFR_FORMAT = "drbfr/1"  # lora/cond_checkpoint.py
CLRFACE_FORMAT = "clrface/1"  # lora/cond_checkpoint.py
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


def _config_meta(path, meta: dict, key: str, cls):
    """A config dataclass from a JSON metadata object; unknown fields and bad values are CheckpointErrors."""
    raw = _json_meta(path, meta, key)
    known = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(raw, dict):
        raise CheckpointError(path, f"metadata {key!r} must be a JSON object with the fields {known}, got "
                                    f"{type(raw).__name__} {meta[key][:80]!r}.")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise CheckpointError(path, f"metadata {key!r} has unknown field(s) {unknown}; {cls.__name__} has {known}. "
                                    "The file was edited or written by another version; re-export it with this "
                                    "version of comfyui-bfr.")
    try:
        return cls(**raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"metadata {key!r} is not a valid {cls.__name__}: {exc}") from exc


def _int_meta(path, meta: dict, key: str, default: int | None, what: str, lo: int | None = None,
              hi: int | None = None, example: str = "100") -> int | None:
    """An integer metadata string (``"100"``), in [lo, hi]; anything else names the key, the value and the rule."""
    raw = meta.get(key)
    if raw is None:
        return default
    rule = f"an integer {what}" + (f" in [{lo}, {hi}]" if lo is not None and hi is not None else
                                   f" >= {lo}" if lo is not None else "")
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise CheckpointError(path, f"metadata {key} is {raw!r}, but it must be {rule} (e.g. {example!r}).") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise CheckpointError(path, f"metadata {key} is {value}, but it must be {rule}.")
    return value


def _float_meta(path, meta: dict, key: str, default: float, what: str, lo: float | None = None) -> float:
    """A finite number from a metadata string (``"1.0"``), >= lo."""
    raw = meta.get(key)
    if raw is None:
        return default
    rule = f"a finite number{' >= ' + format(lo, 'g') if lo is not None else ''} ({what})"
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise CheckpointError(path, f"metadata {key} is {raw!r}, but it must be {rule}.") from None
    if not math.isfinite(value) or (lo is not None and value < lo):
        raise CheckpointError(path, f"metadata {key} is {raw!r}, but it must be {rule}.")
    return value


# Diffusers attention paths of a transformer block (FlipNet's LoRA and BoostHub targets) and their kohya names.
_ATTN_PATH = re.compile(r"(?:(?P<kind>down|up)_blocks\.(?P<level>\d+)|mid_block)\.attentions\.(?P<j>\d+)"
                        r"\.transformer_blocks\.(?P<k>\d+)\.(?P<attn>attn[12])")
_KOHYA_LORA = re.compile(re.escape(KOHYA_PREFIX) + r"(?:(?P<kind>down|up)_blocks_(?P<level>\d+)|mid_block)"
                         r"_attentions_(?P<j>\d+)_transformer_blocks_(?P<k>\d+)_(?P<attn>attn[12])"
                         r"_(?P<proj>to_q|to_k|to_v|to_out_0)")
_LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _diffusers_path(m: re.Match) -> str:
    """The dotted diffusers module path of a kohya LoRA name match (``..._attn2_to_out_0`` -> ``....attn2.to_out.0``)."""
    block = "mid_block" if m["kind"] is None else f"{m['kind']}_blocks.{m['level']}"
    proj = "to_out.0" if m["proj"] == "to_out_0" else m["proj"]
    return f"{block}.attentions.{m['j']}.transformer_blocks.{m['k']}.{m['attn']}.{proj}"


def _unet_topology(path, meta: dict) -> dict:
    """The widths the file's UNet has: its ``unet`` metadata over SD2.1-base's, checked to be an SD2.x UNet."""
    sig = _json_meta(path, meta, "unet", {})
    if not isinstance(sig, dict):
        raise CheckpointError(path, f"metadata 'unet' must be a JSON object (the UNet topology), got {sig!r:.80}.")
    topo = {"block_out_channels": list(SD21_BASE_UNET_CONFIG["block_out_channels"]),
            "layers_per_block": SD21_BASE_UNET_CONFIG["layers_per_block"],
            "cross_attention_dim": SD21_BASE_UNET_CONFIG["cross_attention_dim"]}
    topo.update({k: sig[k] for k in topo if k in sig})
    boc, lpb = topo["block_out_channels"], topo["layers_per_block"]
    if isinstance(lpb, (list, tuple)) and len(set(lpb)) == 1:
        topo["layers_per_block"] = lpb = lpb[0]
    if not (isinstance(boc, list) and boc and all(isinstance(c, int) and c > 0 for c in boc)) or \
            not (isinstance(lpb, int) and lpb > 0):
        raise CheckpointError(path, f"metadata 'unet' has block_out_channels={boc!r}, layers_per_block={lpb!r}; "
                                    "expected a list of positive widths and a positive integer (SD2.1-base: "
                                    f"{SD21_BASE_UNET_CONFIG['block_out_channels']}, 2).")
    if topo["cross_attention_dim"] != SD2_CONTEXT_DIM:
        raise CheckpointError(path, f"metadata 'unet' says cross_attention_dim={topo['cross_attention_dim']!r}, but "
                                    f"a FlipNet for SD2.1-base has {SD2_CONTEXT_DIM} (SD1.x: 768, SDXL: 2048).")
    return topo


def _block_width(match: re.Match, topo: dict) -> int:
    """Width of the transformer block an attention path / kohya name points at; ValueError if the UNet has none."""
    boc, lpb = topo["block_out_channels"], topo["layers_per_block"]
    kind, j = match["kind"], int(match["j"])
    if kind is None:
        if j != 0:
            raise ValueError(f"the middle block has one attention layer (attentions.0), not attentions.{j}")
        return boc[-1]
    level = int(match["level"])
    if level >= len(boc):
        raise ValueError(f"the UNet has {len(boc)} {kind} blocks (block_out_channels {boc}), not {kind}_blocks.{level}")
    per = lpb if kind == "down" else lpb + 1
    if j >= per:
        raise ValueError(f"{kind} block {level} has {per} attention layers (layers_per_block {lpb}), not "
                         f"attentions.{j}")
    return boc[level] if kind == "down" else boc[::-1][level]


def _check_lora_shapes(path, lora: dict[str, torch.Tensor], topo: dict) -> None:
    """Every kohya tensor against the layer it targets: lora_down is rank x in, lora_up out x rank (door (a))."""
    ctx = topo["cross_attention_dim"]
    for key, value in sorted(lora.items()):
        name, suffix = next(((key[: -len(s)], s) for s in _LORA_SUFFIXES if key.endswith(s)), (key, None))
        m = _KOHYA_LORA.fullmatch(name)
        if suffix is None or m is None:
            raise CheckpointError(path, f"LoRA key {key!r} is not '<kohya name of an attn1/attn2 to_q|to_k|to_v|"
                                        "to_out.0 projection>.lora_down.weight|.lora_up.weight|.alpha'; FlipNet puts "
                                        "its LoRA on the attention projections only.")
        layer = _diffusers_path(m)
        try:
            width = _block_width(m, topo)
        except ValueError as exc:
            raise CheckpointError(path, f"LoRA {name} targets a layer this UNet does not have: {exc}.") from None
        if suffix == ".alpha":
            if value.numel() != 1 or not math.isfinite(float(value.reshape(-1)[0])):
                raise CheckpointError(path, f"{key} must be one finite number (the LoRA alpha), got a tensor of "
                                            f"shape {tuple(value.shape)}.")
            continue
        cross_kv = m["attn"] == "attn2" and m["proj"] in ("to_k", "to_v")
        in_dim = ctx if cross_kv else width
        why_in = (f"the SD2.1 text context, cross_attention_dim {ctx}" if cross_kv else f"the block width {width}")
        if value.ndim != 2:
            raise CheckpointError(path, f"{key} is {tuple(value.shape)}; a LoRA projection is a matrix.")
        rank = int(value.shape[0] if suffix == ".lora_down.weight" else value.shape[1])
        if suffix == ".lora_down.weight" and int(value.shape[1]) != in_dim:
            hint = (" (768 is SD1.x's text width, 2048 SDXL's)" if cross_kv else "")
            raise CheckpointError(path, f"LoRA down projection {key} is {rank}x{int(value.shape[1])}, but the layer "
                                        f"it targets ({layer}) takes {in_dim}-wide inputs ({why_in}){hint}: the LoRA "
                                        "was made for another base model (ComfyUI would only log an error and leave "
                                        "that layer unpatched). Use a FlipNet trained on SD2.1-base.")
        if suffix == ".lora_up.weight" and int(value.shape[0]) != width:
            raise CheckpointError(path, f"LoRA up projection {key} is {int(value.shape[0])}x{rank}, but the layer it "
                                        f"targets ({layer}) gives {width}-wide outputs (the block width): the LoRA "
                                        "was made for another base model. Use a FlipNet trained on SD2.1-base.")


def _check_boosthub_shapes(path, boosthub: dict[str, torch.Tensor], topo: dict) -> None:
    """Every BoostHub layer: a known self-attention path, C x C projections with C its width (door (b))."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in boosthub.items():
        layer, _, leaf = key.rpartition(".")
        layer, _, proj = layer.rpartition(".")
        m = _ATTN_PATH.fullmatch(layer)
        if m is None or m["attn"] != "attn1" or proj not in ("q_proj", "k_proj", "v_proj", "out_proj"):
            raise CheckpointError(path, f"BoostHub key 'boosthub.{key}' is not 'boosthub.<self-attention (attn1) "
                                        "path>.<q|k|v|out>_proj.<weight|bias>'.")
        groups.setdefault(layer, {})[f"{proj}.{leaf}"] = value
    for layer, weights in sorted(groups.items()):
        try:
            check_boosthub_layer(layer, weights, _block_width(_ATTN_PATH.fullmatch(layer), topo))
        except ValueError as exc:
            raise CheckpointError(path, str(exc)) from None


def _check_module_tensors(path, namespace: str, module: nn.Module, sd: dict[str, torch.Tensor], config: str,
                          fix: str = "Re-export the checkpoint with `bfr train flipnet`.") -> None:
    """``sd`` has exactly the tensors (names and shapes) of ``module``, a meta-device build from the stored config."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise CheckpointError(path, f"'{namespace}.*' does not match the stored {config}: {len(missing)} tensors "
                                    f"missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. "
                                    f"{unexpected[:3]}). {fix}")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            have = "x".join(map(str, sd[k].shape)) or "a scalar"
            raise CheckpointError(path, f"{namespace}.{k} is {have}, but the stored {config} needs "
                                        f"{'x'.join(map(str, shape)) or 'a scalar'}: the weights and the config come "
                                        f"from different models. {fix}")


def _build_prefixed_module(path, tensors: dict[str, torch.Tensor], namespace: str, build, cfg, config_key: str,
                           fix: str, dtype: torch.dtype | None = None) -> nn.Module:
    """``build(cfg)`` loaded from a file whose tensors are all ``<namespace>.*``: other tensors, missing / unexpected
    names and wrong shapes (checked on a meta-device build first) raise :class:`CheckpointError` naming ``fix``."""
    prefix = namespace + "."
    unknown = [k for k in tensors if not k.startswith(prefix)]
    if unknown:
        raise CheckpointError(path, f"{len(unknown)} tensors outside '{namespace}.*' (e.g. {unknown[:3]}). {fix}")
    sd = {k[len(prefix):]: (v if dtype is None else v.to(dtype)) for k, v in tensors.items()}
    with torch.device("meta"):
        shape_only = build(cfg)
    _check_module_tensors(path, namespace, shape_only, sd, f"{config_key} {cfg.to_dict()}", fix)
    module = build(cfg)
    module.load_state_dict(sd, strict=True)
    return module


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


def current_umask() -> int:
    """The process umask (Linux: read from /proc, so nothing is changed; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_permissions(path: str | Path) -> None:
    """Mode ``0666 & ~umask`` for a file we wrote: what ``open()`` would give, e.g. 0644 under umask 022.

    safetensors (>= 0.6) writes through a private temporary file with mode 0600; an export left like that cannot
    be read by ComfyUI running as another user."""
    os.chmod(path, 0o666 & ~current_umask())


EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    names = {v: k for k, v in EXPORT_DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"export dtype must be one of {list(EXPORT_DTYPES)}, got {dtype}.")
    return names[dtype]


def _write(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], train_config: dict | None,
           dtype: torch.dtype | None = None) -> Path:
    """One ``.safetensors`` with metadata (+ the training config and its hash), written atomically with the usual
    umask permissions. ``dtype``: store floating-point tensors in it (LoRA ``.alpha`` scalars stay fp32)."""
    if train_config is not None:
        meta["train_config"] = json.dumps(train_config, sort_keys=True, default=str)
        meta["train_config_hash"] = config_hash(train_config)
    if dtype is not None:
        meta["dtype"] = dtype_name(dtype)

    def stored(key: str, v: torch.Tensor) -> torch.Tensor:
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point() and not key.endswith(".alpha"):
            v = v.to(dtype)
        return v.contiguous()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.safetensors")
    save_file({k: stored(k, v) for k, v in tensors.items()}, str(tmp), metadata=meta)
    give_umask_permissions(tmp)
    tmp.replace(path)
    return path


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
    dtype: torch.dtype | None = None,
) -> Path:
    """Write LoRA (kohya keys) + BoostHub (+ LQ face encoder + adapter for restore mode) with metadata; ``dtype``
    (bf16 / fp16) halves the file (default: the tensors' own dtype, fp32 for trained parameters)."""
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
    path = _write(path, tensors, meta, train_config, dtype)
    logger.info("Saved FlipNet %s checkpoint %s (%d tensors, %.1f MB).", mode, path, len(tensors),
                path.stat().st_size / 1e6)
    return path


def read_flipnet_checkpoint(path: str | Path, expected_base_model: str = BASE_MODEL) -> FlipNetCheckpoint:
    """Read and validate a FlipNet file before anything is built from it: format, base model and mode; namespaces;
    every LoRA tensor against the width of the SD2.1 layer it targets (ComfyUI's loader would only log an
    error at merge time and leave that layer unpatched); every BoostHub layer C x C with C its block's width; one LoRA rank that matches the metadata; numeric
    metadata (phi, t_y, lora_rank, face_image_size) and the face configs field by field; the face embedder and
    adapter tensors against those configs. Widths come from the file's ``unet`` metadata (SD2.1-base's when absent).
    Every problem is a :class:`CheckpointError` naming the file and saying what is wrong."""
    tensors, meta = _read(path)
    fmt = meta.get("bfr_format")
    if fmt != FLIPNET_FORMAT:
        hint = {FACE_AE_FORMAT: " It is a face-autoencoder file: pass it as --face-ae to `bfr train flipnet`.",
                FLIPNET_LORA_FORMAT: " It is the LoRA part alone (`bfr export-lora`): load it with ComfyUI's "
                                     "LoraLoaderModelOnly, or use the full FlipNet file it came from.",
                DRBFR_FORMAT: " It is a DR-BFR checkpoint: load it with BFR Load DR-BFR (`--method drbfr`).",
                CLRFACE_FORMAT: " It is a CLR-Face checkpoint: load it with BFR Load CLR-Face (`--method clrface`)."
                }.get(fmt, "")
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
    topo = _unet_topology(path, meta)
    _check_lora_shapes(path, groups["lora"], topo)
    _check_boosthub_shapes(path, groups["boosthub"], topo)
    try:
        rank, alpha = kohya_rank_alpha(groups["lora"], Path(path).name)
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from exc
    meta_rank = _int_meta(path, meta, "lora_rank", rank, "(the LoRA rank)", lo=1, example="64")
    if meta_rank != rank:
        raise CheckpointError(path, f"metadata says LoRA rank {meta_rank} but the weights have rank {rank}.")
    phi = _float_meta(path, meta, "phi", 1.0, "the BoostHub enhance weight; paper default 1, range [0, 2]", lo=0.0)
    t_y = _int_meta(path, meta, "t_y", 100, "timestep", lo=0, hi=999)
    try:
        defaults = FlipNetDefaults(phi=phi, t_y_policy=meta.get("t_y_policy", "fixed"), t_y=t_y)
    except ValueError as exc:
        raise CheckpointError(path, f"metadata: {exc}") from exc
    ckpt = FlipNetCheckpoint(path=str(path), mode=mode, rank=rank, alpha=alpha, lora=groups["lora"],
                             boosthub=groups["boosthub"], face_embedder=groups["face_embedder"],
                             adapter=groups["adapter"], defaults=defaults, unet=_json_meta(path, meta, "unet", {}),
                             metadata=meta)
    if bool(ckpt.face_embedder) != bool(ckpt.adapter):
        raise CheckpointError(path, "has only one of 'face_embedder.*' and 'adapter.*'; both are needed.")
    if ckpt.face_embedder:
        ckpt.face_ae_config = _config_meta(path, meta, "face_ae_config", FaceAEConfig)
        ckpt.adapter_config = _config_meta(path, meta, "adapter_config", AdapterConfig)
        ckpt.face_image_size = _int_meta(path, meta, "face_image_size", None, "size in px", lo=1, example="512")
        if ckpt.adapter_config.in_dim != ckpt.face_ae_config.token_dim:
            raise CheckpointError(path, f"adapter input width {ckpt.adapter_config.in_dim} does not match face token "
                                        f"width {ckpt.face_ae_config.token_dim}.")
        if ckpt.adapter_config.out_dim != SD2_CONTEXT_DIM:
            raise CheckpointError(path, f"the face adapter gives {ckpt.adapter_config.out_dim}-wide tokens, but "
                                        f"SD2.1's text context is {SD2_CONTEXT_DIM} wide.")
        with torch.device("meta"):  # shapes only: nothing allocated
            encoder, adapter = LQFaceEncoder(ckpt.face_ae_config), FaceAdapter(ckpt.adapter_config)
        _check_module_tensors(path, "face_embedder", encoder, ckpt.face_embedder,
                              f"face_ae_config {ckpt.face_ae_config.to_dict()}")
        _check_module_tensors(path, "adapter", adapter, ckpt.adapter, f"adapter_config {ckpt.adapter_config.to_dict()}")
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


def _format_of(path: str | Path) -> str | None:
    """The ``bfr_format`` metadata of a safetensors file (None when absent); read errors as :func:`_read`'s."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist; check the path (models/bfr/ in ComfyUI).")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("bfr_format")
    except Exception as exc:  # SafetensorError / OSError for damaged or foreign files
        raise CheckpointError(path, f"cannot be read as safetensors ({exc}). `bfr export-lora` takes a FlipNet "
                                    "checkpoint (flipnet_<mode>.safetensors from `bfr train flipnet`).") from exc


def lora_only_metadata(ckpt: FlipNetCheckpoint, title: str) -> dict[str, str]:
    """What a kohya-style SD2.1 LoRA file usually carries (``ss_*``, ``modelspec.*``), plus where it came from."""
    alpha = int(ckpt.alpha) if float(ckpt.alpha).is_integer() else ckpt.alpha
    meta = {
        "bfr_format": FLIPNET_LORA_FORMAT,
        "bfr_source_format": FLIPNET_FORMAT,
        "base_model": ckpt.metadata.get("base_model", BASE_MODEL),
        "mode": ckpt.mode,
        "lora_rank": str(ckpt.rank),
        "lora_alpha": repr(float(ckpt.alpha)),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ckpt.rank),
        "ss_network_alpha": str(alpha),
        "ss_v2": "True",
        "ss_base_model_version": "sd_v2",
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v2-512/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": "512x512",
        "modelspec.prediction_type": "epsilon",
        "modelspec.description": (f"LoRA part (rank {ckpt.rank}) of the FlipNet {ckpt.mode}-mode checkpoint "
                                  f"{Path(ckpt.path).name}; without BoostHub and face tokens it is not FlipNet "
                                  "restoration, only its LoRA."),
    }
    for key in ("train_config_hash", "dtype"):
        if key in ckpt.metadata:
            meta[key] = ckpt.metadata[key]
    return meta


def export_lora_only(src: str | Path, dst: str | Path) -> Path:
    """``bfr export-lora``: the ``lora_unet_*`` tensors of a FlipNet file alone (validated first, dtype kept), so
    core ``LoraLoaderModelOnly`` loads every key. Refuses anything that is not a ``flipnet/1`` file."""
    src, dst = Path(src), Path(dst)
    fmt = _format_of(src)
    if fmt != FLIPNET_FORMAT:
        what = {FLIPNET_LORA_FORMAT: "already a LoRA-only export",
                FACE_AE_FORMAT: "a face-autoencoder file (it holds no LoRA)",
                None: "not a FlipNet checkpoint (no bfr_format metadata; a plain LoRA file already loads with "
                      "LoraLoaderModelOnly as it is)"}.get(fmt, f"not a FlipNet checkpoint (bfr_format {fmt!r})")
        raise CheckpointError(src, f"is {what}. `bfr export-lora` takes a FlipNet checkpoint (bfr_format "
                                   f"{FLIPNET_FORMAT!r}: flipnet_restore/degrade.safetensors from `bfr train flipnet`).")
    if dst.suffix != ".safetensors":
        raise ValueError(f"export-lora: the output {str(dst)!r} must end in .safetensors (ComfyUI's models/loras "
                         "lists .safetensors files).")
    if dst.resolve() == src.resolve():
        raise ValueError(f"export-lora: the output {str(dst)!r} is the input file; write the LoRA to another path "
                         "(e.g. ComfyUI/models/loras/<name>_lora.safetensors).")
    ckpt = read_flipnet_checkpoint(src)
    path = _write(dst, dict(ckpt.lora), lora_only_metadata(ckpt, dst.stem), None)
    logger.info("Wrote the LoRA part of %s (%d tensors, rank %d, %.1f MB) to %s.", src.name, len(ckpt.lora),
                ckpt.rank, path.stat().st_size / 1e6, path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Face autoencoders
# --------------------------------------------------------------------------------------------------------------------


def save_face_ae_checkpoint(path: str | Path, pair: FaceAutoencoderPair, *, stage: str, image_size: int,
                            train_config: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write both face autoencoders (``face_ae.hq.*``, ``face_ae.lq.*``) with their config and stage; ``dtype``
    (bf16 / fp16) halves the file (SD-VAE topology: 2 x 83.65 M parameters, 669 MB in fp32)."""
    if stage not in ("recon", "assoc"):
        raise ValueError(f"stage must be 'recon' or 'assoc', got {stage!r}.")
    tensors = {f"face_ae.{k}": v.detach().cpu().contiguous() for k, v in pair.state_dict().items()}
    meta = {"bfr_format": FACE_AE_FORMAT, "base_model": BASE_MODEL, "stage": stage,
            "face_ae_config": json.dumps(pair.cfg.to_dict()), "image_size": str(int(image_size))}
    path = _write(path, tensors, meta, train_config, dtype)
    logger.info("Saved face autoencoders (%s stage) to %s (%.1f MB).", stage, path, path.stat().st_size / 1e6)
    return path


def load_face_ae_checkpoint(path: str | Path) -> tuple[FaceAutoencoderPair, dict[str, str]]:
    """Rebuild the HQ/LQ autoencoder pair from a face-AE file; returns (pair, metadata)."""
    tensors, meta = _read(path)
    fmt = meta.get("bfr_format")
    if fmt != FACE_AE_FORMAT:
        raise CheckpointError(path, f"bfr_format is {fmt!r}, expected {FACE_AE_FORMAT!r} (written by "
                                    "`bfr train face-ae`).")
    cfg = _config_meta(path, meta, "face_ae_config", FaceAEConfig)
    pair = FaceAutoencoderPair(cfg)
    sd = {k.removeprefix("face_ae."): v for k, v in tensors.items()}
    try:
        pair.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"face autoencoder weights do not fit the stored config: {exc}") from exc
    return pair, meta
