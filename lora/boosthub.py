"""BoostHub: a parallel attention branch beside every self-attention layer (FlipNet Eq. 4-5).

    F_ro    = W_o Attn(W_q F_x, W_k F_y, W_v F_y) = W_o Softmax(Q_x K_y^T / sqrt(d)) V_y      (Eq. 4)
    F_joint = SelfAttn(F_x) + phi * F_ro                                                   (Eq. 5)

F_x are the normalised hidden states (``norm1`` output, the self-attention input) of the stream being denoised and
F_y those of the condition stream at the same layer. W_q, W_k, W_v start as copies of the layer's self-attention
projections and W_o (weight and bias) starts at zero, so an untrained BoostHub is an exact no-op.

Batch convention (the "joint batch"): one UNet call carries ``cat([input_stream, condition_stream])`` on the batch
axis, row ``i`` of the input half paired with row ``B + i`` of the condition half. Restoration mode puts the noisy
HQ latent first and the diffused LQ latent second; degradation mode flips them. Only the input half is boosted; the
condition half runs the plain (LoRA) UNet.

The math lives in pure functions; :func:`boosthub_forward` is the ONE dispatch (joint batch / record / replay)
that both wrappers call with the layer's self-attention output and its input ``normed = norm1(x)``:

* the diffusers processor :class:`BoostHubAttnProcessor` (training, CLI), installed by :func:`install_boosthub`;
* the ComfyUI patches in ``nodes/flipnet_patches.py``: ``attn1_patch(n, context, value, extra_options)`` stashes
  ``n = norm1(x)`` in ``extra_options`` (the same dict reaches the later patches of that block call) and
  ``attn1_output_patch(out, extra_options)`` (``out`` is after the layer's own ``to_out``) returns
  ``boosthub_forward(out, n, hub, extra_options["n_heads"], phi, cache_mode, kv)[0]``. ``hub`` is this layer's
  :class:`BoostHubProjections` (:func:`boosthub_modules_from_state_dict` on a checkpoint's ``boosthub.*`` weights,
  keyed by diffusers attn1 path; :func:`comfy_block_key` gives the ComfyUI ``(block, number, index)`` of a path). No
  replace patch is needed because BoostHub has its own W_o.

LQ cache (design §3.3, policy ``t_y = fixed``): the condition stream's K_y, V_y do not change across sampling steps,
so :func:`boosthub_kv` can be computed once per layer (``cache_mode = "record"`` on a condition-only batch) and
reused (``"replay"`` on an input-only batch); see :class:`BoostHubState`. The condition rows never read the input
rows, so record + replay equals the joint batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CACHE_MODES = ("off", "record", "replay")


class _Projections(Protocol):
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    out_proj: nn.Module


# --------------------------------------------------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------------------------------------------------


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Attn(Q, K, V) = Softmax(Q K^T / sqrt(d)) V per head (Eq. 4); (B, N, C), (B, M, C) -> (B, N, C)."""
    b, n, c = q.shape
    if c % heads:
        raise ValueError(f"BoostHub width {c} is not divisible by heads={heads}.")
    d = c // heads
    qh = q.view(b, n, heads, d).transpose(1, 2)
    kh = k.reshape(k.shape[0], -1, heads, d).transpose(1, 2)
    vh = v.reshape(v.shape[0], -1, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, n, c).to(q.dtype)


def _project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) computed in x's dtype on x's device: the weights are cast to the activations, never the reverse.

    The activations arrive in the UNet's compute dtype (ComfyUI: ``manual_cast_dtype`` or the weight dtype; diffusers:
    the UNet's dtype, or autocast's), so BoostHub computes in that dtype wherever its bank is stored. When the bank
    already is in that dtype on that device (what the ComfyUI node arranges) the casts are no-ops; a bank left on the
    offload device by a partial (lowvram) load is cast per call instead of being moved behind the model manager."""
    w = layer.weight
    if w.dtype == x.dtype and w.device == x.device:
        return layer(x)
    b = getattr(layer, "bias", None)
    return F.linear(x, w.to(device=x.device, dtype=x.dtype), None if b is None else b.to(device=x.device, dtype=x.dtype))


def boosthub_kv(f_y: torch.Tensor, hub: _Projections) -> tuple[torch.Tensor, torch.Tensor]:
    """K_y = W_k F_y, V_y = W_v F_y (Eq. 4); the part the LQ cache can compute once."""
    return _project(hub.k_proj, f_y), _project(hub.v_proj, f_y)


def boosthub_residual(
    f_x: torch.Tensor,
    f_y: torch.Tensor | None,
    hub: _Projections,
    heads: int,
    phi: float,
    kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """phi * F_ro = phi * W_o Attn(W_q F_x, W_k F_y, W_v F_y)  (Eq. 4, the added term of Eq. 5).

    Args:
        f_x: normalised hidden states of the stream being denoised, (B, N, C).
        f_y: normalised hidden states of the condition stream, (B, M, C); ignored when ``kv`` is given.
        hub: the layer's projections (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).
        heads: number of attention heads of the layer (ComfyUI: ``extra_options["n_heads"]``).
        phi: enhance weight (paper default 1; 0 disables the branch, 2 lets LQ features dominate).
        kv: precomputed ``boosthub_kv(f_y, hub)`` (LQ cache); batch 1 broadcasts over B.
    """
    if kv is None:
        if f_y is None:
            raise ValueError("boosthub_residual needs either the condition features f_y or cached kv.")
        kv = boosthub_kv(f_y, hub)
    k, v = kv
    if k.shape[0] != f_x.shape[0]:
        if k.shape[0] != 1:
            raise ValueError(f"BoostHub condition batch {k.shape[0]} does not match input batch {f_x.shape[0]}; "
                             "the joint batch must hold as many condition rows as input rows.")
        k, v = k.expand(f_x.shape[0], -1, -1), v.expand(f_x.shape[0], -1, -1)
    q = _project(hub.q_proj, f_x)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    return phi * _project(hub.out_proj, multihead_attention(q, k, v, heads))


def boosthub_is_zero(hubs) -> bool:
    """True when every BoostHub W_o (weight and bias) is zero: F_ro = 0 exactly, whatever the condition stream holds.

    ``hubs``: an iterable of :class:`BoostHubProjections`. With such a bank (an untrained checkpoint) or phi = 0 the
    condition stream cannot reach the output, so the wrappers do not run it at all (no joint batch): the result is then
    bit-identical to the LoRA-only UNet, not merely equal up to the float reduction order of a doubled batch."""
    return all(not bool(hub.out_proj.weight.any()) and (hub.out_proj.bias is None or not bool(hub.out_proj.bias.any()))
               for hub in hubs)


def joint_features(self_attn_out: torch.Tensor, boost: torch.Tensor) -> torch.Tensor:
    """F_joint = SelfAttn(F_x) + phi F_ro (Eq. 5); ``boost`` is the output of :func:`boosthub_residual`."""
    return self_attn_out + boost


def boost_joint_batch(self_attn_out: torch.Tensor, normed: torch.Tensor, hub: _Projections, heads: int,
                      phi: float) -> torch.Tensor:
    """Eq. (5) on a whole joint batch: rows [:B] (input stream) get + phi F_ro(normed[:B], normed[B:]), rows [B:]
    (condition stream) are returned unchanged.

    ``self_attn_out`` is the layer's self-attention output after its own ``to_out`` and ``normed`` its input
    (``norm1`` output), both (2B, N, C). This is exactly what a ComfyUI ``attn1_output_patch`` computes from the
    ``n`` its ``attn1_patch`` stashed; the diffusers processor calls it too.
    """
    rows = normed.shape[0]
    if rows % 2 or self_attn_out.shape[0] != rows:
        raise ValueError(f"BoostHub needs the joint batch cat([input, condition]) with an even number of rows, got "
                         f"{rows} hidden-state rows and {self_attn_out.shape[0]} output rows. Concatenate the "
                         "condition latents on the batch axis or disable BoostHub.")
    half = rows // 2
    boost = boosthub_residual(normed[:half], normed[half:], hub, heads, phi)
    return torch.cat([joint_features(self_attn_out[:half], boost.to(self_attn_out.dtype)), self_attn_out[half:]], 0)


def boosthub_forward(
    self_attn_out: torch.Tensor,
    normed: torch.Tensor,
    hub: _Projections,
    heads: int,
    phi: float,
    cache_mode: str = "off",
    kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """One self-attention layer's BoostHub step, for every wrapper: ``(layer output, recorded K_y/V_y or None)``.

    ``self_attn_out`` is the layer's own self-attention output (after ``to_out``) and ``normed`` its input
    (``norm1`` output), both (rows, N, C). ``cache_mode``:

    * ``"off"``: rows are the joint batch ``cat([input, condition])``; Eq. (5) on the input half
      (:func:`boost_joint_batch`);
    * ``"record"``: rows are the condition stream only; returns the output unchanged and ``boosthub_kv(normed)``
      (detached) to keep for the replay passes;
    * ``"replay"``: rows are the input stream only; ``kv`` is what ``"record"`` returned for this layer (batch 1 or
      one row per input row); returns ``SelfAttn + phi F_ro`` with those K_y/V_y.
    """
    if cache_mode == "off":
        return boost_joint_batch(self_attn_out, normed, hub, heads, phi), None
    if cache_mode == "record":
        k, v = boosthub_kv(normed, hub)
        return self_attn_out, (k.detach(), v.detach())
    if cache_mode == "replay":
        if kv is None:
            raise ValueError("the BoostHub LQ cache holds no K/V for this layer; run a 'record' pass on the condition "
                             "stream first (or use cache_mode 'off').")
        boost = boosthub_residual(normed, None, hub, heads, phi, kv=kv)
        return joint_features(self_attn_out, boost.to(self_attn_out.dtype)), None
    raise ValueError(f"BoostHub cache_mode {cache_mode!r} is not one of {CACHE_MODES}.")


# --------------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class BoostHubState:
    """Runtime state shared by all BoostHub processors of one UNet.

    ``phi``: enhance weight of Eq. (5). ``enabled``: False runs the plain (LoRA) UNet on whatever batch is given.
    ``cache_mode``: ``"off"`` (joint batch), ``"record"`` (batch = condition stream only: store K_y/V_y per layer,
    return plain outputs) or ``"replay"`` (batch = input stream only: use the stored K_y/V_y).
    """

    phi: float = 1.0
    enabled: bool = True
    cache_mode: str = "off"
    kv_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.phi, (int, float)) or self.phi < 0:
            raise ValueError(f"BoostHub enhance weight phi must be a number >= 0 (paper: 1, range [0, 2]), "
                             f"got {self.phi!r}.")
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"BoostHub cache_mode {self.cache_mode!r} is not one of {CACHE_MODES}.")


class BoostHubProjections(nn.Module):
    """W_q, W_k, W_v (no bias, like SD's attention) and W_o (with bias, zero-initialised) of one layer."""

    def __init__(self, hidden_size: int):
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"BoostHub hidden_size must be positive, got {hidden_size}.")
        self.hidden_size = hidden_size
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    @torch.no_grad()
    def init_from_attention(self, attn: nn.Module) -> None:
        """Copy W_q/W_k/W_v from the layer's self-attention base weights (LoRA deltas excluded)."""
        for mine, theirs in ((self.q_proj, attn.to_q), (self.k_proj, attn.to_k), (self.v_proj, attn.to_v)):
            base = getattr(theirs, "base_layer", theirs)
            if tuple(base.weight.shape) != tuple(mine.weight.shape):
                raise ValueError(f"Cannot initialise BoostHub ({self.hidden_size} wide) from an attention projection "
                                 f"of shape {tuple(base.weight.shape)}.")
            mine.weight.copy_(base.weight.to(mine.weight.dtype))


class BoostHubAttnProcessor(nn.Module):
    """Diffusers attention processor for a self-attention layer (``attn1``): SelfAttn + phi * F_ro on the input half.

    The self-attention itself is delegated to diffusers' ``AttnProcessor2_0`` on the full batch (so with W_o = 0 the
    output is bit-identical to the stock processor); LoRA on ``to_q/to_k/to_v/to_out.0`` applies there.
    """

    def __init__(self, hidden_size: int, layer_name: str, state: BoostHubState):
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.hub = BoostHubProjections(hidden_size)
        self.layer_name = layer_name
        self.state = state
        self._self_attention = AttnProcessor2_0()

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(f"BoostHub sits on self-attention only, but {self.layer_name} received "
                             "encoder_hidden_states (a cross-attention layer?).")
        out = self._self_attention(attn, hidden_states, None, attention_mask, temb)
        state = self.state
        if not state.enabled:
            return out
        if hidden_states.ndim != 3:
            raise ValueError(f"BoostHub expects (B, N, C) hidden states at {self.layer_name}, got "
                             f"{tuple(hidden_states.shape)}.")
        try:
            out, kv = boosthub_forward(out, hidden_states, self.hub, attn.heads, state.phi, state.cache_mode,
                                       state.kv_cache.get(self.layer_name))
        except ValueError as exc:
            raise ValueError(f"{self.layer_name}: {exc}") from exc
        if kv is not None:
            state.kv_cache[self.layer_name] = kv
        return out


# --------------------------------------------------------------------------------------------------------------------
# Installation and naming
# --------------------------------------------------------------------------------------------------------------------


def self_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """{attention module path: module} for every self-attention layer (``...attn1``) of a diffusers UNet."""
    layers = {}
    for name in getattr(unet, "attn_processors", {}):
        module_path = name.removesuffix(".processor")
        if module_path.endswith(".attn1"):
            layers[module_path] = unet.get_submodule(module_path)
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no self-attention layers (attn1); BoostHub needs a diffusers "
                         "UNet2DConditionModel with transformer blocks.")
    return layers


def install_boosthub(unet: nn.Module, state: BoostHubState | None = None, init_from_self_attention: bool = True
                     ) -> BoostHubState:
    """Put a :class:`BoostHubAttnProcessor` on every ``attn1`` of ``unet`` (16 for SD2.1); other layers keep theirs.

    Returns the shared :class:`BoostHubState`. Existing BoostHub processors are replaced.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    state = state or BoostHubState()
    layers = self_attention_layers(unet)
    processors = {}
    for name, proc in unet.attn_processors.items():
        module_path = name.removesuffix(".processor")
        if module_path in layers:
            attn = layers[module_path]
            base = getattr(attn.to_q, "base_layer", attn.to_q)
            processor = BoostHubAttnProcessor(base.in_features, module_path, state)
            if init_from_self_attention:
                processor.hub.init_from_attention(attn)
            ref = base.weight
            processor.to(device=ref.device, dtype=ref.dtype)
            processors[name] = processor
        else:
            processors[name] = proc if not isinstance(proc, BoostHubAttnProcessor) else AttnProcessor2_0()
    unet.set_attn_processor(processors)
    logger.info("Installed BoostHub on %d self-attention layers.", len(layers))
    return state


def boosthub_processors(unet: nn.Module) -> dict[str, BoostHubAttnProcessor]:
    """{attention module path: processor} of the installed BoostHub processors (empty if none)."""
    return {p.layer_name: p for p in unet.attn_processors.values() if isinstance(p, BoostHubAttnProcessor)}


def boosthub_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """BoostHub weights as ``{"<attn path>.<q|k|v|out>_proj.<weight|bias>": tensor}`` (no ``boosthub.`` prefix)."""
    out = {}
    for path, proc in boosthub_processors(unet).items():
        for key, value in proc.hub.state_dict().items():
            out[f"{path}.{key}"] = value
    return out


def load_boosthub_state_dict(unet: nn.Module, sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load :func:`boosthub_state_dict` output into the installed processors; names every missing/extra/bad key."""
    procs = boosthub_processors(unet)
    if not procs:
        raise ValueError(f"Cannot load BoostHub weights from {source}: no BoostHub processors are installed on the "
                         "UNet (call install_boosthub first).")
    expected = {}
    for path, proc in procs.items():
        for key, value in proc.hub.state_dict().items():
            expected[f"{path}.{key}"] = value
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"BoostHub weights in {source} do not match this UNet: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Was the checkpoint trained on another base model "
            "topology (SD2.1-base expected)?"
        )
    for key, ref in expected.items():
        if tuple(sd[key].shape) != tuple(ref.shape):
            raise ValueError(f"BoostHub weight {key} in {source} has shape {tuple(sd[key].shape)}, the UNet needs "
                             f"{tuple(ref.shape)}: the checkpoint belongs to a different base model.")
    with torch.no_grad():
        for path, proc in procs.items():
            prefix = f"{path}."
            proc.hub.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})


BOOSTHUB_LEAVES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "out_proj.bias")


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(int(d)) for d in t.shape) or "a scalar"


def check_boosthub_layer(path: str, weights: dict[str, torch.Tensor], width: int | None = None) -> int:
    """The width C of one layer's BoostHub weights ``{"q_proj.weight": ..., ...}``; a ValueError that says in words
    what is wrong otherwise: every projection is C x C and the W_o bias C, with C the layer's width (``width``)."""
    missing = [leaf for leaf in BOOSTHUB_LEAVES if leaf not in weights]
    extra = sorted(set(weights) - set(BOOSTHUB_LEAVES))
    if missing or extra:
        parts = ([f"lacks {', '.join(missing)}"] if missing else []) + \
            ([f"has unknown tensors {', '.join(extra)}"] if extra else [])
        raise ValueError(f"BoostHub {path} {' and '.join(parts)}; a BoostHub layer holds exactly "
                         f"{', '.join(BOOSTHUB_LEAVES)}.")
    q = weights["q_proj.weight"]
    if q.ndim != 2 or q.shape[0] != q.shape[1]:
        raise ValueError(f"BoostHub {path}: q_proj.weight is {_shape(q)}, but every BoostHub projection is a square "
                         "C x C matrix (C = the width of its self-attention layer).")
    c = int(q.shape[0])
    for leaf in BOOSTHUB_LEAVES[1:]:
        want = (c,) if leaf.endswith(".bias") else (c, c)
        if tuple(weights[leaf].shape) != want:
            raise ValueError(f"BoostHub {path}: {leaf} is {_shape(weights[leaf])} but q_proj.weight is {c}x{c}; the "
                             f"projections of one layer must agree ({'x'.join(map(str, want))}).")
    if width is not None and c != int(width):
        raise ValueError(f"BoostHub {path} is {c} wide but that self-attention layer is {int(width)} wide; the "
                         "BoostHub weights belong to another UNet.")
    return c


def boosthub_modules_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, BoostHubProjections]:
    """{attn1 path: BoostHubProjections} rebuilt from ``boosthub.*`` weights (checkpoint namespace stripped), for
    wrappers that do not use a diffusers UNet (the ComfyUI patch)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        path, _, leaf = key.rpartition(".")
        path, _, proj = path.rpartition(".")
        if proj not in ("q_proj", "k_proj", "v_proj", "out_proj") or leaf not in ("weight", "bias") or not path:
            raise ValueError(f"Unexpected BoostHub key {key!r}; expected '<attn1 path>.<q|k|v|out>_proj.<weight|bias>'.")
        groups.setdefault(path, {})[f"{proj}.{leaf}"] = value
    modules = {}
    for path, weights in groups.items():
        hub = BoostHubProjections(check_boosthub_layer(path, weights))
        # assign: the module holds the checkpoint's tensors themselves (no second copy of the bank)
        hub.load_state_dict(weights, strict=True, assign=True)
        modules[path] = hub
    return modules


def comfy_block_key(attn_path: str, unet_config) -> tuple[str, int, int]:
    """ComfyUI patch key ``(block_name, number, transformer_index)`` for a diffusers attention path (comfyui-notes §4.1).

    ``unet_config``: a diffusers config (``layers_per_block``), ComfyUI's ``unet_config`` dict (``num_res_blocks``),
    or the int itself (a FlipNet checkpoint stores it as ``ckpt.unet["layers_per_block"]``).

    ``down_blocks.i.attentions.j.transformer_blocks.k`` -> ``("input", 1 + i*(L+1) + j, k)``,
    ``mid_block.attentions.0.transformer_blocks.k`` -> ``("middle", 0, k)``,
    ``up_blocks.i.attentions.j.transformer_blocks.k`` -> ``("output", i*(L+1) + j, k)`` with L = layers_per_block
    (up blocks hold L+1 layers).
    """
    parts = attn_path.split(".")
    if isinstance(unet_config, int):
        layers = unet_config
    elif isinstance(unet_config, dict):
        layers = unet_config["layers_per_block"] if "layers_per_block" in unet_config else unet_config["num_res_blocks"]
    else:
        layers = unet_config.layers_per_block
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ValueError(f"comfy_block_key supports a uniform layers_per_block, got {layers}.")
        layers = layers[0]
    try:
        k = int(parts[parts.index("transformer_blocks") + 1])
        if parts[0] == "down_blocks":
            return ("input", 1 + int(parts[1]) * (layers + 1) + int(parts[3]), k)
        if parts[0] == "mid_block":
            return ("middle", 0, k)
        if parts[0] == "up_blocks":
            return ("output", int(parts[1]) * (layers + 1) + int(parts[3]), k)
    except (ValueError, IndexError):
        pass
    raise ValueError(f"{attn_path!r} is not a diffusers UNet transformer-block attention path "
                     "(down_blocks.i.attentions.j.transformer_blocks.k.attn1, mid_block..., up_blocks...).")
