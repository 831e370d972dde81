"""The early-stopping rule of SISO, with no dependency on torch or ComfyUI.

Rule (paper: x = 3 %, n = 7): an iteration counts as an improvement when its loss is lower
than the reference loss by more than x % of the reference's magnitude; the reference is the
loss of the last improving iteration (none before the first iteration, so the first always
improves). Every iteration that does not improve adds one to a stale count, an improvement
resets it, and the run stops when the stale count reaches n.

The authors' code writes the test as ``loss < best * (1 + x / 100)`` for their negative
cosine losses (always below zero); ``best - x/100 * |best|`` is the same test and also holds
when a loss is positive or zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class EarlyStopping:
    threshold_percent: float = 3.0
    patience: int = 7
    reference_loss: float = math.inf
    stale_iterations: int = 0
    history: list = field(default_factory=list)

    def __post_init__(self):
        if self.threshold_percent < 0:
            raise ValueError(f"early-stop threshold must be >= 0 %, got {self.threshold_percent}")
        if self.patience < 1:
            raise ValueError(f"early-stop patience must be at least 1 iteration, got {self.patience}")

    def improves(self, loss: float) -> bool:
        if math.isinf(self.reference_loss):
            return True
        margin = self.threshold_percent / 100.0 * abs(self.reference_loss)
        return loss < self.reference_loss - margin

    def update(self, loss: float) -> bool:
        """Record one iteration's loss; True when the run should stop after it."""
        loss = float(loss)
        if math.isnan(loss):
            raise FloatingPointError("the loss is NaN: early stopping cannot compare it")
        self.history.append(loss)
        if self.improves(loss):
            self.reference_loss = loss
            self.stale_iterations = 0
        else:
            self.stale_iterations += 1
        return self.stale_iterations >= self.patience
