"""The environment the training clone runs in, each swap put back after: gradients and
ComfyUI's training flag inside a node (training_mode), comfy_kitchen's fused RoPE in its
differentiable form, PyTorch's attention for the clone, and the stock path the self-check's
reference call takes (stock_path)."""
from __future__ import annotations

import contextlib

import torch

import comfy.ldm.modules.attention
import comfy.model_management

from .layer_forwards import layers_as_stock, on_stock_path


def training_attention(func, *args, **kwargs):
    """The training clone's attention override (attention_for_training), also the memory
    probe's: PyTorch's fused attention, except on the self-check's stock call."""
    if on_stock_path():      # the self-check's stock call: the attention ComfyUI chose
        return func(*args, **kwargs)
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


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
    if isinstance(kitchen, _KitchenWithDifferentiableRope):
        quant_ops.ck = kitchen._kitchen
    if flag is not None:
        management.in_training = False
    try:
        with layers_as_stock():
            yield
    finally:
        if isinstance(kitchen, _KitchenWithDifferentiableRope):
            quant_ops.ck = kitchen
        if flag is not None:
            management.in_training = flag


def attention_for_training(model_options: dict, keep_stock: bool = False):
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
        options["optimized_attention_override"] = training_attention


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
