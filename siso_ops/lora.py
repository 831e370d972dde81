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


LORA_FORMATS = ("comfyui", "diffusers")


def lora_layers(tensors: dict) -> dict:
    """ComfyUI-layout LoRA tensors -> {layer: (up, down, alpha)}."""
    layers = {}
    for key in tensors:
        if key.endswith(".lora_up.weight"):
            base = key[: -len(".lora_up.weight")]
            down = tensors[f"{base}.lora_down.weight"]
            alpha = tensors.get(f"{base}.alpha")
            layers[base] = (tensors[key], down, float(alpha) if alpha is not None else float(down.shape[0]))
    return layers


def to_diffusers(tensors: dict, targets: dict) -> dict:
    """ComfyUI-layout LoRA tensors -> the diffusers / PEFT layout that diffusers'
    ``load_lora_weights`` reads: ``<module>.lora_A.weight`` (down) and ``<module>.lora_B.weight``
    (up). PEFT files carry no per-layer alpha (a loader without metadata takes alpha = rank), so
    alpha / rank is multiplied into lora_B: the same delta for any alpha. ``targets``: the
    model's {ComfyUI layer: [(diffusers module, rows, reorder)]}; a fused ComfyUI layer (Flux's
    qkv) becomes one LoRA per diffusers module, each with its rows of up (in diffusers' order)."""
    out = {}
    for base, (up, down, alpha) in lora_layers(tensors).items():
        places = targets.get(base)
        if not places:
            raise ValueError(f"the layer {base} has no diffusers name: save this LoRA in the comfyui format "
                             "(or train it with lora_target 'attention', which every layout names)")
        scaled_up = up.float() * (alpha / down.shape[0])
        for module, rows, reorder in places:
            if rows is not None and rows[1] + rows[2] > scaled_up.shape[rows[0]]:
                raise ValueError(f"the layer {base} is smaller than its diffusers layout expects ({module}): this "
                                 "model's shapes have no diffusers equivalent; save in the comfyui format")
            part = scaled_up if rows is None else scaled_up.narrow(rows[0], rows[1], rows[2])
            part = part if reorder is None else reorder(part)   # the rows of up are the output rows
            out[f"{module}.lora_A.weight"] = down.to(up.dtype).contiguous().clone()
            out[f"{module}.lora_B.weight"] = part.to(up.dtype).contiguous()
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
    architecture: str = ""           # the base model, in modelspec's words (e.g. stable-diffusion-v1)
    diffusers_targets: dict | None = None   # where each layer lives in diffusers (see to_diffusers)

    def __repr__(self):
        return (f"SISO_LORA(rank {self.rank}, {len(self.tensors) // 3} layers, {self.model}, best "
                f"iteration {self.best_iteration + 1}/{self.iterations}, loss {self.best_loss:.4f})")




def file_metadata(lora: "SubjectLoRA", title: str, file_format: str, date: str) -> dict:
    """The safetensors header: SISO's own keys, kohya's rank/alpha keys (read by many tools) and
    modelspec's (what ComfyUI's model library shows: title, architecture, description)."""
    description = (f"SISO subject LoRA ({file_format} layout): rank {lora.rank}, alpha {lora.alpha:g}, best iteration "
                   f"{lora.best_iteration + 1} of {lora.iterations}, loss {lora.best_loss:.4f}, trained on {lora.model}")
    metadata = {
        "siso.model": lora.model, "siso.rank": str(lora.rank), "siso.alpha": f"{lora.alpha:g}",
        "siso.best_iteration": str(lora.best_iteration + 1), "siso.iterations": str(lora.iterations),
        "siso.best_loss": f"{lora.best_loss:.6f}", "siso.format": file_format,
        "ss_network_dim": str(lora.rank),
        # the diffusers layout carries alpha / rank inside lora_B: its alpha is the rank
        "ss_network_alpha": f"{lora.alpha if file_format == 'comfyui' else lora.rank:g}",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.title": title, "modelspec.description": description,
        "modelspec.date": date,
    }
    if lora.architecture:
        metadata["modelspec.architecture"] = f"{lora.architecture}/lora"
    return metadata
