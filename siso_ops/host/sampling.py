"""Sampling through ComfyUI's own guider, so model-specific conditioning (SDXL's size vectors,
Flux's guidance, ...) is built by ComfyUI: the sigma schedule, a stock seed's noise, and a
"sampler" whose sampling is SISO's optimisation or inversion loop."""
from __future__ import annotations

import torch

import comfy.sample
import comfy.samplers

from .training import TrainableModel


SCHEDULERS = tuple(comfy.samplers.SCHEDULER_NAMES)


def detach_copy(obj):
    """Normal (non-inference) copies of every tensor in a conditioning structure."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: detach_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [detach_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(detach_copy(v) for v in obj)
    return obj


def sigma_schedule(model, scheduler: str, steps: int) -> torch.Tensor:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{scheduler}', choose one of {SCHEDULERS}")
    sampling = model.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(sampling, scheduler, steps).float()


def seed_noise(latent: torch.Tensor, seed: int) -> torch.Tensor:
    # The exact noise a stock KSampler draws for this seed, so iteration 0 matches it.
    return comfy.sample.prepare_noise(latent, seed)


class _LoopSampler(comfy.samplers.Sampler):
    """A ComfyUI sampler whose "sampling" is the caller's whole optimisation loop.

    ComfyUI's guider loads the model, builds the model-specific conditioning and then calls
    ``sample``; we hand the caller a denoiser over (x, sigma), the start latent (noise scaled
    to sigmas[0]) and the clean latent, both in the model's latent space."""

    def __init__(self, body, trainable=None):
        self.body = body
        self.trainable = trainable
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        sampling = model_wrap.inner_model.model_sampling

        def denoise(x, sigma):
            return model_wrap(x, sigma.reshape(1).expand(x.shape[0]).to(x), **extra_args)

        if self.trainable is not None:
            self.trainable.check_loaded()
        start = sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        self.result = self.body(denoise, start, sigmas, latent_image)
        return latent_image


def run_with_denoiser(model, positive, latent: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, seed: int,
                      body):
    """Run ``body(denoise, start_latent, sigmas, clean_latent)`` inside ComfyUI's guider and
    return its result. ``model``: a TrainableModel, or the host MODEL itself for work that
    needs no gradient into the model (inversion), which is then used exactly as KSampler uses it."""
    trainable = model if isinstance(model, TrainableModel) else None
    if trainable is not None:
        trainable.loading = trainable.load()
        trainable.check_lora_path()
    guider = comfy.samplers.CFGGuider(model if trainable is None else trainable.patcher)
    guider.set_conds(detach_copy(positive), [])
    guider.set_cfg(1.0)
    sampler = _LoopSampler(body, trainable)
    guider.sample(noise, latent, sampler, sigmas, seed=seed)
    return sampler.result
