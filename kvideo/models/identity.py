"""Identity tokens and identity attention: a character held by a reference image, across shots.

    reference latent (b, latent_channels, h, w)          the reference image through the MoVQ encoder
      -> ReferenceEncoder                                 patches + 2-D sinusoidal positions + transformer
      -> tokens (b, n, token_dim), mask (b, n)            n = (h / patch) * (w / patch)
      -> IdentityTokens(tokens, mask, weight (b,))        weight: 0 = no reference, else the sampling scale
      -> IdentityAttention in the UNet's levels           beside every text cross-attention it is set on

An `IdentityAttention` is the UNet's cross-attention block (`AttentionBlock`, its context the
identity tokens) behind a scalar gate starting at zero, times the per-sample weight:

    out = x + gate * weight[b] * (AttentionBlock(x, emb, tokens, mask) - x)

so a UNet with identity attention equals the UNet without it at initialisation, and for every
sample of weight 0 (a dropped reference, the branch of guidance without it) at any time. The block
itself is randomly initialised, so the gate's gradient is not zero from the first step (the
block's is, until the gate moves: the interpolation UNet's gated temporal attention does the same).
The UNet sets it per level (`UNetConfig.identity_attention`) and takes the tokens by keyword,
`UNet.forward(..., identity=IdentityTokens(...))`.

The reference encoder reads no particular resolution: its position embedding is computed for the
patch grid of each input, so one encoder serves 16x16 ShapesWorld latents and 64x64 Kandinsky ones.

Sections: identity tokens, identity attention, reference encoder, named sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from einops import rearrange
from torch import nn

from kvideo.models.sizes import sized_config
from kvideo.models.unet_blocks import Attention, AttentionBlock, sinusoidal_embedding

# ----------------------------------------------------------------------------------------------
# Identity tokens
# ----------------------------------------------------------------------------------------------


@dataclass
class IdentityTokens:
    """What a UNet's identity attention reads, per sample.

    tokens (b, n, d); mask (b, n) bool, True = a valid token (None: all valid); weight (b,) float,
    the strength of the identity attention for that sample (None: all 1): 0 for a sample without a
    reference (reference dropout in training, the branch without the reference in guidance), the
    sampling scale otherwise. A sample without any valid token is not conditioned (as weight 0).
    """

    tokens: torch.Tensor
    mask: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise ValueError(f"IdentityTokens.tokens must be (b, n, d); got {tuple(self.tokens.shape)}")
        b, n = self.tokens.shape[:2]
        if self.mask is None:
            self.mask = torch.ones(b, n, dtype=torch.bool, device=self.tokens.device)
        if self.weight is None:
            self.weight = torch.ones(b, dtype=self.tokens.dtype, device=self.tokens.device)
        if self.mask.dtype != torch.bool or self.mask.shape != (b, n):
            raise ValueError(f"IdentityTokens.mask must be bool ({b}, {n}); got {self.mask.dtype} "
                             f"{tuple(self.mask.shape)}")
        if not self.weight.is_floating_point() or self.weight.shape != (b,):
            raise ValueError(f"IdentityTokens.weight must be a float ({b},) tensor; got {self.weight.dtype} "
                             f"{tuple(self.weight.shape)}")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def check(self, batch_size: int, dim: int, owner: str) -> None:
        """Raise ValueError (naming `owner`, the network) unless these are `batch_size` samples of
        `dim`-wide tokens."""
        if self.batch_size != batch_size or self.tokens.shape[2] != dim:
            raise ValueError(f"{owner}: identity tokens must be ({batch_size}, n, {dim}); "
                             f"got {tuple(self.tokens.shape)}")

    def repeat_interleave(self, repeats: int) -> "IdentityTokens":
        """Each sample `repeats` times in a row: a clip's tokens for its frames folded into the batch."""
        return IdentityTokens(self.tokens.repeat_interleave(repeats, dim=0),
                              self.mask.repeat_interleave(repeats, dim=0),
                              self.weight.repeat_interleave(repeats, dim=0))


# ----------------------------------------------------------------------------------------------
# Identity attention
# ----------------------------------------------------------------------------------------------


class IdentityAttention(nn.Module):
    """x + gate * weight[b] * (block(x, emb, tokens, mask) - x), the gate a scalar starting at 0.

    `block` is a cross-attention AttentionBlock whose context is the identity tokens (context_dim
    = the token width), randomly initialised.
    """

    def __init__(self, block: AttentionBlock) -> None:
        super().__init__()
        if not block.is_cross:
            raise ValueError("IdentityAttention: the block must be a cross-attention (an AttentionBlock "
                             "with a context_dim)")
        self.block = block
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        """x (b, c, h, w), emb (b, e), tokens (b, n, d), mask (b, n) bool, weight (b,)."""
        has_token = mask.any(dim=1, keepdim=True)  # (b, 1)
        # a sample without a valid token attends to all of them (softmax over nothing is NaN, and
        # 0 * NaN is NaN), then its weight is zeroed: it is not conditioned
        attend = mask | ~has_token
        weight = weight.to(x.dtype) * has_token[:, 0].to(x.dtype)  # (b,)
        a = (self.gate.to(x.dtype) * weight).reshape(-1, 1, 1, 1)
        return x + a * (self.block(x, emb, tokens, attend) - x)


# ----------------------------------------------------------------------------------------------
# Reference encoder
# ----------------------------------------------------------------------------------------------


@dataclass
class ReferenceEncoderConfig:
    """A reference image's latent -> identity tokens. The defaults suit ShapesWorld's 16x16x4
    latents and its `shapes` UNet (context_dim 128): 64 tokens, 0.4M parameters."""

    latent_channels: int = 4  # the MoVQ latent's channels (its embed_dim)
    patch: int = 2  # each token covers patch x patch latent pixels (h and w must be divisible by it)
    width: int = 128  # the transformer's width (a multiple of 4 and of head_dim)
    depth: int = 2  # pre-norm transformer layers
    head_dim: int = 32  # attention heads = width // head_dim
    mlp_ratio: int = 4  # feed-forward hidden width = mlp_ratio * width
    token_dim: int = 128  # the tokens' width: the UNet's identity_dim (default its context_dim)
    # the width of the name embeddings that tag a reference's tokens (`forward(latent, names)`,
    # a linear map starting at zero, added to every token); 0: no tags
    name_dim: int = 0


def _check_encoder_config(cfg: ReferenceEncoderConfig) -> None:
    """Raise ValueError naming the field when a ReferenceEncoderConfig cannot build an encoder."""
    for name in ("latent_channels", "patch", "width", "depth", "head_dim", "mlp_ratio", "token_dim"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"ReferenceEncoderConfig.{name} must be positive; got {getattr(cfg, name)}")
    if cfg.name_dim < 0:
        raise ValueError(f"ReferenceEncoderConfig.name_dim must be >= 0 (0: no name tags); got {cfg.name_dim}")
    if cfg.width % 4:
        raise ValueError(f"ReferenceEncoderConfig.width must be a multiple of 4 (a sin and cos per axis); "
                         f"got {cfg.width}")
    if cfg.width % cfg.head_dim:
        raise ValueError(f"ReferenceEncoderConfig.width = {cfg.width} is not a multiple of head_dim = {cfg.head_dim}")


def position_embedding_2d(h: int, w: int, dim: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Fixed 2-D sinusoidal positions of an h x w grid -> (h * w, dim) float32, row-major: the
    first dim / 2 features the row's sinusoidal embedding, the rest the column's."""
    rows = sinusoidal_embedding(torch.arange(h, device=device), dim // 2)  # (h, dim/2)
    cols = sinusoidal_embedding(torch.arange(w, device=device), dim // 2)  # (w, dim/2)
    grid = torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], dim=-1)  # (h, w, dim)
    return rearrange(grid, "h w d -> (h w) d")


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + Attention(LN(x)); x + MLP(LN(x)) (GELU)."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = Attention(width, width, width, head_dim)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attention_norm(x)
        x = x + self.attention(h, h)  # (b, n, width)
        return x + self.mlp(self.mlp_norm(x))


class ReferenceEncoder(nn.Module):
    """`forward(latent, names=None) -> (tokens, mask)`: latent (b, latent_channels, h, w) -> tokens
    (b, (h / patch) * (w / patch), token_dim), mask (b, n) bool, all True.

    A strided-conv patch embedding, plus a fixed 2-D sinusoidal position embedding computed for the
    input's grid (any latent size), `depth` pre-norm transformer layers, then Linear(width,
    token_dim) and a LayerNorm: unit-scale tokens, as the text encoder's LayerNorm'd ones. With
    `name_dim`, `names` (b, name_dim), each reference's name embedding, tags its tokens:
    + Linear(name_dim, token_dim)(name) on every token, the map starting at zero (untagged at init).
    """

    def __init__(self, cfg: ReferenceEncoderConfig) -> None:
        super().__init__()
        _check_encoder_config(cfg)
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.latent_channels, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)
        self.layers = nn.ModuleList([EncoderLayer(cfg.width, cfg.head_dim, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.proj = nn.Linear(cfg.width, cfg.token_dim)
        self.norm = nn.LayerNorm(cfg.token_dim)
        self.name_proj = nn.Linear(cfg.name_dim, cfg.token_dim) if cfg.name_dim else None
        if self.name_proj is not None:
            nn.init.zeros_(self.name_proj.weight)
            nn.init.zeros_(self.name_proj.bias)

    def forward(self, latent: torch.Tensor, names: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        c, p = self.cfg.latent_channels, self.cfg.patch
        if latent.ndim != 4 or latent.shape[1] != c or latent.shape[2] % p or latent.shape[3] % p:
            raise ValueError(f"ReferenceEncoder: the latent must be (b, {c}, h, w) with h, w divisible by "
                             f"patch = {p}; got {tuple(latent.shape)}")
        x = self.patch_embed(latent)  # (b, width, h / p, w / p)
        gh, gw = x.shape[2:]
        x = rearrange(x, "b c h w -> b (h w) c")  # (b, n, width)
        x = x + position_embedding_2d(gh, gw, self.cfg.width, x.device).to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        tokens = self.norm(self.proj(x))  # (b, n, token_dim)
        if names is not None:
            if self.name_proj is None or names.shape != (latent.shape[0], self.cfg.name_dim):
                raise ValueError(f"ReferenceEncoder: names must be ({latent.shape[0]}, name_dim = {self.cfg.name_dim})"
                                 f"{' (this encoder has no name tags: name_dim 0)' if self.name_proj is None else ''}; "
                                 f"got {tuple(names.shape)}")
            tokens = tokens + self.name_proj(names.to(tokens.dtype))[:, None]
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


# ----------------------------------------------------------------------------------------------
# Named sizes
# ----------------------------------------------------------------------------------------------

REFERENCE_ENCODER_SIZES: Dict[str, ReferenceEncoderConfig] = {
    # ShapesWorld: a 16x16x4 latent -> 64 tokens of the shapes UNet's 128-wide context, 0.4M parameters.
    "shapes": ReferenceEncoderConfig(),
    # Kandinsky: a 64x64x4 latent (a 512x512 reference) -> 256 tokens of the UNet's 4096-wide
    # context, through a 1024-wide, 4-layer transformer: 55M parameters.
    "kandinsky": ReferenceEncoderConfig(patch=4, width=1024, depth=4, head_dim=64, token_dim=4096),
}


def reference_encoder_config(size: str, **overrides) -> ReferenceEncoderConfig:
    """A fresh copy of the named size `size`, with fields replaced by `overrides`."""
    return sized_config(REFERENCE_ENCODER_SIZES, size, **overrides)
