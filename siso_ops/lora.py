"""A trainable LoRA delta, and its file format.

Each delta adds ``alpha / rank * up @ down`` to one weight, computed on the input side
(``lora_output``) in every layer it trains. ``up``
starts at zero and ``down`` random (Kaiming uniform), so iteration 0 equals the base model exactly. Exported
keys are the generic ``diffusion_model.<module>.lora_up.weight / .lora_down.weight /
.alpha`` form that ComfyUI's stock LoRA loaders read for every model family.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field

import safetensors.torch
import torch

from .weights import read_checkpoint


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

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        """The delta's contribution to a linear layer's output (see lora_output)."""
        return lora_output(x, self.down, self.up, self.scale)


def lora_output(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """A LoRA's contribution to a linear layer's output, ``scale * up (down x)``: the same
    function as adding ``scale * up @ down`` to the layer's weight, at rank-sized cost, and in
    the layer's output units whatever its weight is stored as. The one place SISO computes a
    LoRA: the training clone's layers, SISO Apply LoRA's on-the-fly layers and the memory
    estimate's shape-only layers all call it, so what is estimated, trained and applied is one
    function. ``up`` and ``down`` are cast to the input's dtype (float32 parameters under a
    bfloat16 autocast, a float32 file's LoRA on a half-precision model)."""
    hidden = torch.nn.functional.linear(x, down.to(x.dtype))
    out = torch.nn.functional.linear(hidden, up.to(x.dtype))
    return out if scale == 1.0 else out * scale


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


def check_warm_start_rank(rank: int, lora_rank: int, what: str = "initial_lora"):
    """A warm start's LoRA must have the run's rank (its layers are checked on the clone)."""
    if int(rank) != int(lora_rank):
        raise ValueError(f"{what} has rank {rank} but lora_rank is {lora_rank}: set lora_rank to {rank}")


def warm_start_tensors(tensors: dict, shapes: dict, rank: int, alpha: float, what: str = "initial_lora") -> dict:
    """Warm start: a LoRA's values (ComfyUI layout, e.g. an earlier run's) as this run's starting
    point, so iteration 0 is the model with that LoRA. ``shapes``: {layer: (up shape, down
    shape)} of the layers this run trains, at ``rank`` and ``alpha``. The LoRA must cover
    exactly those layers, at this rank and these shapes; its alpha may differ: up is rescaled by
    its alpha / ours, the same delta. Returns {layer: (up, down)} to copy into the run's LoRA."""
    layers = lora_layers(tensors)
    missing, extra = sorted(set(shapes) - set(layers)), sorted(set(layers) - set(shapes))
    if missing or extra:
        raise ValueError(
            f"{what} does not fit this run: it has {len(layers)} LoRA layers, this model with this lora_target "
            f"trains {len(shapes)}" + (f"; not in it: {missing[0]}" if missing else "")
            + (f"; not trained here: {extra[0]}" if extra else "")
            + ". Use the model and lora_target it was made with.")
    out = {}
    for base, (up_shape, down_shape) in shapes.items():
        up, down, file_alpha = layers[base]
        check_warm_start_rank(down.shape[0], rank, what)
        if tuple(up.shape) != tuple(up_shape) or tuple(down.shape) != tuple(down_shape):
            raise ValueError(f"{what}: layer {base} has shape {tuple(up.shape)} x {tuple(down.shape)}, this "
                             f"model's needs {tuple(up_shape)} x {tuple(down_shape)}: it was made "
                             "for another model")
        out[base] = (up.float() * (file_alpha / alpha), down)
    return out


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


# ----------------------------------------------------------------------------- reading a LoRA file back
LORA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")
# A LoRA whose change of a layer's weight is this many times the weight itself (root mean square)
# drowns the layer: SISO's trained LoRAs change a weight by a few percent, a wrongly scaled file
# (weights of 1e4) by 1e4 times and more, which renders black or NaN. Why this and not a layer
# call on a probe input: up @ down is what ComfyUI adds to the weight, so it judges every layer
# exactly (a probe input would test one), costs one small matrix product a layer on the CPU and
# needs no knowledge of each layer's forward. The absolute floor keeps a layer whose weight is
# (near) zero, such as a zero-initialised output projection, from being refused for any delta.
MAX_DELTA_RATIO = 100.0
MIN_DELTA_RMS = 1.0


class LoRAFileError(ValueError):
    """A LoRA file that cannot be applied to the model as it is; the message names the layer."""


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape) or "a single number"


def lora_file_rank(tensors: dict, weights: dict, name: str, model_text: str) -> int:
    """Checks a ComfyUI-layout LoRA file against the model's weights ({'diffusion_model.x.weight':
    tensor}) layer by layer, as ComfyUI's loader would apply it, and returns its rank. Raises a
    ``LoRAFileError`` naming the first layer that does not fit and what to do: pairs (an up without
    its down), dtype (floating point), shapes and ranks, the layer in the model, one rank for all
    layers, and a change of the weight that is finite and not absurdly large."""
    again = "Save the LoRA again with SISO Save LoRA (comfyui format), or use the file as it was saved."
    layers, unknown = {}, []
    for key in sorted(tensors):
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        layers.setdefault(key[: -len(suffix)], {})[suffix] = tensors[key]
    if not any(".lora_up.weight" in parts or ".lora_down.weight" in parts for parts in layers.values()):
        kind = "diffusers / PEFT (lora_A / lora_B)" if any(".lora_A." in k for k in tensors) else "unknown"
        raise LoRAFileError(f"{name} holds no ComfyUI-layout LoRA layers (*.lora_up.weight / *.lora_down.weight); its "
                            f"layout is {kind}. SISO Load LoRA reads files saved by SISO Save LoRA in the comfyui format.")
    if unknown:
        raise LoRAFileError(f"{name} holds {len(unknown)} tensor(s) that are no part of a ComfyUI-layout LoRA (the "
                            f"first: '{unknown[0]}'); ComfyUI would skip them and apply the rest. {again}")
    ranks, missing = {}, []
    for base, parts in layers.items():
        up, down, alpha = parts.get(".lora_up.weight"), parts.get(".lora_down.weight"), parts.get(".alpha")
        if up is None or down is None:
            has, lacks = ("lora_down", "lora_up") if up is None else ("lora_up", "lora_down")
            raise LoRAFileError(f"{name}: the layer {base} has a {has} but no {lacks}: the file is incomplete. {again}")
        for part, tensor in (("lora_up", up), ("lora_down", down), ("alpha", alpha)):
            if tensor is not None and not tensor.is_floating_point():
                raise LoRAFileError(f"{name}: the {part} of layer {base} holds {str(tensor.dtype).replace('torch.', '')} "
                                    f"numbers, not floating point (float32, float16 or bfloat16). {again}")
        if alpha is not None and alpha.numel() != 1:
            raise LoRAFileError(f"{name}: the alpha of layer {base} holds {alpha.numel()} values ({_shape(alpha)}); "
                                f"it must be one number. {again}")
        if down.dim() not in (2, 4) or up.dim() not in (2, 4) or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
            raise LoRAFileError(f"{name}: the layer {base} has a lora_up of {_shape(up)} and a lora_down of "
                                f"{_shape(down)}; a LoRA's are matrices (2-D, or 4-D for a convolution). {again}")
        if up.shape[1] != down.shape[0]:
            raise LoRAFileError(f"{name}: the layer {base} has a lora_up of rank {up.shape[1]} and a lora_down of rank "
                                f"{down.shape[0]} ({_shape(up)} and {_shape(down)}); they must be equal, else ComfyUI "
                                f"skips the layer. {again}")
        weight = weights.get(f"{base}.weight")
        if weight is None:
            missing.append(base)
            continue
        if weight.dim() == 4 and down.dim() == 2 and tuple(weight.shape[2:]) != (1, 1):
            raise LoRAFileError(f"{name}: the layer {base} is a {weight.shape[2]}x{weight.shape[3]} convolution in "
                                f"{model_text}, but the LoRA for it is shaped for a linear layer (lora_down {_shape(down)}): "
                                "ComfyUI would skip it. It was made for another model: load the checkpoint it was "
                                "trained on.")
        if up.shape[0] != weight.shape[0] or down[0].numel() != weight[0].numel():
            missing.append(base)
            continue
        ranks.setdefault(down.shape[0], base)
    if missing:
        raise LoRAFileError(f"{name} does not fit {model_text}: {len(missing)} of its {len(layers)} layers are missing "
                            f"or shaped differently in this model (first: {missing[0]}). It was made for another model: "
                            "load the checkpoint it was trained on.")
    if len(ranks) != 1:
        shown = ", ".join(f"rank {r} (e.g. {b})" for r, b in sorted(ranks.items()))
        raise LoRAFileError(f"{name} mixes LoRA ranks: {shown}. A SISO LoRA has one rank for every layer; this file "
                            "was made or edited elsewhere: save it again with SISO Save LoRA.")
    for base, parts in layers.items():
        _check_delta(name, base, parts, weights[f"{base}.weight"])
    return next(iter(ranks))


def _check_delta(name: str, base: str, parts: dict, weight: torch.Tensor):
    up, down, alpha = parts[".lora_up.weight"], parts[".lora_down.weight"], parts.get(".alpha")
    scale = (float(alpha) if alpha is not None else float(down.shape[0])) / down.shape[0]
    if not math.isfinite(scale):
        raise LoRAFileError(f"{name}: the alpha of layer {base} is {float(alpha)}, not a number. Save the LoRA again.")
    up2, down2 = up.flatten(1).double(), down.flatten(1).double()
    # ||scale * up @ down||^2 = scale^2 * trace((up^T up)(down down^T)): rank x rank matrices, no
    # out x in product (a Flux layer's would be 150 MB)
    square = float(((up2.T @ up2) * (down2 @ down2.T)).sum()) * scale * scale
    rms = math.sqrt(max(square, 0.0) / max(up2.shape[0] * down2.shape[1], 1)) if math.isfinite(square) else math.inf
    if weight.device.type == "meta":   # a weight not in memory here: only the delta can be judged
        patched_finite, weight_rms = math.isfinite(rms), 0.0
    else:
        weight_rms = float(torch.linalg.vector_norm(weight.detach(), dtype=torch.float64)) / math.sqrt(max(weight.numel(), 1))
        # the first call of the patched layer uses weight + delta in the model's dtype: surely finite
        # when the largest weight plus a bound of the largest delta entry (Cauchy-Schwarz) fit in it
        bound = abs(scale) * float(up2.norm(dim=1).max()) * float(down2.norm(dim=0).max())
        largest = float(weight.detach().abs().max()) if weight.numel() else 0.0
        patched_finite = math.isfinite(rms) and (bound + largest < torch.finfo(weight.dtype).max if
                                                 weight.is_floating_point() else True)
        if math.isfinite(rms) and not patched_finite:   # rare: compute it
            delta = (up2 @ down2 * scale).to(weight.device)
            patched_finite = bool(torch.isfinite((weight.detach().flatten(1).double() + delta).to(weight.dtype)).all())
    if not patched_finite:
        raise LoRAFileError(f"{name}: the layer {base} would get non-finite weights (NaN or infinite in "
                            f"{str(weight.dtype).replace('torch.', '')}) from this LoRA: its up / down values are far "
                            "too large. The image would be black or NaN; this file cannot be used.")
    if rms > MIN_DELTA_RMS and rms > MAX_DELTA_RATIO * weight_rms:
        raise LoRAFileError(f"{name}: the layer {base} would change by {rms:.3g} (root mean square), "
                            f"{rms / max(weight_rms, 1e-30):.3g} times its own weight ({weight_rms:.3g}): the image "
                            "would be black or noise. The file's up / down values are wrongly scaled; this file cannot "
                            "be used.")


def header_number(header: dict, key: str, kind, default, name: str):
    """A number of a LoRA file's header (``kind`` int or float); ``default`` when it is absent."""
    text = header.get(key)
    if text is None:
        return default
    try:
        value = kind(text)
    except (TypeError, ValueError):
        value = None
    if value is None or (kind is int and value < 0):
        what = "a whole number of 0 or more" if kind is int else "a number"
        raise LoRAFileError(f"{name}: its header field {key} is {text!r}, not {what}: the header was edited or "
                            "damaged. Save the LoRA again with SISO Save LoRA, or fix that field.")
    return value


def read_lora_file(path: str, name: str) -> tuple:
    """(tensors, header) of a LoRA file, read from disk once: the tensors and the safetensors
    header's metadata come from the same bytes. A file that is not a readable, finite
    safetensors file is refused by the pack's weight reader (weights.read_checkpoint), which
    names what is wrong with it (empty, cut short, renamed, NaN, unreadable)."""
    tensors, header = None, {}
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        tensors = safetensors.torch.load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    except Exception:   # noqa: BLE001  (the reader below says what is wrong, in words)
        tensors = None
    if not tensors or not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
        read_checkpoint(path, "SISO LoRA")      # raises, naming the file's problem
        raise LoRAFileError(f"{name} could not be read as a LoRA file (safetensors).")
    return tensors, header


def load_subject_lora(path: str, name: str, fits, model: str, layouts: dict) -> SubjectLoRA:
    """SISO Load LoRA: a LoRA file as a SubjectLoRA. ``fits(tensors)`` checks the file against
    the model, layer by layer, and returns its rank (host.check_lora_fits); ``model`` is the
    model's description and ``layouts`` what SISO Save LoRA needs of it (subject_lora_layouts).
    The header's SISO fields (best iteration, iterations, loss) are read where present."""
    tensors, header = read_lora_file(path, name)
    rank = fits(tensors)
    alphas = {float(alpha) for _, _, alpha in lora_layers(tensors).values()}
    best = header_number(header, "siso.best_iteration", int, 1, name)
    iterations = header_number(header, "siso.iterations", int, 0, name)
    loss = header_number(header, "siso.best_loss", float, math.nan, name)
    return SubjectLoRA(tensors=tensors, rank=rank, alpha=alphas.pop() if len(alphas) == 1 else float(rank), model=model,
                       best_iteration=max(best - 1, 0), iterations=iterations, best_loss=loss,
                       stop_reason=f"loaded from {name}", **layouts)


def write_lora_file(tensors: dict, path: str, metadata: dict):
    """Writes a LoRA file whole or not at all: to a temporary name in the same folder, then renamed
    over ``path`` (``os.replace``, atomic on one file system), so an interrupted or failed write
    leaves an earlier file of that name intact and no half file behind. A failure names the folder."""
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    temporary = None
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        os.close(handle)
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, temporary, metadata=metadata)
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise OSError(f"could not write '{name}' in {folder}: {reason}. Free space there or make it writable "
                      "for the user ComfyUI runs as, then queue again (an earlier file of that name is unchanged)"
                      ) from error
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
