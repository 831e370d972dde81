"""SISO's sampler against ComfyUI's own k-diffusion samplers (Euler and Euler-ancestral with the
same stored noises), on the analytic Gaussian denoiser of tests/method/gaussian.py. The ReNoise
inversion's own tests are pure torch: tests/method/test_renoise.py."""
import pytest
import torch

import comfy.k_diffusion.sampling as kd
import comfy.model_sampling
from conftest import siso
from method.gaussian import SHAPE, GaussianData, turbo_sigmas

S = siso("siso_ops.sampler")


class _Wrapped:
    """The shape of model object ComfyUI's k-diffusion samplers expect."""

    def __init__(self, denoise, flow):
        self.denoise = denoise
        sampling = comfy.model_sampling.CONST() if flow else comfy.model_sampling.EPS()
        # 0.3.75's samplers read inner_model.inner_model.model_sampling; 0.33's flow sampler
        # also asks inner_model.model_patcher for it (its noise_scale).
        patcher = type("P", (), {"get_model_object": lambda self, name: sampling})()
        self.inner_model = type("Inner", (), {"inner_model": type("M", (), {"model_sampling": sampling})(),
                                              "model_patcher": patcher})()

    def __call__(self, x, sigma, **kwargs):
        return self.denoise(x, sigma[0])


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_ancestral_steps_with_stored_noises_equal_comfyui_euler_ancestral(flow):
    data = GaussianData(flow, seed=1)
    sigmas = turbo_sigmas([999, 749, 499, 249], flow)
    if flow:
        sigmas[0] = 1.0
    g = torch.Generator().manual_seed(5)
    noises = [torch.randn(SHAPE, generator=g) for _ in range(len(sigmas) - 1)]
    start = torch.randn(SHAPE, generator=g) * (1.0 if flow else float(sigmas[0]))
    calls = iter(noises)
    theirs = kd.sample_euler_ancestral(_Wrapped(data, flow), start.clone(), sigmas, disable=True,
                                       noise_sampler=lambda s, sn: next(calls))
    ours = S.sample(data, start.clone(), sigmas, grad_steps=0, noises=noises, flow=flow)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    euler = kd.sample_euler(_Wrapped(data, flow), start.clone(), sigmas, disable=True)
    torch.testing.assert_close(S.sample(data, start.clone(), sigmas, grad_steps=0, flow=flow), euler, atol=1e-5, rtol=1e-5)
