"""kvideo.diffusion against diffusers' schedulers (a dev dependency), plus its own identities."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as their_rescale

from kvideo.diffusion import (
    LossSpec, SamplerSpec, Schedule, betas_for, dynamic_threshold, min_snr_weight, sample, training_loss, with_known,
)

SCHEDULE_KW = {
    "squaredcos_cap_v2": {},
    "linear": {"beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
}
DIFFUSERS_TARGET = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SHAPE = (2, 4, 3, 6, 6)  # (b, c, f, h, w)


def model_fn(x, t):
    """A fixed analytic 'network': nonlinear in x and dependent on t; t is (b,) or a scalar."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.1 * x * (1 + t / 1000) + 0.05 * torch.sin(3 * x)


def run_sampler(sampler, model_fn, schedule, x, *, steps, spacing="leading", target="eps", generator=None,
                callback=None, data_range=1.0, **spec):
    """`sample` with SamplerSpec(sampler, steps, spacing, **spec): the old per-sampler call shape."""
    return sample(model_fn, schedule, x, SamplerSpec(sampler, steps, spacing, **spec), target=target,
                  data_range=data_range, generator=generator, callback=callback)


def sample_ddpm(*args, **kwargs):
    return run_sampler("ddpm", *args, **kwargs)


def sample_ddim(*args, **kwargs):
    return run_sampler("ddim", *args, **kwargs)


def sample_dpmpp_2m(*args, **kwargs):
    return run_sampler("dpmpp_2m", *args, **kwargs)


def ours_and_theirs(name, zero_snr, cls, **config):
    ours = Schedule.from_name(name, zero_terminal_snr=zero_snr, steps_offset=config.get("steps_offset", 0),
                              **SCHEDULE_KW[name])
    theirs = cls(beta_schedule=name, rescale_betas_zero_snr=zero_snr, **SCHEDULE_KW[name], **config)
    return ours, theirs


def x_T(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def assert_close(a, b, tol=1e-5):
    err = (a.double() - b.double()).abs().max().item()
    scale = max(1.0, b.double().abs().max().item())
    assert err <= tol * scale, f"max abs error {err:.3g} (scale {scale:.3g})"


# ----------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("name", list(SCHEDULE_KW))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(name, zero_snr):
    """1e-6 relative against diffusers' formulas evaluated in float64; float32 rounding against its scheduler."""
    ours, theirs = ours_and_theirs(name, zero_snr, DDPMScheduler)
    a = ours.alphas_cumprod
    assert a.dtype == torch.float64
    # diffusers' betas are float32: ours must round to them
    their_betas = ours_and_theirs(name, False, DDPMScheduler)[1].betas.double()
    our_betas = betas_for(name, **SCHEDULE_KW[name])
    assert ((our_betas - their_betas).abs() / their_betas).max() < 1e-6
    # float64 reference: diffusers' linspace formulas in float64, our cosine betas (checked just above),
    # diffusers' own rescale function applied in float64
    if name == "linear":
        ref_betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    elif name == "scaled_linear":
        ref_betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    else:
        ref_betas = our_betas
    if zero_snr:
        ref_betas = their_rescale(ref_betas)
    ref = torch.cumprod(1 - ref_betas, 0)
    nz = ref > 0
    assert ((a[nz] - ref[nz]).abs() / ref[nz]).max() < 1e-6
    assert (a - ref).abs().max() < 1e-12
    # against the float32 scheduler itself (which accumulates rounding error in its cumprod)
    b = theirs.alphas_cumprod.double()
    assert (a - b).abs().max() < 1e-6 and ((a - b).abs() / b)[b > 0].max() < 1e-4
    if zero_snr:
        assert a[-1] == 0 and ours.snr()[-1] == 0 and torch.isclose(a[0], torch.cumprod(1 - our_betas, 0)[0])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 15, 50, 999])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers(spacing, steps, offset):
    for cls in (DDPMScheduler, DDIMScheduler):
        ours, theirs = ours_and_theirs("linear", False, cls, timestep_spacing=spacing, steps_offset=offset)
        theirs.set_timesteps(steps)
        assert ours.timesteps(steps, spacing).tolist() == theirs.timesteps.tolist()
    if spacing == "trailing":  # DPM-Solver uses its own leading/linspace variants; trailing is shared
        ours, theirs = ours_and_theirs("linear", False, DPMSolverMultistepScheduler, timestep_spacing=spacing)
        theirs.set_timesteps(steps)
        assert ours.timesteps(steps, spacing).tolist() == theirs.timesteps.tolist()


def test_reference_timesteps():
    s = Schedule.from_name("squaredcos_cap_v2")
    assert s.timesteps(50, "leading")[[0, -1]].tolist() == [980, 0]
    assert s.timesteps(10, "trailing").tolist() == list(range(999, 0, -100))


# ----------------------------------------------------------------------------- q and targets

def test_q_sample_statistics():
    s = Schedule.from_name("squaredcos_cap_v2")
    g = torch.Generator().manual_seed(1)
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    for t in (0, 300, 700, 999):
        tt = torch.full((n,), t)
        xt = s.q_sample(x0, tt, torch.randn(n, 1, generator=g, dtype=torch.float64))
        ab = s.alphas_cumprod[t].item()
        assert abs(xt.mean().item() - math.sqrt(ab) * 0.7) < 5e-3
        assert abs(xt.var().item() - (1 - ab)) < 1e-2
    # per-element timesteps
    x0 = torch.ones(3, 2)
    xt = s.q_sample(x0, torch.tensor([0, 500, 999]), torch.zeros(3, 2))
    assert torch.allclose(xt[:, 0], s.alphas_cumprod[[0, 500, 999]].sqrt().float())


@pytest.mark.parametrize("zero_snr", [False, True])
def test_target_conversions_invert(zero_snr):
    s = Schedule.from_name("squaredcos_cap_v2", zero_terminal_snr=zero_snr)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999 if not zero_snr else 997])
    xt = s.q_sample(x0, t, eps)
    for target in ("eps", "v", "x0"):
        out = s.target_for(x0, eps, t, target)
        assert torch.allclose(s.predict_x0(xt, t, out, target), x0, atol=1e-6)
        assert torch.allclose(s.predict_eps(xt, t, out, target), eps, atol=1e-6)
        assert torch.allclose(s.predict_v(xt, t, out, target), s.v_target(x0, eps, t), atol=1e-6)
    if zero_snr:  # at SNR 0, v recovers x0 exactly: x_T = eps, v = -x0
        tT = torch.full((6,), 999)
        xT = s.q_sample(x0, tT, eps)
        assert torch.allclose(s.predict_x0(xT, tT, s.v_target(x0, eps, tT), "v"), x0, atol=1e-12)


def test_get_velocity_matches_diffusers():
    ours, theirs = ours_and_theirs("scaled_linear", False, DDPMScheduler)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    assert_close(ours.v_target(x0, eps, t), theirs.get_velocity(x0, eps, t))
    assert_close(ours.q_sample(x0, t, eps), theirs.add_noise(x0, eps, t))


# ----------------------------------------------------------------------------- losses

@pytest.mark.parametrize("target", ["eps", "v", "x0"])
def test_min_snr_weights(target):
    for zero_snr in (False, True):
        s = Schedule.from_name("squaredcos_cap_v2", zero_terminal_snr=zero_snr)
        w = min_snr_weight(s.snr(), target, 5.0)
        assert torch.isfinite(w).all() and (w >= 0).all()
        assert torch.isfinite(w[[0, -1]]).all()
    # x0-space weight is min(SNR, gamma) whatever the target
    snr = torch.tensor([0.1, 1.0, 5.0, 50.0], dtype=torch.float64)
    factor = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[target]
    assert torch.allclose(min_snr_weight(snr, target, 5.0) * factor, snr.clamp(max=5.0))


def test_training_loss():
    s = Schedule.from_name("squaredcos_cap_v2", zero_terminal_snr=True)
    x0 = torch.randn(4, 4, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    calls = {}

    def net(x, t, cond=None):
        calls["cond"] = cond
        assert t.shape == (4,) and t.dtype == torch.long
        return torch.zeros_like(x)

    for target in ("eps", "v", "x0"):
        for weighting in (None, "min_snr"):
            spec = LossSpec(target=target, weighting=weighting)
            l1, info = training_loss(lambda x, t: net(x, t, 7), s, x0, spec, generator=torch.Generator().manual_seed(5))
            l2, _ = training_loss(lambda x, t: net(x, t, 7), s, x0, spec, generator=torch.Generator().manual_seed(5))
            assert l1.shape == (4,) and torch.isfinite(l1).all() and torch.equal(l1, l2) and calls["cond"] == 7
            expect = info["target"].pow(2).flatten(1).mean(1) * info["weight"]
            assert torch.allclose(l1, expect)
    # a perfect model has zero loss; explicit t / noise are used as given
    t = torch.tensor([0, 1, 500, 999])
    noise = torch.randn_like(x0)
    perfect = lambda x, tt: s.target_for(x0, noise, tt, "v")  # noqa: E731
    loss, info = training_loss(perfect, s, x0, LossSpec(target="v", weighting="min_snr"), t=t, noise=noise)
    assert torch.equal(info["t"], t) and loss.abs().max() < 1e-10


def test_training_loss_mask_averages_over_the_kept_elements():
    s = Schedule.from_name("squaredcos_cap_v2", zero_terminal_snr=True)
    x0 = torch.randn(3, 4, 5, 8, 8, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 1, 5, 1, 1, dtype=torch.bool)
    mask[:2, :, 0] = False  # samples 0 and 1 leave frame 0 out, sample 2 keeps it
    net = lambda x, t: 0.5 * x  # noqa: E731
    spec = LossSpec(target="v")
    loss, info = training_loss(net, s, x0, spec, generator=torch.Generator().manual_seed(5), mask=mask)
    err = (info["pred"] - info["target"]).pow(2)
    expect = torch.stack([err[0, :, 1:].mean(), err[1, :, 1:].mean(), err[2].mean()])
    assert torch.allclose(loss, expect)
    # elements outside the mask do not reach the loss: changing the prediction there changes nothing
    def louder(x, t):
        out = net(x, t).clone()
        out[:2, :, 0] += 100.0
        return out
    moved, _ = training_loss(louder, s, x0, spec, generator=torch.Generator().manual_seed(5), mask=mask)
    assert torch.equal(moved, loss)
    none = torch.zeros_like(mask)
    with pytest.raises(ValueError, match="no element"):
        training_loss(net, s, x0, spec, mask=none)


def test_timestep_shift():
    from kvideo.diffusion.losses import draw_timesteps

    # shift 1 is the uniform draw, exactly (runs without the option keep their random stream)
    assert torch.equal(draw_timesteps(64, 1000, 1.0, torch.Generator().manual_seed(3)),
                       torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))
    t = draw_timesteps(20000, 1000, 3.0, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    # median at T s / (s + 1) = 750; P(t < 500) = P(u < 1/4) for s = 3 (u = t' / (s - (s - 1) t'))
    assert abs(float(t.double().median()) - 750) < 15
    assert abs(float((t < 500).double().mean()) - 0.25) < 0.015
    with pytest.raises(ValueError, match="recipe.diffusion.timestep_shift must be > 0"):
        draw_timesteps(4, 1000, 0.0)
    s = Schedule.from_name("squaredcos_cap_v2", zero_terminal_snr=True)
    _, info = training_loss(lambda x, tt: torch.zeros_like(x), s, torch.zeros(512, 4),
                            LossSpec(target="eps", timestep_shift=3.0), generator=torch.Generator().manual_seed(1))
    assert float(info["t"].double().median()) > 650


def test_inference_timestep_shift():
    """The inference shift moves each step toward pure noise by
    u -> s u / (1 + (s - 1) u) on u = (t + 1) / T, 999 and the ordering kept; shift 1 changes nothing."""
    plain = Schedule.from_name("squaredcos_cap_v2", zero_terminal_snr=True)
    assert plain.timesteps(10, "trailing", shift=3.0).tolist() == [999, 963, 922, 874, 817, 749, 666, 561, 428, 249]
    for spacing in ("leading", "trailing", "linspace"):
        base, moved = plain.timesteps(15, spacing), plain.timesteps(15, spacing, shift=3.0)
        assert torch.equal(base, plain.timesteps(15, spacing, shift=1.0))
        assert len(moved) == 15 and bool((moved[:-1] > moved[1:]).all()) and bool((moved >= base).all())
    assert len(plain.timesteps(1000, "trailing", shift=3.0)) < 1000  # merged where the shift makes steps equal
    with pytest.raises(ValueError, match="timestep_shift must be > 0"):
        plain.timesteps(10, "trailing", shift=0.0)
    # the sampler's spec carries the shift: the plan and a sample follow it
    from kvideo.diffusion import plan_timesteps

    spec = SamplerSpec("ddim", 10, "trailing", timestep_shift=3.0)
    assert plan_timesteps(plain, spec, "v") == plain.timesteps(10, "trailing", shift=3.0).tolist()
    seen = []
    sample(model_fn, plain, x_T(), spec, target="v", callback=lambda i, n, t, x: seen.append(t))
    assert seen == plain.timesteps(10, "trailing", shift=3.0).tolist()


def test_eps_models_cannot_start_at_zero_snr():
    """Every sampler refuses a plan whose first step has SNR 0 for an eps model (x0 would be
    (x - eps) / 0): trailing spacing, or leading spacing shifted onto the last timestep."""
    from kvideo.diffusion.samplers import SAMPLERS

    zero = Schedule.from_name("squaredcos_cap_v2", zero_terminal_snr=True)
    x = torch.randn(1, 2, 4, 4)
    eps_model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    for name in SAMPLERS:
        with pytest.raises(ValueError, match="start at the zero-SNR timestep 999"):
            run_sampler(name, eps_model, zero, x, steps=4, spacing="trailing", target="eps")
        assert torch.isfinite(run_sampler(name, eps_model, zero, x, steps=4, spacing="leading", target="eps")).all()
        assert torch.isfinite(run_sampler(name, eps_model, zero, x, steps=4, spacing="trailing", target="v")).all()
    with pytest.raises(ValueError, match="timestep shift 1000.0"):
        run_sampler("ddim", eps_model, zero, x, steps=4, spacing="leading", target="eps", timestep_shift=1000.0)


# ----------------------------------------------------------------------------- thresholding

def test_dynamic_threshold_acts_on_the_data_range():
    """Latents scaled by 3 for training are thresholded in the autoencoder's own units: a scaled
    latent that lies within [-3, 3] passes unchanged (thresholding at 1 would shrink it)."""
    g = torch.Generator().manual_seed(5)
    z = (torch.rand(2, 4, 8, 8, generator=g) * 2 - 1) * 0.9  # the autoencoder's latent, within [-1, 1]
    assert torch.allclose(dynamic_threshold(3 * z, 0.995, data_range=3.0), 3 * z, atol=1e-6)
    assert dynamic_threshold(3 * z, 0.995).abs().max() <= 1 + 1e-6  # the unit range squeezes it
    x = torch.randn(2, 4, 8, 8, generator=g) * 5
    assert torch.allclose(dynamic_threshold(x, 0.995, data_range=3.0), 3 * dynamic_threshold(x / 3, 0.995), atol=1e-6)


def test_dynamic_threshold_matches_diffusers_and_spec():
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(3, 4, 2, 8, 8, generator=g) * torch.tensor([0.3, 2.0, 8.0]).view(3, 1, 1, 1, 1)
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=4.0)
    assert_close(dynamic_threshold(x0, 0.995, max_value=4.0), sched._threshold_sample(x0), 1e-6)
    y = dynamic_threshold(x0, 0.995)
    # sample 0 (|x| mostly < 1): s = 1, plain clipping; others: scaled into [-1, 1], the top 0.5% saturated
    assert torch.equal(y[0], x0[0].clamp(-1, 1))
    for i in (1, 2):
        s = torch.quantile(x0[i].abs().flatten(), 0.995)
        assert s > 1 and torch.allclose(y[i], x0[i].clamp(-s, s) / s)
        assert y[i].abs().max() <= 1 + 1e-6
        assert ((y[i].abs() > 1 - 1e-6).float().mean() - 0.005).abs() < 0.005


# ----------------------------------------------------------------------------- trajectories

def run_diffusers(sched, x, steps, target_kw, generator=None, timesteps=None, **step_kw):
    if timesteps is not None:
        sched.set_timesteps(timesteps=timesteps)
    else:
        sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(model_fn(x, t), t, x, generator=generator, **step_kw).prev_sample
    return x


def with_targets(cases):
    """(target, case) pairs; eps-prediction is undefined at SNR 0 (x0 = (x - eps) / 0), so zero-SNR cases use v only."""
    return [(target, case) for case in cases for target in ("eps", "v") if not (case[1] and target == "eps")]


@pytest.mark.parametrize("target,case", with_targets([
    ("squaredcos_cap_v2", False, "leading", 50, 1), ("scaled_linear", False, "leading", 15, 0),
    ("squaredcos_cap_v2", True, "trailing", 10, 0), ("linear", False, "trailing", 50, 0)]))
def test_ddim_trajectory_matches_diffusers(target, case):
    name, zero_snr, spacing, steps, offset = case
    ours, theirs = ours_and_theirs(name, zero_snr, DDIMScheduler, timestep_spacing=spacing, steps_offset=offset,
                                   clip_sample=False, prediction_type=DIFFUSERS_TARGET[target])
    seen = []
    a = sample_ddim(model_fn, ours, x_T(), steps=steps, spacing=spacing, target=target,
                    callback=lambda i, n, t, x: seen.append((i, n, t)))
    b = run_diffusers(theirs, x_T(), steps, target)
    assert_close(a, b)
    assert [s[2] for s in seen] == theirs.timesteps.tolist() and seen[-1][:2] == (steps - 1, steps)


@pytest.mark.parametrize("target,case", with_targets([
    ("squaredcos_cap_v2", False, "trailing", 15), ("squaredcos_cap_v2", True, "trailing", 15),
    ("scaled_linear", False, "leading", 15), ("linear", False, "linspace", 10), ("squaredcos_cap_v2", False, "leading", 50)]))
def test_dpmpp_2m_trajectory_matches_diffusers(target, case):
    name, zero_snr, spacing, steps = case
    ours, theirs = ours_and_theirs(name, zero_snr, DPMSolverMultistepScheduler, solver_order=2,
                                   algorithm_type="dpmsolver++", prediction_type=DIFFUSERS_TARGET[target])
    a = sample_dpmpp_2m(model_fn, ours, x_T(), steps=steps, spacing=spacing, target=target)
    # DPM-Solver's own "leading"/"linspace" differ from DDPM's: hand it our timesteps explicitly
    b = run_diffusers(theirs, x_T(), steps, target, timesteps=ours.timesteps(steps, spacing).tolist())
    # Zero terminal SNR: diffusers replaces alpha_bar_T = 0 by 2**-24 everywhere, so its x0 at T is
    # 2**-12 * x_T - sigma * v; ours keeps the exact x0 = -v (only the solver's lambda uses 2**-24).
    # The difference is O(2**-12 |x_T|) ~ 1e-4, hence the looser tolerance in that case only.
    assert_close(a, b, 5e-4 if zero_snr else 1e-5)


@pytest.mark.parametrize("target,case", with_targets([
    ("squaredcos_cap_v2", False, "leading", 50, None), ("scaled_linear", False, "trailing", 15, None),
    ("squaredcos_cap_v2", True, "trailing", 10, None), ("squaredcos_cap_v2", False, "leading", 10, 0.995)]))
def test_ddpm_trajectory_matches_diffusers(target, case):
    """Exact noise alignment: both draw torch.randn(shape, generator) once per step, in the same order."""
    name, zero_snr, spacing, steps, thresh = case
    ours, theirs = ours_and_theirs(name, zero_snr, DDPMScheduler, timestep_spacing=spacing, clip_sample=False,
                                   variance_type="fixed_small_log", prediction_type=DIFFUSERS_TARGET[target],
                                   thresholding=thresh is not None, dynamic_thresholding_ratio=thresh or 0.995,
                                   sample_max_value=2.0)
    a = sample_ddpm(model_fn, ours, x_T(), steps=steps, spacing=spacing, target=target, variance="fixed_small_log",
                    generator=torch.Generator().manual_seed(7), dynamic_threshold=thresh, threshold_max=2.0)
    b = run_diffusers(theirs, x_T(), steps, target, generator=torch.Generator().manual_seed(7))
    assert_close(a, b)
    c = sample_ddpm(model_fn, ours, x_T(), steps=steps, spacing=spacing, target=target,
                    generator=torch.Generator().manual_seed(7), dynamic_threshold=thresh, threshold_max=2.0)
    assert torch.equal(a, c)
    d = sample_ddpm(model_fn, ours, x_T(), steps=steps, spacing=spacing, target=target,
                    generator=torch.Generator().manual_seed(8), dynamic_threshold=thresh, threshold_max=2.0)
    assert not torch.allclose(a, d)


def test_ddim_eta_and_clipping_branches():
    s = Schedule.from_name("squaredcos_cap_v2", zero_terminal_snr=True)
    kw = dict(steps=10, spacing="trailing", target="v")
    a = sample_ddim(model_fn, s, x_T(), eta=1.0, generator=torch.Generator().manual_seed(9), **kw)
    b = sample_ddim(model_fn, s, x_T(), eta=1.0, generator=torch.Generator().manual_seed(9), **kw)
    c = sample_ddim(model_fn, s, x_T(), eta=0.0, **kw)
    assert torch.equal(a, b) and not torch.allclose(a, c) and torch.isfinite(a).all()
    # with clipping, our DDIM equals diffusers' use_clipped_model_output=True
    ours, theirs = ours_and_theirs("scaled_linear", False, DDIMScheduler, timestep_spacing="leading",
                                   clip_sample=True, clip_sample_range=0.5, prediction_type="epsilon")
    a = sample_ddim(model_fn, ours, 3 * x_T(), steps=15, spacing="leading", target="eps", clip_x0=0.5)
    b = run_diffusers(theirs, 3 * x_T(), 15, "eps", use_clipped_model_output=True)
    assert_close(a, b)
    x = sample_dpmpp_2m(model_fn, s, x_T(), dynamic_threshold=0.995, **kw)
    assert torch.isfinite(x).all() and x.abs().max() <= 1 + 1e-5  # the last step returns the thresholded x0


@pytest.mark.parametrize("spacing,steps", [("trailing", 15), ("linspace", 10)])
def test_ddim_steps_along_the_list(spacing, steps):
    """Where diffusers' DDIM steps to t - T // n instead of the next listed timestep (a known quirk: it
    disagrees with its own list for these spacings), our DDIM still equals DDIM written as first-order
    DPM-Solver++ over the same list, which diffusers computes along the list."""
    ours, theirs = ours_and_theirs("linear", False, DPMSolverMultistepScheduler, solver_order=1,
                                   algorithm_type="dpmsolver++", prediction_type="epsilon")
    a = sample_ddim(model_fn, ours, x_T(), steps=steps, spacing=spacing, target="eps")
    b = run_diffusers(theirs, x_T(), steps, "eps", timesteps=ours.timesteps(steps, spacing).tolist())
    assert_close(a, b)
    _, ddim = ours_and_theirs("linear", False, DDIMScheduler, timestep_spacing=spacing, clip_sample=False)
    assert not torch.allclose(a, run_diffusers(ddim, x_T(), steps, "eps"), atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("target,zero_snr,spacing", [("eps", False, "leading"), ("v", True, "trailing"),
                                                     ("x0", False, "leading")])
def test_with_known_holds_the_masked_frames(sampler, target, zero_snr, spacing):
    """Replacement sampling: every sampler ends exactly on the known frame; at each step the model's
    output is untouched off the mask, and on it implies x0 = known (the frame walks the known
    frame's noise path)."""
    schedule = Schedule.from_name("squaredcos_cap_v2", zero_terminal_snr=zero_snr)
    known = torch.randn(SHAPE[0], SHAPE[1], 1, *SHAPE[3:], generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 1, SHAPE[2], 1, 1, dtype=torch.bool)
    mask[:, :, 0] = True

    def mixing(x, t):  # frames see each other, as a video model's do
        return model_fn(x, t) + 0.1 * x.mean(dim=2, keepdim=True)

    wrapped = with_known(mixing, schedule, target, known, mask)
    seen = []

    def checked(x, t):
        out = wrapped(x, t)
        plain = mixing(x, t)
        assert torch.equal(out[:, :, 1:], plain[:, :, 1:])
        assert_close(schedule.predict_x0(x, t, out, target)[:, :, :1], known, tol=1e-4)
        seen.append(int(t[0]))
        return out

    out = run_sampler(sampler, checked, schedule, x_T(), steps=8, spacing=spacing, target=target,
                      generator=torch.Generator().manual_seed(1))
    assert len(seen) == 8
    assert_close(out[:, :, :1], known, tol=1e-5)
    free = run_sampler(sampler, mixing, schedule, x_T(), steps=8, spacing=spacing, target=target,
                       generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(free[:, :, :1], known, atol=1e-2)  # without it the frame is the model's
    assert not torch.allclose(out[:, :, 1:], free[:, :, 1:], atol=1e-4)  # the other frames see it
