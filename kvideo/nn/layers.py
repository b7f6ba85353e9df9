"""Building blocks shared by every network of kvideo.

Sections, in the order a network uses them:

1. attention        `attention(q, k, v, mask=)`: the one attention kernel of the project.
2. checkpointing    `GradCheckpointMixin`: `set_grad_checkpointing(enabled)` on every model and
                    `run_block(block, *args)` that recomputes a block in the backward pass.
3. norms and init   `group_norm`, `zero_module`.
4. resampling       `Downsample2d` (strided conv, taming's asymmetric padding) and
                    `Upsample2d` (nearest neighbour + conv).

Everything here works on CPU; the xformers kernel is an optional speed-up on CUDA only.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

try:  # optional: `pip install kvideo[xformers]`
    import xformers.ops as xformers_ops
except ImportError:  # the common case on CPU machines
    xformers_ops = None


# ----------------------------------------------------------------------------------------------
# 1. Attention
# ----------------------------------------------------------------------------------------------


def xformers_available() -> bool:
    """True when xformers imported; `attention` then uses it for unmasked CUDA tensors."""
    return xformers_ops is not None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Scaled dot-product attention, softmax(q k^T / sqrt(d)) v, for every network of kvideo.

    Args:
        q: queries (b, heads, n, d).
        k: keys (b, heads, m, d).
        v: values (b, heads, m, dv).
        mask: optional, broadcastable to (b, heads, n, m): boolean (True = may attend) or an
            additive float bias, as in `F.scaled_dot_product_attention`.

    Returns:
        (b, heads, n, dv).

    Kernel: xformers' `memory_efficient_attention` when xformers is importable, the tensors are
    on CUDA and there is no mask; otherwise PyTorch's `scaled_dot_product_attention` (which has
    its own flash / memory-efficient kernels on CUDA, masked ones included); on the CPU in
    bf16, its math kernel, which is faster there than the CPU flash kernel.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "attention expects q, k, v of shape (b, heads, n, d); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if mask is not None and mask.ndim != 4:
        raise ValueError(
            f"attention mask must be 4-d, broadcastable to (b, heads, n, m); got {tuple(mask.shape)}"
        )
    if xformers_ops is not None and q.is_cuda and mask is None:
        q, k, v = (rearrange(t, "b h n d -> b n h d") for t in (q, k, v))  # xformers layout
        out = xformers_ops.memory_efficient_attention(q, k, v)  # (b, n, heads, dv)
        return rearrange(out, "b n h d -> b h n d")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # PyTorch's CPU flash kernel is slow in bf16: forward + backward of the shapes UNet's
        # attentions took 2-6x longer than the plain math kernel (docs/BENCHMARKS.md, "attention").
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------------------------------------
# 2. Gradient checkpointing
# ----------------------------------------------------------------------------------------------


class GradCheckpointMixin:
    """Adds `set_grad_checkpointing(enabled)` and `run_block(block, *args)` to an nn.Module.

    Mix it in before nn.Module (`class Encoder(GradCheckpointMixin, nn.Module)`) and call the
    blocks worth recomputing through `self.run_block(block, x, ...)`. When checkpointing is on
    and autograd is recording, the block's activations are dropped after the forward pass and
    recomputed in the backward pass (`torch.utils.checkpoint.checkpoint`, non-reentrant, RNG
    state preserved so dropout draws the same mask twice): gradients are unchanged, memory goes
    down, compute goes up by about one forward pass.

    `set_grad_checkpointing` reaches every submodule that has the mixin, so calling it on the
    top-level model is enough. Blocks with side effects in forward (buffer updates such as a
    codebook's usage statistics) must not be run through `run_block`: they would run twice.
    """

    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Switch checkpointing on or off here and in every submodule that has the mixin."""
        if not isinstance(self, nn.Module):
            raise TypeError("GradCheckpointMixin must be mixed into an nn.Module")
        for module in self.modules():
            if isinstance(module, GradCheckpointMixin):
                module.grad_checkpointing = bool(enabled)

    def run_block(self, block: Callable[..., Any], *args: Any) -> Any:
        """`block(*args)`, recomputed in the backward pass when checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# ----------------------------------------------------------------------------------------------
# 3. Norms and initialisation
# ----------------------------------------------------------------------------------------------


def group_norm(channels: int, groups: int = 32, *, eps: float = 1e-6, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm with a clear error when `channels` is not a multiple of `groups`.

    eps 1e-6 follows the VQGAN / MoVQ autoencoders (PyTorch's default is 1e-5).
    """
    if channels % groups != 0:
        raise ValueError(
            f"group_norm: {channels} channels cannot be split into {groups} groups; "
            "choose channel widths that are multiples of the number of norm groups"
        )
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=eps, affine=affine)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it (layers that start as identity)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


# ----------------------------------------------------------------------------------------------
# 4. Resampling
# ----------------------------------------------------------------------------------------------


class Downsample2d(nn.Module):
    """Halve height and width with a 3x3 stride-2 conv.

    The input is padded by one pixel on the right and bottom only (taming / VQGAN "asymmetric
    padding"), so an even size H maps to exactly H / 2 and the receptive field matches the
    released autoencoders, whose weights assume this padding.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # (b, c, h + 1, w + 1): right and bottom only
        return self.conv(x)  # (b, c, h / 2, w / 2)


class Upsample2d(nn.Module):
    """Double height and width: nearest-neighbour upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (b, c, 2h, 2w)
        return self.conv(x)
