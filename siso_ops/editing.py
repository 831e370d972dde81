"""Subject swap: invert the photo (ReNoise), then let SISO optimise a LoRA that, denoising the
inversion with the same per-step noises, replaces the subject while a background loss keeps
everything outside the subject's mask.

``L = L_sim + c * L_bg``; ``L_bg`` is the mean squared error in [0, 1] pixel space over the
background pixel-channels (weights 1 - mask), against the input photo itself (the authors'
code; the paper writes the inverted image: the photo is what users want kept).

The same loss keeps the background of a generated picture (the refine route: a mask but no
inversion): there ``L_bg`` is taken against iteration 0's image, the picture the model makes
before the LoRA moves it (``EditScore`` with no photo keeps the first image it scores).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .runtime import host
from .renoise import ReNoiseSettings, invert, reconstruct


@dataclass
class InversionSettings:
    steps: int = 4                 # the full schedule, as a turbo model samples it
    strength: float = 0.75         # fraction of it that is inverted: int(steps * strength) steps
    scheduler: str = "simple"
    renoise: ReNoiseSettings = field(default_factory=ReNoiseSettings)

    @property
    def inverted_steps(self) -> int:
        return int(self.steps * self.strength)

    def check(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.inverted_steps < 1:
            raise ValueError(f"strength {self.strength} of {self.steps} steps inverts no step: raise strength or steps "
                             f"(int(steps * strength) must be at least 1)")
        self.renoise.check()


@dataclass
class PhotoInversion:
    """What SISO_INVERSION carries: enough to denoise back to the photo, deterministically."""
    latent: torch.Tensor          # 1 x C x h x w, model latent space, at sigmas[0]
    sigmas: torch.Tensor          # the inverted part of the schedule, descending, ends at 0
    noises: list | None           # per-step noises for Euler-ancestral, None for Euler
    flow: bool
    photo: torch.Tensor           # 1 x 3 x H x W in [0, 1]: the input photo
    model: str                    # describe_model() of the model it was made with
    steps: int
    strength: float
    scheduler: str
    predictions: int = 0
    latent_error: float = float("nan")            # mean |denoise(invert(z)) - z|, z = the encoded photo
    reconstruction_error: float = float("nan")    # mean |decoded reconstruction - photo| in [0, 1] pixels

    @property
    def sampler(self) -> str:
        return "euler" if self.noises is None else "euler_ancestral"

    @property
    def size(self) -> tuple:
        return tuple(self.photo.shape[-2:])

    def __repr__(self):
        h, w = self.size
        return (f"SISO_INVERSION({w}x{h}, {len(self.sigmas) - 1} of {self.steps} steps, {self.sampler}, "
                f"{self.model}, latent error {self.latent_error:.4f}, pixel error {self.reconstruction_error:.4f})")


def check_photo(image: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """IMAGE (BHWC) -> the one photo; refuses batches and sizes the VAE would silently crop.
    ``scale``: the VAE's pixels per latent cell (8; 16 for Flux.2, 32 for HunyuanImage 2.1)."""
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise ValueError(f"the photo must be an IMAGE (batch, height, width, RGB); got shape {tuple(image.shape)}")
    if image.shape[0] != 1:
        raise ValueError(f"the photo input holds a batch of {image.shape[0]} images; ReNoise inverts ONE photo. "
                         "Pick one with an 'ImageFromBatch' node (length 1).")
    h, w = image.shape[1:3]
    least = max(64, scale)
    up = (lambda v: max(least, v + (-v) % scale))
    if h < least or w < least:
        raise ValueError(f"the photo is {w}x{h}; both sides must be at least {least} pixels (and multiples of {scale}: "
                         f"the VAE works on {scale}-pixel blocks). Scale it up first, e.g. 'ImageScale' to "
                         f"{up(w)}x{up(h)} or larger.")
    if h % scale or w % scale:
        raise ValueError(f"the photo is {w}x{h}; both sides must be multiples of {scale} (the VAE works on "
                         f"{scale}-pixel blocks). Crop or scale it first, e.g. 'ImageCrop' to "
                         f"{w - w % scale}x{h - h % scale}.")
    return image[..., :3]


def invert_photo(model, vae, image: torch.Tensor, positive, settings: InversionSettings, on_step=None):
    """Returns (PhotoInversion, reconstruction IMAGE BHWC): the reconstruction is the inversion
    denoised by the unchanged model, decoded by the stock VAE."""
    settings.check()
    host.check_supported(model)
    photo = check_photo(image, host.latent_scale(vae))
    flow = host.is_flow(model)
    # Inference mode, as ComfyUI runs a stock KSampler: the host model is only read here (ReNoise's
    # noise regularisation enables grad for its own terms).
    with torch.inference_mode():
        latent = host.encode_photo(vae, photo)
        sigmas = host.sigma_schedule(model, settings.scheduler, settings.steps)[-(settings.inverted_steps + 1):]

        def body(denoise, start, sigmas_on_device, clean):
            result = invert(denoise, clean.float(), sigmas_on_device, settings.renoise, flow, on_step)
            rebuilt = reconstruct(denoise, result, sigmas_on_device, flow)
            return result, rebuilt, float((rebuilt - clean.float()).abs().mean())

        inversion, rebuilt, latent_error = host.run_with_denoiser(model, positive, latent, torch.zeros_like(latent), sigmas,
                                                    settings.renoise.seed, body)
        reconstruction = host.decode_latent(vae, model, rebuilt)
    pixels = photo.detach().float().clone().permute(0, 3, 1, 2).contiguous()
    result = PhotoInversion(
        latent=inversion.latent.detach().float().cpu(), sigmas=sigmas.detach().float().cpu(),
        noises=None if inversion.noises is None else [n.detach().float().cpu() for n in inversion.noises],
        flow=flow, photo=pixels, model=host.describe_model(model), steps=settings.steps,
        strength=settings.strength, scheduler=settings.scheduler, predictions=inversion.predictions, latent_error=latent_error,
        reconstruction_error=float((reconstruction.permute(0, 3, 1, 2) - pixels).abs().mean()))
    return result, reconstruction


# ----------------------------------------------------------------------------- the edit loss
def background_weights(mask: torch.Tensor | None, size: tuple, image: str = "the inverted photo",
                       advice: str = "make the mask from the same photo that went into SISO ReNoise Invert") -> torch.Tensor:
    """MASK (HW or 1HW, 1 = subject) -> 1 x 1 x H x W weights of the background (1 - mask).
    ``size`` (height, width) is the image the loss compares, which the mask must match exactly
    (it is not resized: a mask of another picture would keep the wrong region); ``image`` names
    that image and ``advice`` says how to get a mask that fits, in the size refusal."""
    if mask is None:
        raise ValueError("editing needs the subject's mask in the photo (from SISO Subject Mask, or drawn in "
                         "ComfyUI's mask editor): connect it to 'mask', or set background_weight to 0")
    m = mask.detach().float()
    if m.ndim == 2:
        m = m.unsqueeze(0)
    if m.ndim != 3 or m.shape[0] != 1:
        raise ValueError(f"the mask must be ONE mask (height, width); got shape {tuple(mask.shape)}")
    if tuple(m.shape[-2:]) != tuple(size):
        raise ValueError(f"the mask is {m.shape[-1]}x{m.shape[-2]} but {image} is {size[1]}x{size[0]}: {advice}")
    if float(m.clamp(0, 1).max()) <= 0:
        raise ValueError(
            "the mask is empty: it marks no subject to replace in the photo. From SISO Subject Mask: the text was not "
            "found (see its preview) or a negative grow_pixels shrank the mask to nothing; drawn by hand: paint over "
            "the subject in the mask editor (white = subject).")
    keep = 1.0 - m.clamp(0, 1)
    if float(keep.sum()) <= 0:
        raise ValueError("the mask covers the whole photo: there is no background to preserve (set background_weight to 0)")
    return keep.unsqueeze(1)


def background_loss(image: torch.Tensor, photo: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences over background pixel-channels / their (weighted) count."""
    weights = keep.expand_as(image)
    return ((image - photo) ** 2 * weights).sum() / weights.sum()


class EditScore:
    """SISO's similarity loss plus c * background loss. ``photo`` None: the first image scored
    (iteration 0's, before any LoRA step) becomes the picture whose background is kept, so its
    own background term is exactly 0."""

    def __init__(self, similarity, photo: torch.Tensor | None, keep: torch.Tensor | None, background_weight: float):
        self.similarity = similarity
        self.photo = photo
        self.keep = keep
        self.weight = float(background_weight)

    def __call__(self, image: torch.Tensor) -> dict:
        terms = self.similarity(image)
        if self.keep is not None and self.weight > 0:
            if self.photo is None:
                self.photo = image.detach().clone()
            bg = background_loss(image, self.photo, self.keep)
            terms["background"] = bg
            terms["loss"] = terms["loss"] + self.weight * bg
        return terms


def check_edit(inversion: PhotoInversion, model, mask, background_weight: float, grad_steps: int):
    """Every mismatch between model, inversion and mask, before any work."""
    if not isinstance(inversion, PhotoInversion):
        raise TypeError(f"'inversion' must come from SISO ReNoise Invert, got {type(inversion).__name__}")
    if background_weight < 0:
        raise ValueError(f"background_weight cannot be negative, got {background_weight}")
    described = host.describe_model(model)
    if described != inversion.model:
        raise ValueError(f"the inversion was made with {inversion.model} but this model is {described}: "
                         "invert the photo with the same model you optimise")
    channels = host.latent_channels(model)
    if inversion.latent.shape[1] != channels:
        raise ValueError(f"the inversion has {inversion.latent.shape[1]} latent channels, the model expects {channels}")
    steps = len(inversion.sigmas) - 1
    if grad_steps > steps:
        raise ValueError(f"grad_steps ({grad_steps}) cannot exceed the inversion's {steps} denoising steps")
    return background_weights(mask, inversion.size) if background_weight > 0 else None


def check_refine_mask(mask, width: int, height: int, background_weight: float):
    """A mask without an inversion (the refine route): the background weights against iteration
    0's picture, which is ``width`` x ``height``; None when background_weight is 0 (the mask is
    then unused, as when editing). Before any work."""
    if background_weight < 0:
        raise ValueError(f"background_weight cannot be negative, got {background_weight}")
    if background_weight == 0:
        return None
    return background_weights(
        mask, (height, width), image="the picture SISO Optimize makes (width x height)",
        advice="make the mask from that picture (SISO Subject Mask on the zero-shot picture, which KSampler made at "
               "the same size), or set SISO Optimize's width and height to the mask's size")
