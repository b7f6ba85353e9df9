"""Discrete-time Gaussian diffusion: beta schedules, the forward process q, target conversions.

Everything here is computed in float64 and cast to the data's dtype at the last moment.
Notation (DDPM): alpha_bar_t = prod_{s<=t} (1 - beta_s), and for integer t in [0, T)

    x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps          (q_sample)
    v   = sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x0          (v-prediction)
    SNR(t) = alpha_bar_t / (1 - alpha_bar_t)

Prediction targets are named "eps", "v" and "x0" (diffusers: "epsilon", "v_prediction",
"sample"). Inference timesteps follow diffusers' DDPMScheduler / DDIMScheduler exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

TARGETS = ("eps", "v", "x0")
SPACINGS = ("leading", "trailing", "linspace")
SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")


def check_target(target: str) -> str:
    """Return `target` if it is a known prediction target, else raise."""
    if target not in TARGETS:
        raise ValueError(f"unknown prediction target {target!r}; expected one of {TARGETS}")
    return target


def shift_noise_level(u, shift: float):
    """The timestep shift of Esser et al. (2024) on a noise level u in [0, 1] (t / T):
    u -> shift * u / (1 + (shift - 1) * u). shift > 1 moves every level toward pure noise (u = 1),
    keeping 0 and 1 fixed; shift = 1 is the identity. Works on floats, arrays and tensors."""
    if shift <= 0:
        raise ValueError(f"timestep_shift must be > 0 (1 = no shift), got {shift}")
    return shift * u / (1.0 + (shift - 1.0) * u)


# ----------------------------------------------------------------------------- betas

def betas_for(name: str, num_steps: int = 1000, *, beta_start: float = 1e-4, beta_end: float = 0.02,
              max_beta: float = 0.999) -> torch.Tensor:
    """Beta schedule `name` with `num_steps` entries, float64.

    - "squaredcos_cap_v2": the cosine schedule of Nichol & Dhariwal (2021),
      alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), beta_i = 1 - alpha_bar((i+1)/N) / alpha_bar(i/N),
      capped at `max_beta`.
    - "linear": beta linear in [beta_start, beta_end] (DDPM: 1e-4 .. 0.02).
    - "scaled_linear": sqrt(beta) linear in [sqrt(beta_start), sqrt(beta_end)] (Stable Diffusion
      uses 0.00085 .. 0.012).
    """
    if name == "squaredcos_cap_v2":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                 for i in range(num_steps)]
        return torch.tensor(betas, dtype=torch.float64)
    if name == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown beta schedule {name!r}; expected one of {SCHEDULES}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that the last timestep has SNR exactly 0 (Lin et al. 2023, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged;
    betas are then recovered from the new cumulative product. Returns float64.
    """
    sqrt_ab = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab ** 2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


# ----------------------------------------------------------------------------- schedule

def _expand(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] (float64 table, t of shape (b,)) reshaped to broadcast against `like`, in like's dtype."""
    out = values.to(t.device)[t.long()].to(like.dtype)
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))


@dataclass
class Schedule:
    """A discrete noise schedule: float64 tables indexed by integer timestep t in [0, T).

    Build with `Schedule.from_name("squaredcos_cap_v2", zero_terminal_snr=True)` or from betas.
    `steps_offset` only affects "leading" inference spacing (diffusers' `steps_offset`). How a
    sampler walks the schedule (steps, spacing, timestep shift) is the sampler's
    (`kvideo.diffusion.SamplerSpec`), not the schedule's.
    """

    betas: torch.Tensor
    steps_offset: int = 0
    alphas_cumprod: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.betas = self.betas.double().cpu()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    @classmethod
    def from_name(cls, name: str = "squaredcos_cap_v2", num_steps: int = 1000, *, zero_terminal_snr: bool = False,
                  steps_offset: int = 0, **beta_kwargs) -> "Schedule":
        """The schedule `betas_for(name, num_steps, **beta_kwargs)`, optionally rescaled to zero terminal SNR."""
        betas = betas_for(name, num_steps, **beta_kwargs)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, steps_offset=steps_offset)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    def snr(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), float64; the whole table when t is None."""
        snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        return snr if t is None else snr.to(t.device)[t.long()]

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) broadcastable against `like`, in like's dtype."""
        ab = self.alphas_cumprod
        return _expand(ab.sqrt(), t, like), _expand((1.0 - ab).sqrt(), t, like)

    # --- forward process ---------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) with the given noise.

        t: integer timesteps of shape (b,), one per batch element.
        """
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise

    # --- prediction targets ------------------------------------------------------------

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0."""
        a, s = self.alpha_sigma(t, x0)
        return a * noise - s * x0

    def target_for(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, target: str) -> torch.Tensor:
        """What a model predicting `target` ("eps", "v" or "x0") should output for x_t = q_sample(x0, t, noise)."""
        check_target(target)
        if target == "eps":
            return noise
        if target == "x0":
            return x0
        return self.v_target(x0, noise, t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor, target: str) -> torch.Tensor:
        """x0 implied by the model output `out` (a prediction of `target`) at x_t.

        eps: (x_t - sigma eps) / alpha (undefined where alpha = 0, i.e. the last step of a
        zero-terminal-SNR schedule); v: alpha x_t - sigma v; x0: out.
        """
        check_target(target)
        if target == "x0":
            return out
        a, s = self.alpha_sigma(t, x_t)
        if target == "eps":
            return (x_t - s * out) / a
        return a * x_t - s * out

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor, target: str) -> torch.Tensor:
        """eps implied by the model output `out` (a prediction of `target`) at x_t.

        eps: out; v: sigma x_t + alpha v; x0: (x_t - alpha x0) / sigma.
        """
        check_target(target)
        if target == "eps":
            return out
        a, s = self.alpha_sigma(t, x_t)
        if target == "v":
            return s * x_t + a * out
        return (x_t - a * out) / s

    def predict_v(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor, target: str) -> torch.Tensor:
        """v implied by the model output `out` (a prediction of `target`) at x_t."""
        check_target(target)
        if target == "v":
            return out
        a, s = self.alpha_sigma(t, x_t)
        x0 = self.predict_x0(x_t, t, out, target)
        eps = self.predict_eps(x_t, t, out, target)
        return a * eps - s * x0

    # --- inference timesteps -----------------------------------------------------------

    def timesteps(self, num_inference_steps: int, spacing: str = "leading", shift: float = 1.0) -> torch.Tensor:
        """Decreasing integer timesteps for sampling, as diffusers' DDPM/DDIM `set_timesteps`.

        With T training steps and n inference steps:
        - "leading":  arange(n) * (T // n), reversed, + steps_offset   (T=1000, n=50: 980 ... 0)
        - "trailing": round(arange(T, 0, -T / n)) - 1                   (T=1000, n=10: 999, 899 ... 99)
        - "linspace": round(linspace(0, T - 1, n)), reversed            (T=1000, n=10: 999, 888 ... 0)

        `shift` > 1 then moves each step toward pure noise (`shift_noise_level` on (t + 1) / T),
        as SD3 samples (trailing, n=10, shift 3: 999, 963, 922 ... 249): more of the steps fall
        where the conditioning, not x_t, decides the content.
        Steps the shift makes equal are merged (only when n is near T).
        """
        T, n = self.num_steps, num_inference_steps
        if not 0 < n <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
        if spacing == "leading":
            ts = (np.arange(n) * (T // n)).round()[::-1].astype(np.int64) + self.steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
        if ts.max() >= T or ts.min() < 0:
            raise ValueError(f"timesteps {ts.tolist()} fall outside [0, {T}) (steps_offset={self.steps_offset})")
        shift_noise_level(1.0, shift)  # validates it
        if shift != 1.0:
            u = shift_noise_level((ts.astype(np.float64) + 1) / T, shift)
            ts = np.unique(np.clip(np.round(u * T) - 1, 0, T - 1).astype(np.int64))[::-1]
        return torch.from_numpy(ts.copy())
