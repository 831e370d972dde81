"""A deterministic, differentiable Euler sampler over sigmas (k-diffusion convention).

``denoise(x, sigma)`` returns the model's x0 prediction. One Euler update
``x += (x - x0) / sigma * (sigma_next - sigma)`` serves EPS, V-prediction and flow models
alike. Only the last ``grad_steps`` steps are recorded for backward; earlier steps run
without grad, which is what makes a 4-step optimisation affordable.
"""
from __future__ import annotations

import torch


def sample(denoise, x: torch.Tensor, sigmas: torch.Tensor, grad_steps: int = 1) -> torch.Tensor:
    steps = len(sigmas) - 1
    if steps < 1:
        raise ValueError("the schedule needs at least one denoising step")
    first_grad_step = max(0, steps - int(grad_steps))
    for i in range(steps):
        with torch.set_grad_enabled(i >= first_grad_step and torch.is_grad_enabled()):
            if i < first_grad_step:
                x = x.detach()
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x0 = denoise(x, sigma)
            if float(sigma_next) == 0.0:
                x = x0
            else:
                x = x + (x - x0) / sigma * (sigma_next - sigma)
    return x
