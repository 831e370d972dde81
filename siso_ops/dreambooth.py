"""Single-image DreamBooth's training set, for ComfyUI's own trainer (Train LoRA, TrainLoraNode).

DreamBooth with prior preservation minimises, per step,

    L = L_subject + prior_weight * L_class

where L_subject is the denoising loss on the subject photo captioned with a rare token ("a photo
of sks dog") and L_class the same loss on an image the model itself generated from the class
prompt ("a photo of a dog"), so the model keeps what "a dog" looked like before.

ComfyUI's trainer takes one latent and one conditioning per sample and, at batch size 1, draws one
sample uniformly at random each step and minimises its loss: it has no per-sample weight. With the
subject repeated ``k`` times and each class image ``m`` times in the set, the expected step
gradient is proportional to

    k * n_subject * mean(L_subject) + m * n_class * mean(L_class)

so the sample ratio ``m * n_class / (k * n_subject)`` *is* the prior weight, up to a constant
factor that Adam and AdamW (the trainer's default) do not see. What the ratio cannot give is
DreamBooth's pairing (both losses in every step): a single step sees one of them, so the
gradient is noisier; accumulating about 1 + prior_weight draws per optimiser step
(``TrainingSet.accumulation``) averages it out. This module picks the smallest whole ``k`` and
``m`` whose ratio is nearest the weight asked for and reports the weight it gives.

Plain Python and torch: a latent is ``{"samples": BxCxHxW}``, a conditioning ComfyUI's list of
``[tensor, options]`` entries; nothing here imports ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrainingSet:
    latents: list          # one {"samples": 1xCxHxW} per sample, the subject's first
    conditionings: list    # one CONDITIONING (a one-entry list) per sample, in the same order
    subject_copies: int    # k: how often each subject photo is in the set
    class_copies: int      # m: how often each class image is in the set
    subject_count: int
    class_count: int

    @property
    def prior_weight(self) -> float:
        """The weight of the class loss that the sample ratio gives."""
        return self.class_copies * self.class_count / (self.subject_copies * self.subject_count)

    @property
    def accumulation(self) -> int:
        """Draws per optimiser step that hold one subject sample on average (1 + the weight)."""
        return max(1, round(len(self.latents) / (self.subject_copies * self.subject_count)))

    def summary(self) -> str:
        return (f"{len(self.latents)} samples: {self.subject_count} subject photo(s) x {self.subject_copies} "
                f"+ {self.class_count} class image(s) x {self.class_copies}; prior weight {self.prior_weight:.3g} "
                f"(the sample ratio). Train LoRA: batch_size 1 (a prompt pairs with its own image only at 1), "
                f"grad_accumulation_steps {self.accumulation} (about one subject sample per optimiser step).")


def copies_for_weight(prior_weight: float, subject_count: int, class_count: int) -> tuple[int, int]:
    """(k, m): whole copies of each subject photo and each class image whose sample ratio
    m * class_count / (k * subject_count) is nearest ``prior_weight`` with k, m as small as that
    allows (at most 64 copies each)."""
    if prior_weight <= 0 or class_count == 0:
        return 1, 0
    best = None
    for k in range(1, 65):
        for m in range(1, 65):
            error = abs(m * class_count / (k * subject_count) - prior_weight) / prior_weight
            key = (round(error, 3), k + m)
            if best is None or key < best[0]:
                best = (key, k, m)
    return best[1], best[2]


def _one_entry(conditioning, what: str) -> list:
    if not isinstance(conditioning, list) or len(conditioning) != 1:
        count = len(conditioning) if isinstance(conditioning, list) else type(conditioning).__name__
        raise ValueError(f"the {what} conditioning must be one prompt from one text-encode node (it has {count} "
                         "entries, e.g. from Conditioning (Combine)): Train LoRA pairs one entry with each image, "
                         f"so connect a single CLIP Text Encode to {what}_prompt.")
    return conditioning


def _samples(latent, what: str) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[0] == 0:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"the {what} latent must be an image latent batch (B x C x H x W with B >= 1), got {shape}: "
                         f"connect {'VAE Encode of the subject photo' if what == 'subject' else 'the KSampler that generates the class images'}.")
    if not torch.isfinite(samples).all():
        raise ValueError(f"the {what} latent holds NaN or infinite values: re-encode or re-generate it.")
    return samples


def training_set(subject_latent: dict, subject_prompt: list, class_latents: dict, class_prompt: list,
                 prior_weight: float) -> TrainingSet:
    """The subject photo(s) with the rare-token prompt and the class images with the class prompt,
    each as often as ``prior_weight`` asks (see the module's note)."""
    subject = _samples(subject_latent, "subject")
    _one_entry(subject_prompt, "subject")
    if prior_weight > 0:
        classes = _samples(class_latents, "class")
        _one_entry(class_prompt, "class")
        if classes.shape[1] != subject.shape[1]:
            raise ValueError(f"the class images' latents have {classes.shape[1]} channels and the subject's "
                             f"{subject.shape[1]}: both must come from the same model and VAE.")
    else:
        classes = subject[:0]
    k, m = copies_for_weight(prior_weight, subject.shape[0], classes.shape[0])
    latents, conditionings = [], []
    for image in subject:
        latents += [{"samples": image[None]}] * k
        conditionings += [subject_prompt] * k
    for image in classes:
        latents += [{"samples": image[None]}] * m
        conditionings += [class_prompt] * m
    return TrainingSet(latents, conditionings, k, m, subject.shape[0], classes.shape[0])
