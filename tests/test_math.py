"""The diffusion math against diffusers' reference values and against its own identities.

Schedules: ours are float64, diffusers' float32, so they agree to ~1e-6.
Forward process, v target, guidance rescale and min-SNR weights: the same
inputs through our functions and diffusers' give the same numbers. Then the
identities the samplers rely on: the posterior, the prediction conversions,
DDIM at η = 1 against DDPM's posterior variance, DPM-Solver++(1) = DDIM.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale_zero_terminal_snr
from diffusers.training_utils import compute_snr

from latent_diffusion.diffusion.gaussian import (
    eps_from_v,
    eps_from_x0,
    min_snr_weight,
    predictions_from_output,
    q_posterior,
    q_sample,
    training_target,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from latent_diffusion.diffusion.guidance import classifier_free_guidance, guide, rescale_guidance
from latent_diffusion.diffusion.losses import DenoisingLoss
from latent_diffusion.diffusion.samplers.ddim import ddim_coefficients, ddim_sigma
from latent_diffusion.diffusion.samplers.ddpm import ancestral_std, posterior_mean_coefficients, posterior_variance
from latent_diffusion.diffusion.samplers.dpm_solver import first_order_coefficients, half_log_snr
from latent_diffusion.diffusion.schedules import NoiseSchedule
from latent_diffusion.tensors import append_dims, gather

CONFIGS = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}
F64 = torch.float64


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def alpha_bars(seed=0, n=4):
    """Random ᾱ in (0, 1), shaped (n, 1, 1, 1) to broadcast over (n, C, H, W)."""
    return append_dims(torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) * 0.98 + 0.01, 4)


# ----- schedules against diffusers (float32) ---------------------------------------------------------------------

@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("betas", list(CONFIGS))
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler])
def test_schedule_matches_diffusers(cls, betas, zero_snr):
    """ᾱ_t to 1e-6. β_t too, except near T after the zero-SNR rescale, where diffusers' float32
    β_t = 1 − ᾱ_t/ᾱ_{t−1} of tiny ᾱ loses digits (~7e-6); the float64 check below covers those."""
    config = {**CONFIGS[betas], "rescale_betas_zero_snr": zero_snr}
    ours, theirs = NoiseSchedule.from_config(config), cls.from_config(config)
    assert ours.betas.dtype == F64 and ours.alphas_cumprod.dtype == F64
    assert torch.allclose(ours.betas, theirs.betas.double(), rtol=0, atol=1e-5 if zero_snr else 1e-6)
    expected = theirs.alphas_cumprod.double()
    if zero_snr and cls is DPMSolverMultistepScheduler:
        expected[-1] = 0.0  # the solver's own 2⁻²⁴ stand-in, not the schedule; see test_samplers
    assert torch.allclose(ours.alphas_cumprod, expected, rtol=0, atol=1e-6)
    if zero_snr:
        assert ours.alphas_cumprod[-1] == 0 and ours.snr(ours.num_train_timesteps - 1) == 0


@pytest.mark.parametrize("betas", list(CONFIGS))
def test_zero_snr_rescale_matches_diffusers_in_float64(betas):
    """Lin et al. 2023 Algorithm 1: our float64 rescale against diffusers' function fed float64 β."""
    plain = NoiseSchedule.from_config(CONFIGS[betas])
    rescaled = NoiseSchedule.from_config({**CONFIGS[betas], "rescale_betas_zero_snr": True})
    expected = diffusers_rescale_zero_terminal_snr(plain.betas.clone())
    assert torch.allclose(rescaled.betas, expected, rtol=0, atol=1e-12)
    assert torch.allclose(rescaled.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=0, atol=1e-15)  # √ᾱ_1 kept


def test_schedule_reads_trained_betas_and_rejects_unknown():
    betas = torch.linspace(1e-4, 0.02, 50).tolist()
    schedule = NoiseSchedule.from_config({"trained_betas": betas})
    assert torch.allclose(schedule.alphas_cumprod, DDPMScheduler(trained_betas=betas).alphas_cumprod.double(), atol=1e-6)
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_config({"prediction_type": "flow_prediction"})


# ----- forward process, targets, guidance, loss weights against diffusers ----------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_q_sample_and_v_target_match_add_noise_and_get_velocity(dtype):
    """In float32 against diffusers as it is; in float64 with its ᾱ swapped for ours, to 1e-12."""
    scheduler = DDPMScheduler.from_config(CONFIGS["scaled_linear"])
    schedule = NoiseSchedule.from_config(CONFIGS["scaled_linear"])
    if dtype == F64:
        scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    x0, noise = rand(4, 3, 8, 8, seed=1, dtype=dtype), rand(4, 3, 8, 8, seed=2, dtype=dtype)
    t = torch.tensor([0, 10, 500, 999])
    ab = gather(schedule.alphas_cumprod, t, x0)  # (4, 1, 1, 1)
    assert torch.allclose(q_sample(x0, noise, ab), scheduler.add_noise(x0, noise, t), rtol=0, atol=tol)
    v = training_target(x0, noise, ab, "v_prediction")
    assert torch.allclose(v, scheduler.get_velocity(x0, noise, t), rtol=0, atol=tol)


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(phi):
    uncond, cond = rand(2, 4, 8, 8, seed=5), rand(2, 4, 8, 8, seed=6)
    guided = classifier_free_guidance(uncond, cond, 7.5)
    assert torch.allclose(guided, uncond + 7.5 * (cond - uncond))
    expected = rescale_noise_cfg(guided, cond, guidance_rescale=phi)
    assert torch.allclose(rescale_guidance(guided, cond, phi), expected, rtol=0, atol=1e-12)
    assert torch.allclose(guide(torch.cat([uncond, cond]), 7.5, phi), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weight_matches_diffusers_formula(prediction_type, gamma):
    """diffusers' train_text_to_image.py: min(SNR, γ), divided by SNR for ε and by SNR + 1 for v.

    compute_snr works in float32, whose 1 − ᾱ_t at small t is good to ~3e-5 relative: hence rtol 1e-4.
    """
    scheduler = DDPMScheduler.from_config(CONFIGS["scaled_linear"])
    schedule = NoiseSchedule.from_config(CONFIGS["scaled_linear"])
    t = torch.tensor([0, 3, 50, 200, 600, 999])
    snr = compute_snr(scheduler, t)
    expected = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    expected = {"epsilon": expected / snr, "v_prediction": expected / (snr + 1), "sample": expected}[prediction_type]
    ours = min_snr_weight(schedule.alphas_cumprod[t], gamma, prediction_type)
    assert torch.allclose(ours, expected.double(), rtol=1e-4, atol=0)


# ----- identities: posterior, conversions ------------------------------------------------------------------------

def test_posterior_mean_from_true_eps_is_the_ddpm_mean():
    """μ̃_t(x_t, x̂_0(x_t, ε)) = (x_t − β_t/√(1 − ᾱ_t) ε) / √α_t (DDPM eq. 11), one step (ᾱ_{t−1} = ᾱ_t/α_t)."""
    schedule = NoiseSchedule.from_config(CONFIGS["linear"])
    t = torch.tensor([1, 10, 300, 999])
    x0, eps = rand(4, 3, 4, 4, seed=7), rand(4, 3, 4, 4, seed=8)
    ab, ab_prev = gather(schedule.alphas_cumprod, t, x0), gather(schedule.alphas_cumprod, t - 1, x0)
    beta = gather(schedule.betas, t, x0)
    x_t = q_sample(x0, eps, ab)
    mean, variance = q_posterior(x0_from_eps(x_t, eps, ab), x_t, ab, ab_prev)
    assert torch.allclose(mean, (x_t - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt(), atol=1e-10)
    assert torch.allclose(variance, (1 - ab_prev) / (1 - ab) * beta, atol=1e-15)
    assert (variance <= beta).all()


def test_sampler_posterior_coefficients_match_q_posterior():
    ab, ab_prev = alpha_bars(seed=1) * 0.5, alpha_bars(seed=2) * 0.5 + 0.5  # ᾱ_t < ᾱ_{t−1}
    x0, x_t = rand(4, 2, 3, 3, seed=9), rand(4, 2, 3, 3, seed=10)
    mean, variance = q_posterior(x0, x_t, ab, ab_prev)
    coef_x0, coef_xt = posterior_mean_coefficients(ab, ab_prev)
    assert torch.allclose(coef_x0 * x0 + coef_xt * x_t, mean, atol=1e-12)
    assert torch.allclose(posterior_variance(ab, ab_prev), variance, atol=1e-15)
    assert torch.allclose(ancestral_std(ab, ab_prev, "fixed_large") ** 2, 1 - ab / ab_prev, atol=1e-15)


def test_ddim_eta_one_is_the_ddpm_posterior_and_eta_zero_the_dpm_solver_first_order():
    ab, ab_prev = alpha_bars(seed=3) * 0.5, alpha_bars(seed=4) * 0.5 + 0.5
    # η = 1: σ_t² = β̃_t (DDIM §4.1), and the x̂_0/ε̂ coefficients reproduce μ̃_t
    sigma = ddim_sigma(ab, ab_prev, 1.0)
    assert torch.allclose(sigma**2, posterior_variance(ab, ab_prev), atol=1e-15)
    x0, eps = rand(4, 2, 3, 3, seed=11), rand(4, 2, 3, 3, seed=12)
    x_t = q_sample(x0, eps, ab)
    c_x0, c_eps = ddim_coefficients(ab_prev, sigma)
    mean, _ = q_posterior(x0, x_t, ab, ab_prev)
    assert torch.allclose(c_x0 * x0 + c_eps * eps, mean, atol=1e-12)
    # η = 0: DPM-Solver++(1) is DDIM (Lu et al. 2022, §4)
    c_x0, c_eps = ddim_coefficients(ab_prev, ddim_sigma(ab, ab_prev, 0.0))
    for i in range(4):
        a, a_prev = math.sqrt(ab[i].item()), math.sqrt(ab_prev[i].item())
        s, s_prev = math.sqrt(1 - ab[i].item()), math.sqrt(1 - ab_prev[i].item())
        h = half_log_snr(a_prev, s_prev) - half_log_snr(a, s)
        coef_x, coef_d0 = first_order_coefficients(h, a_prev, s_prev, s)
        ddim = c_x0[i] * x0[i] + c_eps[i] * eps_from_x0(x_t[i], x0[i], ab[i])
        assert torch.allclose(coef_x * x_t[i] + coef_d0 * x0[i], ddim, atol=1e-12)


def test_conversions_round_trip():
    ab = alpha_bars(seed=5)
    x0, eps = rand(4, 3, 4, 4, seed=13), rand(4, 3, 4, 4, seed=14)
    x_t = q_sample(x0, eps, ab)
    v = v_from_x0_eps(x0, eps, ab)
    assert torch.allclose(x0_from_eps(x_t, eps, ab), x0, atol=1e-12)
    assert torch.allclose(eps_from_x0(x_t, x0, ab), eps, atol=1e-12)
    assert torch.allclose(x0_from_v(x_t, v, ab), x0, atol=1e-12)
    assert torch.allclose(eps_from_v(x_t, v, ab), eps, atol=1e-12)
    for prediction_type, output in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        got_eps, got_x0 = predictions_from_output(output, x_t, ab, prediction_type)
        assert torch.allclose(got_eps, eps, atol=1e-12) and torch.allclose(got_x0, x0, atol=1e-12)
        assert torch.allclose(training_target(x0, eps, ab, prediction_type), output)
    with pytest.raises(ValueError, match="prediction_type"):
        predictions_from_output(eps, x_t, ab, "flow")


# ----- the loss ---------------------------------------------------------------------------------------------------

def test_denoising_loss():
    ab = alpha_bars(seed=6)
    x0, eps, out = rand(4, 3, 4, 4, seed=15), rand(4, 3, 4, 4, seed=16), rand(4, 3, 4, 4, seed=17)
    eps_loss, v_loss = DenoisingLoss(linear_schedule("epsilon")), DenoisingLoss(linear_schedule("v_prediction"))
    assert torch.allclose(eps_loss.weighted_mse(out, x0, eps, ab), F.mse_loss(out.float(), eps.float()))
    v = v_from_x0_eps(x0, eps, ab)
    assert torch.allclose(v_loss.weighted_mse(out, x0, eps, ab), F.mse_loss(out.float(), v.float()))
    weighted = DenoisingLoss(linear_schedule("epsilon"), snr_gamma=5.0).weighted_mse(out, x0, eps, ab)
    per_sample = (out - eps).pow(2).mean(dim=(1, 2, 3))
    expected = (min_snr_weight(ab.reshape(-1), 5.0, "epsilon") * per_sample).mean()
    assert torch.allclose(weighted.double(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        DenoisingLoss(linear_schedule("flow"))
    with pytest.raises(ValueError, match="snr_gamma"):
        DenoisingLoss(linear_schedule("epsilon"), snr_gamma=0.0)


def linear_schedule(prediction_type):
    return NoiseSchedule.from_config({**CONFIGS["linear"], "prediction_type": prediction_type})


@pytest.mark.parametrize("noise_offset", [0.0, 0.1])
def test_denoising_loss_is_algorithm_1(noise_offset):
    """DenoisingLoss draws t, then ε, then the offset, from the generator, noises z_0 and scores net(z_t, t, c)."""
    schedule = linear_schedule("v_prediction")
    loss_fn = DenoisingLoss(schedule, snr_gamma=5.0, noise_offset=noise_offset)
    z0, cond = rand(3, 4, 2, 2, seed=18, dtype=torch.float32), object()
    seen = []

    def net(z_t, t, c):
        seen.append((z_t, t, c))
        return z_t * 0.5

    per_sample = loss_fn(net, z0, cond, torch.Generator().manual_seed(3), reduce=False)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (3,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    if noise_offset:
        eps = eps + noise_offset * torch.randn((3, 4, 1, 1), generator=g)
    ab = gather(schedule.alphas_cumprod, t, z0)
    z_t = q_sample(z0, eps, ab)
    (got_z_t, got_t, got_cond), = seen
    assert got_cond is cond and torch.equal(got_t, t) and torch.equal(got_z_t, z_t)
    weights = min_snr_weight(ab.reshape(-1), 5.0, "v_prediction")
    expected = weights * (z_t * 0.5 - v_from_x0_eps(z0, eps, ab)).pow(2).mean(dim=(1, 2, 3))
    assert per_sample.shape == (3,) and torch.allclose(per_sample, expected)
    assert torch.equal(loss_fn(net, z0, cond, torch.Generator().manual_seed(3)), per_sample.mean())
