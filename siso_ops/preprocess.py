"""Differentiable image preprocessing for the two similarity networks.

Semantics follow kornia's ``resize(side="short")`` and centre crop as the authors used them:
the long side is TRUNCATED (``int(long * size / short)``), bicubic without antialiasing and
with ``align_corners=False``, and the crop offset is ``floor((side - size) / 2)``. A test
compares this with kornia itself. Plain torch is used at run time so the hot loop does not
depend on kornia's version.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_short_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize BCHW images so the short side is ``size``; the long side is truncated."""
    h, w = images.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(w * size / h)
    else:
        new_h, new_w = int(h * size / w), size
    if (new_h, new_w) == (h, w):
        return images
    return F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    top = (h - size) // 2
    left = (w - size) // 2
    return images[..., top:top + size, left:left + size]


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def prepare_for_network(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """BCHW RGB images in [0, 1] (unclamped is fine) -> normalised square network input."""
    return normalize(center_crop(resize_short_side(images, size), size), mean, std)
