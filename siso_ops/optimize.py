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
        return (f"{why.get(self.stop_reason, self.stop_reason)} after {self.iterations} iterations; "
                f"best iteration {self.best_iteration + 1} with loss {self.best_loss:.4f}")


def optimize(parameters: dict, generate, score, settings: OptimizationSettings, on_iteration=None) -> OptimizationResult:
    """parameters: name -> trainable tensor. on_iteration(report) may raise to cancel."""
    settings.check()
    params = list(parameters.values())
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, betas=settings.betas,
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
            history.append(values)
            shown = image.detach().float().clamp(0, 1).cpu()
            is_best = best is None or values["loss"] < best.best_loss
            if is_best:
                best = OptimizationResult(
                    best_iteration=i, best_loss=values["loss"], best_image=shown,
                    best_state={n: p.detach().clone() for n, p in parameters.items()})
            should_stop = stopper.update(values["loss"])
            if on_iteration is not None:
                on_iteration(IterationReport(i, settings.max_iterations, values, shown, is_best,
                                             best.best_iteration, stopper.stale_iterations))
            if should_stop:
                stop_reason = "early_stop"
                break
            if i == settings.max_iterations - 1:
                break  # a step after the last scored iteration would never be used
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            del loss, terms, image
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    best.history = history
    best.stop_reason = stop_reason
    return best
