"""Motion and temporal consistency from optical flow: the flow score and the warping error.

    raft = load_raft("raft_large_C_T_SKHT_V2-ff5fadd5.pth")   # torchvision's RAFT weights file
    flow_score(raft, frames)      # uint8 (t, h, w, 3) -> mean flow magnitude, pixels per frame
    warping_error(raft, frames)   # -> mean squared error of frame t+1 warped back onto frame t

Flow is torchvision's RAFT (large, or small when the file is a RAFT-small state dict) with 12
refinement iterations, on frames in [-1, 1] padded to a multiple of 8 (replicate padding, cropped
back). RAFT needs 128 pixels a side: smaller frames (ShapesWorld's 64) are upscaled by an integer
factor first and the flow is brought back to the frames' own pixels (block mean / factor). The flow score (EvalCrafter's) is the mean magnitude of the forward flow between
consecutive frames in pixels of the given frames. The warping error (Lai et al. 2018, as
EvalCrafter uses it) warps frame t+1 back onto frame t along the forward flow and averages the
squared RGB difference (values in [0, 1]) over the pixels that are not occluded, where the
forward-backward check of Sundaram et al. holds:
|f(x) + b(x + f(x))|^2 < 0.01 (|f(x)|^2 + |b(x + f(x))|^2) + 0.5.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

MIN_SIZE = 128  # torchvision's RAFT needs feature maps of 16 (images of 128 pixels) for its pyramid


def load_raft(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """torchvision's RAFT with the weights of `path` (raft_large or raft_small, told by the keys)."""
    from torchvision.models.optical_flow import raft_large, raft_small

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RAFT weights {str(path)!r} not found (torchvision's raft_large_C_T_SKHT_V2 "
                                f"file; pass --raft FILE)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    errors = []
    for build in (raft_large, raft_small):
        model = build(weights=None)
        try:
            model.load_state_dict(state)
            return model.eval().requires_grad_(False).to(device)
        except RuntimeError as e:
            errors.append(str(e).splitlines()[0])
    raise ValueError(f"{path}: neither RAFT-large nor RAFT-small weights ({errors[0]})")


def _to_input(frames: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int], int]:
    """uint8 (n, h, w, 3) -> (float (n, 3, H8, W8) in [-1, 1], (H, W), scale): frames smaller than
    RAFT's 128-pixel minimum are upscaled by the integer `scale` (bilinear), then replicate-padded
    to multiples of 8; (H, W) is the size before padding."""
    x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1
    scale = max(1, math.ceil(MIN_SIZE / min(x.shape[-2:])))
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    x = F.pad(x, (0, (-w) % 8, 0, (-h) % 8), mode="replicate")
    return x, (h, w), scale


@torch.no_grad()
def pair_flows(raft: torch.nn.Module, frames: np.ndarray, batch_size: int = 8,
               backward: bool = False) -> torch.Tensor:
    """Flow from each frame to the next, (t - 1, 2, h, w) in pixels (x, y); `backward=True` gives
    the flow from each next frame back to its predecessor instead."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 2:
        raise ValueError(f"flow needs uint8 frames (t >= 2, h, w, 3); got {frames.dtype} {frames.shape}")
    device = next(raft.parameters()).device
    x, (h, w), scale = _to_input(torch.from_numpy(frames))
    first, second = (x[1:], x[:-1]) if backward else (x[:-1], x[1:])
    out = []
    for i in range(0, len(first), batch_size):
        flow = raft(first[i:i + batch_size].to(device), second[i:i + batch_size].to(device))[-1][..., :h, :w]
        if scale > 1:  # back to the frames' own pixels: the mean over each scale x scale block, / scale
            flow = F.avg_pool2d(flow, scale) / scale
        out.append(flow.float().cpu())
    return torch.cat(out)


def flow_score(raft: torch.nn.Module, frames: np.ndarray) -> float:
    """Mean forward-flow magnitude over consecutive frame pairs, in pixels per frame."""
    return float(pair_flows(raft, frames).norm(dim=1).mean())


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """image (n, c, h, w) sampled at x + flow(x) (flow (n, 2, h, w) in pixels, bilinear, border)."""
    n, _, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=flow.dtype), torch.arange(w, dtype=flow.dtype), indexing="ij")
    gx = (xs + flow[:, 0]) / max(w - 1, 1) * 2 - 1
    gy = (ys + flow[:, 1]) / max(h - 1, 1) * 2 - 1
    return F.grid_sample(image, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="border", align_corners=True)


def non_occluded(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """(n, 1, h, w) bool: where the forward-backward consistency check holds (Sundaram et al.)."""
    back = warp(backward, forward)
    lhs = (forward + back).pow(2).sum(1, keepdim=True)
    rhs = 0.01 * (forward.pow(2).sum(1, keepdim=True) + back.pow(2).sum(1, keepdim=True)) + 0.5
    return lhs < rhs


def warping_error_from_flows(frames: np.ndarray, forward: torch.Tensor, backward: torch.Tensor) -> float:
    """Mean over valid pixels of || frame_t - warp(frame_t+1, forward_t) ||^2 (RGB in [0, 1])."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # (t, 3, h, w)
    warped = warp(x[1:], forward)
    mask = non_occluded(forward, backward).float()
    error = (x[:-1] - warped).pow(2).sum(1, keepdim=True) * mask
    return float(error.sum() / mask.sum().clamp_min(1))


def warping_error(raft: torch.nn.Module, frames: np.ndarray) -> float:
    """The warping error of a uint8 video (t, h, w, 3), flows by `raft`."""
    return warping_error_from_flows(frames, pair_flows(raft, frames), pair_flows(raft, frames, backward=True))
