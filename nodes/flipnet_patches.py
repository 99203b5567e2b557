"""The FlipNet patch objects a patched MODEL carries (as IPAdapter keeps ``CrossAttentionPatch.py`` apart).

* :class:`JointBatchWrapper` -- an ``APPLY_MODEL`` wrapper: every UNet call runs the joint batch ``cat([x, y])`` of
  :mod:`..lora.boosthub` (``x`` the latent being sampled, all cond/uncond chunks; ``y`` the condition latent diffused
  to the same sigma, policy ``same``, or to the fixed sigma of ``t_y``, policy ``fixed``) and returns the input half.
  With the LQ cache (``t_y`` fixed) a condition-only pass records every BoostHub layer's K_y/V_y once per prompt chunk
  and later steps run the input rows alone (replay); its :meth:`~JointBatchWrapper.outer_sample` (an
  ``OUTER_SAMPLE`` wrapper) clears the cache at the start and end of every sampling run.
* :class:`BoostHubStash` -- an ``attn1_patch`` that keeps ``n = norm1(x)`` for the same block call;
* :class:`BoostHubOutput` -- an ``attn1_output_patch`` that hands the layer's output and the stashed ``n`` to
  :func:`..lora.boosthub.boosthub_forward`, the one BoostHub dispatch the diffusers processor calls too;
* :class:`SharedRowsAttention` -- an ``attn1`` replace on the UNet's first transformer block: under CFG the cond and
  uncond chunks are bitwise equal there (checked by the stash), so that self-attention and its BoostHub branch run
  for one chunk and are copied to the others (below the per-row compute floor; same numbers to float rounding).

They talk through ``transformer_options`` / ``extra_options`` (``BasicTransformerBlock.forward`` copies every
``transformer_options`` key into one ``extra_options`` dict per block call and passes that dict to each patch):

* ``bfr_flipnet_joint`` -- set by the wrapper: the rows are ``cat([input, condition])``;
* ``bfr_flipnet_record`` -- a dict the patches fill with ``{block key: (K_y, V_y)}`` (condition rows only);
* ``bfr_flipnet_replay`` -- ``{block key: (K_y, V_y)}`` to use (input rows only);
* ``bfr_flipnet_n`` -- the stashed ``norm1`` output, popped by the output patch;
* ``bfr_flipnet_shared`` -- first block only: ``(streams, chunks)`` when the CFG chunks hold equal rows.

Pure torch: nothing here imports ComfyUI, so the patches are unit-tested with the arguments ComfyUI gives them
(``tests/test_boosthub.py``). Every object returns itself from ``__deepcopy__`` (``ModelPatcher.clone`` deep-copies
``model_options``, comfyui-notes §3.1), so clones share the patches and the BoostHub weights. Errors raised while
sampling are :class:`.helpers.NodeInputError` naming the node.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..lora import boosthub as bh
from .helpers import NodeInputError

JOINT = "bfr_flipnet_joint"  # transformer_options flag: rows in the current UNet call (input + condition)
STASH = "bfr_flipnet_n"  # extra_options slot for norm1(x) of the current block call
RECORD = "bfr_flipnet_record"  # LQ cache: {block key: (K_y, V_y)} filled by a condition-only pass
REPLAY = "bfr_flipnet_replay"  # LQ cache: {block key: (K_y, V_y)} used by an input-only pass
SHARED = "bfr_flipnet_shared"  # first block only: (streams, chunks) when every CFG chunk of a stream holds equal rows

BlockKey = tuple[str, int, int]  # ComfyUI (block name, number, block_index)


class HubBank(nn.Module):
    """All BoostHub projections of one checkpoint, keyed by ComfyUI-safe names (a ModuleDict forbids dots)."""

    def __init__(self, hubs: dict[str, bh.BoostHubProjections]):
        super().__init__()
        self.layers = nn.ModuleDict({path.replace(".", "__"): hub for path, hub in hubs.items()})

    def get(self, path: str) -> bh.BoostHubProjections:
        return self.layers[path.replace(".", "__")]

    def paths(self) -> list[str]:
        return [k.replace("__", ".") for k in self.layers.keys()]


def block_key(extra_options: dict) -> BlockKey | None:
    """The ``(block, number, block_index)`` of the transformer block a patch is called from."""
    block = extra_options.get("block")
    if block is None:
        return None
    return block[0], int(block[1]), int(extra_options.get("block_index", 0))


# ---------------------------------------------------------------------------------------------- shared CFG rows
# Under CFG the cond and uncond chunks of one UNet call hold the same latent at the same sigma; they only diverge at
# the first cross-attention. So the first transformer block's self-attention (4096 tokens at 512 px) and its BoostHub
# branch see bitwise-equal rows in every chunk of a stream, and are computed for one chunk and copied to the others.
# The stash patch checks the equality (torch.equal, exact) on every call; anything else (cfg 1, area conds, other
# latents) runs the plain computation. Rows are laid out [stream][chunk][row]: streams = 2 in the joint batch
# (input, condition), 1 in the LQ cache's record / replay passes.


def _chunked(t: torch.Tensor, streams: int, chunks: int) -> torch.Tensor:
    return t.view(streams, chunks, t.shape[0] // (streams * chunks), *t.shape[1:])


def first_chunks(t: torch.Tensor, streams: int, chunks: int) -> torch.Tensor:
    """Chunk 0 of every stream: (streams * per, ...)."""
    return _chunked(t, streams, chunks)[:, 0].reshape(-1, *t.shape[1:])


def expand_chunks(t: torch.Tensor, streams: int, chunks: int) -> torch.Tensor:
    """The inverse of :func:`first_chunks` for equal chunks: every stream's rows repeated for each chunk."""
    per = t.shape[0] // streams
    return t.view(streams, 1, per, *t.shape[1:]).expand(streams, chunks, per, *t.shape[1:]).reshape(-1, *t.shape[1:])


def chunks_equal(t: torch.Tensor, streams: int, chunks: int) -> bool:
    """Whether every chunk of every stream equals that stream's chunk 0, bit for bit."""
    if t.shape[0] % (streams * chunks):
        return False
    v = _chunked(t, streams, chunks)
    return all(torch.equal(v[:, 0], v[:, j]) for j in range(1, chunks))


def shared_layout(n: torch.Tensor, extra_options: dict) -> tuple[int, int] | None:
    """(streams, chunks) when the block's input rows repeat across CFG chunks, else None."""
    streams = 2 if extra_options.get(JOINT) else 1
    chunks = len(extra_options.get("cond_or_uncond") or [])
    if chunks < 2 or n.shape[0] % (streams * chunks):
        return None
    return (streams, chunks) if chunks_equal(n, streams, chunks) else None


class SharedRowsAttention:
    """``attn1`` replace for the first transformer block: when the stash found the CFG chunks equal, the attention
    runs on one chunk per stream and is copied to the others; otherwise it is the block's own attention.
    ``attention(q, k, v, heads, extra_options)`` is the UNet's attention function (ComfyUI's ``optimized_attention``,
    passed in by the node so that this module imports no ComfyUI). ``shared_calls`` counts the shared evaluations."""

    def __init__(self, attention):
        self.attention = attention
        self.shared_calls = 0

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        heads = int(extra_options["n_heads"])
        layout = extra_options.get(SHARED)
        if layout is None or q.shape[0] != k.shape[0]:
            return self.attention(q, k, v, heads, extra_options)
        self.shared_calls += 1
        out = self.attention(*(first_chunks(t, *layout) for t in (q, k, v)), heads, extra_options)
        return expand_chunks(out, *layout)


class BoostHubStash:
    """``attn1_patch``: remember ``n = norm1(x)`` of the joint batch for :class:`BoostHubOutput` (same block call);
    at ``first_block`` (the UNet's first transformer block, before any cross-attention) also record whether the
    CFG chunks hold equal rows (:data:`SHARED`)."""

    def __init__(self, first_block: BlockKey | None = None):
        self.first_block = first_block

    def __call__(self, n, context, value, extra_options):
        if extra_options.get(JOINT) or RECORD in extra_options or REPLAY in extra_options:
            extra_options[STASH] = n
            if self.first_block is not None and block_key(extra_options) == self.first_block:
                layout = shared_layout(n, extra_options)
                if layout is not None:
                    extra_options[SHARED] = layout
        return n, context, value

    def __deepcopy__(self, memo):
        return self


class BoostHubOutput:
    """``attn1_output_patch``: F_joint = SelfAttn(F_x) + phi F_ro on the input rows (Eq. 5), per block, through
    :func:`..lora.boosthub.boosthub_forward`.

    ``hubs``: the checkpoint's BoostHub bank; ``keys``: ComfyUI ``(block, number, block_index)`` -> diffusers attn1
    path; ``node`` / ``source``: the node and file named in errors.
    """

    def __init__(self, hubs: HubBank, keys: dict[BlockKey, str], phi: float, *, node: str, source: str = "FlipNet"):
        self.hubs = hubs
        self.keys = keys
        self.phi = float(phi)
        self.node = node
        self.source = source

    def __deepcopy__(self, memo):
        return self

    def __call__(self, out, extra_options):
        n = extra_options.pop(STASH, None)
        if n is None:
            return out
        key = block_key(extra_options)
        path = self.keys.get(key)
        if path is None:
            raise NodeInputError(self.node, f"no BoostHub for self-attention block {key}; the FlipNet checkpoint "
                                            f"{self.source} does not fit this model.")
        if RECORD in extra_options:  # condition-only pass: keep K_y, V_y; the output is discarded
            mode, kv = "record", None
        elif REPLAY in extra_options:  # input-only pass: F_joint with the recorded K_y, V_y
            mode, kv = "replay", extra_options[REPLAY].get(key)
        elif extra_options.get(JOINT):
            mode, kv = "off", None
        else:
            return out
        # the bank is loaded to the UNet's device by the additional-model patcher and stored in the UNet's compute
        # dtype; boosthub_forward computes in n's dtype on n's device either way (a partial load that left the bank
        # on the offload device costs a per-call cast, never a move behind the model manager's back)
        hub = self.hubs.get(path)
        layout = extra_options.get(SHARED)
        if layout is not None and kv is not None and not (
                kv[0].shape[0] == n.shape[0] and chunks_equal(kv[0], *layout) and chunks_equal(kv[1], *layout)):
            layout = None  # replayed K_y/V_y differ between chunks: compute every row
        if layout is not None:  # equal CFG chunks: one chunk per stream, copied to the others
            out_all = out
            out, n = first_chunks(out, *layout), first_chunks(n, *layout)
            kv = None if kv is None else (first_chunks(kv[0], *layout), first_chunks(kv[1], *layout))
        try:
            result, recorded = bh.boosthub_forward(out, n, hub, int(extra_options["n_heads"]), self.phi, mode, kv)
        except ValueError as exc:
            raise NodeInputError(self.node, f"self-attention block {key} ({path}): {exc}") from exc
        if layout is not None:
            result = out_all if mode == "record" else expand_chunks(result, *layout)
            if recorded is not None:
                recorded = (expand_chunks(recorded[0], *layout), expand_chunks(recorded[1], *layout))
        if recorded is not None:
            extra_options[RECORD][key] = recorded
        return result


class JointBatchWrapper:
    """``APPLY_MODEL`` wrapper: run ``cat([x, y_sigma])`` through the model and return the input half.

    ``condition`` is the model-space condition latent (B or 1 rows), ``noise`` its fixed noise draw;
    ``sigma_y`` None means policy ``same`` (y at each row's own sigma), else the fixed sigma of ``t_y``.
    ``node`` names the node in errors.
    """

    def __init__(self, condition: torch.Tensor, noise: torch.Tensor, sigma_y: float | None, lq_cache: bool = False,
                 *, node: str):
        self.condition = condition
        self.noise = noise
        self.sigma_y = sigma_y
        self.lq_cache = bool(lq_cache) and sigma_y is not None
        self.node = node
        self.cache: dict = {}  # (cond uuid, cond_or_uncond) -> {"context", "rows", "kv": {block key: (K, V)}}
        self.condition_passes = 0  # condition-only UNet passes run for the LQ cache (diagnostics, tests)

    def clear_cache(self) -> None:
        self.cache.clear()

    def outer_sample(self, executor, *args, **kwargs):
        """OUTER_SAMPLE wrapper: a fresh LQ cache for every sampling run (weights and prompts may have changed)."""
        self.clear_cache()
        try:
            return executor(*args, **kwargs)
        finally:
            self.clear_cache()

    def __deepcopy__(self, memo):
        return self

    def condition_rows(self, x: torch.Tensor, sigma: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(y at its sigma for every row of x, the per-row sigmas of y); x holds ``chunks`` equal cond/uncond parts."""
        rows = x.shape[0]
        if chunks < 1 or rows % chunks:
            chunks = 1
        per = rows // chunks
        y, eps = self.condition, self.noise
        if y.shape[0] != per:
            if y.shape[0] != 1:
                raise NodeInputError(self.node, f"the sampled latent has batch {per} but the condition IMAGE has "
                                                f"{y.shape[0]} images; sample the LATENT output of {self.node} (one "
                                                "latent per image) or give one image.")
            y, eps = y.expand(per, -1, -1, -1), eps.expand(per, -1, -1, -1)
        if tuple(y.shape[1:]) != tuple(x.shape[1:]):
            raise NodeInputError(self.node, f"the sampled latent {tuple(x.shape[1:])} does not match the condition "
                                            f"image's latent {tuple(y.shape[1:])}; sample the LATENT output of "
                                            f"{self.node} (same size as the image) and do not use area conditioning.")
        y = y.repeat(chunks, 1, 1, 1).to(x.device, torch.float32)
        eps = eps.repeat(chunks, 1, 1, 1).to(x.device, torch.float32)
        sigma = sigma.reshape(-1).to(x.device, torch.float32)
        if sigma.numel() == 1:
            sigma = sigma.expand(rows)
        sig_y = sigma if self.sigma_y is None else torch.full_like(sigma, self.sigma_y)
        return (y + sig_y.view(-1, 1, 1, 1) * eps).to(x.dtype), sig_y.to(sigma.dtype)

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        transformer_options = transformer_options if transformer_options is not None else {}
        if control is not None:
            raise NodeInputError(self.node, "FlipNet cannot be combined with ControlNet/T2I-Adapter: the control "
                                            "residuals are computed for the plain batch, FlipNet doubles it. Remove "
                                            "the ControlNet from this sampler.")
        rows = x.shape[0]
        chunks = len(transformer_options.get("cond_or_uncond", [0]))
        y, sig_y = self.condition_rows(x, t, chunks)
        if self.lq_cache:
            return self._cached_call(executor, x, t, y, sig_y, c_concat, c_crossattn, transformer_options, kwargs)
        sigma = t.reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(rows)
        x2 = torch.cat([x, y])
        t2 = torch.cat([sigma, sig_y.to(sigma.device, sigma.dtype)])

        def double(v):
            if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == rows:
                return torch.cat([v, v])
            if isinstance(v, list):
                return [double(e) for e in v]
            return v

        options = dict(transformer_options)
        options[JOINT] = 2 * rows
        out = executor(x2, t2, double(c_concat), double(c_crossattn), control, options,
                       **{k: double(v) for k, v in kwargs.items()})
        return out[:rows]

    def _cached_call(self, executor, x, t, y, sig_y, c_concat, c_crossattn, transformer_options, kwargs):
        """LQ cache (t_y fixed): record K_y/V_y of every BoostHub layer once per prompt chunk, then run x alone.

        The condition rows never read the input rows and y_{t_y} is the same at every step, so their per-layer K/V
        only depend on the chunk's prompt: a condition-only pass (recorded) + an input-only pass (replayed) equals
        the joint batch (lora/boosthub.py, BoostHubState)."""
        rows = x.shape[0]
        kinds = list(transformer_options.get("cond_or_uncond", [0]))
        uuids = list(transformer_options.get("uuids", [None] * len(kinds)))
        if len(kinds) < 1 or rows % len(kinds):
            kinds, uuids = [0], [None]
        per = rows // len(kinds)

        def part(v, j_list):
            if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == rows:
                return torch.cat([v[j * per:(j + 1) * per] for j in j_list])
            if isinstance(v, list):
                return [part(e, j_list) for e in v]
            return v

        def entry_key(j):
            return (uuids[j] if j < len(uuids) else None, kinds[j])

        missing = []
        for j in range(len(kinds)):
            entry = self.cache.get(entry_key(j))
            ctx = c_crossattn[j * per:(j + 1) * per] if c_crossattn is not None else None
            if entry is None or entry["rows"] != per or not _same_tensor(entry["context"], ctx):
                missing.append(j)
        if missing:
            store: dict = {}
            options = dict(transformer_options)
            options[RECORD] = store
            options["cond_or_uncond"] = [kinds[j] for j in missing]
            options["uuids"] = [uuids[j] for j in missing if j < len(uuids)]
            executor(part(y, missing), part(sig_y.to(t.device, t.dtype), missing), part(c_concat, missing),
                     part(c_crossattn, missing), None, options, **{k: part(v, missing) for k, v in kwargs.items()})
            self.condition_passes += 1
            for i, j in enumerate(missing):
                ctx = c_crossattn[j * per:(j + 1) * per] if c_crossattn is not None else None
                self.cache[entry_key(j)] = {
                    "context": None if ctx is None else ctx.detach().clone(), "rows": per,
                    "kv": {key: (k[i * per:(i + 1) * per], v[i * per:(i + 1) * per]) for key, (k, v) in store.items()},
                }
        entries = [self.cache[entry_key(j)]["kv"] for j in range(len(kinds))]
        replay = {key: (torch.cat([e[key][0] for e in entries]), torch.cat([e[key][1] for e in entries]))
                  for key in entries[0]}
        options = dict(transformer_options)
        options[REPLAY] = replay
        return executor(x, t, c_concat, c_crossattn, None, options, **kwargs)


def _same_tensor(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.device == b.device and torch.equal(a, b.to(a.dtype))
