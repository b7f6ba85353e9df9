"""LPIPS perceptual distance (Zhang et al. 2018, VGG16 variant), loaded from one local file.

    d(x, y) = sum_l mean_hw( w_l . (n(F_l(x)) - n(F_l(y)))^2 )

F_l are VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, n() divides
each feature vector by its L2 norm over channels, and w_l >= 0 are the learned 1x1 "lin" heads.
Inputs are images in [-1, 1]; they are shifted and scaled to the statistics the official
weights expect. The network is frozen and always in eval mode; gradients still flow to the
inputs, so it serves as a training loss.

Weights come from ONE local file and nothing is ever downloaded. The file (.safetensors, or a
.pt / .pth state dict readable with `torch.load(weights_only=True)`) holds exactly:

    features.{i}.weight, features.{i}.bias   i in 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28
                                             the convs of torchvision's vgg16().features, same names
    lins.{k}.weight                          (1, C_k, 1, 1), k = 0..4, C = 64, 128, 256, 512, 512

`convert_lpips_weights(vgg_path, lin_path, out_path)` builds it from torchvision's ImageNet
VGG16 state dict (`vgg16-397923af.pth`, as saved in torch's hub cache) and the official LPIPS
lin-layer file (`vgg.pth` of the `lpips` package, keys `lin{k}.model.1.weight`; it ships inside
the `lpips` wheel under `lpips/weights/v0.1/`). Command line:

    python -m kvideo.models.lpips VGG16.pth LPIPS_VGG_LIN.pth OUT.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Union

import torch
import torchvision
from torch import nn

PathLike = Union[str, Path]

TAP_LAYERS = (3, 8, 15, 22, 29)  # indices in vgg16().features after relu1_2 ... relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
VGG_CONV_LAYERS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# Official LPIPS input normalisation, applied to images in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# ----------------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------------


def expected_shapes() -> Dict[str, tuple]:
    """Key -> shape of every tensor an LPIPS weight file must contain."""
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


def _load_tensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """A flat {key: tensor} dict from a .safetensors file or a torch state dict file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path} (LPIPS never downloads weights)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a flat state dict of tensors (got {type(state).__name__})")
    return state


def _check_keys(state: Dict[str, torch.Tensor], source: PathLike) -> None:
    """Raise KeyError / ValueError naming the missing, unexpected or mis-shaped keys."""
    shapes = expected_shapes()
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise KeyError(
            f"{source} does not have the LPIPS key layout (see kvideo.models.lpips): "
            f"{len(missing)} missing {missing[:6]}, {len(unexpected)} unexpected {unexpected[:6]}; "
            "build the file with convert_lpips_weights(vgg_path, lin_path, out_path)"
        )
    wrong = [f"{k}: {tuple(state[k].shape)} != {shapes[k]}" for k in shapes if tuple(state[k].shape) != shapes[k]]
    if wrong:
        raise ValueError(f"{source}: tensors of the wrong shape: {wrong[:6]}")


def convert_lpips_weights(vgg_path: PathLike, lin_path: PathLike, out_path: PathLike) -> Path:
    """Combine torchvision's VGG16 state dict and the official LPIPS lin file into one file.

    vgg_path: `torchvision.models.vgg16` state dict (`features.*` are kept, `classifier.*` dropped).
    lin_path: LPIPS lin heads, keys `lin{k}.model.1.weight` (the official `vgg.pth`).
    out_path: `.safetensors` -> safetensors, anything else -> `torch.save`. Returns out_path.
    """
    vgg, lin = _load_tensors(vgg_path), _load_tensors(lin_path)
    out: Dict[str, torch.Tensor] = {}
    for layer in VGG_CONV_LAYERS:
        for name in ("weight", "bias"):
            key = f"features.{layer}.{name}"
            if key not in vgg:
                raise KeyError(f"{vgg_path}: no {key}; expected a torchvision vgg16 state dict")
            out[key] = vgg[key]
    for k in range(len(TAP_CHANNELS)):
        key = f"lin{k}.model.1.weight"
        if key not in lin:
            raise KeyError(f"{lin_path}: no {key}; expected the official LPIPS vgg.pth lin layers")
        out[f"lins.{k}.weight"] = lin[key]
    _check_keys(out, out_path)
    out = {k: v.detach().contiguous().float() for k, v in out.items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(out, str(out_path))
    else:
        torch.save(out, out_path)
    return out_path


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16. forward(x, y), both (b, 3, H, W) in [-1, 1] -> distance (b,) >= 0."""

    def __init__(self, weights_path: PathLike) -> None:
        super().__init__()
        state = _load_tensors(weights_path)
        _check_keys(state, weights_path)
        if any((state[f"lins.{k}.weight"] < 0).any() for k in range(len(TAP_CHANNELS))):
            raise ValueError(f"{weights_path}: LPIPS lin weights must be non-negative (the official ones are)")
        with torch.device("meta"):  # skip initialising the 120M-parameter classifier
            vgg = torchvision.models.vgg16(weights=None)
        self.features = vgg.features[: TAP_LAYERS[-1] + 1].to_empty(device="cpu")  # layers 0..29
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAP_CHANNELS)
        self.load_state_dict(state, strict=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description="Combine VGG16 and LPIPS lin weights into one file.")
    parser.add_argument("vgg_path", help="torchvision vgg16 state dict (e.g. vgg16-397923af.pth)")
    parser.add_argument("lin_path", help="official LPIPS lin layers (lpips/weights/v0.1/vgg.pth)")
    parser.add_argument("out_path", help="output .safetensors or .pth")
    args = parser.parse_args()
    print(convert_lpips_weights(args.vgg_path, args.lin_path, args.out_path))


if __name__ == "__main__":
    main()
