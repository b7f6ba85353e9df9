"""The Inception v3 of the TensorFlow FID, for FID and KID on frames.

    model = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")  # pytorch-fid's weights file
    features = inception_features(model, frames)  # uint8 (n, 3, h, w) -> (n, 2048) float32

The network is torchvision's Inception v3 (1008 classes, no auxiliary head) with the four
differences of the 2015 TensorFlow graph the FID was defined on, as pytorch-fid reproduces them:
the average pools in the pooling branches of Mixed_5b-d, Mixed_6b-e and Mixed_7b leave the
zero padding out of the average, and Mixed_7c's pooling branch takes a max. The weights file is
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (published with pytorch-fid's releases),
torchvision's key layout. Preprocessing is pytorch-fid's: values in [0, 1], bilinearly resized to
299 x 299 (align_corners=False), scaled to [-1, 1]; the features are the 2048 channels of the
final average pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torchvision.models import inception as tv

FEATURES = 2048
SIZE = 299


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _tf_max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _TFPoolingBranch:
    """A torchvision Inception block whose last branch (1x1 conv of a 3x3 pool) pools as the
    TensorFlow graph did: the block's output with those channels recomputed."""

    tf_pool: Callable[[torch.Tensor], torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        pooled = self.branch_pool(type(self).tf_pool(x))
        return torch.cat([out[:, : out.shape[1] - pooled.shape[1]], pooled], 1)


class _InceptionA(_TFPoolingBranch, tv.InceptionA):
    tf_pool = staticmethod(_tf_avg_pool)


class _InceptionC(_TFPoolingBranch, tv.InceptionC):
    tf_pool = staticmethod(_tf_avg_pool)


class _InceptionE(_TFPoolingBranch, tv.InceptionE):
    tf_pool = staticmethod(_tf_avg_pool)


class _InceptionEMax(_TFPoolingBranch, tv.InceptionE):
    tf_pool = staticmethod(_tf_max_pool)


class FIDInception(tv.Inception3):
    """(n, 3, h, w) in [0, 1] -> (n, 2048) pool features: torchvision's Inception3 (its names, and
    its 1008-way `fc`, unused, so the weights file loads strictly) with the TensorFlow blocks."""

    def __init__(self) -> None:
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _InceptionA(192, 32), _InceptionA(256, 64), _InceptionA(288, 64)
        self.Mixed_6b, self.Mixed_6c = _InceptionC(768, 128), _InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _InceptionC(768, 160), _InceptionC(768, 192)
        self.Mixed_7b, self.Mixed_7c = _InceptionE(1280), _InceptionEMax(2048)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = 2 * F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False) - 1
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                      self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2,
                      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c, self.avgpool):
            x = layer(x)
        return x.flatten(1)  # (n, 2048, 1, 1) -> (n, 2048)


def load_fid_inception(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> FIDInception:
    """FIDInception with the weights of `path` (pytorch-fid's pt_inception-2015-12-05 file), in
    eval mode. A missing file or a state dict of another layout is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {str(path)!r} not found (pytorch-fid's "
                                f"pt_inception-2015-12-05-6726825d.pth; pass --inception FILE)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = FIDInception()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: not the FID Inception's state dict ({str(e).splitlines()[0]})") from e
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def inception_features(model: FIDInception, frames: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, h, w) frames -> (n, 2048) float32 features (pytorch-fid's preprocessing)."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"inception_features: frames must be uint8 (n, 3, h, w); got {frames.dtype} {tuple(frames.shape)}")
    device = next(model.parameters()).device
    return model(frames.to(device).float() / 255).float().cpu()
