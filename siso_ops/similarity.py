"""The SISO similarity loss: L = a * d_DINO + b * d_IR, d = negative cosine similarity.

The subject's embeddings are computed once, without grad; the generated image keeps its
gradient through preprocessing and both networks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class SimilarityLoss:
    def __init__(self, dino, ir, subject_image: torch.Tensor, dino_weight: float = 1.0, ir_weight: float = 1.0):
        self.terms = [(name, net, w) for name, net, w in (("dino", dino, dino_weight), ("ir", ir, ir_weight)) if w != 0]
        if not self.terms:
            raise ValueError("both similarity weights are 0: nothing would be optimised; set dino_weight or ir_weight above 0")
        with torch.no_grad():
            self.targets = {name: net.embed(subject_image).detach() for name, net, _ in self.terms}

    def __call__(self, image: torch.Tensor) -> dict:
        """image: BCHW RGB, [0, 1] range but unclamped. Returns the total and each term."""
        out = {}
        total = 0.0
        for name, net, weight in self.terms:
            emb = net.embed(image)
            distance = -F.cosine_similarity(emb.float(), self.targets[name].float().expand_as(emb), dim=-1).mean()
            out[name] = distance
            total = total + weight * distance
        out["loss"] = total
        return out
