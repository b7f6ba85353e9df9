"""The denoising training loss, independent of the network.

    loss, info = training_loss(model_fn, schedule, x0, LossSpec(target="v", weighting="min_snr"), generator=g)
    loss.mean().backward()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .schedule import Schedule, check_target, shift_noise_level


def min_snr_weight(snr: torch.Tensor, target: str, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for a model predicting `target`, float64.

    The x0-space weight min(SNR, gamma) is rewritten for the target's own MSE, using
    |x0 - x0'|^2 = |eps - eps'|^2 / SNR = |v - v'|^2 / (SNR + 1):
      x0: min(SNR, gamma);  eps: min(SNR, gamma) / SNR = min(1, gamma / SNR);
      v:  min(SNR, gamma) / (SNR + 1).
    All are finite for SNR in [0, inf] (eps at SNR 0 gives 1, the limit).
    """
    check_target(target)
    snr = snr.double()
    if target == "x0":
        return snr.clamp(max=gamma)
    if target == "eps":
        return (gamma / snr).clamp(max=1.0)  # gamma / 0 = inf -> 1
    return snr.clamp(max=gamma) / (snr + 1.0)


def draw_timesteps(n: int, num_steps: int, shift: float = 1.0, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """n training timesteps in {0, ..., num_steps - 1}: uniform for `shift` = 1; for `shift` > 1
    skewed toward high noise by u -> shift * u / (1 + (shift - 1) * u) on u ~ U(0, 1), the
    timestep shift of Esser et al. (2024), so the median t is num_steps * shift / (shift + 1).
    Where frames share their content (video), x_t gives the content away at noise levels that
    would hide a single image, and the decisions left to the conditioning (which way an object
    moves) are made only near pure noise: the shift trains more of the steps there."""
    if shift <= 0:
        raise ValueError(f"recipe.diffusion.timestep_shift must be > 0 (1 = uniform), got {shift}")
    if shift == 1.0:
        return torch.randint(0, num_steps, (n,), generator=generator, device=device)
    u = shift_noise_level(torch.rand(n, generator=generator, device=device, dtype=torch.float64), shift)
    return (u * num_steps).long().clamp(max=num_steps - 1)


@dataclass(frozen=True)
class LossSpec:
    """What the denoising loss trains: the prediction target, the weighting, the timestep shift
    (a stage fills it from its recipe.diffusion)."""

    target: str = "eps"  # eps | v | x0
    weighting: Optional[str] = None  # None | min_snr
    min_snr_gamma: float = 5.0
    timestep_shift: float = 1.0  # training timesteps skewed toward noise (draw_timesteps); 1 = uniform

    def __post_init__(self):
        check_target(self.target)
        if self.weighting not in (None, "min_snr"):
            raise ValueError(f"unknown loss weighting {self.weighting!r}; expected None or 'min_snr'")


def training_loss(model_fn: Callable[..., torch.Tensor], schedule: Schedule, x0: torch.Tensor, spec: LossSpec, *,
                  generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Per-sample denoising loss E|model(x_t, t) - target|^2 for a batch of clean x0.

    Draws t of shape (b,) (`draw_timesteps`: uniform over {0, ..., T-1} unless
    `spec.timestep_shift` > 1) and then eps ~ N(0, I) from `generator` (in that order, on the
    generator's device) unless `t` / `noise` are given; forms x_t = q_sample(x0, t, eps); calls
    `model_fn(x_t, t)`; returns (loss of shape (b,), info) where the loss is the mean squared
    error over all non-batch dims, times the weight (1, or `min_snr_weight` when
    spec.weighting="min_snr"). `mask` (broadcast against x0, true where the loss counts) restricts
    the mean to its elements (an anchor frame given as input is not a prediction); every sample
    must keep at least one. info holds t, noise, x_t, pred, target and weight (all detached).
    """
    target = spec.target
    b = x0.shape[0]
    gen_device = generator.device if generator is not None else x0.device
    if t is None:
        t = draw_timesteps(b, schedule.num_steps, spec.timestep_shift, generator, gen_device)
    t = t.to(x0.device).long()
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype)
    noise = noise.to(x0.device)

    x_t = schedule.q_sample(x0, t, noise)
    pred = model_fn(x_t, t)
    tgt = schedule.target_for(x0, noise, t, target)
    err = (pred.float() - tgt.float()).pow(2)
    if mask is None:
        mse = err.flatten(1).mean(dim=1)  # (b,)
    else:
        keep = mask.to(err.device, err.dtype).expand_as(err).flatten(1)
        count = keep.sum(dim=1)
        if bool((count == 0).any()):
            raise ValueError("training_loss: the mask leaves a sample with no element to train on")
        mse = (err.flatten(1) * keep).sum(dim=1) / count

    if spec.weighting == "min_snr":
        weight = min_snr_weight(schedule.snr(t), target, spec.min_snr_gamma).to(mse.dtype)
    else:
        weight = torch.ones_like(mse)
    loss = weight * mse
    info = {"t": t, "noise": noise, "x_t": x_t.detach(), "pred": pred.detach(), "target": tgt.detach(),
            "weight": weight.detach(), "mse": mse.detach()}
    return loss, info
