"""Turning a ComfyUI IMAGE (+ optional MASK or alpha) into the subject photo SISO scores against."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

@dataclass
class SubjectPhoto:
    """The reference photos of ONE subject: each 1x3xHxW RGB in [0, 1], background already
    blanked if asked; sizes may differ (each is preprocessed for the networks on its own)."""
    images: list
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)   # what looks wrong but is not refused (SISO Optimize's report says it)

    @property
    def image(self) -> torch.Tensor:
        """The first photo (the only one of a single-photo subject)."""
        return self.images[0]

    def __len__(self):
        return len(self.images)

    def __repr__(self):
        parts = []
        for image, note in zip(self.images, self.notes or [""] * len(self.images)):
            h, w = image.shape[-2:]
            parts.append(f"{w}x{h}{', ' + note if note else ''}")
        return f"SISO_SUBJECT({'; '.join(parts)})"

    def joined(self, other: "SubjectPhoto") -> "SubjectPhoto":
        return SubjectPhoto(self.images + other.images, self.notes + other.notes, self.warnings + other.warnings)


FILL = {"white": 1.0, "black": 0.0, "gray": 0.5}
# Smallest subject photo side: DINOv2 sees a 224-pixel view in 16x16 patches of 14 pixels; below
# 32 source pixels a side, each patch gets less than 2 pixels of the photo, i.e. nothing to match.
MIN_SIDE = 32


def prepare_subject(image: torch.Tensor, mask: torch.Tensor | None = None, mask_marks: str = "subject",
                    background: str = "white") -> SubjectPhoto:
    """image: BHWC in [0, 1] with 1, 3 or 4 channels, one or more photos of the same subject;
    mask: BHW or HW, 1 = what mask_marks says: one mask for every photo, or one per photo."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise ValueError(f"the subject image must be an IMAGE (batch, height, width, channels); got shape {tuple(image.shape)}")
    if image.shape[0] < 1:
        raise ValueError("the subject image batch is empty: give at least one photo")
    masks = [None] * image.shape[0]
    if mask is not None:
        m = mask.unsqueeze(0) if mask.ndim == 2 else mask
        if m.ndim != 3:
            raise ValueError(f"the subject mask must be a MASK (batch, height, width); got shape {tuple(mask.shape)}")
        if m.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"the subject mask holds {m.shape[0]} masks for {image.shape[0]} photos: give one mask "
                             "for all photos or one per photo")
        masks = [m[min(i, m.shape[0] - 1)][None] for i in range(image.shape[0])]
    photos = [_prepare_one(image[i:i + 1], masks[i], mask_marks, background,
                           f" (photo {i + 1} of {image.shape[0]})" if image.shape[0] > 1 else "")
              for i in range(image.shape[0])]
    return SubjectPhoto([p for p, _ in photos], [n for _, n in photos],
                        [w for i in range(image.shape[0]) for w in subject_warnings(
                            image[i:i + 1], f" (photo {i + 1} of {image.shape[0]})" if image.shape[0] > 1 else "")])


# At most this (of 1) in every channel is black to the eye: what ComfyUI's LoadImage makes of a
# fully transparent PNG (it drops the alpha; the colour under it is usually black).
BLACK = 1.0 / 255


def subject_warnings(image: torch.Tensor, which: str = "") -> list:
    """What makes a subject photo useless without being an error: all black, all transparent."""
    warnings = []
    if image.shape[-1] == 4 and float(image[..., 3].max()) <= 0:
        warnings.append(f"the subject photo{which} is fully transparent (alpha 0 everywhere): SISO sees no subject")
    elif float(image[..., :3].max()) <= BLACK:
        warnings.append(f"the subject photo{which} is all black: SISO would learn a black square. A transparent PNG "
                        "loaded with LoadImage looks like this (LoadImage drops the alpha and gives it as its MASK "
                        "output): use a photo where the subject is visible")
    return warnings


def _prepare_one(image: torch.Tensor, mask: torch.Tensor | None, mask_marks: str, background: str, which: str):
    height, width = image.shape[1:3]
    if min(height, width) < MIN_SIDE:
        raise ValueError(
            f"the subject photo{which} is {width}x{height} pixels; SISO needs at least {MIN_SIDE} on each side: the "
            "similarity networks look at it through 14-pixel patches of a 224-pixel view (DINOv2), and a smaller "
            "photo holds too little of the subject to compare against. Use a larger photo of the subject.")
    channels = image.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"the subject image{which} has {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")
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
        m = mask.detach().float().unsqueeze(1)
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
            raise ValueError(f"the subject mask{which} is empty (no subject pixels): check the mask or set background "
                             "to 'keep'")
        pixels = pixels * subject_mask + FILL[background] * (1 - subject_mask)
        notes.append(f"{background} background")
    return pixels.contiguous(), ", ".join(notes)
