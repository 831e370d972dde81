"""A trainable LoRA delta, and its file format.

Each delta adds ``alpha / rank * up @ down`` to one weight: on the input side (``on_input``) in
ComfyUI's own layers while training, as a ComfyUI weight wrapper in other packs' layers. ``up``
starts at zero and ``down`` random (Kaiming uniform), so iteration 0 equals the base model exactly. Exported
keys are the generic ``diffusion_model.<module>.lora_up.weight / .lora_down.weight /
.alpha`` form that ComfyUI's stock LoRA loaders read for every model family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


class LoRADelta(torch.nn.Module):
    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, device=None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.rank = int(rank)
        self.alpha = float(alpha)
        # Drawn on the CPU from the run's generator, so one seed gives one result on any device.
        down = torch.empty(self.rank, in_features, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.down = torch.nn.Parameter(down.to(device))
        self.up = torch.nn.Parameter(torch.zeros(out_features, self.rank, device=device, dtype=torch.float32))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.up @ self.down) * self.scale
        return weight + delta.reshape(weight.shape).to(weight.dtype)

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        """The delta's contribution to a linear layer's output, ``scale * up (down x)``: the same
        function as adding it to the weight, at rank-sized cost."""
        hidden = torch.nn.functional.linear(x, self.down.to(x.dtype))
        out = torch.nn.functional.linear(hidden, self.up.to(x.dtype))
        return out if self.scale == 1.0 else out * self.scale

    def passive_memory_usage(self):
        # ComfyUI asks weight wrappers for their size when it plans memory.
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def move_to(self, device=None):
        # ComfyUI moves weight wrappers with the model; .to() keeps the Parameter objects,
        # so the optimizer still holds them.
        if device is not None:
            self.to(device)
        return self.passive_memory_usage()


def export_lora(deltas: dict, dtype=torch.float32) -> dict:
    """{weight key 'diffusion_model.x.weight': LoRADelta} -> LoRA file tensors (CPU copies)."""
    out = {}
    for key, delta in deltas.items():
        base = key[: -len(".weight")] if key.endswith(".weight") else key
        out[f"{base}.lora_up.weight"] = delta.up.detach().to("cpu", dtype).clone()
        out[f"{base}.lora_down.weight"] = delta.down.detach().to("cpu", dtype).clone()
        out[f"{base}.alpha"] = torch.tensor(delta.alpha, dtype=torch.float32)
    return out



@dataclass
class SubjectLoRA:
    """The learned LoRA in ComfyUI's LoRA file layout, plus how it was made."""
    tensors: dict
    rank: int
    alpha: float
    model: str
    best_iteration: int
    iterations: int
    best_loss: float
    stop_reason: str
    history: list = field(default_factory=list)

    def __repr__(self):
        return (f"SISO_LORA(rank {self.rank}, {len(self.tensors) // 3} layers, {self.model}, best "
                f"iteration {self.best_iteration + 1}/{self.iterations}, loss {self.best_loss:.4f})")


