"""SISO Subject Score: how close each image of a batch is to the subject, by the two networks
SISO optimises against (DINOv2 and the image-retrieval embedding), without gradients.

Each image's similarity to the subject is the mean cosine similarity of its embedding to the
reference photos' embeddings, exactly the quantity SISO's loss maximises, so a score here is
comparable with the similarities in SISO Optimize's report and chart. The ranking uses the
weighted mean ``(a * DINO + b * IR) / (a + b)`` of the two, with SISO Optimize's weights.

Beside them, the SISO paper's diversity figure (its Table 2, "Diversity"): the mean squared error
between each image and the subject photo, in RGB in [0, 1]. A render that copies the photo scores
near 0 (overfitting); it does not enter the ranking.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .precision import autocast
from .similarity import check_weights, reference_similarities
from .subject import MIN_SIDE

CHUNK = 4   # images embedded at once: bounds the activations of a large batch


@dataclass
class Scores:
    dino: list          # per image, None where the network is skipped (weight 0)
    ir: list
    combined: list      # the ranking score
    order: list         # image indices, best first
    subject_mse: list | None = None   # per image: the diversity figure (MSE to the subject photo)

    @property
    def best(self) -> int:
        return self.order[0]

    def table(self) -> str:
        mse = self.subject_mse or [None] * len(self.order)
        rows = ["rank | image | DINO sim | IR sim | score" + (" | MSE to subject (diversity)" if self.subject_mse else "")]
        for rank, i in enumerate(self.order, 1):
            values = (self.dino[i], self.ir[i], self.combined[i]) + ((mse[i],) if self.subject_mse else ())
            cells = ["-" if v is None else f"{v:.4f}" for v in values]
            rows.append(f"{rank} | {i} | " + " | ".join(cells))
        return "\n".join(rows)


def size_problem(width: int, height: int, which: str = "the images") -> str | None:
    """Images too small to score: below the side SISO Load Subject accepts for a subject photo
    (DINOv2 would see less than 2 pixels a patch, i.e. nothing to match)."""
    if min(width, height) >= MIN_SIDE:
        return None
    return (f"{which} are {width}x{height} pixels; SISO Subject Score needs at least {MIN_SIDE} a side, as SISO Load "
            f"Subject does for the subject's photos (smaller, the networks see nothing to compare): scale them up "
            f"first (e.g. 'Upscale Image' to {max(width, MIN_SIDE)}x{max(height, MIN_SIDE)} or more) or score larger images")


def score_images(images: torch.Tensor, references: list, dino, ir, dino_weight: float = 1.0, ir_weight: float = 1.0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, on_chunk=None) -> Scores:
    """images: BCHW in [0, 1]; references: the subject's photos (1x3xHxW each); dino / ir: the
    feature networks (None where the weight is 0). ``on_chunk(done, total)`` may raise to cancel."""
    check_weights(dino_weight, ir_weight, "score the images")
    nets = [(name, net, w) for name, net, w in (("dino", dino, dino_weight), ("ir", ir, ir_weight)) if w > 0]
    device = torch.device(device)
    sims = {name: [] for name, _, _ in nets}
    with torch.no_grad(), autocast(device, dtype):
        targets = {name: [net.embed(ref.to(device).float()) for ref in references] for name, net, _ in nets}
        total = images.shape[0]
        for start in range(0, total, CHUNK):
            chunk = images[start:start + CHUNK].to(device).float()
            for name, net, _ in nets:
                embedding = net.embed(chunk).float()
                for row in embedding:   # one image at a time: the mean over references only
                    sims[name].append(float(reference_similarities(row[None], targets[name]).mean()))
            if on_chunk is not None:
                on_chunk(min(start + CHUNK, total), total)
    count = images.shape[0]
    dino_sims = sims.get("dino", [None] * count)
    ir_sims = sims.get("ir", [None] * count)
    weight_sum = sum(w for _, _, w in nets)
    combined = [sum(w * sims[name][i] for name, _, w in nets) / weight_sum for i in range(count)]
    order = sorted(range(count), key=lambda i: (-combined[i], i))
    return Scores(dino_sims, ir_sims, combined, order, subject_mse(images, references))


def subject_mse(images: torch.Tensor, references: list) -> list:
    """The paper's diversity: per image (BCHW in [0, 1]) the mean squared error to the subject's
    photos (1x3xHxW each), the image resized to each photo's size (bilinear, antialiased), the mean
    over the photos. Higher: the image copies the photo less."""
    out = []
    with torch.no_grad():
        for image in images.float():
            errors = []
            for ref in references:
                ref = ref.float().to(image.device)
                x = image[None]
                if x.shape[-2:] != ref.shape[-2:]:
                    x = F.interpolate(x, size=tuple(ref.shape[-2:]), mode="bilinear", antialias=True, align_corners=False)
                errors.append(float(((x - ref) ** 2).mean()))
            out.append(sum(errors) / len(errors))
    return out
