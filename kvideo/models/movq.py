"""MoVQ: the image autoencoder of Kandinsky (MoVQGAN, "modulated vector-quantised GAN").

    x (b, 3, H, W) in [-1, 1]
      -> encoder -> quant_conv -> z (b, embed_dim, H/f, W/f)      continuous latent (`encode`)
      -> quantize (nearest codebook entry, straight-through) -> zq  (`quantize`, training only)
      -> post_quant_conv -> decoder, every decoder norm modulated by the latent -> x_rec

f = 2 ** (len(ch_mult) - 1), 8 for the released model. The diffusion models of the cascade work
on the continuous latent z, unscaled: Kandinsky decodes it without quantising it (its
`force_not_quantize`), so `decode(z)` accepts a continuous or a quantised latent alike, and uses
it both as the decoder input and as the condition of the spatial norms. The codebook only
matters while training the autoencoder as a VQ-GAN (`forward(x, quantize=True)`).

The encoder is the VQGAN encoder (GroupNorm + SiLU ResNet blocks, strided-conv downsampling,
attention at the lowest resolution). The decoder mirrors it with one more ResNet block per level
and replaces every GroupNorm by a `SpatialNorm`:

    SpatialNorm(h, zq) = GroupNorm(h) * conv_y(zq') + conv_b(zq'),   zq' = nearest-resize(zq)

Parameter names follow the released MoVQGAN checkpoints (`encoder.down.0.block.0.norm1.weight`,
`decoder.up.3.attn.0.norm.conv_y.weight`, `quantize.embedding.weight`, ...), so a released state
dict loads as it is once its `loss.` and `ema_` entries are dropped. The one addition, the
codebook usage buffer `quantize.usage`, is filled in when a checkpoint lacks it.

Sections: config, blocks, encoder and decoder, vector quantiser, model, named sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kvideo.nn.layers import Downsample2d, GradCheckpointMixin, Upsample2d, attention, group_norm
from kvideo.models.sizes import sized_config

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class MovqConfig:
    """Architecture and codebook of a MoVQ autoencoder. The defaults are the released 270M model."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 256  # base width; level i has ch * ch_mult[i] channels
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 2, 4])  # one entry per level
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    attn_levels: List[int] = field(default_factory=lambda: [-1])  # levels with attention; -1 = lowest resolution
    z_channels: int = 4  # encoder output channels (before quant_conv)
    embed_dim: int = 4  # latent / codebook vector size (after quant_conv)
    n_embed: int = 16384  # codebook entries
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm groups everywhere (encoder, decoder, spatial norms)
    resolution: int = 256  # nominal training resolution, for information only: any size divisible by f works
    beta: float = 0.25  # commitment weight of the VQ loss
    usage_decay: float = 0.99  # EMA decay of the per-code usage statistics
    dead_code_threshold: float = 0.05  # a code is dead below this fraction of the uniform usage share


def _check_config(cfg: MovqConfig) -> None:
    """Raise ValueError naming the field when a MovqConfig cannot build a network."""
    levels = len(cfg.ch_mult)
    if levels < 1:
        raise ValueError("MovqConfig.ch_mult needs at least one level")
    for i, mult in enumerate(cfg.ch_mult):
        if (cfg.ch * mult) % cfg.norm_groups != 0:
            raise ValueError(
                f"MovqConfig: level {i} has ch * ch_mult[{i}] = {cfg.ch * mult} channels, "
                f"not a multiple of norm_groups = {cfg.norm_groups}"
            )
    for level in cfg.attn_levels:
        if not -levels <= level < levels:
            raise ValueError(f"MovqConfig.attn_levels: {level} is not a level index of ch_mult {list(cfg.ch_mult)}")
    for name in ("num_res_blocks", "z_channels", "embed_dim", "n_embed", "in_channels", "out_channels"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"MovqConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 < cfg.usage_decay < 1.0:
        raise ValueError(f"MovqConfig.usage_decay must be in (0, 1), got {cfg.usage_decay}")
    if cfg.beta < 0 or cfg.dead_code_threshold < 0:
        raise ValueError("MovqConfig.beta and dead_code_threshold must be >= 0")


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class SpatialNorm(nn.Module):
    """GroupNorm whose scale and shift are 1x1 convs of the latent, resized to the features.

    forward(h (b, c, H, W), zq (b, embed_dim, h, w)) -> (b, c, H, W).
    """

    def __init__(self, channels: int, cond_channels: int, groups: int) -> None:
        super().__init__()
        self.norm_layer = group_norm(channels, groups)
        self.conv_y = nn.Conv2d(cond_channels, channels, kernel_size=1)
        self.conv_b = nn.Conv2d(cond_channels, channels, kernel_size=1)

    def forward(self, h: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=h.shape[-2:], mode="nearest")  # (b, embed_dim, H, W)
        return self.norm_layer(h) * self.conv_y(zq) + self.conv_b(zq)


def _make_norm(channels: int, cond_channels: Optional[int], groups: int) -> nn.Module:
    """Plain GroupNorm (encoder) or SpatialNorm conditioned on the latent (decoder)."""
    if cond_channels is None:
        return group_norm(channels, groups)
    return SpatialNorm(channels, cond_channels, groups)


def _apply_norm(norm: nn.Module, h: torch.Tensor, zq: Optional[torch.Tensor]) -> torch.Tensor:
    if isinstance(norm, SpatialNorm):
        if zq is None:
            raise ValueError("a spatially conditioned block needs the latent zq")
        return norm(h, zq)
    return norm(h)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv3x3 -> norm -> SiLU -> dropout -> conv3x3, plus a (1x1) shortcut.

    cond_channels=None gives the encoder's GroupNorm block; an int gives the decoder's block
    with SpatialNorms conditioned on a latent of that many channels.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, dropout: float, groups: int,
        cond_channels: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.norm1 = _make_norm(in_channels, cond_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _make_norm(out_channels, cond_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor, zq: Optional[torch.Tensor] = None, after_conv=None) -> torch.Tensor:
        """`after_conv(i, h) -> h` (the video decoder): applied after conv1 (i = 0) and conv2 (i = 1)."""
        h = self.conv1(F.silu(_apply_norm(self.norm1, x, zq)))  # (b, out, H, W)
        if after_conv is not None:
            h = after_conv(0, h)
        h = self.conv2(self.dropout(F.silu(_apply_norm(self.norm2, h, zq))))
        if after_conv is not None:
            h = after_conv(1, h)
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual."""

    def __init__(self, channels: int, *, groups: int, cond_channels: Optional[int] = None) -> None:
        super().__init__()
        self.norm = _make_norm(channels, cond_channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, zq: Optional[torch.Tensor] = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = _apply_norm(self.norm, x, zq)
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        h = attention(q, k, v)  # (b, 1, h*w, c)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution (`block_1`, `attn_1`, `block_2`)."""

    def __init__(self, channels: int, *, dropout: float, groups: int, cond_channels: Optional[int] = None) -> None:
        super().__init__()
        kwargs = dict(dropout=dropout, groups=groups, cond_channels=cond_channels)
        self.block_1 = ResnetBlock(channels, channels, **kwargs)
        self.attn_1 = AttnBlock(channels, groups=groups, cond_channels=cond_channels)
        self.block_2 = ResnetBlock(channels, channels, **kwargs)


class Level(nn.Module):
    """One resolution of the encoder or decoder: ResNet blocks, optionally each followed by
    attention, and an optional resampler (`downsample` in the encoder, `upsample` in the decoder)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, num_blocks: int, use_attn: bool, dropout: float,
        groups: int, cond_channels: Optional[int] = None,
    ) -> None:
        super().__init__()
        kwargs = dict(dropout=dropout, groups=groups, cond_channels=cond_channels)
        self.block = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, **kwargs) for i in range(num_blocks)]
        )
        num_attn = num_blocks if use_attn else 0  # one attention after each ResNet block, or none
        self.attn = nn.ModuleList(
            [AttnBlock(out_channels, groups=groups, cond_channels=cond_channels) for _ in range(num_attn)]
        )


# ----------------------------------------------------------------------------------------------
# Encoder and decoder
# ----------------------------------------------------------------------------------------------


def _attn_level_set(cfg: MovqConfig) -> set:
    return {level % len(cfg.ch_mult) for level in cfg.attn_levels}


class Encoder(GradCheckpointMixin, nn.Module):
    """x (b, in_channels, H, W) -> (b, z_channels, H/f, W/f). Plain GroupNorm throughout."""

    def __init__(self, cfg: MovqConfig) -> None:
        super().__init__()
        levels, attn_levels = len(cfg.ch_mult), _attn_level_set(cfg)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, width in enumerate(widths):
            level = Level(block_in, width, num_blocks=cfg.num_res_blocks, use_attn=i in attn_levels,
                          dropout=cfg.dropout, groups=cfg.norm_groups)
            if i != levels - 1:
                level.downsample = Downsample2d(width)
            self.down.append(level)
            block_in = width
        self.mid = MidBlock(block_in, dropout=cfg.dropout, groups=cfg.norm_groups)
        self.norm_out = group_norm(block_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (b, ch, H, W)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = self.run_block(block, h)
                if len(level.attn) > 0:
                    h = self.run_block(level.attn[i], h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # (b, c, H / 2, W / 2)
        h = self.run_block(self.mid.block_1, h)  # (b, c_low, H/f, W/f)
        h = self.run_block(self.mid.attn_1, h)
        h = self.run_block(self.mid.block_2, h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (b, z_channels, H/f, W/f)


class Decoder(GradCheckpointMixin, nn.Module):
    """(h (b, z_channels, h, w), zq (b, embed_dim, h, w)) -> (b, out_channels, h*f, w*f).

    Every norm is a SpatialNorm conditioned on zq. `up[i]` is level i (0 = full resolution) and
    has num_res_blocks + 1 ResNet blocks; levels run from the lowest resolution up.
    """

    def __init__(self, cfg: MovqConfig) -> None:
        super().__init__()
        levels, attn_levels = len(cfg.ch_mult), _attn_level_set(cfg)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        cond = dict(dropout=cfg.dropout, groups=cfg.norm_groups, cond_channels=cfg.embed_dim)
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = MidBlock(block_in, **cond)
        up: List[nn.Module] = []
        for i in reversed(range(levels)):  # built from the lowest resolution up
            level = Level(block_in, widths[i], num_blocks=cfg.num_res_blocks + 1, use_attn=i in attn_levels, **cond)
            if i != 0:
                level.upsample = Upsample2d(widths[i])
            up.append(level)
            block_in = widths[i]
        self.up = nn.ModuleList(up[::-1])  # indexed by level, as in the released checkpoints
        self.norm_out = SpatialNorm(block_in, cfg.embed_dim, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, h: torch.Tensor, zq: torch.Tensor, temporal=None) -> torch.Tensor:
        """`temporal` (the video decoder only): an object with `inner(name)` -> None or an
        `after_conv` hook for the ResNet block `name` ("mid.block_1", "up.2.block.0", ...) and
        `attention(name, h)` run after the attention block `name` ("mid.attn_1", "up.3.attn.1")."""
        h = self.conv_in(h)  # (b, c_low, h, w)
        h = self._resnet("mid.block_1", self.mid.block_1, h, zq, temporal)
        h = self._attention("mid.attn_1", self.mid.attn_1, h, zq, temporal)
        h = self._resnet("mid.block_2", self.mid.block_2, h, zq, temporal)
        for j in reversed(range(len(self.up))):
            level = self.up[j]
            for i, block in enumerate(level.block):
                h = self._resnet(f"up.{j}.block.{i}", block, h, zq, temporal)
                if len(level.attn) > 0:
                    h = self._attention(f"up.{j}.attn.{i}", level.attn[i], h, zq, temporal)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # (b, c, 2 * height, 2 * width)
        return self.conv_out(F.silu(self.norm_out(h, zq)))  # (b, out_channels, h*f, w*f)

    def _resnet(self, name: str, block: nn.Module, h: torch.Tensor, zq: torch.Tensor, temporal) -> torch.Tensor:
        if temporal is None:
            return self.run_block(block, h, zq)
        return self.run_block(block, h, zq, temporal.inner(name))

    def _attention(self, name: str, block: nn.Module, h: torch.Tensor, zq: torch.Tensor, temporal) -> torch.Tensor:
        h = self.run_block(block, h, zq)
        return h if temporal is None else self.run_block(temporal.attention, name, h)


# ----------------------------------------------------------------------------------------------
# Vector quantiser
# ----------------------------------------------------------------------------------------------


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with a straight-through gradient and usage statistics.

    forward(z (b, c, h, w)) -> (zq, loss, info):
        zq    z snapped to its nearest code (L2), with the gradient of the identity (b, c, h, w)
        loss  ||sg[z] - e||^2 + beta * ||z - sg[e]||^2 (codebook + commitment, means)
        info  {"indices": (b, h, w) long, "perplexity": batch perplexity, "used_codes": count}

    Usage: the persistent buffer `usage` (n_embed,) is an EMA (decay `usage_decay`) of each code's
    share of the assignments, updated by every forward pass in training mode. A code is dead
    when its share is below `dead_code_threshold / n_embed`; `restart_dead_codes` moves dead
    codes onto random encoder outputs. The module never communicates across processes: in DDP,
    call `restart_dead_codes` on rank 0 and broadcast `embedding.weight` and `usage` (DDP's
    default buffer broadcast already keeps `usage` equal to rank 0's). Reset the optimiser
    state of restarted rows if it matters to you; this method only touches the weights.
    """

    def __init__(self, n_embed: int, embed_dim: int, *, beta: float = 0.25, usage_decay: float = 0.99,
                 dead_code_threshold: float = 0.05) -> None:
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.beta, self.usage_decay, self.dead_code_threshold = beta, usage_decay, dead_code_threshold
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # as taming's VQGAN
        self.register_buffer("usage", torch.zeros(n_embed), persistent=True)

    # -- quantisation -------------------------------------------------------------------------

    @torch.no_grad()
    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Indices (n,) of the nearest codes to flat (n, embed_dim), in chunks of ~2**24 distances."""
        codes = self.embedding.weight.float()  # (n_embed, d)
        codes_sq = codes.square().sum(dim=1)  # (n_embed,)
        chunk = max(1, 2**24 // self.n_embed)
        out = []
        for part in flat.float().split(chunk):
            dist = part.square().sum(dim=1, keepdim=True) - 2 * part @ codes.t() + codes_sq  # (chunk, n_embed)
            out.append(dist.argmin(dim=1))
        return torch.cat(out)

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"VectorQuantizer expects (b, {self.embed_dim}, h, w), got {tuple(z.shape)}")
        b, _, height, width = z.shape
        z32 = z.float()
        flat = rearrange(z32, "b c h w -> (b h w) c")
        indices = self.nearest_codes(flat)  # (b*h*w,)
        zq = rearrange(self.embedding(indices), "(b h w) c -> b c h w", b=b, h=height, w=width)
        loss = F.mse_loss(zq, z32.detach()) + self.beta * F.mse_loss(z32, zq.detach())
        zq = z32 + (zq - z32).detach()  # straight-through: forward zq, gradient of identity

        counts = torch.bincount(indices, minlength=self.n_embed).float()  # (n_embed,)
        share = counts / counts.sum()
        if self.training:
            with torch.no_grad():
                self.usage.mul_(self.usage_decay).add_(share, alpha=1.0 - self.usage_decay)
        info = {
            "indices": rearrange(indices, "(b h w) -> b h w", b=b, h=height, w=width),
            "perplexity": _perplexity(share),
            "used_codes": (counts > 0).sum(),
        }
        return zq.to(z.dtype), loss, info

    def embed_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for indices (b, h, w) -> (b, embed_dim, h, w)."""
        return rearrange(self.embedding(indices), "b h w c -> b c h w")

    # -- usage statistics and dead codes ------------------------------------------------------

    def dead_mask(self) -> torch.Tensor:
        """(n_embed,) bool: codes whose EMA usage share is below dead_code_threshold / n_embed."""
        return self.usage < self.dead_code_threshold / self.n_embed

    @torch.no_grad()
    def codebook_usage(self) -> Dict[str, float]:
        """{"used_fraction": share of codes not dead, "perplexity": exp(entropy) of the EMA usage,
        "dead": number of dead codes}. Perplexity ranges from 1 (one code) to n_embed (uniform)."""
        total = self.usage.sum()
        dead = int(self.dead_mask().sum())
        perplexity = float(_perplexity(self.usage / total)) if total > 0 else 0.0
        return {"used_fraction": 1.0 - dead / self.n_embed, "perplexity": perplexity, "dead": dead}

    @torch.no_grad()
    def reset_usage(self) -> None:
        """Forget the usage statistics (every code counts as dead until used)."""
        self.usage.zero_()

    @torch.no_grad()
    def restart_dead_codes(self, z_samples: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> int:
        """Move every dead code onto a random row of z_samples (n, embed_dim); return how many.

        z_samples are encoder outputs (after quant_conv), e.g. `rearrange(model.encode(x),
        'b c h w -> (b h w) c')`. Rows are drawn without replacement when there are enough of
        them. Restarted codes get the uniform usage share 1 / n_embed, a grace period of about
        log(dead_code_threshold) / log(usage_decay) steps before they can count as dead again.
        """
        if z_samples.ndim != 2 or z_samples.shape[1] != self.embed_dim:
            raise ValueError(
                f"restart_dead_codes expects z_samples (n, {self.embed_dim}), got {tuple(z_samples.shape)}"
            )
        if z_samples.shape[0] == 0:
            raise ValueError("restart_dead_codes needs at least one sample")
        dead = self.dead_mask()
        n_dead, n_samples = int(dead.sum()), z_samples.shape[0]
        if n_dead == 0:
            return 0
        device = generator.device if generator is not None else "cpu"
        if n_samples >= n_dead:
            rows = torch.randperm(n_samples, generator=generator, device=device)[:n_dead]
        else:
            rows = torch.randint(0, n_samples, (n_dead,), generator=generator, device=device)
        weight = self.embedding.weight
        weight[dead] = z_samples[rows.to(z_samples.device)].to(device=weight.device, dtype=weight.dtype)
        self.usage[dead] = 1.0 / self.n_embed
        return n_dead

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # the nn.Module loading hook
        # Released MoVQGAN checkpoints have no usage buffer: keep the current (zero) statistics.
        state_dict.setdefault(prefix + "usage", self.usage.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _perplexity(share: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a distribution over codes (zeros contribute nothing)."""
    return torch.exp(-(share * torch.log(share.clamp_min(1e-12))).sum())


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class MoVQ(GradCheckpointMixin, nn.Module):
    """The MoVQ autoencoder. Images in and out are in [-1, 1], shaped (b, c, H, W), with H and W
    divisible by `downsample_factor`.

    encode(x) -> z                        continuous latent (b, embed_dim, H/f, W/f)
    quantize(z) -> (zq, vq_loss, info)    codebook lookup (see VectorQuantizer)
    decode(z) -> x                        from a continuous or quantised latent
    forward(x, quantize=True) -> (x_rec, vq_loss, info)   the training path
    """

    def __init__(self, cfg: MovqConfig) -> None:
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, kernel_size=1)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=cfg.beta, usage_decay=cfg.usage_decay,
                                        dead_code_threshold=cfg.dead_code_threshold)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, kernel_size=1)
        self.decoder = Decoder(cfg)

    @property
    def downsample_factor(self) -> int:
        """f: the latent is f times smaller than the image in height and width."""
        return 2 ** (len(self.cfg.ch_mult) - 1)

    def latent_shape(self, height: int, width: int) -> Tuple[int, int, int]:
        """(embed_dim, height / f, width / f) for an image of that size."""
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(f"MoVQ: image size {height}x{width} is not divisible by the downsampling factor {f}")
        return self.cfg.embed_dim, height // f, width // f

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, in_channels, H, W) in [-1, 1] -> continuous latent z (b, embed_dim, H/f, W/f)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"MoVQ.encode expects (b, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        self.latent_shape(*x.shape[-2:])  # validates the size
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (b, embed_dim, h, w), continuous or quantised -> image (b, out_channels, h*f, w*f).

        z is both the decoder input (through post_quant_conv) and the spatial-norm condition.
        """
        if z.ndim != 4 or z.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"MoVQ.decode expects (b, {self.cfg.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z), z)

    def forward(
        self, x: torch.Tensor, quantize: bool = True, decode_continuous: bool = False, scale_down: int = 1
    ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """Reconstruct x.

        quantize=False skips the codebook: vq_loss is 0 and info is empty.
        decode_continuous=True still quantises (the codebook and commitment losses train the
        codebook and pull z towards it) but decodes the continuous z, the latent the diffusion
        stages decode at inference.
        scale_down=k > 1 also decodes the continuous z downsampled k times (`downsample`) into
        info["recon_down"], for the scale-equivariance term (its target: `downsample(x, k)`).
        """
        z = self.encode(x)
        info: Dict[str, torch.Tensor] = {}
        vq_loss = z.new_zeros(())
        if quantize:
            zq, vq_loss, info = self.quantize(z)
        if scale_down > 1:
            info["recon_down"] = self.decode(downsample(z, scale_down))
        return self.decode(z if decode_continuous or not quantize else zq), vq_loss, info

    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output conv weight, for the adaptive GAN loss weight."""
        return self.decoder.conv_out.weight


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x (b, c, h, w) -> (b, c, h / factor, w / factor), bilinear with antialiasing: an image and
    its latent go through the same filter for the scale-equivariance term."""
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"recipe.scale_equivariance.factors: {factor} does not divide the {h}x{w} latent "
                         f"(and its image) into whole pixels")
    # in float32: antialiased resampling has no bf16 kernel on the CPU
    out = F.interpolate(x.float(), size=(h // factor, w // factor), mode="bilinear", antialias=True, align_corners=False)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Named sizes
# ----------------------------------------------------------------------------------------------

MOVQ_SIZES: Dict[str, MovqConfig] = {
    # The released MoVQGAN 270M (Kandinsky 2.2 / 3 image autoencoder): f = 8, 4-channel latent.
    "kandinsky": MovqConfig(),
    # A CPU-trainable model for 64x64 ShapesWorld frames: f = 4, latent 16x16x4, 1.4M parameters.
    # Widths 32/64/64 with 8 norm groups (4-8 channels per group, not GroupNorm(32)'s one).
    "shapes": MovqConfig(
        ch=32, ch_mult=[1, 2, 2], num_res_blocks=2, norm_groups=8, n_embed=1024, resolution=64,
    ),
}


def movq_config(size: str, **overrides) -> MovqConfig:
    """A fresh copy of the named size `size`, with fields replaced by `overrides`."""
    return sized_config(MOVQ_SIZES, size, **overrides)
