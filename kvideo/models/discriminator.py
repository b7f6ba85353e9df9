"""The PatchGAN discriminator and GAN losses for training the MoVQ autoencoder.

`PatchDiscriminator` is the pix2pix / taming "NLayerDiscriminator": a stack of 4x4 convs that
scores overlapping patches, real (> 0) or fake (< 0). MoVQGAN uses n_layers = 2, ndf = 64.

Norm choice (`norm`): taming uses BatchNorm, which under DistributedDataParallel needs
SyncBatchNorm (or silently normalises with per-rank statistics), keeps running statistics that
differ between the generator and discriminator passes, and couples the samples of a batch.
The default here is GroupNorm: per sample, identical under DDP for any per-rank batch size, no
buffers. "batch" (taming's behaviour) and "none" are available as explicit options.

The losses are plain functions:
    hinge_d_loss(logits_real, logits_fake)          discriminator loss
    hinge_g_loss(logits_fake)                       generator (adversarial) loss
    adaptive_gan_weight(rec_loss, g_loss, last)     VQGAN's balance of the two gradients
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvideo.nn.layers import group_norm

NORMS = ("group", "batch", "none")

# ----------------------------------------------------------------------------------------------
# Discriminator
# ----------------------------------------------------------------------------------------------


def _norm_layer(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "group":
        return group_norm(channels, groups, eps=1e-5)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """x (b, in_channels, H, W) -> patch logits (b, 1, H', W'); with `video=True` a 3D PatchGAN,
    x (b, in_channels, f, H, W) -> (b, 1, f, H', W'), that also judges motion (3-frame kernels).

    Layers: conv4x4/2 -> LeakyReLU, then (n_layers - 1) x [conv4x4/2 -> norm -> LeakyReLU] with
    widths doubling (capped at 8 * ndf), then conv4x4/1 -> norm -> LeakyReLU, then conv4x4/1 to one
    channel. For n_layers = 2 a 256x256 input gives 62x62 logits, a 64x64 input 14x14.
    Weights start as in taming: convs N(0, 0.02), norm scales N(1, 0.02), biases 0.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 2, *, norm: str = "group",
                 norm_groups: int = 32, video: bool = False) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"PatchDiscriminator norm must be one of {NORMS}, got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"PatchDiscriminator n_layers must be >= 1, got {n_layers}")
        if video and norm == "batch":
            raise ValueError("PatchDiscriminator(video=True) supports norm 'group' or 'none'")
        use_bias = norm == "none"  # a norm's shift makes the conv bias redundant

        def conv(c_in: int, c_out: int, stride: int, bias: bool = True) -> nn.Module:
            if video:  # 3D PatchGAN: 3 frames x 4 x 4 kernels, time never strided
                return nn.Conv3d(c_in, c_out, (3, 4, 4), stride=(1, stride, stride), padding=1, bias=bias)
            return nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=1, bias=bias)

        layers = [conv(in_channels, ndf, 2), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            out = ndf * min(2**n, 8)
            layers += [conv(width, out, stride, bias=use_bias), _norm_layer(norm, out, norm_groups), nn.LeakyReLU(0.2)]
            width = out
        layers.append(conv(width, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (b, 1, H', W') or (b, 1, f, H', W')


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss of the hinge GAN: -mean D(fake)."""
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's adaptive weight ||d rec_loss / d last|| / (||d g_loss / d last|| + 1e-4).

    Both gradients are taken with respect to `last_layer` (the decoder's output conv weight,
    `MoVQ.last_layer_weight()`) with retain_graph=True, so the caller can still backpropagate
    the combined loss. Returns a detached scalar clamped to [0, max_weight]; multiply it by the
    configured GAN weight. Under DDP the weight is computed from each rank's own batch
    (`autograd.grad` does not all-reduce). Needs both losses to be attached to `last_layer`:
    in evaluation (no graph) use a fixed weight instead.
    """
    for name, loss in (("rec_loss", rec_loss), ("g_loss", g_loss)):
        if not loss.requires_grad:
            raise RuntimeError(
                f"adaptive_gan_weight: {name} has no autograd graph (evaluation or torch.no_grad?); "
                "the adaptive weight is only defined in training"
            )
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
