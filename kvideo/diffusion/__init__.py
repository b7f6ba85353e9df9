"""Gaussian diffusion math, independent of any network: schedules, the training loss, one sampler
entry (`sample` with a `SamplerSpec`), classifier-free guidance."""

from .guidance import GuidanceTerm, batched_branches, stack_branches, text_guided, text_image_guided
from .losses import LossSpec, min_snr_weight, training_loss
from .samplers import SAMPLERS, SamplerSpec, dynamic_threshold, plan_timesteps, sample, with_known
from .schedule import SCHEDULES, SPACINGS, TARGETS, Schedule, betas_for, check_target, rescale_zero_terminal_snr

__all__ = [
    "Schedule", "betas_for", "rescale_zero_terminal_snr", "check_target", "TARGETS", "SPACINGS", "SCHEDULES",
    "LossSpec", "training_loss", "min_snr_weight", "GuidanceTerm", "batched_branches", "stack_branches", "text_guided",
    "text_image_guided", "SamplerSpec", "sample", "dynamic_threshold", "plan_timesteps", "SAMPLERS",
    "with_known",
]
