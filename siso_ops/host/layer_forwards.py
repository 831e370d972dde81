"""The training clone's layer forwards: how each of the clone's layers computes while it trains
(a zero-copy view of a weight used as stored, ComfyUI's cast where it casts, a quantised layer
through its own cast path with its weight dequantised again in backward), and the one decision
of what a layer keeps for backward (``training_layer``), which the memory estimate's shape-only
layers (memory_probe.py) ask too, so the estimate follows the training path by construction."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

import comfy.ops

from .. import families


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


# The same layers as plain torch classes, exactly these classes (a subclass may compute another way):
# what a third-party pack builds its network from when it does not use ComfyUI's ops (ComfyUI_ExtraModels'
# Sana). They have no cast path: ComfyUI moves them whole, and their weights are used as stored.
_PLAIN_LAYERS = {getattr(torch.nn, name): op for name, op in _TRAINING_OPS.items()}

_STOCK_LAYERS = {getattr(getattr(comfy.ops, family), name): op
                 for family in ("disable_weight_init", "manual_cast") for name, op in _TRAINING_OPS.items()}
_STOCK_LAYERS.update(_PLAIN_LAYERS)


def can_carry_lora(module) -> bool:
    """Whether the training forward can put a LoRA on this layer: one of ComfyUI's layers (or another
    pack's built on its ops: it has a weight-function list), or a plain torch layer of a class the
    training forward computes itself."""
    return hasattr(module, "weight_function") or type(module) in _PLAIN_LAYERS


def _stored_as_is(module, x) -> bool:
    """Whether ComfyUI's cast path would hand this layer's weight out as stored: a plain tensor in
    the input's dtype and on its device, no wrapper, no scale. Then a zero-copy view of it is what
    the layer computes with; any other layout (fp8 storage, a scaled or quantised weight, a GGUF
    tensor, weights streamed from RAM in lowvram mode, patches applied on the fly) is dequantised
    or cast by the layer itself, and backward must not keep that full-precision copy."""
    weight, bias = module.weight, getattr(module, "bias", None)
    if getattr(module, "weight_function", None) or getattr(module, "bias_function", None) or \
            getattr(module, "scale_weight", None) is not None:
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


def stock_forward(module, x, *args, **kwargs):
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
    def forward(ctx, x, module, kind, copy_input):
        ctx.module, ctx.kind, ctx.input_shape = module, kind, tuple(x.shape)
        # ``copy_input``: a layer of another class may write into its input (0.3.75's fp8_linear
        # clamps it in place), which the block's residual path and autograd still need; it gets a
        # copy. ComfyUI's own layer classes and plain torch layers only read it (TrainingLayer's
        # ``input_read_only``): no copy, one kernel and one activation-sized buffer less per call.
        out = stock_forward(module, x.detach().clone() if copy_input else x.detach())
        # A view made here could not be written in place later (Flux adds into its blocks' inputs),
        # and a linear layer's output on a 3-D input is a view of its 2-D product: detached, the
        # same storage is a tensor of its own (no copy; nothing else holds the product).
        return out.detach() if out._base is not None else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        module = ctx.module
        weight = dequantised_weight(module, grad)
        if ctx.kind == "linear":
            return torch.matmul(grad, weight), None, None, None
        input_gradient = _CONV_INPUT_GRADIENTS[weight.dim() - 2]
        return (input_gradient(ctx.input_shape, weight, grad, module.stride, module.padding, module.dilation,
                               module.groups), None, None, None)


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


# The stored weight used as it is (a zero-copy view), a copy in the input's dtype made by
# ComfyUI's cast path (manual cast, weight wrappers, on-the-fly patches), or nothing of the
# weight: the layer computes through its own cast path (_ThroughOwnCast) and backward casts again.
AS_STORED, CAST_COPY, OWN_CAST = "as stored", "cast copy", "own cast"


@dataclass(frozen=True)
class TrainingLayer:
    """How the training forward computes one of the clone's layers (see training_layer).
    ``op``: the functional form it computes a ComfyUI layer class with (None for other classes);
    ``kind``: 'linear' or 'conv' where the layer can go through its own cast path (layer_kind);
    ``clone_input``: the layer reads a copy of its input (ComfyUI's DiT blocks add into a
    LayerNorm's input in place after it was saved)."""
    module: torch.nn.Module
    op: object
    kind: str | None
    clone_input: bool

    @property
    def input_read_only(self) -> bool:
        """Whether the layer's own forward only reads its input: exactly one of ComfyUI's layer
        classes (disable_weight_init, manual_cast) or a plain torch layer, whose forward casts the
        weight and computes (read in ComfyUI 0.3.75 and 0.33's comfy/ops.py). Any other class
        (fp8 matrix multiply, scaled fp8, another pack's quantised layer) may write into it."""
        return self.op is not None

    @property
    def computed(self) -> bool:
        """Whether the training forward computes the layer (else it keeps its own forward)."""
        return self.op is not None or self.kind is not None

    def keeps(self, x: torch.Tensor) -> str:
        """What backward keeps of the weight at a call on input ``x``: AS_STORED (a zero-copy
        view of it, which the model holds anyway), CAST_COPY (a copy in the input's dtype) or
        OWN_CAST (nothing: the layer runs its own forward and backward dequantises again)."""
        module = self.module
        if self.kind is not None and (self.op is None or not _stored_as_is(module, x)):
            return OWN_CAST
        # a plain torch layer has none of ComfyUI's cast attributes: its weight is used as stored
        if module.weight is not None and (getattr(module, "comfy_cast_weights", False) or
                                          getattr(module, "weight_function", None) or getattr(module, "bias_function", None)):
            return CAST_COPY
        return AS_STORED

    def functional(self):
        """The functional form of the layer's computation (for a layer of another class, the
        linear map or convolution its own forward computes)."""
        return self.op or (_linear if self.kind == "linear" else _conv)


def training_layer(module, in_place: bool) -> TrainingLayer:
    """The training path's decision for one layer of the denoiser, the one place it is made:
    TrainableModel builds the clone's layer forwards from it and the memory estimate's probe its
    shape-only ones. ``in_place``: the family's blocks add into their inputs in place (families.py)."""
    return TrainingLayer(module, _STOCK_LAYERS.get(type(module)), layer_kind(module),
                         in_place and isinstance(module, torch.nn.LayerNorm))


class TrainingForward:
    """The forward of one of the clone's layers while it trains, installed as an object patch.

    Where ComfyUI would use the stored weight as it is, the layer computes with a zero-copy view
    of it that autograd can save (no copy of any weight at any call). Every other linear or
    convolution layer (fp8 storage, scaled fp8, ComfyUI's quantised layers, GGUF, lowvram
    streaming, on-the-fly patches) runs its own forward and takes its gradient through its own
    cast path (_ThroughOwnCast): iteration 0 computes in the precision the stock sampler uses,
    and backward holds no full-precision copy of a quantised weight. A LoRA adds its low-rank
    product on the input side in the layer's output units: ``layer(x) + s * up (down x)``
    (lora.lora_output). That is the function ComfyUI's merged ``(W + s * up @ down) x`` computes,
    but it needs no merged weight and no full-size weight gradient, and neither bfloat16 nor fp8
    storage rounds a small update away. ``calls``: how many times the LoRA was applied (the
    check that it is on the model's path)."""

    def __init__(self, layer: TrainingLayer, lora=None):
        self.layer = layer
        self.lora = lora
        self.calls = 0

    @property
    def op(self):
        return self.layer.op

    @property
    def kind(self) -> str | None:
        return self.layer.kind

    def __call__(self, x):
        layer = self.layer
        module = layer.module
        if on_stock_path():          # the self-check's stock call (environment.stock_path)
            return stock_forward(module, x)
        comfy.ops.run_every_op()     # ComfyUI's Cancel check, as its own layers make it
        if layer.clone_input:
            x = x.clone()
        keeps = layer.keeps(x)
        if keeps == OWN_CAST:
            out = _ThroughOwnCast.apply(x, module, layer.kind, not layer.input_read_only)
        else:
            if module.weight is None:
                weight = bias = None
            elif keeps == CAST_COPY:
                weight, bias = comfy.ops.cast_bias_weight(module, x)
            else:
                weight, bias = module.weight, module.bias
            out = layer.op(module, x, _trainable_view(weight), _trainable_view(bias))
        if self.lora is not None:
            self.calls += 1
            out = self.lora.on_input(x, base=out)
        return out


class CloneInput:
    """Calls a layer on a copy of its input (see TrainingLayer's ``clone_input``)."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, x, *args, **kwargs):
        return self.forward(x.clone(), *args, **kwargs)


# True while the self-check's stock call runs (environment.stock_path): the clone's layer
# forwards and its attention choice step aside, so the loaded clone computes what the stock model
# computes.
_STOCK_PATH = [False]


def on_stock_path() -> bool:
    return _STOCK_PATH[0]


@contextlib.contextmanager
def layers_as_stock():
    """The clone's layer forwards computing as their stock classes do (see on_stock_path)."""
    _STOCK_PATH[0] = True
    try:
        yield
    finally:
        _STOCK_PATH[0] = False


def computes_in_low_precision(module) -> bool:
    """Whether a layer rounds what it computes with at every call: ComfyUI's quantised ops (a
    QuantizedTensor weight: int8 and float8 layouts may quantise the activations too) or its
    fp8 matrix multiply (fp8_ops, which casts the input to fp8)."""
    quantized = _quantized_tensor_class()
    if quantized and isinstance(getattr(module, "weight", None), quantized):
        return True
    fp8_ops = getattr(comfy.ops, "fp8_ops", None)
    return fp8_ops is not None and isinstance(module, fp8_ops.Linear)
