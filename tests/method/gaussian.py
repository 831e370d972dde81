"""Data whose optimal denoiser is known in closed form, and SD's discrete sigma schedule: the
ground truth the ReNoise and sampler tests compare with (here and in tests/test_renoise.py)."""
import torch

SHAPE = (1, 4, 16, 16)


def turbo_sigmas(timesteps, flow=False):
    """SD's discrete schedule (scaled-linear betas) at the given timesteps, then 0; for flow
    models the timestep fraction itself."""
    if flow:
        return torch.tensor([t / 1000 for t in timesteps] + [0.0])
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    sigma = ((1 - alphas) / alphas) ** 0.5
    return torch.tensor([float(sigma[t]) for t in timesteps] + [0.0])


class GaussianData:
    def __init__(self, flow=False, seed=0, spread=0.6):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(SHAPE, generator=g) * 0.5
        self.s = spread
        self.flow = flow
        self.x0 = self.mu + spread * torch.randn(SHAPE, generator=g)

    def __call__(self, x, sigma):
        sigma, var = float(sigma), self.s ** 2
        if self.flow:        # x = (1 - sigma) x0 + sigma eps
            a = 1.0 - sigma
            return self.mu + a * var / (a * a * var + sigma * sigma) * (x - a * self.mu)
        return self.mu + var / (var + sigma * sigma) * (x - self.mu)
