"""Gaussian diffusion math, independent of any network: schedules, the training loss, samplers."""

from .guidance import batched_branches, text_guided, text_image_guided
from .losses import min_snr_weight, training_loss
from .samplers import SAMPLERS, dynamic_threshold, plan_timesteps, sample_ddim, sample_ddpm, sample_dpmpp_2m
from .schedule import SCHEDULES, SPACINGS, TARGETS, Schedule, betas_for, check_target, rescale_zero_terminal_snr

__all__ = [
    "Schedule", "betas_for", "rescale_zero_terminal_snr", "check_target", "TARGETS", "SPACINGS", "SCHEDULES",
    "training_loss", "min_snr_weight", "batched_branches", "text_guided", "text_image_guided",
    "sample_ddpm", "sample_ddim", "sample_dpmpp_2m", "dynamic_threshold", "plan_timesteps", "SAMPLERS",
]
