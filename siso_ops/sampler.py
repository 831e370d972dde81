"""Deterministic, differentiable sampling over sigmas (k-diffusion convention), and the exact
algebra of one step, forwards and backwards, that ReNoise inversion needs.

``denoise(x, sigma)`` returns the model's x0 prediction ``D``. A noisy latent is written
``x = s(sigma) * D + sigma * eps`` with ``s = 1`` for EPS / V-prediction models (ComfyUI
keeps them in variance-exploding space) and ``s = 1 - sigma`` for flow models (Flux). Every
step below is then:

    x_next = a * (s(sigma_down) * D + sigma_down * eps) + c * noise

with ``sigma_down = sigma_next, a = 1, c = 0`` for Euler (which is DDIM), and ComfyUI's
ancestral coefficients for Euler-ancestral (``sample_euler_ancestral`` for EPS/V,
``sample_euler_ancestral_RF`` for flow). Written this way the step is affine in ``eps`` and
in ``noise``, so both its inverse (ReNoise) and the per-step noise that makes it land on a
given latent (noise correction) are closed-form.

Only the last ``grad_steps`` steps are recorded for backward; earlier steps run without
grad, which is what makes a multi-step optimisation affordable.
"""
from __future__ import annotations

import torch


def signal_scale(sigma, flow: bool):
    return 1.0 - sigma if flow else 1.0


def noise_of(x: torch.Tensor, denoised: torch.Tensor, sigma, flow: bool = False) -> torch.Tensor:
    """The eps that, with ``denoised``, makes up ``x`` at ``sigma``."""
    return (x - signal_scale(sigma, flow) * denoised) / sigma


def step_coefficients(sigma: float, sigma_next: float, ancestral: bool, flow: bool = False):
    """(sigma_down, a, c) of one step from ``sigma`` to ``sigma_next`` (eta = 1)."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    if not ancestral or sigma_next == 0.0:
        return sigma_next, 1.0, 0.0
    if flow:
        sigma_down = sigma_next * sigma_next / sigma
        a = (1.0 - sigma_next) / (1.0 - sigma_down)
        c = max(sigma_next ** 2 - (sigma_down * a) ** 2, 0.0) ** 0.5
        return sigma_down, a, c
    sigma_up = min(sigma_next, (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, 1.0, sigma_up


def step_mean(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next, ancestral: bool, flow: bool = False):
    """The noise-free part of a step and the coefficient ``c`` of its noise."""
    sigma_down, a, c = step_coefficients(sigma, sigma_next, ancestral, flow)
    eps = noise_of(x, denoised, sigma, flow)
    return a * (signal_scale(sigma_down, flow) * denoised + sigma_down * eps), c


def inverse_step(x_next: torch.Tensor, eps: torch.Tensor, sigma, sigma_next, noise: torch.Tensor | None,
                 ancestral: bool, flow: bool = False) -> torch.Tensor:
    """The ``x`` at ``sigma`` whose step, given its noise prediction ``eps``, lands on ``x_next``."""
    sigma_f = float(sigma)
    sigma_down, a, c = step_coefficients(sigma_f, sigma_next, ancestral, flow)
    y = x_next if c == 0.0 else x_next - c * noise
    y = y / a
    return (y - sigma_down * eps) * (signal_scale(sigma_f, flow) / signal_scale(sigma_down, flow)) + sigma_f * eps


def sample(denoise, x: torch.Tensor, sigmas: torch.Tensor, grad_steps: int = 1, noises: list | None = None,
           flow: bool = False) -> torch.Tensor:
    """Euler over ``sigmas``; with ``noises`` (one tensor per step), Euler-ancestral with those
    exact noises, so the result is deterministic (ReNoise's inversions carry them)."""
    steps = len(sigmas) - 1
    if steps < 1:
        raise ValueError("the schedule needs at least one denoising step")
    if noises is not None and len(noises) != steps:
        raise ValueError(f"{len(noises)} stored noises for a {steps}-step schedule")
    first_grad_step = max(0, steps - int(grad_steps))
    for i in range(steps):
        with torch.set_grad_enabled(i >= first_grad_step and torch.is_grad_enabled()):
            if i < first_grad_step:
                x = x.detach()
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x0 = denoise(x, sigma)
            if float(sigma_next) == 0.0:
                x = x0
            elif noises is None:
                x = x + (x - x0) / sigma * (sigma_next - sigma)   # ComfyUI's own Euler update
            else:
                mean, c = step_mean(x, x0, sigma, sigma_next, True, flow)
                x = mean + c * noises[i].to(mean)
    return x
