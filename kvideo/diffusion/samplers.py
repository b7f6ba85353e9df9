"""Samplers: one entry, `sample`, a pure function of a model function, a Schedule, the initial
noise and a `SamplerSpec`.

    spec = SamplerSpec("ddim", steps=50, spacing="leading", dynamic_threshold=0.995)
    x = sample(model_fn, schedule, x_T, spec, target="eps", generator=g)

`model_fn(x, t) -> prediction` takes x of shape (b, ...) and integer timesteps t of shape (b,)
and returns a prediction of `target` ("eps", "v" or "x0"); guidance and conditioning live in
the closure. `callback(i, total, t, x)` is called after step i (0-based) of `total`, with the
timestep t that was just denoised and the new sample x. Randomness comes only from `generator`:
the same generator state gives the same output (DPM-Solver++ draws none). The spec's
`dynamic_threshold` (a percentile) or `clip_x0` process each x0 prediction; `data_range` says
how far the clean data reaches in x0's units (the latent scale for scaled latents), so
thresholding acts on the data's own range.

The update formulas follow diffusers' DDPMScheduler, DDIMScheduler and
DPMSolverMultistepScheduler (dpmsolver++, midpoint, order 2, final sigma 0), with these
deliberate differences:
- every sampler steps to the *next timestep in the list* (diffusers' DDIM uses t - T // n,
  which disagrees with the list for "linspace" and for "trailing" when n does not divide T);
- DDIM re-derives eps from the processed x0 when x0 is thresholded or clipped (guided-diffusion
  behaviour; diffusers' `use_clipped_model_output=True`); without processing this is identical;
- DDPM adds no noise after the last step (diffusers adds noise of std 1e-10 when the last
  timestep is > 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .schedule import SPACINGS, Schedule, check_target

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, int, torch.Tensor], None]
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclass(frozen=True)
class SamplerSpec:
    """How to walk a schedule at inference: the sampler, its timesteps and x0 processing.

    `timestep_shift` > 1 moves the inference timesteps toward noise (`Schedule.timesteps`);
    `dynamic_threshold` is a percentile (Imagen), `threshold_max` its upper bound, `clip_x0`
    plain clipping when no threshold is set; `eta` is DDIM's noise, `variance` DDPM's."""

    sampler: str = "ddpm"  # ddpm | ddim | dpmpp_2m
    steps: int = 50
    spacing: str = "leading"
    timestep_shift: float = 1.0
    dynamic_threshold: Optional[float] = None
    threshold_max: Optional[float] = None
    clip_x0: Optional[float] = None
    eta: float = 0.0
    variance: str = "fixed_small_log"

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler '{self.sampler}'; choose from {', '.join(SAMPLERS)}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.spacing!r}; expected one of {SPACINGS}")
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; expected one of {VARIANCES}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps = {self.steps!r}: must be an integer >= 1")
        if not self.timestep_shift > 0:
            raise ValueError(f"timestep_shift = {self.timestep_shift!r}: must be > 0")
        if self.dynamic_threshold is not None and not 0 < self.dynamic_threshold <= 1:
            raise ValueError(f"dynamic_threshold = {self.dynamic_threshold!r}: must be a percentile in (0, 1], or None")
        if not self.eta >= 0:
            raise ValueError(f"eta = {self.eta!r}: must be >= 0")


# ----------------------------------------------------------------------------- helpers

def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995, max_value: float | None = None,
                      data_range: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding of a predicted x0, per sample.

    s = quantile(|x0|, percentile) over all non-batch elements, clamped to [1, max_value];
    x0 is clamped to [-s, s] and divided by s. With s = 1 this is plain clipping to [-1, 1].
    diffusers' `sample_max_value` is `max_value` (its default 1.0 reduces this to clipping;
    here the default is no upper bound, as in Imagen).

    `data_range` is the magnitude the clean data reaches in the units of x0: thresholding is done
    on x0 / data_range and scaled back. Latents multiplied by a `latent_scale` for training pass
    data_range = latent_scale, so the threshold applies to the autoencoder's own latent range
    (without it, thresholding at 1 would shrink scaled latents towards zero).
    """
    flat = x0.reshape(x0.shape[0], -1)
    work = (flat if flat.dtype in (torch.float32, torch.float64) else flat.float()) / data_range
    s = torch.quantile(work.abs(), percentile, dim=1).clamp(min=1.0, max=max_value)[:, None]
    out = torch.maximum(torch.minimum(work, s), -s) / s * data_range
    return out.to(x0.dtype).reshape(x0.shape)


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (as diffusers' randn_tensor)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


@dataclass(frozen=True)
class _Run:
    """One sampling call's fixed parts, passed to the step loops."""

    model_fn: ModelFn
    schedule: Schedule
    spec: SamplerSpec
    target: str
    data_range: float
    generator: Optional[torch.Generator]
    callback: Optional[Callback]


def _denoise(run: _Run, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Call the model at integer timestep t; return (x0, raw model output, whether x0 was processed)."""
    spec = run.spec
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    out = run.model_fn(x, t_batch)
    x0 = run.schedule.predict_x0(x, t_batch, out, run.target)
    processed = False
    if spec.dynamic_threshold is not None:
        x0, processed = dynamic_threshold(x0, spec.dynamic_threshold, spec.threshold_max, run.data_range), True
    elif spec.clip_x0 is not None:
        x0, processed = x0.clamp(-spec.clip_x0, spec.clip_x0), True
    return x0, out, processed


def plan_timesteps(schedule: Schedule, spec: SamplerSpec, target: str) -> list[int]:
    """The sampler's decreasing timesteps; a ValueError for a plan the target cannot follow."""
    check_target(target)
    ts = schedule.timesteps(spec.steps, spec.spacing, spec.timestep_shift).tolist()
    if target == "eps" and _alpha_bar(schedule, ts[0]) == 0.0:
        raise ValueError(f"{spec.steps} '{spec.spacing}' steps (timestep shift {spec.timestep_shift}) start at the "
                         f"zero-SNR timestep {ts[0]}, where an eps-prediction model cannot give x0: use 'leading' "
                         "spacing or a v-prediction model")
    return ts


def _alpha_bar(schedule: Schedule, t: int) -> float:
    """alpha_bar_t as a Python float (float64); 1.0 for t < 0, i.e. past the end of the chain."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


# ----------------------------------------------------------------------------- DDPM

def _ddpm(run: _Run, x_T: torch.Tensor) -> torch.Tensor:
    """Ancestral sampling from p(x_{t'} | x_t) = q(x_{t'} | x_t, x0 = x0_pred) along the inference timesteps.

    With t' the next inference timestep (alpha_bar = 1 past the end) and beta' = 1 - ab_t / ab_t':
      mean = sqrt(ab_t') beta' / (1 - ab_t) * x0 + sqrt(1 - beta') (1 - ab_t') / (1 - ab_t) * x_t
      variance "fixed_small" / "fixed_small_log": (1 - ab_t') / (1 - ab_t) * beta' (clamped at 1e-20;
      the two differ only in how diffusers evaluates the square root), "fixed_large": beta'.
    Noise is drawn from `generator` once per step, except after the last step.
    """
    schedule, variance = run.schedule, run.spec.variance
    ts = plan_timesteps(schedule, run.spec, run.target)
    x = x_T
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x0, _, _ = _denoise(run, x, t)
        ab_t, ab_prev = _alpha_bar(schedule, t), _alpha_bar(schedule, t_prev)
        beta = 1.0 - ab_t / ab_prev
        mean = (ab_prev ** 0.5 * beta / (1.0 - ab_t)) * x0 + ((1.0 - beta) ** 0.5 * (1.0 - ab_prev) / (1.0 - ab_t)) * x
        if t_prev >= 0:
            var = beta if variance == "fixed_large" else max((1.0 - ab_prev) / (1.0 - ab_t) * beta, 1e-20)
            x = mean + var ** 0.5 * _randn(x, run.generator)
        else:
            x = mean
        if run.callback is not None:
            run.callback(i, len(ts), t, x)
    return x


# ----------------------------------------------------------------------------- DDIM

def _ddim(run: _Run, x_T: torch.Tensor) -> torch.Tensor:
    """DDIM (Song et al. 2021): x_t' = sqrt(ab_t') x0 + sqrt(1 - ab_t' - s^2) eps + s z.

    s = eta * sqrt((1 - ab_t') / (1 - ab_t) * (1 - ab_t / ab_t')); eta = 0 is deterministic,
    eta = 1 is DDPM-like. t' is the next inference timestep (alpha_bar = 1 past the end).
    """
    schedule, eta = run.schedule, run.spec.eta
    ts = plan_timesteps(schedule, run.spec, run.target)
    x = x_T
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x0, out, processed = _denoise(run, x, t)
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = schedule.predict_eps(x, t_batch, x0, "x0") if processed else schedule.predict_eps(x, t_batch, out, run.target)
        ab_t, ab_prev = _alpha_bar(schedule, t), _alpha_bar(schedule, t_prev)
        std = eta * ((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)) ** 0.5
        x = ab_prev ** 0.5 * x0 + max(1.0 - ab_prev - std ** 2, 0.0) ** 0.5 * eps
        if eta > 0:
            x = x + std * _randn(x, run.generator)
        if run.callback is not None:
            run.callback(i, len(ts), t, x)
    return x


# ----------------------------------------------------------------------------- DPM-Solver++(2M)

def _dpmpp_2m(run: _Run, x_T: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), data-prediction multistep, midpoint form.

    With alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma), h = lambda_t' - lambda_t,
    D = x0_i + (x0_i - x0_{i-1}) / (2 r), r = h_{i-1} / h_i:
        x_t' = (sigma_t' / sigma_t) x_t - alpha_t' (exp(-h) - 1) D
    The first step is first order (no history) and so is the last, which goes to sigma = 0 and
    therefore returns the final x0 prediction (diffusers' `final_sigmas_type="zero"`, which
    implies its `lower_order_final`). A terminal alpha_bar of exactly 0 (zero-terminal-SNR) is
    replaced by 2**-24 in the solver's alpha/sigma/lambda, as diffusers does, to keep lambda
    finite; unlike diffusers, the x0 prediction there keeps the exact alpha = 0 (x0 = -v), a
    difference of order 2**-12 * |x_T|. The solver is deterministic: it draws no noise.
    """
    schedule = run.schedule
    ts = plan_timesteps(schedule, run.spec, run.target)

    def alpha_sigma_lambda(t: int) -> tuple[float, float, float]:
        ab = _alpha_bar(schedule, t)
        ab = 2.0 ** -24 if ab == 0.0 else ab
        a, s = ab ** 0.5, (1.0 - ab) ** 0.5
        return a, s, (float("inf") if s == 0.0 else float(torch.tensor(a / s, dtype=torch.float64).log()))

    x = x_T
    x0_prev, lambda_prev = None, None
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        x0, _, _ = _denoise(run, x, t)
        a_s, s_s, lam_s = alpha_sigma_lambda(t)
        a_t, s_t, lam_t = alpha_sigma_lambda(t_next)
        if t_next < 0:
            x = x0  # sigma_t' = 0: the first-order step lands exactly on the x0 prediction
        else:
            h = lam_t - lam_s
            phi = torch.expm1(torch.tensor(-h, dtype=torch.float64)).item()  # exp(-h) - 1
            if x0_prev is None:
                d = x0
            else:
                r = (lam_s - lambda_prev) / h
                d = x0 + (0.5 / r) * (x0 - x0_prev)
            x = (s_t / s_s) * x - (a_t * phi) * d
        x0_prev, lambda_prev = x0, lam_s
        if run.callback is not None:
            run.callback(i, len(ts), t, x)
    return x


SAMPLERS = {"ddpm": _ddpm, "ddim": _ddim, "dpmpp_2m": _dpmpp_2m}


def with_known(model_fn: ModelFn, schedule: Schedule, target: str, known: torch.Tensor,
               mask: torch.Tensor) -> ModelFn:
    """`model_fn` whose x0 prediction is `known` where `mask` is true (replacement sampling).

    At every step the output is rewritten, where `mask` holds, to the prediction of `target`
    that implies x0 = known at this x_t (eps = (x_t - alpha known) / sigma); elsewhere it is the
    model's own output, untouched. Every sampler then moves those elements along the noise path
    of `known` and ends on it exactly, and the model sees them at each step's noise level: a
    video sampler conditioned on a given frame keeps that frame (an anchor frame, Factorized
    Video Generation; "replacement" in Ho et al.'s video diffusion). Draws no randomness.
    `known` and `mask` broadcast against the model's x.
    """
    def known_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model_fn(x, t)
        x0 = known.to(out.dtype).expand_as(out)
        eps = schedule.predict_eps(x, t, x0, "x0")
        return torch.where(mask, schedule.target_for(x0, eps, t, target).to(out.dtype), out)

    return known_fn


@torch.no_grad()
def sample(model_fn: ModelFn, schedule: Schedule, x_T: torch.Tensor, spec: SamplerSpec, *, target: str = "eps",
           data_range: float = 1.0, generator: Optional[torch.Generator] = None,
           callback: Optional[Callback] = None) -> torch.Tensor:
    """x_0 from the noise x_T by `spec.sampler` over `spec`'s timesteps (see the module docstring)."""
    return SAMPLERS[spec.sampler](_Run(model_fn, schedule, spec, target, data_range, generator, callback), x_T)
