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
import weakref
from dataclasses import dataclass, field

import safetensors.torch
import torch

from .weights import TensorEntry, read_checkpoint, read_safetensors_header, write_file_whole


class LoRADelta(torch.nn.Module):
    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, device=None,
                 generator: torch.Generator | None = None, storage: tuple | None = None):
        """``storage``: (down, up) float32 views this delta's parameters live in (LoRASet's buffer),
        else tensors of their own."""
        super().__init__()
        self.rank = int(rank)
        self.alpha = float(alpha)
        # Drawn on the CPU from the run's generator, so one seed gives one result on any device.
        down = torch.empty(self.rank, in_features, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        if storage is None:
            storage = (torch.empty(self.rank, in_features, device=device, dtype=torch.float32),
                       torch.empty(out_features, self.rank, device=device, dtype=torch.float32))
        with torch.no_grad():
            storage[0].copy_(down)
            storage[1].zero_()
        self.down = torch.nn.Parameter(storage[0])
        self.up = torch.nn.Parameter(storage[1])
        self.group = None      # a weak reference to the LoRASet it belongs to, and its place there
        self.index = -1

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def on_input(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The delta's contribution to a linear layer's output, added to ``base`` where given (see
        lora_output). In a LoRASet, under gradients and in half precision, with the set's one cast
        of all its parameters."""
        down, up = self.down, self.up
        lora_set = self.group() if self.group is not None else None
        if lora_set is not None and torch.is_grad_enabled():
            dtype = lora_compute_dtype(x)
            if dtype != down.dtype:
                down, up = lora_set.cast(dtype)[self.index]
        return lora_output(x, down, up, self.scale, base)


def lora_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in on input ``x``: autocast's where autocast is on for
    its device (F.linear is one of the operators autocast casts), else ``x``'s own."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def lora_output(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float,
                base: torch.Tensor | None = None) -> torch.Tensor:
    """A LoRA's contribution to a linear layer's output, ``scale * up (down x)``: the same
    function as adding ``scale * up @ down`` to the layer's weight, at rank-sized cost, and in
    the layer's output units whatever its weight is stored as. The one place SISO computes a
    LoRA: the training clone's layers, SISO Apply LoRA's on-the-fly layers and the memory
    estimate's shape-only layers all call it, so what is estimated, trained and applied is one
    function. ``up`` and ``down`` are cast to the dtype the layer computes in (lora_compute_dtype:
    float32 parameters under a bfloat16 autocast, a float32 file's LoRA on a half-precision model).

    ``base``: the layer's own output, ``base + scale * up (down x)`` returned. Where it is in the
    compute dtype, the second product, the scale and the sum are one matrix multiply-add (addmm:
    one kernel, where a product and an add are two per layer and call; backward is the same two
    products). It rounds once where the product and the sum rounded apart: the same function in
    another float order."""
    dtype = lora_compute_dtype(x)
    hidden = torch.nn.functional.linear(x, down.to(dtype))
    up = up.to(dtype)
    if base is not None and base.dtype == dtype and base.shape[:-1] == hidden.shape[:-1] \
            and base.shape[-1] == up.shape[0] and base.is_contiguous():
        flat = torch.addmm(base.reshape(-1, base.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), up.t(), alpha=scale)
        return flat.view(base.shape)
    out = torch.nn.functional.linear(hidden, up)
    out = out if scale == 1.0 else out * scale
    return out if base is None else base + out


class _CastTogether(torch.autograd.Function):
    """All of a LoRASet's parameters cast to a half-precision dtype by one kernel (the set's
    buffer holds them all), and their gradients cast back to float32 by one: the gradient of
    each parameter is its part of that one tensor (a view, which autograd's accumulation keeps
    without a copy)."""

    @staticmethod
    def forward(ctx, buffer, dtype, lora_set, *parameters):
        # weakly: the set keeps this cast (and so this graph node) until backward
        ctx.lora_set, ctx.shapes = weakref.ref(lora_set), lora_set.shapes
        return buffer.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        lora_set = ctx.lora_set()
        if lora_set is not None:
            lora_set.drop_cast()       # its graph is used up: the next forward casts again
        return (None, None, None, *_split_as(grad.float(), ctx.shapes))


def _split_as(flat: torch.Tensor, shapes: list) -> list:
    """``flat`` (one of a LoRASet's buffer layout) as views of ``shapes``, in order."""
    parts = torch.split(flat, [shape.numel() for shape in shapes])
    return [part.view(shape) for part, shape in zip(parts, shapes)]


class LoRASet:
    """The LoRA deltas of one run, their float32 parameters laid out in one buffer (each a
    Parameter over its part; AdamW, the gradient clip and the saved states see them one by one,
    as before). What the buffer buys is the cast: a forward in half precision casts every delta
    from the float32 parameters, and backward casts every gradient back. Per delta and call that
    is two kernels each way (bfloat16 SDXL: 1,120 cast kernels in the forward pass and 1,120 in
    backward, about a fifth of what the denoiser launches per iteration on a GPU); here it is one
    kernel for the whole set each way, made once per parameter change and dtype and reused by
    every layer and call until backward uses it up.

    The one difference in arithmetic: a delta called more than once before backward (several
    denoising steps with gradients) sums its gradients in the compute dtype before the one cast
    back (as autocast's own cast cache does), not in float32 per call. Under no gradients (the
    self-checks, denoising steps without gradients) each delta casts itself per call as it did:
    nothing to save there, and a check that changes one delta would make the set cast again."""

    def __init__(self, shapes: list, rank: int, alpha: float, device=None, generator: torch.Generator | None = None):
        """``shapes``: (out_features, in_features) per delta, in the order the deltas are drawn."""
        rank = int(rank)
        # each delta's down, then its up: the order of the buffer, of the casts and of the gradients
        self.shapes = [torch.Size(shape) for o, i in shapes for shape in ((rank, i), (o, rank))]
        self.buffer = torch.empty(sum(shape.numel() for shape in self.shapes), device=device, dtype=torch.float32)
        views = _split_as(self.buffer, self.shapes)
        self.deltas = []
        for index, (out_features, in_features) in enumerate(shapes):
            delta = LoRADelta(out_features, in_features, rank, alpha, generator=generator,
                              storage=(views[2 * index], views[2 * index + 1]))
            delta.group, delta.index = weakref.ref(self), index
            self.deltas.append(delta)
        self.parameters = [p for delta in self.deltas for p in (delta.down, delta.up)]
        self._cast = None
        self._key = None

    def cast(self, dtype: torch.dtype) -> list:
        """[(down, up)] per delta in ``dtype``, under gradients. The parameters share the
        buffer's version counter, so one number says whether any of them changed."""
        key = (self.buffer._version, dtype)
        if self._key != key:
            views = _split_as(_CastTogether.apply(self.buffer, dtype, self, *self.parameters), self.shapes)
            self._cast = list(zip(views[0::2], views[1::2]))
            self._key = key
        return self._cast

    def drop_cast(self):
        self._cast = self._key = None


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


# The largest rank SISO Optimize trains (its lora_rank input's maximum).
MAX_RANK = 128


def warm_start_rank_problem(rank: int, lora_rank: int, what: str = "initial_lora") -> str | None:
    """Why a LoRA of ``rank`` cannot start a run of ``lora_rank``, with advice that can be followed."""
    if int(rank) == int(lora_rank):
        return None
    if not 1 <= int(rank) <= MAX_RANK:
        return (f"{what} has rank {rank}, but SISO Optimize trains ranks 1 to {MAX_RANK} (lora_rank): it cannot go on "
                f"from this LoRA. Leave initial_lora empty to start from zero, or load a LoRA of rank {MAX_RANK} or "
                "less (as SISO Save LoRA writes)")
    return f"{what} has rank {rank} but lora_rank is {lora_rank}: set lora_rank to {rank}"


def check_warm_start_rank(rank: int, lora_rank: int, what: str = "initial_lora"):
    """A warm start's LoRA must have the run's rank (its layers are checked on the clone)."""
    problem = warm_start_rank_problem(rank, lora_rank, what)
    if problem:
        raise ValueError(problem)


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
    warnings: list = field(default_factory=list)   # what makes it useless without being an error

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


AGAIN = "Save the LoRA again with SISO Save LoRA (comfyui format), or use the file as it was saved."


def lora_layout(entries: dict, name: str) -> tuple:
    """({layer: {suffix: entry}}, rank) of a ComfyUI-layout LoRA file from its tensors' dtypes and
    shapes alone ({key: weights.TensorEntry}, as the file's header gives them: no tensor is read).
    Raises a ``LoRAFileError`` naming the first layer that cannot be a LoRA and what to do: the
    layout (diffusers keys, foreign tensors), pairs (an up without its down), dtype (floating
    point), shapes and ranks, and one rank for all layers."""
    layers, unknown = {}, []
    for key in sorted(entries):
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        layers.setdefault(key[: -len(suffix)], {})[suffix] = entries[key]
    if not any(".lora_up.weight" in parts or ".lora_down.weight" in parts for parts in layers.values()):
        kind = "diffusers / PEFT (lora_A / lora_B)" if any(".lora_A." in k for k in entries) else "unknown"
        raise LoRAFileError(f"{name} holds no ComfyUI-layout LoRA layers (*.lora_up.weight / *.lora_down.weight); its "
                            f"layout is {kind}. SISO Load LoRA reads files saved by SISO Save LoRA in the comfyui format.")
    if unknown:
        raise LoRAFileError(f"{name} holds {len(unknown)} tensor(s) that are no part of a ComfyUI-layout LoRA (the "
                            f"first: '{unknown[0]}'); ComfyUI would skip them and apply the rest. {AGAIN}")
    ranks = {}
    for base, parts in layers.items():
        up, down, alpha = parts.get(".lora_up.weight"), parts.get(".lora_down.weight"), parts.get(".alpha")
        if up is None or down is None:
            has, lacks = ("lora_down", "lora_up") if up is None else ("lora_up", "lora_down")
            raise LoRAFileError(f"{name}: the layer {base} has a {has} but no {lacks}: the file is incomplete. {AGAIN}")
        for part, entry in (("lora_up", up), ("lora_down", down), ("alpha", alpha)):
            if entry is not None and not entry.floating:
                raise LoRAFileError(f"{name}: the {part} of layer {base} holds {entry.dtype} numbers, not floating "
                                    f"point (float32, float16 or bfloat16). {AGAIN}")
        if alpha is not None and alpha.numel != 1:
            raise LoRAFileError(f"{name}: the alpha of layer {base} holds {alpha.numel} values ({_shape(alpha)}); "
                                f"it must be one number. {AGAIN}")
        if len(down.shape) not in (2, 4) or len(up.shape) not in (2, 4) or (len(up.shape) == 4 and tuple(up.shape[2:]) != (1, 1)):
            raise LoRAFileError(f"{name}: the layer {base} has a lora_up of {_shape(up)} and a lora_down of "
                                f"{_shape(down)}; a LoRA's are matrices (2-D, or 4-D for a convolution). {AGAIN}")
        if up.shape[1] != down.shape[0]:
            raise LoRAFileError(f"{name}: the layer {base} has a lora_up of rank {up.shape[1]} and a lora_down of rank "
                                f"{down.shape[0]} ({_shape(up)} and {_shape(down)}); they must be equal, else ComfyUI "
                                f"skips the layer. {AGAIN}")
        ranks.setdefault(down.shape[0], base)
    if len(ranks) != 1:
        shown = ", ".join(f"rank {r} (e.g. {b})" for r, b in sorted(ranks.items()))
        raise LoRAFileError(f"{name} mixes LoRA ranks: {shown}. A SISO LoRA has one rank for every layer; this file "
                            "was made or edited elsewhere: save it again with SISO Save LoRA.")
    return layers, next(iter(ranks))


def lora_file_layout(path: str, name: str) -> tuple:
    """(rank, header metadata) of a LoRA file, from its header alone (weights.read_safetensors_header:
    milliseconds, no tensor read): what SISO Load LoRA checks at queue time and before it loads."""
    entries, header = read_safetensors_header(path, "SISO LoRA")
    _, rank = lora_layout(entries, name)
    header_fields(header, name)
    return rank, header


def lora_file_rank(tensors: dict, weights: dict, name: str, model_text: str) -> int:
    """Checks a ComfyUI-layout LoRA file against the model's weights ({'diffusion_model.x.weight':
    tensor}) layer by layer, as ComfyUI's loader would apply it, and returns its rank. Raises a
    ``LoRAFileError`` naming the first layer that does not fit and what to do: its layout
    (lora_layout), the layer in the model, and a change of the weight that is finite and not
    absurdly large."""
    layers, rank = lora_layout({key: TensorEntry.of(t) for key, t in tensors.items()}, name)
    missing = []
    for base in layers:
        up, down = tensors[f"{base}.lora_up.weight"], tensors[f"{base}.lora_down.weight"]
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
    if missing:
        raise LoRAFileError(f"{name} does not fit {model_text}: {len(missing)} of its {len(layers)} layers are missing "
                            f"or shaped differently in this model (first: {missing[0]}). It was made for another model: "
                            "load the checkpoint it was trained on.")
    for base in layers:
        parts = {suffix: tensors[base + suffix] for suffix in LORA_SUFFIXES if base + suffix in tensors}
        _check_delta(name, base, parts, weights[f"{base}.weight"])
    return rank


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


def header_fields(header: dict, name: str) -> tuple:
    """(best iteration counted from 1, iterations, best loss) of a LoRA file's header, where present."""
    return (header_number(header, "siso.best_iteration", int, 1, name),
            header_number(header, "siso.iterations", int, 0, name),
            header_number(header, "siso.best_loss", float, math.nan, name))


def read_lora_file(path: str, name: str) -> tuple:
    """(tensors, header) of a LoRA file. Its header is checked first (lora_file_layout: layout,
    ranks, dtypes, header fields), so a file that cannot be a LoRA is refused before any tensor
    is read; then the tensors are read once. A file that is not a readable, finite safetensors
    file is refused by the pack's weight reader (weights.read_checkpoint), which names what is
    wrong with it (empty, cut short, renamed, NaN, unreadable)."""
    _, header = lora_file_layout(path, name)
    try:
        with open(path, "rb") as handle:
            tensors = safetensors.torch.load(handle.read())
    except Exception:   # noqa: BLE001  (the reader below says what is wrong, in words)
        tensors = None
    if not tensors or not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
        read_checkpoint(path, "SISO LoRA")      # raises, naming the file's problem
        raise LoRAFileError(f"{name} could not be read as a LoRA file (safetensors).")
    return tensors, header


def changes_nothing(tensors: dict) -> str | None:
    """Why a ComfyUI-layout LoRA adds nothing to any weight (every alpha 0, or every lora_up all
    zeros), in words; None when it changes something."""
    layers = lora_layers(tensors)
    if not layers:
        return None
    if all(alpha == 0 for _, _, alpha in layers.values()):
        return f"the alpha of every one of its {len(layers)} layers is 0"
    if all(not bool(up.any()) for up, _, _ in layers.values()):
        return f"the lora_up of every one of its {len(layers)} layers is all zeros"
    return None


def no_change_warning(name: str, why: str) -> str:
    return (f"{name} changes nothing: {why}, so the model with it makes the same images as without it. A LoRA "
            "saved from SISO Optimize's first iteration (before any step) is all zeros too: run more iterations, "
            "or load the file you meant")


def load_subject_lora(path: str, name: str, fits, model: str, layouts: dict) -> SubjectLoRA:
    """SISO Load LoRA: a LoRA file as a SubjectLoRA. ``fits(tensors)`` checks the file against
    the model, layer by layer, and returns its rank (host.check_lora_fits); ``model`` is the
    model's description and ``layouts`` what SISO Save LoRA needs of it (subject_lora_layouts).
    The header's SISO fields (best iteration, iterations, loss) are read where present; a LoRA
    that changes nothing carries a warning."""
    tensors, header = read_lora_file(path, name)
    rank = fits(tensors)
    alphas = {float(alpha) for _, _, alpha in lora_layers(tensors).values()}
    best, iterations, loss = header_fields(header, name)
    why = changes_nothing(tensors)
    return SubjectLoRA(tensors=tensors, rank=rank, alpha=alphas.pop() if len(alphas) == 1 else float(rank), model=model,
                       best_iteration=max(best - 1, 0), iterations=iterations, best_loss=loss,
                       stop_reason=f"loaded from {name}", warnings=[no_change_warning(name, why)] if why else [],
                       **layouts)


def write_lora_file(tensors: dict, path: str, metadata: dict):
    """Writes a LoRA file whole or not at all (weights.write_file_whole): serialised once, in
    memory, by safetensors, then written to one temporary file of the pack's pattern and renamed
    over ``path``. A failure (a full disk included) names the folder and what to do."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values()) + 8 + len(json.dumps(metadata)) + 100 * len(tensors)
    write_file_whole(path, lambda: safetensors.torch.save(tensors, metadata=metadata), size)
