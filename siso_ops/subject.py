"""Turning a ComfyUI IMAGE (+ optional MASK or alpha) into the subject photo SISO scores against."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

@dataclass
class SubjectPhoto:
    """The reference photo: 1x3xHxW RGB in [0, 1], background already blanked if asked."""
    image: torch.Tensor
    note: str = ""

    def __repr__(self):
        h, w = self.image.shape[-2:]
        return f"SISO_SUBJECT({w}x{h}{', ' + self.note if self.note else ''})"



FILL = {"white": 1.0, "black": 0.0, "gray": 0.5}


def prepare_subject(image: torch.Tensor, mask: torch.Tensor | None = None, mask_marks: str = "subject",
                    background: str = "white") -> SubjectPhoto:
    """image: BHWC in [0, 1] with 1, 3 or 4 channels; mask: BHW or HW, 1 = what mask_marks says."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise ValueError(f"the subject image must be an IMAGE (batch, height, width, channels); got shape {tuple(image.shape)}")
    if image.shape[0] != 1:
        raise ValueError(f"the subject input holds a batch of {image.shape[0]} images; SISO learns from ONE photo. "
                         "Pick one with an 'ImageFromBatch' node (batch_index, length 1).")
    channels = image.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"the subject image has {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")
    pixels = image.detach().float().clone().permute(0, 3, 1, 2).clamp(0, 1)   # 1 x C x H x W
    notes = []
    subject_mask = None
    if channels == 4:
        subject_mask = pixels[:, 3:4]
        pixels = pixels[:, :3]
        notes.append("alpha as mask")
    elif channels == 1:
        pixels = pixels.expand(-1, 3, -1, -1).clone()
        notes.append("gray")
    if mask is not None:
        m = mask.detach().float()
        if m.ndim == 2:
            m = m.unsqueeze(0)
        if m.ndim != 3:
            raise ValueError(f"the subject mask must be a MASK (batch, height, width); got shape {tuple(mask.shape)}")
        if m.shape[0] != 1:
            raise ValueError(f"the subject mask holds {m.shape[0]} masks; give exactly one")
        m = m.unsqueeze(1)
        if m.shape[-2:] != pixels.shape[-2:]:
            m = F.interpolate(m, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
            notes.append("mask resized")
        if mask_marks == "background":
            m = 1.0 - m
        elif mask_marks != "subject":
            raise ValueError(f"mask_marks must be 'subject' or 'background', got '{mask_marks}'")
        subject_mask = m.clamp(0, 1)
        notes.append("mask")
    if subject_mask is not None and background != "keep":
        if background not in FILL:
            raise ValueError(f"background must be one of {list(FILL) + ['keep']}, got '{background}'")
        if float(subject_mask.max()) <= 0:
            raise ValueError("the subject mask is empty (no subject pixels): check the mask or set background to 'keep'")
        pixels = pixels * subject_mask + FILL[background] * (1 - subject_mask)
        notes.append(f"{background} background")
    return SubjectPhoto(pixels.contiguous(), ", ".join(notes))
