"""CLIP-IQA (Wang, Chan & Loy, "Exploring CLIP for Assessing the Look and Feel of Images", AAAI 2023) on CLIP RN50,
our own network code in plain torch (no torchvision, no clip / open_clip package at run time).

The score of an image is ``softmax(s * [cos(f, t_good), cos(f, t_bad)])[0]`` for the antonym prompts "Good photo." /
"Bad photo." (``s = exp(logit_scale)`` of the file, 100 for OpenAI's release), with ``f`` the CLIP image embedding of
the image at its own size: as in the paper, the attention pool's positional embedding is left out so that any size
works; the image is only normalised with CLIP's mean / std. ``prompts="pyiqa"`` averages the three pairs pyiqa's
``clipiqa`` uses instead (Good/Bad photo, High/Low quality, Sharp/Blurry photo).

Architecture facts (Radford et al. 2021, CLIP's "ModifiedResNet" RN50 and its 12-layer text Transformer) in the
key layout of OpenAI's RN50 state dict, which open_clip's ``RN50-quickgelu`` shares (``visual.*``,
``transformer.resblocks.N.*``, ``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection``,
``logit_scale``). The prompts' BPE token ids are constants (CLIP's tokenizer: ``<start> ... <end>``, lower case), so
no vocabulary file is needed; tests/comfy checks them and the network against open_clip on the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import load_checked, read_state_dict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SOT, EOT = 49406, 49407
# CLIP BPE ids of the prompts (lower-cased words with the end-of-word mark), between SOT and EOT.
PROMPT_TOKENS = {
    "Good photo.": (886, 1125, 269), "Bad photo.": (2103, 1125, 269),
    "High quality.": (1400, 3027, 269), "Low quality.": (1042, 3027, 269),
    "Sharp photo.": (8157, 1125, 269), "Blurry photo.": (21977, 1125, 269),
}
PROMPT_SETS = {
    "paper": (("Good photo.", "Bad photo."),),
    "pyiqa": (("Good photo.", "Bad photo."), ("High quality.", "Low quality."), ("Sharp photo.", "Blurry photo.")),
}
# Keys some exports of OpenAI's JIT archive carry next to the weights (ints, not parameters).
_META_KEYS = ("input_resolution", "context_length", "vocab_size")


class CLIPWeightsError(ValueError):
    """A CLIP RN50 file that is missing, unreadable or not in OpenAI's / open_clip's RN50 layout."""


class Bottleneck(nn.Module):
    """CLIP's anti-aliased bottleneck: 1x1, 3x3, avg-pool(stride), 1x1 (x4), with an avg-pool + 1x1 shortcut."""

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.stride = stride
        self.downsample = None
        if stride > 1 or cin != planes * 4:
            # indices as in the release (its index -1 is a parameter-free avg-pool, applied in forward)
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.stride) if self.stride > 1 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self._pool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        skip = x if self.downsample is None else self.downsample(self._pool(x))
        return F.relu(out + skip)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean token over [mean, all positions]; the output of the mean token."""

    def __init__(self, grid: int, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, dim))
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor, pos_embedding: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        x = torch.cat([x.mean(1, keepdim=True), x], 1)
        if pos_embedding:
            if x.shape[1] != self.positional_embedding.shape[0]:
                raise ValueError(f"the positional embedding covers {self.positional_embedding.shape[0] - 1} "
                                 f"positions, the image gives {h}x{w}; use pos_embedding=False (CLIP-IQA)")
            x = x + self.positional_embedding.to(x.dtype)
        d = c // self.heads
        q = self.q_proj(x[:, :1]).view(n, 1, self.heads, d).transpose(1, 2)
        k = self.k_proj(x).view(n, -1, self.heads, d).transpose(1, 2)
        v = self.v_proj(x).view(n, -1, self.heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, c)
        return self.c_proj(out)


class ModifiedResNet(nn.Module):
    """CLIP's image tower: 3-conv stem + avg-pool, 4 bottleneck stages, attention pool (RN50: 3-4-6-3, width 64)."""

    def __init__(self, layers=(3, 4, 6, 3), width: int = 64, heads: int = 32, out_dim: int = 1024, grid: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        cin = width
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stage = [Bottleneck(cin, planes, 1 if i == 0 else 2)] + [Bottleneck(planes * 4, planes)
                                                                      for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            cin = planes * 4
        self.attnpool = AttentionPool2d(grid, cin, heads, out_dim)

    def forward(self, x: torch.Tensor, pos_embedding: bool = False) -> torch.Tensor:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = F.avg_pool2d(x, 2)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x, pos_embedding)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN Transformer block with QuickGELU (``x * sigmoid(1.702 x)``) in the MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_1 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(dim, dim * 4)
        self.mlp.c_proj = nn.Linear(dim * 4, dim)
        self.ln_2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class CLIPRN50(nn.Module):
    """CLIP RN50: :meth:`encode_image` (N, 3, H, W) normalised images -> (N, 1024); :meth:`encode_text` token ids
    (N, 77) -> (N, 1024)."""

    def __init__(self, context: int = 77, vocab: int = 49408, width: int = 512, layers: int = 12, heads: int = 8,
                 embed_dim: int = 1024):
        super().__init__()
        self.visual = ModifiedResNet(out_dim=embed_dim)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def encode_image(self, x: torch.Tensor, pos_embedding: bool = False) -> torch.Tensor:
        return self.visual(x, pos_embedding)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf"), device=x.device).triu(1)  # causal
        x = x.transpose(0, 1)  # (L, N, D), as nn.MultiheadAttention expects
        for block in self.transformer.resblocks:
            x = block(x, mask)
        x = self.ln_final(x.transpose(0, 1))
        return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ self.text_projection  # the end-of-text token


def tokenize(prompts, context: int = 77) -> torch.Tensor:
    """(N, context) token ids of prompts from :data:`PROMPT_TOKENS`, zero-padded."""
    out = torch.zeros(len(prompts), context, dtype=torch.long)
    for i, p in enumerate(prompts):
        if p not in PROMPT_TOKENS:
            raise ValueError(f"no token ids for prompt {p!r}; known prompts: {sorted(PROMPT_TOKENS)}")
        ids = (SOT, *PROMPT_TOKENS[p], EOT)
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def load_clip_rn50(path: str | Path) -> CLIPRN50:
    """CLIP RN50 from a state dict file (``.safetensors``, or ``.pth`` / ``.bin`` read with ``weights_only=True``),
    in OpenAI's / open_clip's layout; half-precision files are converted to float32."""
    path = Path(path)
    sd = read_state_dict(path, lambda p, what: CLIPWeightsError(f"CLIP RN50 weights {p}: {what}"))
    sd = {k: v for k, v in sd.items() if k not in _META_KEYS and k != "attn_mask"}
    return load_checked(CLIPRN50(), sd, lambda problem: CLIPWeightsError(
        f"CLIP RN50 weights {path.name} are not in OpenAI's RN50 layout ({problem}); use open_clip's RN50 'openai' "
        "file (open_clip_model.safetensors) or a state dict of OpenAI's RN50.pt"))


class CLIPIQAModel(nn.Module):
    """CLIP-IQA on a loaded :class:`CLIPRN50`; :meth:`forward` takes (N, 3, H, W) in [0, 1] and gives (N,) scores
    in [0, 1] (higher = better)."""

    def __init__(self, clip: CLIPRN50, prompts: str = "paper"):
        super().__init__()
        if prompts not in PROMPT_SETS:
            raise ValueError(f"prompts must be one of {sorted(PROMPT_SETS)}, got {prompts!r}")
        self.clip, self.prompts = clip, prompts
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))
        words = [w for pair in PROMPT_SETS[prompts] for w in pair]
        with torch.no_grad():
            text = F.normalize(clip.encode_text(tokenize(words).to(clip.logit_scale.device)), dim=-1)
        self.register_buffer("text", text)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.normalize(self.clip.encode_image((x - self.mean) / self.std, pos_embedding=False), dim=-1)
        logits = self.clip.logit_scale.exp() * f @ self.text.T  # (N, 2 * pairs)
        return logits.view(len(x), -1, 2).softmax(-1)[..., 0].mean(1)


__all__ = ["CLIPIQAModel", "CLIPRN50", "CLIPWeightsError", "CLIP_MEAN", "CLIP_STD", "PROMPT_SETS", "PROMPT_TOKENS",
           "load_clip_rn50", "tokenize"]
