"""ReNoise inversion against an analytic Gaussian denoiser, where the exact answer is known.

Data x0 ~ N(mu, s^2) elementwise has the closed-form optimal denoiser E[x0 | x_sigma], so
inversion followed by denoising must give back x0 exactly when every step is inverted
exactly. Plain DDIM inversion cannot (it predicts the noise at the wrong latent); ReNoise's
fixed-point iterations can."""
import pytest
import torch

import siso_ops.renoise as R

from .gaussian import GaussianData, turbo_sigmas


def reconstruction_error(data, sigmas, settings):
    inversion = R.invert(data, data.x0, sigmas, settings, flow=data.flow)
    return float((R.reconstruct(data, inversion, sigmas, flow=data.flow) - data.x0).abs().mean()), inversion


EXACT = dict(average=False, kl_weight=0.0, ac_weight=0.0, renoise_iterations=30, first_step_iterations=30)


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
@pytest.mark.parametrize("ancestral", [False, True], ids=["euler", "euler_ancestral"])
def test_converged_renoise_inverts_every_step_exactly(flow, ancestral):
    data = GaussianData(flow)
    sigmas = turbo_sigmas([749, 499, 249], flow)
    error, _ = reconstruction_error(data, sigmas, R.ReNoiseSettings(ancestral=ancestral, **EXACT))
    ddim, _ = reconstruction_error(data, sigmas, R.ReNoiseSettings.ddim(ancestral=ancestral))
    assert error < 1e-5 and ddim > 0.05, (error, ddim)


@pytest.mark.parametrize("timesteps", [[749, 499, 249], [999, 749, 499, 249]], ids=["strength0.75", "strength1"])
def test_default_renoise_reconstructs_far_better_than_ddim(timesteps):
    """The figures quoted in docs/measured.md (mean absolute latent error, this data, seed 0)."""
    data = GaussianData()
    sigmas = turbo_sigmas(timesteps)
    ddim, _ = reconstruction_error(data, sigmas, R.ReNoiseSettings.ddim())
    renoise_euler, _ = reconstruction_error(data, sigmas, R.ReNoiseSettings(ancestral=False))
    renoise, inversion = reconstruction_error(data, sigmas, R.ReNoiseSettings())
    print(f"\n{timesteps}: DDIM {ddim:.4f}  ReNoise (euler) {renoise_euler:.4f}  ReNoise (euler_ancestral) {renoise:.4f}")
    assert renoise_euler < 0.5 * ddim
    assert renoise < 0.3 * ddim
    # K + 1 = 10 predictions per step, 6 on the first, one more per noise correction
    assert inversion.predictions == 6 + 10 * (len(timesteps) - 1) + (len(timesteps) - 1)


def test_noise_regularisers_pull_toward_white_noise():
    g = torch.Generator().manual_seed(0)
    correlated = torch.nn.functional.avg_pool2d(torch.randn(1, 4, 34, 34, generator=g), 3, 1)
    white = torch.randn(1, 4, 32, 32, generator=g)
    faint = white * 0.2
    assert R.patch_kl(faint) > 5 * R.patch_kl(white)
    regularised = R.regularise_noise(faint, 0.065, 0.0, 4, 5, torch.Generator().manual_seed(2))
    assert R.patch_kl(regularised) < 0.8 * R.patch_kl(faint)
    smooth = correlated / correlated.std()
    assert R.auto_correlation(smooth, torch.Generator().manual_seed(1)) > 5 * R.auto_correlation(white, torch.Generator().manual_seed(1))
    regularised = R.regularise_noise(smooth, 0.065, 20.0, 4, 5, torch.Generator().manual_seed(2))
    assert R.auto_correlation(regularised, torch.Generator().manual_seed(1)) < R.auto_correlation(smooth, torch.Generator().manual_seed(1))


def test_bad_renoise_settings_are_refused():
    with pytest.raises(ValueError, match="average_other"):
        R.ReNoiseSettings(average_other=(5, 5)).check()
    with pytest.raises(ValueError, match="negative"):
        R.ReNoiseSettings(renoise_iterations=-1).check()
