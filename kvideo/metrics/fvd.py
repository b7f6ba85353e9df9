"""FVD with the standard detector: StyleGAN-V's TorchScript I3D, called as StyleGAN-V calls it.

    detector = load_i3d("i3d_torchscript.pt")
    clip = take_clip(video, length=16, mode="first")      # uint8 (t, h, w, 3) -> (16, h, w, 3)
    features = i3d_features(detector, clips)             # uint8 (b, 3, 16, h, w) -> (b, 400)
    fvd(features_generated, features_reference)

The detector is the TorchScript port of the Kinetics-400 I3D of the TensorFlow FVD (published by
StyleGAN-V as `i3d_torchscript.pt`); it takes uint8 clips (b, c, t, h, w) with `rescale=True,
resize=True, return_features=True` (it rescales to [-1, 1] and resizes to 224 itself) and returns
the 400 logits before the softmax. The distance is StyleGAN-V's: float64 statistics with the
covariance divided by N (not np.cov's N - 1), `scipy.linalg.sqrtm`, the real part.

Clips: StyleGAN-V takes the first `length` consecutive frames (`mode="first"`, the default);
`mode="strided"` takes `length` frames spread evenly over the whole video instead (every
frame of a long video has a say, at a lower frame rate). Videos shorter than `length` are
refused by `take_clip`: the caller skips and reports them, as StyleGAN-V discards them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch

from kvideo.metrics.frechet import FeatureStats, frechet_distance_real

CLIP_LENGTH = 16
I3D_KWARGS = dict(rescale=True, resize=True, return_features=True)  # StyleGAN-V's compute_fvd
CLIP_MODES = ("first", "strided")


def load_i3d(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript I3D of `path` (StyleGAN-V's i3d_torchscript.pt), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D detector {str(path)!r} not found (StyleGAN-V's i3d_torchscript.pt; pass --i3d FILE)")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as e:
        raise ValueError(f"{path}: not a TorchScript module ({str(e).splitlines()[0]})") from e


def take_clip(video: np.ndarray, length: int = CLIP_LENGTH, mode: str = "first") -> np.ndarray:
    """`length` frames of a uint8 video (t, h, w, 3): the first ones, or spread evenly over it."""
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode must be one of {CLIP_MODES}; got {mode!r}")
    t = video.shape[0]
    if t < length:
        raise ValueError(f"a {t}-frame video is shorter than the {length}-frame FVD clip")
    if mode == "first":
        return video[:length]
    return video[np.linspace(0, t - 1, length).round().astype(int)]


@torch.no_grad()
def i3d_features(detector: torch.nn.Module, clips: torch.Tensor) -> torch.Tensor:
    """uint8 clips (b, 3, t, h, w) -> (b, 400) float32 detector features."""
    if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[1] != 3:
        raise ValueError(f"i3d_features: clips must be uint8 (b, 3, t, h, w); got {clips.dtype} {tuple(clips.shape)}")
    device = next(detector.parameters()).device
    return detector(clips.to(device), **I3D_KWARGS).float().cpu()


def fvd(features_a, features_b) -> float:
    """StyleGAN-V's Fréchet distance between two sets of detector features (n, d)."""
    stats = []
    for features in (features_a, features_b):
        s = FeatureStats()
        s.append(np.asarray(features))
        stats.append(s.mean_cov(ddof=0))
    (mu_a, sigma_a), (mu_b, sigma_b) = stats
    return frechet_distance_real(mu_a, sigma_a, mu_b, sigma_b)
