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
from .compiled_models import drop_user_compile
from ..lora import LoRADelta, export_lora, lora_layers
from ..self_check import SelfCheckFailed, check_training_path, refusal
from .models import (TARGETS, check_supported, describe_model, is_dynamic, lora_target_names, model_family,
                     self_checked_path)

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


def _stored_as_is(module, x) -> bool:
    """Whether ComfyUI's cast path would hand this layer's weight out as stored: a plain tensor in
    the input's dtype and on its device, no wrapper, no scale. Then a zero-copy view of it is what
    the layer computes with; any other layout (fp8 storage, a scaled or quantised weight, a GGUF
    tensor, weights streamed from RAM in lowvram mode, patches applied on the fly) is dequantised
    or cast by the layer itself, and backward must not keep that full-precision copy."""
    weight, bias = module.weight, getattr(module, "bias", None)
    if module.weight_function or module.bias_function or getattr(module, "scale_weight", None) is not None:
        return False
    for tensor in (weight, bias):
        if tensor is not None and (type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.dtype != x.dtype
                                   or tensor.device != x.device):
            return False
    return True


def _quantized_tensor_class():
    try:
        from comfy.quant_ops import QuantizedTensor
    except ImportError:      # a ComfyUI without mixed-precision quantisation
        return ()
    return QuantizedTensor


def dequantised_weight(module, like: torch.Tensor) -> torch.Tensor:
    """The layer's weight as it computes with it, in ``like``'s dtype and on its device, taken
    from the layer's own cast path: ComfyUI-GGUF's ``cast_bias_weight`` method (dequantises and
    applies its patches), else ComfyUI's (casts, streams lowvram weights, applies on-the-fly
    patches), then the layer's ``convert_weight`` where it has one (ComfyUI's hook for "the real
    weight": 0.3.75's scaled fp8 multiplies its ``scale_weight``, MixedPrecisionOps dequantises),
    and any QuantizedTensor dequantised."""
    if callable(getattr(type(module), "cast_bias_weight", None)):
        weight = module.cast_bias_weight(like)[0]
    else:
        weight = comfy.ops.cast_bias_weight(module, like)[0]
    quantized = _quantized_tensor_class()
    if quantized and isinstance(weight, quantized):
        weight = weight.dequantize()
    convert = getattr(module, "convert_weight", None)
    if callable(convert):
        weight = convert(weight)
    if quantized and isinstance(weight, quantized):
        weight = weight.dequantize()
    return weight.to(device=like.device, dtype=like.dtype)


def _stock_forward(module, x, *args, **kwargs):
    """The layer's own forward (its class's), past the clone's object patch of ``forward``."""
    return type(module).forward(module, x, *args, **kwargs)


_CONV_INPUT_GRADIENTS = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}


class _ThroughOwnCast(torch.autograd.Function):
    """A frozen linear or convolution layer computed by its own forward (whatever it does with
    its weight: fp8 matrix multiply, a QuantizedTensor, GGUF dequantisation, a scale), so the
    training clone's output is the stock sampler's. Its gradient to the input is that of the
    linear map it computes, with the weight dequantised again from the layer's own cast path
    in backward, as ComfyUI's QuantLinearFunc does: nothing full-precision is kept between the
    forward and the backward pass, only the quantised weight the model holds anyway."""

    @staticmethod
    def forward(ctx, x, module, kind):
        ctx.module, ctx.kind, ctx.input_shape = module, kind, tuple(x.shape)
        # a copy: some layers write into their input (0.3.75's fp8_linear clamps it in place),
        # which autograd may have saved for another layer's backward
        out = _stock_forward(module, x.detach().clone())
        # a view made here could not be written in place later (Flux adds into its blocks' inputs)
        return out.clone() if out._base is not None else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        module = ctx.module
        weight = dequantised_weight(module, grad)
        if ctx.kind == "linear":
            return torch.matmul(grad, weight), None, None
        input_gradient = _CONV_INPUT_GRADIENTS[weight.dim() - 2]
        return (input_gradient(ctx.input_shape, weight, grad, module.stride, module.padding, module.dilation,
                               module.groups), None, None)


def layer_kind(module) -> str | None:
    """'linear' or 'conv' for a layer the training forward can take through its own cast path
    (_ThroughOwnCast), None for any other."""
    if not hasattr(module, "weight_function") or getattr(module, "weight", None) is None:
        return None
    if families.is_linear_map(module):
        return "linear"
    if (isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)):
        return "conv"
    return None


class _TrainingForward:
    """The forward of one of the clone's layers while it trains, installed as an object patch.

    Where ComfyUI would use the stored weight as it is, the layer computes with a zero-copy view
    of it that autograd can save (no copy of any weight at any call). Every other linear or
    convolution layer (fp8 storage, scaled fp8, ComfyUI's quantised layers, GGUF, lowvram
    streaming, on-the-fly patches) runs its own forward and takes its gradient through its own
    cast path (_ThroughOwnCast): iteration 0 computes in the precision the stock sampler uses,
    and backward holds no full-precision copy of a quantised weight. A LoRA adds its low-rank
    product on the input side in the layer's output units: ``layer(x) + s * up (down x)``. That
    is the function ComfyUI's merged ``(W + s * up @ down) x`` computes, but it needs no merged
    weight and no full-size weight gradient, and neither bfloat16 nor fp8 storage rounds a small
    update away. ``clone_input``: the layer reads a copy of its input (ComfyUI's DiT blocks add
    into a LayerNorm's input in place after it was saved). ``calls``: how many times the LoRA
    was applied (the check that it is on the model's path)."""

    def __init__(self, module, op, lora=None, clone_input: bool = False, kind: str | None = None):
        self.module = module
        self.op = op
        self.lora = lora
        self.clone_input = clone_input
        self.kind = kind
        self.calls = 0

    def __call__(self, x):
        module = self.module
        if _STOCK_PATH[0]:           # the self-check's stock call (stock_path)
            return _stock_forward(module, x)
        comfy.ops.run_every_op()     # ComfyUI's Cancel check, as its own layers make it
        if self.clone_input:
            x = x.clone()
        if self.kind is not None and (self.op is None or not _stored_as_is(module, x)):
            out = _ThroughOwnCast.apply(x, module, self.kind)
        else:
            if module.weight is None:
                weight = bias = None
            elif module.comfy_cast_weights or module.weight_function or module.bias_function:
                weight, bias = comfy.ops.cast_bias_weight(module, x)
            else:
                weight, bias = module.weight, module.bias
            out = self.op(module, x, _trainable_view(weight), _trainable_view(bias))
        if self.lora is not None:
            self.calls += 1
            out = out + self.lora.on_input(x)
        return out


class _CloneInput:
    """Calls a layer on a copy of its input (see _TrainingForward's ``clone_input``)."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, x, *args, **kwargs):
        return self.forward(x.clone(), *args, **kwargs)


def _pytorch_attention(func, *args, **kwargs):
    if _STOCK_PATH[0]:      # the self-check's stock call: the attention ComfyUI chose
        return func(*args, **kwargs)
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


# True while the self-check's stock call runs (stock_path): the clone's layer forwards and its
# attention choice step aside, so the loaded clone computes what the stock model computes.
_STOCK_PATH = [False]


@contextlib.contextmanager
def stock_path():
    """The loaded training clone computing as the stock model does, for the self-check's
    reference call: every layer's own class forward, ComfyUI's attention, ComfyUI's training flag
    off and comfy_kitchen's own RoPE operators, as its samplers run. (Checkpointed blocks and
    copied inputs change no value; the clone's own copies of raw parameters are equal ones.)"""
    import sys
    management = comfy.model_management
    quant_ops = sys.modules.get("comfy.quant_ops")
    kitchen = getattr(quant_ops, "ck", None)
    flag = getattr(management, "in_training", None)
    _STOCK_PATH[0] = True
    if isinstance(kitchen, _KitchenWithDifferentiableRope):
        quant_ops.ck = kitchen._kitchen
    if flag is not None:
        management.in_training = False
    try:
        yield
    finally:
        _STOCK_PATH[0] = False
        if isinstance(kitchen, _KitchenWithDifferentiableRope):
            quant_ops.ck = kitchen
        if flag is not None:
            management.in_training = flag


def computes_in_low_precision(module) -> bool:
    """Whether a layer rounds what it computes with at every call: ComfyUI's quantised ops (a
    QuantizedTensor weight: int8 and float8 layouts may quantise the activations too) or its
    fp8 matrix multiply (fp8_ops, which casts the input to fp8)."""
    quantized = _quantized_tensor_class()
    if quantized and isinstance(getattr(module, "weight", None), quantized):
        return True
    fp8_ops = getattr(comfy.ops, "fp8_ops", None)
    return fp8_ops is not None and isinstance(module, fp8_ops.Linear)


def _attention_for_training(model_options: dict, keep_stock: bool = False):
    """ComfyUI picks sub-quadratic (or split) attention where it does not enable PyTorch's
    fused attention, e.g. on CPUs. Those chunk attention with Python loops, which backward
    then walks too; the training clone uses PyTorch's scaled_dot_product_attention instead
    (the same mathematics, in another float order). A user's own attention override is kept.
    ``keep_stock``: the model has layers that round per call (computes_in_low_precision), where
    another float order moves values across rounding boundaries and grows through the network
    (measured: 5.3e-2 on the image of an int8_tensorwise SD1.5 at iteration 0, against 2e-5 with
    ComfyUI's own attention), so the clone keeps ComfyUI's attention and computes the stock image."""
    if keep_stock:
        return
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
        drop_user_compile(self.patcher)   # TorchCompileModel's wrapper: training runs the uncompiled module
        self.deltas = {}
        self.lora_layers = {}     # weight key -> the layer its delta acts on
        self.training_forwards = {}   # weight key -> the _TrainingForward that applies its delta
        self.off_path = set()         # LoRA layers in modules the self-check's inputs do not run (self_check)
        self.forward_patched = []
        device = model.load_device
        diffusion = self.patcher.model.diffusion_model
        family = self.family = model_family(model)
        targets = lora_target_names(model, target)
        blocks = families.checkpointed_blocks(diffusion, family) if checkpointing else set()
        generator = torch.Generator().manual_seed(int(seed))
        for name, module in diffusion.named_modules():
            full = f"diffusion_model.{name}"
            dit_norm = family.in_place and isinstance(module, torch.nn.LayerNorm)
            op = _training_op(module)
            kind = layer_kind(module)
            key = f"{full}.weight"
            delta = None
            if name in targets:
                delta = LoRADelta(module.weight.shape[0], module.weight.shape[1], self.rank, self.alpha,
                                  device=device, generator=generator)
                self.deltas[key] = delta
                self.lora_layers[key] = module
            if op is not None or kind is not None:
                # An object patch of the clone: applied while it is loaded, undone in unload().
                forward = _TrainingForward(module, op, delta, clone_input=dit_norm, kind=kind)
                self._patch_forward(full, module, forward)
                if delta is not None:
                    self.training_forwards[key] = forward
                continue
            if hasattr(module, "weight_function"):
                # Another layer class that is no linear map (a norm of another pack): its own
                # forward, with a detached copy of each weight (ComfyUI's weight-wrapper mechanism).
                if getattr(module, "weight", None) is not None:
                    self.patcher.add_weight_wrapper(key, _detached)
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
        _attention_for_training(self.patcher.model_options,
                                keep_stock=any(computes_in_low_precision(m) for m in diffusion.modules()))
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
        for key, forward in self.training_forwards.items():
            if vars(self.lora_layers[key]).get("forward") is not forward:
                raise RuntimeError("ComfyUI loaded the model without SISO's LoRA layers; nothing would be learned. "
                                   "Free the model cache (Manager: 'Free model and node cache') and run again.")

    def load(self, memory_required: int = 0) -> str:
        """Load the clone as ComfyUI's samplers load a model: under inference mode (ComfyUI's
        quantised tensors are re-wrapped when moved outside it, which would change the host's
        weights they share), with ComfyUI deciding from the free memory whether the weights fit
        or are streamed per layer (lowvram). Returns how it loaded, for the report."""
        with torch.inference_mode():
            self.unload_host_copies()
            comfy.model_management.load_models_gpu([self.patcher], memory_required=int(memory_required))
        loaded, total = self.patcher.loaded_size(), self.patcher.model_size()
        if total and loaded < total:
            return (f"partially loaded by ComfyUI ({loaded / 2**30:.2f} of {total / 2**30:.2f} GiB on the device, "
                    "the rest streamed per layer in every pass)")
        return "fully loaded"

    def check_lora_path(self):
        """Before the loop, on the loaded clone: every LoRA layer, called as the model calls it,
        gives the stock layer's output with its LoRA at zero, and adds exactly the LoRA's product
        when it is not. A layer whose class computes past ``forward`` or a LoRA added in the wrong
        units (a scaled fp8 weight) is caught here, naming the layer, not after minutes of work."""
        if self.family.checked:     # a refusal of the self-checked path names the class and the check
            try:
                return self._check_lora_layers()
            except RuntimeError as error:
                raise SelfCheckFailed(refusal(type(self.host.model).__name__, "0 (each LoRA layer computes as its "
                                              "stock layer plus the LoRA)", str(error))) from error
        return self._check_lora_layers()

    def _check_lora_layers(self):
        self.check_loaded()
        generator = torch.Generator().manual_seed(0)
        dtype = _compute_dtype(self.patcher)
        with torch.no_grad():
            for key, delta in self.deltas.items():
                layer = self.lora_layers[key]
                x = torch.randn(2, delta.down.shape[1], generator=generator).to(delta.down.device, dtype)
                stock = _stock_forward(layer, x)
                saved_up = delta.up.detach().clone()
                forward = self.training_forwards[key]
                calls = forward.calls
                try:
                    delta.up.zero_()
                    zero = layer(x)
                    delta.up.copy_(torch.randn(delta.up.shape, generator=generator).to(delta.up) * 0.1)
                    moved = layer(x) - zero
                    expected = delta.on_input(x)
                finally:
                    delta.up.copy_(saved_up)
                    forward.calls = calls
                # the same layer computation twice; in half precision the LoRA's sum rounds at the
                # output's magnitude (2**-7 relative for bfloat16 over |zero| + |expected|)
                tolerance = 1e-4 if dtype == torch.float32 else 2 ** -6
                scale = float(zero.abs().max() + expected.abs().max())
                if not torch.equal(zero, stock) and float((zero - stock).abs().max()) > tolerance * scale:
                    raise RuntimeError(f"SISO's training forward of {key[:-len('.weight')]} ({type(layer).__name__}) does "
                                       "not give the stock layer's output: this layer class cannot be trained by SISO.")
                if float((moved - expected).abs().max()) > tolerance * max(scale, 1e-12) or not bool(expected.abs().max() > 0):
                    raise RuntimeError(f"the LoRA of {key[:-len('.weight')]} ({type(layer).__name__}) does not change the "
                                       "layer's output as it should: this layer class cannot be trained by SISO.")

    def self_check(self, denoise, x, sigma, dtype) -> str:
        """For a model class no table row names (``family.checked``), before the loop: checks 1
        and 2 of siso_ops/self_check.py on the run's first denoiser call (``denoise(x, sigma)``,
        under the loop's autocast to ``dtype``), refusing with the class and the failed check.
        Returns the report's words for the path ("" for a table row, which its tests pin)."""
        path = self_checked_path(self.host)
        if not path:
            return ""
        calls = {key: forward.calls for key, forward in self.training_forwards.items()}
        computes = _compute_dtype(self.patcher)
        check_dtype = computes if dtype == torch.float32 else dtype
        layers = {key[:-len(".weight")]: (delta.down, delta.up) for key, delta in self.deltas.items()}

        def stock():
            with stock_path():
                return denoise(x, sigma)

        # Which modules holding a LoRA layer run in the training call: a layer of a module this
        # input does not run (OmniGen2's reference-image refiner without references) is off this
        # input's path, no fault; a layer whose module ran but which did not is computed past its
        # forward, a fault.
        holders = {name: _holder(self.patcher.model, name) for name in layers}
        ran = set()
        hooks = [module.register_forward_pre_hook(lambda m, args, key=key: ran.add(key))
                 for key, module in {h: self.patcher.model.get_submodule(h) for h in set(holders.values())}.items()]
        try:
            difference, unused = check_training_path(
                type(self.host.model).__name__, lambda: denoise(x, sigma), stock, layers,
                list(self.patcher.model.named_parameters()), check_dtype,
                called=lambda name: self.training_forwards[f"{name}.weight"].calls > calls[f"{name}.weight"],
                on_path=lambda name: holders[name] in ran)
        finally:    # the loop's own check (check_lora_reached) counts from its first pass
            for hook in hooks:
                hook.remove()
            for key, forward in self.training_forwards.items():
                forward.calls = calls[key]
        self.off_path = {name for name in unused if holders[name] not in ran}
        path += f"; checked before the loop: training forward = stock forward (relative difference {difference:.1e}), " \
                "every LoRA layer the output depends on and no host weight gets a gradient"
        reached = [name for name in unused if name not in self.off_path]
        if reached:
            path += (f" ({len(reached)} of {len(layers)} LoRA layers run but their output never reaches the image, "
                     f"e.g. {reached[0]}: they stay zero)")
        if self.off_path:
            path += (f" ({len(self.off_path)} of {len(layers)} LoRA layers are in modules these inputs do not run, "
                     f"e.g. {sorted(self.off_path)[0]}: they stay zero)")
        log.info("SISO: %s", path)
        return path

    def check_lora_reached(self):
        """After the first forward pass: every LoRA was applied on the way to the image (a layer
        the model reaches past its ``forward``, e.g. by reading ``.weight`` itself, is not)."""
        missed = [key[:-len(".weight")] for key, forward in self.training_forwards.items()
                  if forward.calls == 0 and key[:-len(".weight")] not in self.off_path]
        if missed:
            raise RuntimeError(f"{len(missed)} of SISO's {len(self.deltas)} LoRA layers are never called by "
                               f"{describe_model(self.host)} (first: {missed[0]}): the model computes those layers "
                               "another way, so nothing could be learned there. Use lora_target 'attention' or report "
                               "the model class.")

    def unload(self):
        """Detach the clone from the shared modules (weights, wrappers and object patches), in
        inference mode as ComfyUI's own unloads run (see load)."""
        with torch.inference_mode():
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


def _holder(root: torch.nn.Module, name: str) -> str:
    """The nearest module above layer ``name`` that runs a forward of its own (a ModuleList or
    ModuleDict only holds its layers)."""
    holder = name
    while "." in holder:
        holder = holder.rsplit(".", 1)[0]
        if not isinstance(root.get_submodule(holder), (torch.nn.ModuleList, torch.nn.ModuleDict)):
            return holder
    return ""


def _compute_dtype(patcher) -> torch.dtype:
    """The dtype the model's layers compute in: ComfyUI's manual-cast dtype where the weights are
    stored in another (fp8, GGUF, quantised), else the weights' own."""
    base = patcher.model
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


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
    """While SISO's loop runs: comfy_kitchen with differentiable RoPE (see above) wherever ComfyUI's
    model code reaches it, ``comfy.quant_ops.ck`` and the ``comfy_kitchen`` name of the model
    modules that import the package themselves (0.33's JoyImage calls ``comfy_kitchen.rms_rope``);
    each put back after."""
    import sys
    try:
        import comfy_kitchen
        from comfy_kitchen.backends.eager import rope as eager
    except ImportError:      # ComfyUI 0.3.75 ships no comfy_kitchen; its model code is plain torch
        yield
        return
    swapped = []
    quant_ops = sys.modules.get("comfy.quant_ops")
    if getattr(quant_ops, "ck", None) is not None and not isinstance(quant_ops.ck, _KitchenWithDifferentiableRope):
        swapped.append((quant_ops, "ck", quant_ops.ck))
    for name, module in list(sys.modules.items()):
        if name.startswith("comfy.ldm.") and getattr(module, "comfy_kitchen", None) is comfy_kitchen:
            swapped.append((module, "comfy_kitchen", comfy_kitchen))
    for module, attribute, kitchen in swapped:
        setattr(module, attribute, _KitchenWithDifferentiableRope(kitchen, eager))
    try:
        yield
    finally:
        for module, attribute, kitchen in swapped:
            setattr(module, attribute, kitchen)


@contextlib.contextmanager
def training_mode():
    """Gradients inside a node: ComfyUI runs nodes under inference_mode.

    Newer ComfyUIs (0.2x on) also have a process-wide ``model_management.in_training`` flag,
    which their own LoRA trainer sets for its loop: with it, model code takes its
    differentiable paths (e.g. Flux's RoPE in plain torch instead of comfy-kitchen's
    ``apply_rope``, which has no autograd formula). It is set for this block only and put back
    as it was, so sampling outside SISO's loop runs exactly as before. ComfyUI 0.3.75 has no
    such flag (its paths are all differentiable) and is left alone. Model code that calls
    comfy_kitchen's fused RoPE whatever the flag (0.33's Cosmos Predict2 and JoyImage) gets the
    plain-torch version for the block too (_differentiable_kitchen)."""
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
