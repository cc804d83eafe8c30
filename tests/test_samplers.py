"""Our samplers against diffusers' schedulers, number for number, on full sampling loops.

Each test builds a diffusers scheduler (DDPMScheduler, DDIMScheduler,
DPMSolverMultistepScheduler) and our sampler from the same config dict, runs
both full loops with the same deterministic fake network and, where the
sampler is stochastic, the same generator seed, and asks for max |Δ| < 1e-5.

diffusers computes its schedule in float32, ours is float64, so their raw
outputs differ at ~1e-6 relative (test_math.py checks the schedules against
each other at that level). To compare the *sampler* math at 1e-5, the
diffusers scheduler's betas / alphas / alphas_cumprod (and, for DPM-Solver,
alpha_t / sigma_t / lambda_t and, after set_timesteps, sigmas) are replaced by
float64 values from our `NoiseSchedule` of the same config before its loop
runs (`use_float64`). Everything else -- timesteps, step rules, noise draws --
is diffusers' own. (DPMSolverMultistepScheduler.step still rounds x_t to
float32 before its update; with O(1) samples that costs ~1e-7, well inside 1e-5.)
"""
import math

import numpy as np
import pytest
from conftest import diffusers_scheduler_of
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
)

from latent_diffusion.diffusion.samplers import SAMPLER_NAMES, SIGMA_SCHEDULE_SAMPLERS, Denoiser, Prediction, get_sampler
from latent_diffusion.diffusion.samplers.sigmas import clamp_zero_snr
from latent_diffusion.diffusion.schedules import NoiseSchedule

# diffusers' DPM set_timesteps calls np.array on our float64 tensor; harmless
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

THEIRS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
VP_NAMES = tuple(THEIRS)  # the samplers the VP loop below runs; the σ-schedule samplers have their own section
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
          set_alpha_to_one=False, steps_offset=1)
BETAS = {
    "linear": dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}
SHAPE = (2, 3, 4, 4)
TOL = 1e-5


def fake_model_for(schedule, mu=0.3, s=0.5):
    """A deterministic stand-in for the UNet: the exact denoiser for data x_0 ~ N(μ, s²), plus a smooth
    non-linear error, emitted as ε, v or x_0 per `schedule.prediction_type`.

    E[x_0 | x_t] = μ + α s² (x_t − α μ) / (α² s² + σ²) with α = √ᾱ_t, σ = √(1 − ᾱ_t): like a trained
    network its x̂_0 stays bounded, so final samples are O(1) for every schedule and prediction type.
    """
    alphas_cumprod = schedule.alphas_cumprod

    def model_fn(x, t):
        return fake_prediction(x, float(t), alphas_cumprod[int(t)].item(), schedule.prediction_type, mu, s)

    return model_fn


def fake_prediction(x, t: float, ab: float, prediction_type: str, mu: float, s: float):
    """fake_model_for's output at timestep t with ᾱ_t = ab."""
    alpha, sigma = math.sqrt(ab), math.sqrt(1.0 - ab)
    x0 = mu + alpha * s**2 * (x - alpha * mu) / (alpha**2 * s**2 + sigma**2)
    x0 = x0 + 0.2 * torch.tanh(x) * math.cos(t / 350) + 0.05 * math.sin(t / 90)  # (B, C, H, W)
    eps = (x - alpha * x0) / sigma
    outputs = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}
    return outputs[prediction_type]


def x_T(dtype=torch.float64, seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def use_float64(scheduler, schedule):
    """Swap diffusers' float32 schedule tensors for float64 ones from the same config (before set_timesteps)."""
    alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.betas = schedule.betas.clone()
    scheduler.alphas = 1.0 - scheduler.betas
    if isinstance(scheduler, DDIMScheduler):
        final = 1.0 if scheduler.config.set_alpha_to_one else alphas_cumprod[0].item()
        scheduler.final_alpha_cumprod = torch.tensor(final, dtype=torch.float64)
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        if scheduler.config.rescale_betas_zero_snr:
            alphas_cumprod[-1] = 2**-24  # as diffusers does
        scheduler.alpha_t = alphas_cumprod.sqrt()
        scheduler.sigma_t = (1 - alphas_cumprod).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
        scheduler.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    scheduler.alphas_cumprod = alphas_cumprod


def use_float64_sigmas(scheduler):
    """DPM-Solver: set_timesteps cast its sigmas to float32; recompute them in float64 at its timesteps."""
    ab = scheduler.alphas_cumprod
    last = 0.0 if scheduler.config.final_sigmas_type == "zero" else ((1 - ab[0]) / ab[0]).sqrt().item()
    sigmas = ((1 - ab[scheduler.timesteps]) / ab[scheduler.timesteps]).sqrt()
    scheduler.sigmas = torch.cat([sigmas, torch.tensor([last], dtype=torch.float64)])


def run_theirs(name, config, steps, x, seed=None, eta=None, intervene=None):
    """diffusers' loop: set_timesteps, then step() per timestep; `intervene(i, x)` may replace x after step i."""
    schedule = NoiseSchedule.from_config(config)
    scheduler = THEIRS[name].from_config(config)
    use_float64(scheduler, schedule)
    scheduler.set_timesteps(steps)
    if name == "dpm++":
        use_float64_sigmas(scheduler)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    kwargs = {} if eta is None else {"eta": eta}
    fake_model = fake_model_for(schedule)
    x = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(fake_model(x, t), t, x, generator=generator, **kwargs).prev_sample
        if intervene is not None:
            x = intervene(i, x)
    return scheduler.timesteps, x


def run_ours(name, config, steps, x, seed=None, callback=None, **overrides):
    schedule = NoiseSchedule.from_config(config)
    sampler = get_sampler(name, schedule, **overrides)
    timesteps = sampler.timesteps(steps)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    denoiser = Denoiser(fake_model_for(schedule), schedule)
    return timesteps, sampler(denoiser, x, timesteps, generator=generator, callback=callback)


def assert_matches(name, config, steps, seed=0, eta=None):
    overrides = {} if eta is None else {"eta": eta}
    ts_theirs, theirs = run_theirs(name, config, steps, x_T(), seed=seed, eta=eta)
    ts_ours, ours = run_ours(name, config, steps, x_T(), seed=seed, **overrides)
    assert torch.equal(ts_ours, ts_theirs)
    assert torch.isfinite(theirs).all()
    err = (ours - theirs).abs().max().item()
    assert err < TOL, f"{name} {config} steps={steps}: max |diff| {err:.3g}"


# ----- full loops against diffusers ---------------------------------------------------------------------------

CASES = [
    (name, eta)
    for name in VP_NAMES
    for eta in ((None,) if name != "ddim" else (0.0, 0.6))
]


@pytest.mark.parametrize("name,eta", CASES)
@pytest.mark.parametrize("betas", list(BETAS))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loop_matches_diffusers(name, eta, betas, spacing, prediction_type):
    config = {**SD, **BETAS[betas], "prediction_type": prediction_type, "timestep_spacing": spacing}
    for steps in (1, 4, 10, 20):  # < 15 and >= 15 for DPM++'s lower_order_final
        assert_matches(name, config, steps, eta=eta)


# ε-prediction cannot give x̂_0 at ᾱ_T = 0 (nor can diffusers); only DPM-Solver++, at ᾱ_T = 2⁻²⁴, runs it
ZERO_SNR_CASES = [(name, eta, "v_prediction") for name, eta in CASES] + [("dpm++", None, "epsilon")]


@pytest.mark.parametrize("name,eta,prediction_type", ZERO_SNR_CASES)
def test_zero_terminal_snr_trailing(name, eta, prediction_type):
    """rescale_betas_zero_snr: ᾱ_T = 0 (DDPM, DDIM) or 2⁻²⁴ (DPM-Solver++), with trailing spacing as recommended."""
    config = {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": prediction_type}
    for steps in (3, 10, 25):
        assert_matches(name, config, steps, eta=eta)


@pytest.mark.parametrize("name", VP_NAMES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusers_default_settings(name, prediction_type):
    """A config with only the betas: each sampler takes its diffusers class's defaults (clip_sample=True, ...)."""
    config = {**BETAS["linear"], "prediction_type": prediction_type}
    for steps in (5, 16):
        assert_matches(name, config, steps)


@pytest.mark.parametrize("extra", [
    dict(variance_type="fixed_large"),
    dict(variance_type="fixed_small_log"),
    dict(clip_sample=True, clip_sample_range=0.5),
    dict(timestep_spacing="leading", steps_offset=0),
])
def test_ddpm_settings(extra):
    for steps in (7, 30):
        assert_matches("ddpm", {**SD, **extra}, steps)


@pytest.mark.parametrize("extra", [dict(set_alpha_to_one=True), dict(clip_sample=True, clip_sample_range=1.5)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_settings(extra, eta):
    for steps in (7, 30):
        assert_matches("ddim", {**SD, **extra}, steps, eta=eta)


@pytest.mark.parametrize("extra", [
    dict(solver_order=1),
    dict(solver_order=3),
    dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(solver_type="heun"),
    dict(lower_order_final=False),
    dict(euler_at_final=True, final_sigmas_type="sigma_min"),
    dict(final_sigmas_type="sigma_min"),
    dict(final_sigmas_type="sigma_min", lower_order_final=False),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    dict(algorithm_type="deis", solver_type="logrho", final_sigmas_type="sigma_min"),  # a DEIS config
])
def test_dpm_solver_settings(extra):
    for steps in (5, 12, 20):
        assert_matches("dpm++", {**SD, "timestep_spacing": "linspace", **extra}, steps)


# ----- timesteps ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VP_NAMES)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_match_diffusers(name, spacing, steps_offset):
    config = {**SD, "timestep_spacing": spacing, "steps_offset": steps_offset}
    sampler = get_sampler(name, NoiseSchedule.from_config(config))
    scheduler = THEIRS[name].from_config(config)
    for steps in (1, 2, 3, 7, 10, 15, 25, 50, 100, 333, 999):
        scheduler.set_timesteps(steps)
        ours = sampler.timesteps(steps)
        assert ours.dtype == torch.long and ours.ndim == 1
        assert torch.equal(ours, scheduler.timesteps), (steps, ours, scheduler.timesteps)


def test_timesteps_default_spacing_per_sampler():
    """Without timestep_spacing in the config, each sampler takes its diffusers class's default."""
    config = dict(SD)
    for name in VP_NAMES:
        scheduler = THEIRS[name].from_config(config)
        scheduler.set_timesteps(10)
        assert torch.equal(get_sampler(name, NoiseSchedule.from_config(config)).timesteps(10), scheduler.timesteps)


def test_trailing_keeps_n_steps_where_numpy_adds_one():
    """For n = 61 numpy's float arange yields n + 1 points, so diffusers returns a trailing −1; we keep n."""
    config = {**SD, "timestep_spacing": "trailing"}
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(61)
    ours = get_sampler("ddim", NoiseSchedule.from_config(config)).timesteps(61)
    assert len(ours) == 61 and ours.min() >= 0
    assert torch.equal(ours, scheduler.timesteps[:61])


# ----- the call: callback, generators, dtypes, re-entrancy ------------------------------------------------------

@pytest.mark.parametrize("name,eta", CASES)
def test_callback_called_and_can_replace_x(name, eta):
    config = {**SD, "timestep_spacing": "trailing"}
    overrides = {} if eta is None else {"eta": eta}
    calls = []

    def halve_at_two(i, x):
        return x * 0.5 if i == 2 else x

    def callback(i, t, x):
        calls.append((i, int(t), x.shape))
        return halve_at_two(i, x) if i == 2 else None

    timesteps, theirs = run_theirs(name, config, 8, x_T(), seed=3, eta=eta, intervene=halve_at_two)
    _, ours = run_ours(name, config, 8, x_T(), seed=3, callback=callback, **overrides)
    assert calls == [(i, int(t), SHAPE) for i, t in enumerate(timesteps)]
    assert (ours - theirs).abs().max() < TOL


@pytest.mark.parametrize("name,eta", [("ddpm", None), ("ddim", 0.8)])
def test_list_of_generators_seeds_each_item(name, eta):
    """One generator per batch item: each item is what a batch of one with that seed gives, as in diffusers."""
    config = {**SD, "timestep_spacing": "trailing"}
    schedule = NoiseSchedule.from_config(config)
    sampler = get_sampler(name, schedule, **({} if eta is None else {"eta": eta}))
    timesteps, denoiser, x = sampler.timesteps(6), Denoiser(fake_model_for(schedule), schedule), x_T()
    batch = sampler(denoiser, x, timesteps, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    for b, seed in enumerate((5, 6)):
        single = sampler(denoiser, x[b : b + 1], timesteps, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(batch[b : b + 1], single)
    scheduler = THEIRS[name].from_config(config)
    use_float64(scheduler, schedule)
    scheduler.set_timesteps(6)
    generators, theirs = [torch.Generator().manual_seed(s) for s in (5, 6)], x.clone()
    fake_model, kwargs = fake_model_for(schedule), {} if eta is None else {"eta": eta}
    for t in scheduler.timesteps:
        theirs = scheduler.step(fake_model(theirs, t), t, theirs, generator=generators, **kwargs).prev_sample
    assert (batch - theirs).abs().max() < TOL


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_reentrant_and_inputs_untouched(name):
    schedule = NoiseSchedule.from_config(SD)
    sampler = get_sampler(name, schedule, **({"eta": 0.5} if name == "ddim" else {}))
    before = repr(sampler)
    x, timesteps = x_T(), sampler.timesteps(5)
    x_copy, ts_copy = x.clone(), timesteps.clone()
    denoiser = Denoiser(fake_model_for(schedule), schedule)
    run = lambda: sampler(denoiser, x, timesteps, generator=torch.Generator().manual_seed(1))  # noqa: E731
    first, second = run(), run()
    assert torch.equal(first, second)
    assert torch.equal(x, x_copy) and torch.equal(timesteps, ts_copy) and repr(sampler) == before


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_float32_in_float32_out(name):
    schedule = NoiseSchedule.from_config(SD)
    sampler = get_sampler(name, schedule)
    timesteps, denoiser = sampler.timesteps(10), Denoiser(fake_model_for(schedule), schedule)
    out32 = sampler(denoiser, x_T(torch.float32), timesteps, generator=torch.Generator().manual_seed(0))
    out64 = sampler(denoiser, x_T(torch.float32).double(), timesteps, generator=torch.Generator().manual_seed(0))
    assert out32.dtype == torch.float32
    # the float32 run draws float32 noise from the same seed, so compare the deterministic samplers only
    # (and dpm++_sde, which draws float32 noise in both, as diffusers)
    if name not in ("ddpm", "euler_a", "lcm", "tcd"):  # lcm and tcd (γ = 0.3) draw noise too
        assert (out32.double() - out64).abs().max() < 1e-4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_gives_consistent_eps_and_x0(prediction_type):
    schedule = NoiseSchedule.from_config({**SD, "prediction_type": prediction_type})
    x, t = x_T(), torch.tensor(500)
    pred = Denoiser(fake_model_for(schedule), schedule)(x, t)
    assert isinstance(pred, Prediction)
    ab = schedule.alphas_cumprod[500]
    assert torch.allclose(ab.sqrt() * pred.x0 + (1 - ab).sqrt() * pred.eps, x)  # x_t = √ᾱ x_0 + √(1−ᾱ) ε
    same = Denoiser(fake_model_for(schedule), schedule)(x, t, alpha_bar=ab.reshape(1, 1, 1, 1))
    assert torch.equal(same.x0, pred.x0)


# ----- errors ---------------------------------------------------------------------------------------------------

def test_unknown_sampler_names_the_argument():
    with pytest.raises(ValueError, match="sampler.*ddpm.*ddim.*dpm\\+\\+"):
        get_sampler("lms", NoiseSchedule.from_config(SD))  # "euler" exists since issue 15


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_bad_num_inference_steps(name, steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        get_sampler(name, NoiseSchedule.from_config(SD)).timesteps(steps)


@pytest.mark.parametrize("name,config", [
    ("ddpm", dict(thresholding=True)),
    ("ddim", dict(thresholding=True)),
    ("dpm++", dict(thresholding=True)),
    ("ddpm", dict(variance_type="learned_range")),
    ("dpm++", dict(use_beta_sigmas=True)),  # karras and exponential σ are supported since issue 15
    ("dpm++", dict(algorithm_type="sde-dpmsolver++")),
    ("dpm++", dict(algorithm_type="dpmsolver")),
    ("dpm++", dict(solver_order=4)),
    ("dpm++", dict(final_sigmas_type="sigma_max")),
    ("ddim", dict(timestep_spacing="karras")),
])
def test_unsupported_config_is_a_clear_error(name, config):
    key = next(iter(config))
    with pytest.raises(ValueError, match=key):
        get_sampler(name, NoiseSchedule.from_config({**SD, **config}))


def test_bad_overrides_and_timesteps():
    schedule = NoiseSchedule.from_config(SD)
    with pytest.raises(ValueError, match="eta"):
        get_sampler("ddpm", schedule, eta=0.5)  # DDPM has no eta
    with pytest.raises(ValueError, match="eta"):
        get_sampler("ddim", schedule, eta=-1.0)
    sampler = get_sampler("ddim", schedule)
    with pytest.raises(ValueError, match="timesteps"):
        sampler(Denoiser(fake_model_for(schedule), schedule), x_T(), torch.tensor([1000, 500]))
    dpm = get_sampler("dpm++", schedule, timestep_spacing="leading")
    with pytest.raises(ValueError, match="num_inference_steps"):
        dpm.timesteps(1000)  # ⌊1000/1001⌋ = 0: every timestep would be the same
    with pytest.raises(ValueError, match="strictly decreasing"):
        dpm(Denoiser(fake_model_for(schedule), schedule), x_T(), torch.tensor([500, 500, 1]))


# ===== the σ-schedule samplers: Euler, Euler a, Heun, DPM++ SDE, UniPC, and DPM++ with Karras/exponential σ =====
#
# diffusers' Euler family works on x_VE = x_VP/√ᾱ with scale_model_input and init_noise_sigma; our samplers take
# and return VP latents, so each loop below is diffusers' pipeline loop (init_noise_sigma, scale_model_input,
# step) against ours (start_from_noise, __call__). diffusers keeps its σ in float32 (Euler also its arithmetic),
# so these compare at SIGMA_TOL; its ᾱ are replaced by our float64 ones before set_timesteps, as above.

NEW_NAMES = ("euler", "euler_a", "heun", "dpm++_sde", "unipc")
SIGMA_FLAGS = {"default": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
SIGMA_TOL = 2e-5


def continuous_fake_model_for(schedule, mu=0.3, s=0.5):
    """fake_model_for at fractional timesteps too (Euler's linspace and Karras plans): ᾱ interpolated linearly in t."""
    alphas_cumprod = clamp_zero_snr(schedule.alphas_cumprod)
    grid = torch.arange(len(alphas_cumprod), dtype=torch.float64)

    def model_fn(x, t):
        t = float(t)
        ab = float(np.interp(t, grid.numpy(), alphas_cumprod.numpy()))
        return fake_prediction(x, t, ab, schedule.prediction_type, mu, s)

    return model_fn


def their_sigma_scheduler(name, config, sigma_schedule):
    cls, kwargs = diffusers_scheduler_of(name)
    scheduler = cls.from_config(config, **kwargs, **SIGMA_FLAGS[sigma_schedule])
    schedule = NoiseSchedule.from_config(config)
    scheduler.betas = schedule.betas.clone()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = clamp_zero_snr(schedule.alphas_cumprod)  # float64; 2⁻²⁴ for ᾱ_T = 0, as diffusers
    return scheduler, schedule


def use_float64_plan_sigmas(scheduler, name, schedule, steps, sigma_schedule):
    """Their σ in float64: checked against ours to float32 precision first, then ours in their layout."""
    sampler = get_sampler(name, schedule, sigma_schedule=sigma_schedule)
    sigmas = torch.from_numpy(sampler.plan_sigmas(sampler.timesteps(steps)))
    if name == "heun":
        sigmas = torch.cat([sigmas[:1], sigmas[1:].repeat_interleave(2)])
    theirs = scheduler.sigmas.double()
    assert torch.allclose(theirs[:-1], sigmas, rtol=1e-6, atol=0)
    scheduler.sigmas = torch.cat([sigmas, theirs[-1:]])


def run_theirs_sigma(name, config, steps, x, seed=0, sigma_schedule="default", begin=None, z0=None, intervene=None,
                     float64_sigmas=False):
    """diffusers' loop as its pipelines run it; with `begin` = k, img2img's: timesteps[k·order:], set_begin_index, add_noise."""
    scheduler, schedule = their_sigma_scheduler(name, config, sigma_schedule)
    scheduler.set_timesteps(steps)
    if float64_sigmas:
        use_float64_plan_sigmas(scheduler, name, schedule, steps, sigma_schedule)
    generator = torch.Generator().manual_seed(seed)
    model = continuous_fake_model_for(schedule)
    timesteps = scheduler.timesteps
    if begin is None:
        x = x.clone() * scheduler.init_noise_sigma
    else:
        start = begin * scheduler.order
        timesteps = timesteps[start:]
        scheduler.set_begin_index(start)
        x = scheduler.add_noise(z0, x.clone(), timesteps[:1])
    for i, t in enumerate(timesteps):
        step_kwargs = {} if name in ("heun", "unipc", "dpm++") else {"generator": generator}
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
        if intervene is not None:
            x = intervene(i, x)
    return scheduler.timesteps, x


def run_ours_sigma(name, config, steps, x, seed=0, sigma_schedule="default", begin=None, z0=None, callback=None):
    schedule = NoiseSchedule.from_config(config)
    sampler = get_sampler(name, schedule, sigma_schedule=sigma_schedule)
    timesteps = sampler.timesteps(steps)
    if begin is None:
        x = sampler.start_from_noise(x, timesteps)
    else:
        timesteps = timesteps[begin:]
        x = sampler.add_noise(z0, x, timesteps)
    denoiser = Denoiser(continuous_fake_model_for(schedule), schedule)
    out = sampler(denoiser, x, timesteps, generator=torch.Generator().manual_seed(seed), callback=callback)
    return sampler, out


def assert_sigma_matches(name, config, steps, sigma_schedule="default", tol=SIGMA_TOL, float64_sigmas=False, **kwargs):
    their_timesteps, theirs = run_theirs_sigma(name, config, steps, x_T(), sigma_schedule=sigma_schedule,
                                               float64_sigmas=float64_sigmas, **kwargs)
    sampler, ours = run_ours_sigma(name, config, steps, x_T(), sigma_schedule=sigma_schedule, **kwargs)
    model_timesteps = sampler.model_timesteps(sampler.timesteps(steps)).double()
    if name == "heun":  # diffusers lists each inner timestep twice (t_0, t_1, t_1, t_2, t_2, ...)
        their_timesteps = torch.cat([their_timesteps[:1], their_timesteps[1::2]])
    assert torch.allclose(model_timesteps, their_timesteps.double(), rtol=0, atol=1e-3)
    assert torch.isfinite(theirs).all()
    err = (ours - theirs).abs().max().item()
    assert err < tol, f"{name} {sigma_schedule} {config} steps={steps}: max |diff| {err:.3g}"


def offered(name):
    return ("default", "karras", "exponential") if name in SIGMA_SCHEDULE_SAMPLERS else ("default",)


SIGMA_CASES = [(name, sigma) for name in NEW_NAMES + ("dpm++",) for sigma in offered(name) if (name, sigma) != ("dpm++", "default")]


@pytest.mark.parametrize("name,sigma_schedule", SIGMA_CASES)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sigma_loop_matches_diffusers(name, sigma_schedule, spacing, prediction_type):
    """Full loops, number for number, for each sampler × σ schedule × spacing × prediction type (same seed, same noise)."""
    config = {**SD, "prediction_type": prediction_type, "timestep_spacing": spacing}
    for steps in (1, 4, 10, 20):  # < 15 and >= 15 for the multistep solvers' lower_order_final
        if steps == 1 and name in ("unipc", "dpm++", "dpm++_sde") and sigma_schedule != "default":
            continue  # diffusers' Karras ramp of one level is σ_max alone, a plan that never reaches σ_min
        assert_sigma_matches(name, config, steps, sigma_schedule)


@pytest.mark.parametrize("name", NEW_NAMES)
@pytest.mark.parametrize("betas", ["linear", "squaredcos_cap_v2"])
def test_sigma_loop_other_betas(name, betas):
    """With the cosine betas σ_max ≈ 2·10⁴: diffusers' float32 σ_max is off by ~10⁻³ in absolute terms, which Heun's
    averaged slope multiplies by ~σ_max/σ_1; so their σ are given in float64 (after checking them against ours at
    float32 precision). diffusers' Euler and Euler a also step in float32 on x_VE = x_VP·√(1 + σ²): their tolerance
    follows float32's ε · σ_max."""
    config = {**SD, **BETAS[betas]}
    ab = NoiseSchedule.from_config(config).alphas_cumprod[-1].item()
    float32_steps = name in ("euler", "euler_a")
    tol = max(SIGMA_TOL, 1.2e-7 * math.sqrt((1 - ab) / ab)) if float32_steps else SIGMA_TOL
    for sigma_schedule in offered(name):
        if (name, betas, sigma_schedule) == ("unipc", "squaredcos_cap_v2", "karras"):
            continue  # diffusers' UniPC rounds this plan to repeated timesteps and then fails (this_order = 0)
        for steps in (5, 16):
            assert_sigma_matches(name, config, steps, sigma_schedule, tol=tol, float64_sigmas=betas != "linear")


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpm++_sde", "unipc"])
def test_sigma_loop_zero_terminal_snr(name):
    """rescale_betas_zero_snr with trailing spacing and v-prediction: ᾱ_T = 0 is taken as 2⁻²⁴ (σ_max = 4096), as diffusers."""
    config = {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
    tol = max(SIGMA_TOL, 1.2e-7 * 4096) if name in ("euler", "euler_a") else SIGMA_TOL  # float32 steps at σ = 4096
    for steps in (3, 12):
        assert_sigma_matches(name, config, steps, tol=tol)


@pytest.mark.parametrize("name,extra", [
    ("heun", dict(clip_sample=True, clip_sample_range=0.8)),
    ("heun", dict(prediction_type="sample")),
    ("euler", dict(prediction_type="sample")),
    ("unipc", dict(solver_type="bh1", final_sigmas_type="sigma_min")),
    ("unipc", dict(solver_order=3)),
    ("unipc", dict(solver_order=1)),
    ("unipc", dict(final_sigmas_type="sigma_min")),
    ("unipc", dict(prediction_type="sample")),
    ("dpm++_sde", dict(solver_type="heun")),
    ("dpm++_sde", dict(solver_order=1)),
    ("dpm++_sde", dict(solver_order=3)),
    ("dpm++_sde", dict(final_sigmas_type="sigma_min")),  # with Karras σ the plan itself ends at σ_min
    ("dpm++_sde", dict(algorithm_type="dpmsolver++")),  # a DPM-Solver++ config: the name decides the algorithm
])
def test_sigma_sampler_settings(name, extra):
    config = {**SD, "timestep_spacing": "linspace", **extra}
    for sigma_schedule in offered(name):
        if extra.get("final_sigmas_type") == "sigma_min" and sigma_schedule != "default" and name != "unipc":
            continue  # DPM-Solver's Karras plan ends at σ_0 = σ_min: diffusers' last step has h = 0 (0/0)
        for steps in (6, 18):
            assert_sigma_matches(name, config, steps, sigma_schedule)


def test_config_flags_select_the_sigma_schedule():
    """use_karras_sigmas / use_exponential_sigmas in a checkpoint's config select the schedule, as in diffusers."""
    for flags, expected in (({"use_karras_sigmas": True}, "karras"), ({"use_exponential_sigmas": True}, "exponential")):
        schedule = NoiseSchedule.from_config({**SD, **flags})
        assert get_sampler("euler", schedule).sigma_schedule == expected
        assert get_sampler("dpm++", schedule).sigma_schedule == expected
        assert get_sampler("euler", schedule, sigma_schedule="default").sigma_schedule == "default"
        get_sampler("euler_a", schedule)  # EulerAncestralDiscreteScheduler has no such flag and ignores it
        get_sampler("ddim", schedule)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        get_sampler("euler", NoiseSchedule.from_config({**SD, **SIGMA_FLAGS["karras"], **SIGMA_FLAGS["exponential"]}))


def test_karras_sigmas_are_diffusers_numbers():
    """EDM eq. 5 over diffusers' σ range, and the fractional timesteps of _sigma_to_t, to float32 precision."""
    config = {**SD, "timestep_spacing": "linspace"}
    for name in ("euler", "heun", "dpm++", "unipc"):
        scheduler, _ = their_sigma_scheduler(name, config, "karras")
        scheduler.set_timesteps(12)
        sampler = get_sampler(name, NoiseSchedule.from_config(config), sigma_schedule="karras")
        plan = sampler.timesteps(12)
        assert plan.dtype == torch.float64 and (plan != plan.round()).any()
        sigmas = scheduler.sigmas.double()[:-1]
        if name == "heun":
            sigmas = torch.cat([sigmas[:1], sigmas[1::2]])
        assert torch.allclose(torch.from_numpy(sampler.plan_sigmas(plan)), sigmas, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", NEW_NAMES + ("dpm++",))
def test_callback_and_intervention_match_diffusers(name):
    """A callback that replaces x mid-run: the same replacement in diffusers' loop gives the same result."""
    config = {**SD, "timestep_spacing": "trailing"}
    calls = []

    def halve_at_two(i, x):
        return x * 0.5 if i == 2 else x

    def callback(i, t, x):
        calls.append(i)
        return halve_at_two(i, x) if i == 2 else None

    # diffusers' Heun steps twice per timestep: its step 2·k is the start of our step k
    their_intervene = (lambda j, x: halve_at_two(j // 2 if j % 2 == 0 else -1, x)) if name == "heun" else halve_at_two
    _, theirs = run_theirs_sigma(name, config, 8, x_T(), intervene=None if name == "heun" else their_intervene)
    _, ours = run_ours_sigma(name, config, 8, x_T(), callback=None if name == "heun" else callback)
    assert (ours - theirs).abs().max() < SIGMA_TOL
    if name != "heun":
        assert calls == list(range(8))


@pytest.mark.parametrize("name", ["euler_a", "dpm++_sde"])
def test_ancestral_noise_is_diffusers_noise_per_generator(name):
    """One generator per batch item: each item is what a batch of one with that seed gives, and what diffusers gives."""
    config = {**SD, "timestep_spacing": "trailing"}
    schedule = NoiseSchedule.from_config(config)
    sampler = get_sampler(name, schedule)
    timesteps, denoiser, x = sampler.timesteps(6), Denoiser(continuous_fake_model_for(schedule), schedule), x_T()
    batch = sampler(denoiser, x, timesteps, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    for b, seed in enumerate((5, 6)):
        single = sampler(denoiser, x[b : b + 1], timesteps, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(batch[b : b + 1], single)
    scheduler, _ = their_sigma_scheduler(name, config, "default")
    scheduler.set_timesteps(6)
    generators, theirs, model = [torch.Generator().manual_seed(s) for s in (5, 6)], x.clone(), continuous_fake_model_for(schedule)
    theirs = theirs * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        theirs = scheduler.step(model(scheduler.scale_model_input(theirs, t), t), t, theirs, generator=generators).prev_sample
    ours = sampler(denoiser, sampler.start_from_noise(x, timesteps), timesteps,
                   generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    assert (ours - theirs).abs().max() < SIGMA_TOL
    other_seed = sampler(denoiser, x, timesteps, generator=torch.Generator().manual_seed(7))
    assert (other_seed - batch[:1]).abs().max() > 1e-3  # the noise matters: not a deterministic sampler in disguise


# ----- tails of a plan: img2img's contract --------------------------------------------------------------------

TAIL_CASES = [(name, "default") for name in SAMPLER_NAMES] + [
    (name, "karras") for name in SIGMA_SCHEDULE_SAMPLERS] + [("euler", "exponential"), ("unipc", "exponential")]


@pytest.mark.parametrize("name,sigma_schedule", TAIL_CASES)
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_tail_of_plan_matches_diffusers_img2img_loop(name, sigma_schedule, spacing):
    """sampler.add_noise(z0, ε, timesteps[k:]) then the tail = diffusers' img2img: set_timesteps(n), timesteps[k·order:],
    set_begin_index, add_noise, the loop."""
    config = {**SD, "timestep_spacing": spacing}
    z0 = x_T(seed=11) * 0.5 + 0.3
    for steps, begin in ((10, 3), (20, 8), (6, 5)):
        if name in VP_NAMES and sigma_schedule == "default":
            _, theirs = run_theirs_tail_vp(name, config, steps, begin, z0)
        else:
            _, theirs = run_theirs_sigma(name, config, steps, x_T(), sigma_schedule=sigma_schedule, begin=begin, z0=z0)
        _, ours = run_ours_sigma(name, config, steps, x_T(), sigma_schedule=sigma_schedule, begin=begin, z0=z0)
        err = (ours - theirs).abs().max().item()
        assert err < SIGMA_TOL, f"{name} {sigma_schedule} steps={steps} begin={begin}: {err:.3g}"


def run_theirs_tail_vp(name, config, steps, begin, z0, seed=0):
    """DDPM/DDIM/DPM++ img2img in diffusers, with the float64 schedule of run_theirs."""
    schedule = NoiseSchedule.from_config(config)
    scheduler = THEIRS[name].from_config(config)
    use_float64(scheduler, schedule)
    scheduler.set_timesteps(steps)
    if name == "dpm++":
        use_float64_sigmas(scheduler)
    timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    x = scheduler.add_noise(z0, x_T(), timesteps[:1])
    generator, model = torch.Generator().manual_seed(seed), continuous_fake_model_for(schedule)
    for t in timesteps:
        kwargs = {} if name == "dpm++" else {"generator": generator}
        x = scheduler.step(model(x, t), t, x, **kwargs).prev_sample
    return timesteps, x


# ----- errors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler_a"])
def test_sigma_schedule_refused_by_name_where_diffusers_lacks_it(name):
    schedule = NoiseSchedule.from_config(SD)
    with pytest.raises(ValueError, match=f"sigma_schedule='karras' is not offered by the '{name}' sampler"):
        get_sampler(name, schedule, sigma_schedule="karras")
    get_sampler(name, schedule, sigma_schedule="default")  # the default is fine everywhere
    with pytest.raises(ValueError, match="sigma_schedule must be one of"):
        get_sampler("euler", schedule, sigma_schedule="polyexponential")


@pytest.mark.parametrize("name,config", [
    ("euler", dict(interpolation_type="log_linear")),
    ("euler", dict(timestep_type="continuous")),
    ("euler", dict(final_sigmas_type="sigma_min")),
    ("heun", dict(use_beta_sigmas=True)),
    ("unipc", dict(predict_x0=False)),
    ("unipc", dict(disable_corrector=[0])),
    ("unipc", dict(solver_type="bh3")),
    ("dpm++_sde", dict(thresholding=True)),
])
def test_sigma_sampler_unsupported_config_is_a_clear_error(name, config):
    key = next(iter(config))
    with pytest.raises(ValueError, match=key):
        get_sampler(name, NoiseSchedule.from_config({**SD, **config}))


@pytest.mark.parametrize("name", NEW_NAMES)
def test_sigma_sampler_timesteps_checked(name):
    sampler = get_sampler(name, NoiseSchedule.from_config(SD))
    denoiser = Denoiser(continuous_fake_model_for(sampler.schedule), sampler.schedule)
    with pytest.raises(ValueError, match="timesteps"):
        sampler(denoiser, x_T(), torch.tensor([1000.0, 500.0]))
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampler.timesteps(0)
