"""The trainable clone: a LoRA on a clone of the host MODEL, its layers computing through
zero-copy views of the host's weights (never written), gradient checkpointing of the family's
blocks, and the memory and gradient modes training needs inside a ComfyUI node. The clone is
unloaded in a ``finally`` by its user, so the shared modules return to their stock state."""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.utils.checkpoint

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.ops

from .. import families
from ..lora import LoRADelta, export_lora, lora_layers
from .models import TARGETS, check_supported, describe_model, is_dynamic, lora_target_names, model_family

log = logging.getLogger("siso")


def _detached(weight):
    # For ComfyUI layer types the training forward below does not know: a non-empty wrapper list
    # makes ComfyUI's cast path hand out a fresh copy of the weight, so no inference tensor of the
    # host model is saved for backward. The copy is still linked to the host parameter by autograd
    # (host parameters have requires_grad=True), so cut it here: otherwise every backward writes a
    # full-size .grad onto the host's weights.
    return weight.detach()


def _trainable_view(tensor):
    """``tensor`` as a normal tensor autograd may save for backward, without copying it and
    without an autograd link to the host's parameter (no gradient may land on the user's weights).

    ComfyUI loads weights under inference mode, and autograd refuses to save inference tensors
    (a linear layer saves its weight to pass gradients to its input). A view made outside
    inference mode over the same storage is a normal tensor. Nothing writes to the host's weights
    while the loop runs (ComfyUI patches them only when it loads a model), so what backward reads
    is what the forward pass used."""
    if tensor is None:
        return None
    if not tensor.is_inference():
        return tensor.detach()
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def _linear(module, x, weight, bias):
    return torch.nn.functional.linear(x, weight, bias)


def _conv(module, x, weight, bias):
    return module._conv_forward(x, weight, bias)


def _group_norm(module, x, weight, bias):
    return torch.nn.functional.group_norm(x, module.num_groups, weight, bias, module.eps)


def _layer_norm(module, x, weight, bias):
    return torch.nn.functional.layer_norm(x, module.normalized_shape, weight, bias, module.eps)


# ComfyUI's own layer classes (comfy.ops' disable_weight_init and manual_cast families) that the
# training forward computes itself. Layers of other classes (quantised layers of other packs such
# as GGUF, ComfyUI's fp8 matrix-multiply ops) keep their own forward and get weight wrappers.
_TRAINING_OPS = {"Linear": _linear, "Conv1d": _conv, "Conv2d": _conv, "Conv3d": _conv, "GroupNorm": _group_norm,
                 "LayerNorm": _layer_norm}


_STOCK_LAYERS = {getattr(getattr(comfy.ops, family), name): op
                 for family in ("disable_weight_init", "manual_cast") for name, op in _TRAINING_OPS.items()}


def _training_op(module):
    return _STOCK_LAYERS.get(type(module))


class _TrainingForward:
    """The forward of one of the clone's layers while it trains, installed as an object patch.

    It does what ComfyUI's layer does (its cast path whenever ComfyUI would cast: lowvram
    offload, manual cast, patches applied on the fly), except that the weight is read through
    a zero-copy view autograd can save, instead of a full copy of every weight at every call,
    and a LoRA adds its low-rank product on the input side: ``W x + s * up (down x)``. That is
    the same function as ComfyUI's merged ``(W + s * up @ down) x``, but backward needs no
    full-size weight gradient and the forward pass no merged weight, and in bfloat16 small LoRA
    updates are not rounded away against the weight. ``clone_input``: the layer reads a copy of
    its input (ComfyUI's DiT blocks add into a LayerNorm's input in place after it was saved)."""

    def __init__(self, module, op, lora=None, clone_input: bool = False):
        self.module = module
        self.op = op
        self.lora = lora
        self.clone_input = clone_input

    def __call__(self, x):
        module = self.module
        comfy.ops.run_every_op()     # ComfyUI's Cancel check, as its own layers make it
        if module.weight is None:
            weight = bias = None
        elif module.comfy_cast_weights or module.weight_function or module.bias_function:
            weight, bias = comfy.ops.cast_bias_weight(module, x)
        else:
            weight, bias = module.weight, module.bias
        if self.clone_input:
            x = x.clone()
        out = self.op(module, x, _trainable_view(weight), _trainable_view(bias))
        if self.lora is not None:
            out = out + self.lora.on_input(x)
        return out


class _CloneInput:
    """Calls a layer on a copy of its input (see _TrainingForward's ``clone_input``)."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, x, *args, **kwargs):
        return self.forward(x.clone(), *args, **kwargs)


def _pytorch_attention(func, *args, **kwargs):
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


def _attention_for_training(model_options: dict):
    """ComfyUI picks sub-quadratic (or split) attention where it does not enable PyTorch's
    fused attention, e.g. on CPUs. Those chunk attention with Python loops, which backward
    then walks too; the training clone uses PyTorch's scaled_dot_product_attention instead
    (the same mathematics). A user's own attention override is kept."""
    attention = comfy.ldm.modules.attention
    chunked = (attention.attention_sub_quad, attention.attention_split, attention.attention_basic)
    options = model_options.setdefault("transformer_options", {})
    if attention.optimized_attention in chunked and "optimized_attention_override" not in options:
        options["optimized_attention_override"] = _pytorch_attention


def _checkpointed(forward, clone_inputs: bool = False):
    """``forward`` under non-reentrant gradient checkpointing. ``clone_inputs``: the block gets
    copies of its tensor inputs, for blocks that add into their inputs in place (ComfyUI's
    Flux blocks), which would change the tensors the checkpoint saved."""
    def block(*args, **kwargs):
        if clone_inputs:
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return forward(*args, **kwargs)

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # ComfyUI updates transformer_options (block indices) in place while it walks the
        # model; the recomputation in backward must see what the forward pass saw.
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
    return run


def _unload_loaded(which):
    """Unload (weights unpatched, off the device) every model ComfyUI holds loaded whose patcher
    satisfies ``which``."""
    for loaded in list(comfy.model_management.current_loaded_models):
        if which(loaded.model):
            loaded.model_unload()
            comfy.model_management.current_loaded_models.remove(loaded)


def training_clone(model):
    """The clone SISO trains on. A regular ModelPatcher is cloned as it is (sharing the host's
    weights, which are never written). A dynamic VRAM patcher is cloned the way ComfyUI's own
    Train LoRA node does it: as a regular ModelPatcher over a fresh copy of the weights
    (``clone(disable_dynamic=True)``, which reloads the model from its file), because the training
    forward and its zero-copy weight views are built and tested for regular loading; the dynamic
    loader's on-demand weights are not something a test without a GPU can show correct."""
    if not is_dynamic(model):
        return model.clone()
    if getattr(model, "cached_patcher_init", None) is None:
        raise ValueError(
            "this MODEL uses ComfyUI's dynamic VRAM loading and was not loaded by a stock loader that can reload it "
            "for training. Load it with Load Checkpoint or Load Diffusion Model, or start ComfyUI with "
            "--disable-dynamic-vram.")
    clone = model.clone(disable_dynamic=True)
    if is_dynamic(clone):
        raise RuntimeError("ComfyUI returned a dynamic clone where a regular one was asked for")
    return clone


class TrainableModel:
    """A clone of the host MODEL with trainable LoRA deltas; the host stays untouched."""

    def __init__(self, model, rank: int = 4, alpha: float | None = None, target: str = TARGETS[0], seed: int = 0,
                 checkpointing: bool = False):
        check_supported(model)
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.host = model
        self.rank = int(rank)
        self.alpha = float(alpha if alpha else rank)
        self.patcher = training_clone(model)
        self.deltas = {}
        self.lora_layers = {}     # weight key -> the layer its delta acts on
        self.forward_patched = []
        device = model.load_device
        diffusion = self.patcher.model.diffusion_model
        family = model_family(model)
        targets = lora_target_names(model, target)
        blocks = families.checkpointed_blocks(diffusion, family) if checkpointing else set()
        generator = torch.Generator().manual_seed(int(seed))
        for name, module in diffusion.named_modules():
            full = f"diffusion_model.{name}"
            dit_norm = family.in_place and isinstance(module, torch.nn.LayerNorm)
            op = _training_op(module)
            key = f"{full}.weight"
            delta = None
            if name in targets:
                delta = LoRADelta(module.weight.shape[0], module.weight.shape[1], self.rank, self.alpha,
                                  device=device, generator=generator)
                self.deltas[key] = delta
                self.lora_layers[key] = module
            if op is not None:
                # An object patch of the clone: applied while it is loaded, undone in unload().
                self._patch_forward(full, module, _TrainingForward(module, op, delta, clone_input=dit_norm))
                continue
            if hasattr(module, "weight_function"):
                # Another pack's layer class: its own forward, with a detached copy of each weight
                # and the LoRA added to the weight (ComfyUI's weight-wrapper mechanism).
                if getattr(module, "weight", None) is not None:
                    self.patcher.add_weight_wrapper(key, _detached)
                    if delta is not None:
                        self.patcher.add_weight_wrapper(key, delta)
                if getattr(module, "bias", None) is not None:
                    self.patcher.add_weight_wrapper(f"{full}.bias", _detached)
            else:
                # Raw parameters outside ComfyUI's cast path (e.g. Flux's RMSNorm scales):
                # give the clone its own normal copies.
                for pname, param in module.named_parameters(recurse=False):
                    self.patcher.add_object_patch(f"diffusion_model.{name}.{pname}".replace("..", "."),
                                                  torch.nn.Parameter(param.detach().clone(), requires_grad=False))
            if dit_norm:
                self._patch_forward(full, module, _CloneInput(module.forward))
            elif name in blocks:
                self._patch_forward(full, module, _checkpointed(module.forward, clone_inputs=family.in_place))
        _attention_for_training(self.patcher.model_options)
        if not self.deltas:
            raise ValueError(f"no LoRA target layers found in {describe_model(model)} for target '{target}'")

    def _patch_forward(self, full_name: str, module, forward):
        self.patcher.add_object_patch(f"{full_name}.forward", forward)
        self.forward_patched.append(module)

    def parameters(self) -> dict:
        out = {}
        for key, delta in self.deltas.items():
            out[f"{key}:down"] = delta.down
            out[f"{key}:up"] = delta.up
        return out

    def load_state(self, state: dict):
        with torch.no_grad():
            for name, param in self.parameters().items():
                param.copy_(state[name])

    def export(self, state: dict | None = None) -> dict:
        if state is not None:
            self.load_state(state)
        return export_lora(self.deltas)

    def start_from(self, tensors: dict, what: str = "initial_lora"):
        """Warm start: the deltas take a LoRA's values (ComfyUI layout, e.g. an earlier run's),
        so iteration 0 is the model with that LoRA. It must cover exactly the layers this run
        trains, at this rank; its alpha may differ (up is rescaled: the same delta)."""
        layers = lora_layers(tensors)
        ours = {key[: -len(".weight")]: delta for key, delta in self.deltas.items()}
        missing, extra = sorted(set(ours) - set(layers)), sorted(set(layers) - set(ours))
        if missing or extra:
            raise ValueError(
                f"{what} does not fit this run: it has {len(layers)} LoRA layers, this model with this lora_target "
                f"trains {len(ours)}" + (f"; not in it: {missing[0]}" if missing else "")
                + (f"; not trained here: {extra[0]}" if extra else "")
                + ". Use the model and lora_target it was made with.")
        with torch.no_grad():
            for base, delta in ours.items():
                up, down, alpha = layers[base]
                if down.shape[0] != delta.rank:
                    raise ValueError(f"{what} has rank {down.shape[0]} but lora_rank is {delta.rank}: set lora_rank "
                                     f"to {down.shape[0]}")
                if tuple(up.shape) != tuple(delta.up.shape) or tuple(down.shape) != tuple(delta.down.shape):
                    raise ValueError(f"{what}: layer {base} has shape {tuple(up.shape)} x {tuple(down.shape)}, this "
                                     f"model's needs {tuple(delta.up.shape)} x {tuple(delta.down.shape)}: it was made "
                                     "for another model")
                delta.down.copy_(down.to(delta.down))
                delta.up.copy_((up.float() * (alpha / delta.alpha)).to(delta.up))

    def unload_host_copies(self):
        """Unload other loaded copies of these weights (the host MODEL after a stock sampler ran it).
        ComfyUI only detaches such a clone, leaving the weights marked as loaded; loading ours then
        takes a shortcut (ModelPatcher.partially_load returns early) that skips what a full load
        sets up, such as the weight wrappers of layer types the training forward does not cover."""
        _unload_loaded(lambda patcher: patcher is not self.patcher and patcher.is_clone(self.patcher))

    def check_loaded(self):
        """Raise if ComfyUI loaded the clone without the LoRA wired into its layers."""
        for key, delta in self.deltas.items():
            layer = self.lora_layers[key]
            forward = vars(layer).get("forward")
            if not ((isinstance(forward, _TrainingForward) and forward.lora is delta)
                    or any(f is delta for f in layer.weight_function)):
                raise RuntimeError("ComfyUI loaded the model without SISO's LoRA layers; nothing would be learned. "
                                   "Free the model cache (Manager: 'Free model and node cache') and run again.")

    def unload(self):
        """Detach the clone from the shared modules (weights, wrappers and object patches)."""
        _unload_loaded(lambda patcher: patcher is self.patcher)
        self.patcher.detach(unpatch_all=True)
        self.patcher.weight_wrapper_patches = {}
        self.patcher.object_patches = {}
        # ComfyUI leaves weight wrappers on the shared modules after a full-load unpatch (the
        # next load wipes them). Take ours off now so the LoRA is neither active nor kept alive.
        ours = set(map(id, self.deltas.values())) | {id(_detached)}
        for module in self.patcher.model.modules():
            for attr in ("weight_function", "bias_function"):
                functions = getattr(module, attr, None)
                if functions:
                    setattr(module, attr, [f for f in functions if id(f) not in ours])
        for module in self.forward_patched:
            # Restoring an object patch of `forward` leaves the original bound method as an
            # instance attribute; drop it so the module is exactly as it was.
            if getattr(vars(module).get("forward"), "__self__", None) is module:
                del module.forward


def free_cached_memory():
    comfy.model_management.soft_empty_cache()


def make_room_for_training(device) -> int:
    """Before SISO Optimize puts its similarity networks, its decoder copy and the training clone
    on a GPU, ask ComfyUI to unload every other model it holds on that device (the text
    encoders, the VAE, earlier models), as ComfyUI's own Train LoRA node does
    (``load_models_gpu(..., memory_required=1e20)``). ComfyUI sizes a model's load by its
    inference estimate, which knows nothing of the networks (not ComfyUI models) nor of the
    activations backward keeps; a text encoder left on a 12 GB card can be what makes the run
    fail. Unloaded models are loaded again by the next node that needs them. On a CPU the
    weights already live in RAM, so nothing is unloaded. Returns how many models were unloaded."""
    device = torch.device(device)
    if device.type == "cpu":
        return 0
    unloaded = _unload_everything_from(device)
    if unloaded:
        log.info("SISO: unloaded %d model(s) from %s to make room for training", unloaded, device)
    return unloaded


def _unload_everything_from(device) -> int:
    # ComfyUI's free_memory unloads models until the request fits; no request fits this one.
    return len(comfy.model_management.free_memory(1e30, device))


class _KitchenWithDifferentiableRope:
    """comfy_kitchen as ComfyUI's model code reaches it (``comfy.quant_ops.ck``), except that the
    fused RMSNorm + RoPE functions are its eager backend's plain-torch ones. The package's own
    entry points call custom operators that have no autograd formula (ComfyUI 0.33's Cosmos
    Predict2 attention calls ``ck.rms_rope_split_half``), so no gradient could reach the LoRA
    layers before them. The eager functions compute the same thing (on a CPU the operator runs
    them itself), and a backward pass goes through them."""

    NAMES = ("rms_rope", "rms_rope1", "rms_rope_split_half", "rms_rope_split_half1", "apply_rope", "apply_rope1",
             "apply_rope_split_half", "apply_rope_split_half1")

    def __init__(self, kitchen, eager):
        self._kitchen = kitchen
        for name in self.NAMES:
            if hasattr(eager, name):
                setattr(self, name, getattr(eager, name))

    def __getattr__(self, name):
        return getattr(self._kitchen, name)


@contextlib.contextmanager
def _differentiable_kitchen():
    """While SISO's loop runs: comfy.quant_ops.ck with differentiable RoPE (see above), put back after."""
    import sys
    quant_ops = sys.modules.get("comfy.quant_ops")
    kitchen = getattr(quant_ops, "ck", None)
    try:
        from comfy_kitchen.backends.eager import rope as eager
    except ImportError:      # ComfyUI 0.3.75 ships no comfy_kitchen; its model code is plain torch
        eager = None
    if kitchen is None or eager is None or isinstance(kitchen, _KitchenWithDifferentiableRope):
        yield
        return
    quant_ops.ck = _KitchenWithDifferentiableRope(kitchen, eager)
    try:
        yield
    finally:
        quant_ops.ck = kitchen


@contextlib.contextmanager
def training_mode():
    """Gradients inside a node: ComfyUI runs nodes under inference_mode.

    Newer ComfyUIs (0.2x on) also have a process-wide ``model_management.in_training`` flag,
    which their own LoRA trainer sets for its loop: with it, model code takes its
    differentiable paths (e.g. Flux's RoPE in plain torch instead of comfy-kitchen's
    ``apply_rope``, which has no autograd formula). It is set for this block only and put back
    as it was, so sampling outside SISO's loop runs exactly as before. ComfyUI 0.3.75 has no
    such flag (its paths are all differentiable) and is left alone. Model code that calls
    comfy_kitchen's fused RoPE whatever the flag (0.33's Cosmos Predict2) gets the plain-torch
    version for the block too (_differentiable_kitchen)."""
    management = comfy.model_management
    has_flag = hasattr(management, "in_training")
    saved = management.in_training if has_flag else None
    with torch.inference_mode(False), torch.enable_grad(), _differentiable_kitchen():
        if has_flag:
            management.in_training = True
        try:
            yield
        finally:
            if has_flag:
                management.in_training = saved
