"""The SISO similarity loss: L = a * d_DINO + b * d_IR, d = negative cosine similarity.

With several reference photos of the subject, each term is the negative MEAN cosine similarity
over the references (as the authors' ``get_*_negative_mean_cos_sim`` do with a list of
reference embeddings). The references' embeddings are computed once, each photo preprocessed
on its own (sizes may differ), without grad; the generated image keeps its gradient through
preprocessing and both networks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def weights_problem(dino_weight: float, ir_weight: float, purpose: str) -> str | None:
    """Why a pair of similarity weights cannot work, in the user's words, or None. Neither may be
    negative (a negative weight would reward looking UNLIKE the subject), and a weight of 0 skips
    its network, so at least one must be above 0. ``purpose``: what the networks would do."""
    if dino_weight < 0 or ir_weight < 0:
        return f"dino_weight and ir_weight must be >= 0, got {dino_weight} and {ir_weight}"
    if dino_weight + ir_weight == 0:
        return f"dino_weight and ir_weight are both 0: nothing would {purpose}; set at least one above 0"
    return None


def check_weights(dino_weight: float, ir_weight: float, purpose: str):
    problem = weights_problem(dino_weight, ir_weight, purpose)
    if problem:
        raise ValueError(problem)


def reference_similarities(embedding: torch.Tensor, references: list) -> torch.Tensor:
    """Cosine similarity of the generated images' embeddings to each reference, averaged over
    the generated batch: one value per reference. The per-reference expression is the one a
    single reference has always used, so one photo gives bitwise the same loss as before."""
    return torch.stack([F.cosine_similarity(embedding.float(), ref.float().expand_as(embedding), dim=-1).mean()
                        for ref in references])


class SimilarityLoss:
    def __init__(self, dino, ir, subject_images, dino_weight: float = 1.0, ir_weight: float = 1.0):
        """subject_images: one 1x3xHxW photo, or a list of them (the same subject)."""
        check_weights(dino_weight, ir_weight, "be optimised")
        self.terms = [(name, net, w) for name, net, w in (("dino", dino, dino_weight), ("ir", ir, ir_weight)) if w != 0]
        photos = list(subject_images) if isinstance(subject_images, (list, tuple)) else [subject_images]
        if not photos:
            raise ValueError("no reference photo of the subject")
        with torch.no_grad():
            self.targets = {name: [net.embed(photo).detach() for photo in photos] for name, net, _ in self.terms}
        self.references = len(photos)

    def __call__(self, image: torch.Tensor) -> dict:
        """image: BCHW RGB, [0, 1] range but unclamped. Returns the total and each term; with
        several references also each reference's distance as '<term>@<n>' (1-based)."""
        out = {}
        total = 0.0
        for name, net, weight in self.terms:
            similarities = reference_similarities(net.embed(image), self.targets[name])
            distance = -similarities.mean()
            out[name] = distance
            if self.references > 1:
                for i, similarity in enumerate(similarities.detach()):
                    out[f"{name}@{i + 1}"] = -similarity
            total = total + weight * distance
        out["loss"] = total
        return out
