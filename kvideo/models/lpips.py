"""LPIPS perceptual distance (Zhang et al. 2018, VGG16 variant): the network.

    d(x, y) = sum_l mean_hw( w_l . (n(F_l(x)) - n(F_l(y)))^2 )

F_l are VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, n() divides
each feature vector by its L2 norm over channels, and w_l >= 0 are the learned 1x1 "lin" heads.
Inputs are images in [-1, 1]; they are shifted and scaled to the statistics the official
weights expect. The network is frozen and always in eval mode; gradients still flow to the
inputs, so it serves as a training loss.

`LPIPS()` reads no file and its weights are uninitialised: `kvideo.weights.load_lpips(path)`
builds it from one local file (nothing is ever downloaded) and `kvideo.weights.convert_lpips_weights`
writes that file from the official sources. Its state dict (`expected_shapes()`) is:

    features.{i}.weight, features.{i}.bias   i in 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28
                                             the convs of torchvision's vgg16().features, same names
    lins.{k}.weight                          (1, C_k, 1, 1), k = 0..4, C = 64, 128, 256, 512, 512
"""

from __future__ import annotations

from typing import Dict

import torch
import torchvision
from torch import nn

TAP_LAYERS = (3, 8, 15, 22, 29)  # indices in vgg16().features after relu1_2 ... relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
VGG_CONV_LAYERS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# Official LPIPS input normalisation, applied to images in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def expected_shapes() -> Dict[str, tuple]:
    """Key -> shape of every tensor of the LPIPS state dict (and so of an LPIPS weight file)."""
    shapes: Dict[str, tuple] = {}
    in_ch = 3
    widths = iter([64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512])
    for layer in VGG_CONV_LAYERS:
        out_ch = next(widths)
        shapes[f"features.{layer}.weight"] = (out_ch, in_ch, 3, 3)
        shapes[f"features.{layer}.bias"] = (out_ch,)
        in_ch = out_ch
    for k, channels in enumerate(TAP_CHANNELS):
        shapes[f"lins.{k}.weight"] = (1, channels, 1, 1)
    return shapes


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16. forward(x, y), both (b, 3, H, W) in [-1, 1] -> distance (b,) >= 0.

    Built with uninitialised weights; `kvideo.weights.load_lpips` loads them."""

    def __init__(self) -> None:
        super().__init__()
        with torch.device("meta"):  # skip initialising the 120M-parameter classifier
            vgg = torchvision.models.vgg16(weights=None)
        self.features = vgg.features[: TAP_LAYERS[-1] + 1].to_empty(device="cpu")  # layers 0..29
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        """LPIPS stays in eval mode whatever the caller asks."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (b, 3, H, W) images; got {tuple(x.shape)} and {tuple(y.shape)}")
        batch = x.shape[0]
        h = (torch.cat([x, y]) - self.shift) / self.scale  # (2b, 3, H, W): one VGG pass for both
        distance = x.new_zeros(batch)
        taps = iter(zip(TAP_LAYERS, self.lins))
        tap, lin = next(taps)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == tap:
                feat = h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit norm over channels
                fx, fy = feat.chunk(2)  # (b, c_l, h_l, w_l) each
                distance = distance + lin((fx - fy).square()).mean(dim=(1, 2, 3))  # (b,)
                tap, lin = next(taps, (None, None))
        return distance
