"""The SISO optimisation loop: generate, score, keep the best, step, stop early.

Pure torch: the caller supplies ``generate()`` (a differentiable image from the current
LoRA) and ``score(image)`` (a dict with ``loss`` and its terms). The loss of iteration i is
the loss of the LoRA *before* step i, so the best iteration's LoRA is snapshotted before the
optimizer moves it (the authors' script keeps references that the optimizer then overwrites,
and so saves the last LoRA, not the best).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .early_stopping import EarlyStopping


@dataclass
class OptimizationSettings:
    max_iterations: int = 50
    learning_rate: float = 2e-4
    weight_decay: float = 1e-2
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    early_stop_percent: float = 3.0
    early_stop_patience: int = 7

    def check(self):
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be at least 1, got {self.max_iterations}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        EarlyStopping(self.early_stop_percent, self.early_stop_patience)  # validates both


@dataclass
class IterationReport:
    iteration: int            # 0-based
    max_iterations: int
    terms: dict               # float values: loss, dino, ir, ...
    image: torch.Tensor       # detached BCHW copy on CPU, clamped to [0, 1]
    is_best: bool
    best_iteration: int
    stale_iterations: int


@dataclass
class OptimizationResult:
    best_iteration: int
    best_loss: float
    best_image: torch.Tensor          # BCHW, CPU, [0, 1]
    best_state: dict                  # name -> tensor copy of the trainable parameters
    history: list = field(default_factory=list)   # one dict of float terms per iteration
    stop_reason: str = ""             # "early_stop" or "max_iterations"

    @property
    def iterations(self) -> int:
        return len(self.history)

    def describe(self) -> str:
        why = {"early_stop": "early stop (no improvement)", "max_iterations": "iteration cap reached"}
        text = (f"{why.get(self.stop_reason, self.stop_reason)} after {self.iterations} iterations; "
                f"best iteration {self.best_iteration + 1} with loss {self.best_loss:.4f}")
        best = self.history[self.best_iteration] if self.best_iteration < len(self.history) else {}
        per_photo = []
        for term, label in (("dino", "DINO"), ("ir", "IR")):
            values = [-best[k] for k in sorted((k for k in best if k.startswith(term + "@")),
                                               key=lambda k: int(k.split("@")[1]))]
            if values:
                per_photo.append(f"{label} " + " / ".join(f"{v:.3f}" for v in values))
        if per_photo:   # several reference photos: how close the best image is to each
            text += "; similarity per reference photo: " + ", ".join(per_photo)
        if "background" in best:   # a mask: how far the best image's background moved (0 = kept)
            text += f"; background error {best['background']:.5f} (mean squared, outside the mask)"
        return text


TERM_NAMES = {"loss": "total loss", "dino": "DINOv2 distance", "ir": "image-retrieval distance",
              "background": "background loss"}


def non_finite_message(iteration: int, values: dict, image: torch.Tensor, settings: OptimizationSettings) -> str:
    """Which term went NaN / infinite, and the advice that fits the cause: at the first iteration
    the LoRA is still zero (the stock model's output), so the learning rate cannot be the cause."""
    bad = [TERM_NAMES.get(k, k) for k, v in values.items() if k != "loss" and not math.isfinite(v)] or ["total loss"]
    what = f"iteration {iteration + 1}: the {' and the '.join(bad)} became NaN or infinite"
    image_bad = not bool(torch.isfinite(image.detach()).all())
    if iteration == 0:
        if image_bad:
            return (f"{what}, because the generated image already holds NaN or infinite pixels before any LoRA "
                    "step (the unchanged model and VAE made it; not the learning rate). Try precision fp32 (a "
                    "half-precision overflow), and check that this model and VAE give a normal image in a stock "
                    "KSampler + VAE Decode at this size.")
        return (f"{what} on a normal image before any LoRA step (not the learning rate): the similarity "
                "network's weights or the subject photo are broken; re-download the weight file and check the "
                "subject with SISO Load Subject's preview.")
    return (f"{what} after {iteration} LoRA step{'s' if iteration != 1 else ''}: the LoRA diverged. Lower "
            f"learning_rate (now {settings.learning_rate:g}; the paper uses 2e-4 to generate, 3e-4 to edit) or "
            "lora_alpha; precision fp32 helps if half precision overflows.")


def snapshot(parameters: dict) -> dict:
    """name -> a copy of each parameter. Parameters of one dtype and device (a LoRA's) are copied
    by one concatenation, one kernel on a GPU, where a copy each would launch one per tensor
    (1,120 for SDXL's attention LoRA, at every iteration that improves); the copies are views of it."""
    tensors = [p.detach() for p in parameters.values()]
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        return {n: t.clone() for n, t in zip(parameters, tensors)}
    flat = torch.cat([t.reshape(-1) for t in tensors])
    parts = torch.split(flat, [t.numel() for t in tensors])
    return {n: part.view(t.shape) for n, part, t in zip(parameters, parts, tensors)}


def flat_view(tensors: list) -> torch.Tensor | None:
    """The one 1-D tensor whose consecutive parts ``tensors`` are, in order and whole (a LoRASet's
    parameters in its buffer, or the gradients its cast returned as views of one tensor), as a
    detached view of their storage that shares their version counter; None where they are not
    laid out so (or one is None)."""
    if not tensors or tensors[0] is None:
        return None
    first = tensors[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (t is None or t.dtype != first.dtype or t.device != first.device or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset):
            return None
        offset += t.numel()
    return first.detach().as_strided((offset - first.storage_offset(),), (1,), first.storage_offset())


def flat_gradient(params: list, flat: torch.Tensor) -> torch.Tensor:
    """The parameters' gradients as one tensor laid out as ``flat``: the views they already are
    (a LoRASet's cast back gives every gradient as a part of one float32 tensor) without a copy,
    otherwise one concatenation, a missing gradient as zeros (every SISO LoRA layer gets one:
    check_lora_reached refuses a run where one is off the model's path). The concatenation's
    second copy of the gradients (float32 runs) lives after backward has freed the activations,
    below the iteration's peak that memory.py estimates."""
    grads = [p.grad for p in params]
    joined = flat_view(grads)
    if joined is not None and joined.dtype == flat.dtype:
        return joined
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(flat.dtype)
                      for g, p in zip(grads, params)])


def _clear_gradients(optimizer, params: list):
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None


def optimize(parameters: dict, generate, score, settings: OptimizationSettings, on_iteration=None) -> OptimizationResult:
    """parameters: name -> trainable tensor. on_iteration(report) may raise to cancel.

    Where the parameters are the consecutive parts of one tensor (a LoRASet's buffer: every SISO
    run), AdamW and the gradient clip work on that one tensor: a dozen operators per step instead
    of a dozen per parameter on the CPU (1,120 tensors for SDXL's attention LoRA, looped one by
    one), and on a GPU single kernels instead of multi-tensor ones over lists of 1,120 tensors
    built in Python at every step. AdamW is elementwise, so
    its step is the same per element, with one step count for all (they are all stepped together);
    the clip's total norm is then one norm of the whole gradient instead of the norm of the
    per-parameter norms, the same value up to the rounding of a float32 sum."""
    settings.check()
    params = list(parameters.values())
    flat = flat_view(params)
    stepped = [flat] if flat is not None else params
    optimizer = torch.optim.AdamW(stepped, lr=settings.learning_rate, betas=settings.betas,
                                  eps=settings.eps, weight_decay=settings.weight_decay)
    stopper = EarlyStopping(settings.early_stop_percent, settings.early_stop_patience)
    best = None
    history = []
    stop_reason = "max_iterations"
    try:
        for i in range(settings.max_iterations):
            image = generate()
            terms = score(image)
            loss = terms["loss"]
            values = {k: float(v.detach()) for k, v in terms.items()}
            if not all(math.isfinite(v) for v in values.values()):
                raise FloatingPointError(non_finite_message(i, values, image, settings))
            history.append(values)
            shown = image.detach().float().clamp(0, 1).cpu()
            is_best = best is None or values["loss"] < best.best_loss
            if is_best:
                best = OptimizationResult(best_iteration=i, best_loss=values["loss"], best_image=shown,
                                          best_state=snapshot(parameters))
            should_stop = stopper.update(values["loss"])
            if on_iteration is not None:
                on_iteration(IterationReport(i, settings.max_iterations, values, shown, is_best,
                                             best.best_iteration, stopper.stale_iterations))
            if should_stop:
                stop_reason = "early_stop"
                break
            if i == settings.max_iterations - 1:
                break  # a step after the last scored iteration would never be used
            _clear_gradients(optimizer, params)
            loss.backward()
            if flat is not None:
                flat.grad = flat_gradient(params, flat)
                for p in params:
                    p.grad = None
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(stepped, settings.max_grad_norm)
            optimizer.step()
            del loss, terms, image
    finally:
        _clear_gradients(optimizer, params)
        del optimizer
    best.history = history
    best.stop_reason = stop_reason
    return best
