"""The self-check of a training path no row of the family table pins (torch only; the ComfyUI
side, host/training.py, supplies the two denoiser calls).

A model class no row names (families.py: a subclass of a row's class, or a class with no row)
gets its LoRA layers and checkpointed blocks from rules, not from a test on a tiny model of the
class. Before the loop, on the run's own inputs (start latent, first sigma, conditioning), two
checks show that the rules gave a path SISO can train on, or refuse the run naming the class and
the check that failed:

1. the training forward is the stock forward: one denoiser call through the training clone, its
   LoRA as it starts (zero unless warm-started), equals the stock model's call up to the rounding
   of the compute dtype;
2. the LoRA is on the path to the output, and only the LoRA: one backward from the output gives
   every LoRA layer a finite, non-zero gradient and no weight of the host model any gradient.
"""
from __future__ import annotations

import torch

from .precision import agreement_tolerance


class SelfCheckFailed(ValueError):
    """The self-checked path is wrong for this model class: refused before the loop."""


def refusal(model_class: str, check: str, detail: str) -> str:
    return (f"SISO cannot optimise {model_class} on the self-checked path (no table row names this class): check "
            f"{check} failed: {detail}. Nothing was trained; report the model class so a row with a tested path can "
            "be added.")


def forward_tolerance(dtype: torch.dtype) -> float:
    """Largest relative difference (max |training - stock| / max |stock|) check 1 accepts.

    Both calls run the same layers on the same inputs in the same dtype; what may differ is the
    order of float operations: the training clone's attention (PyTorch's fused kernel where
    ComfyUI chose a chunked one), a LoRA adding its zero product, layers computing on views or
    copies of their inputs. The bound is the pack's one rule for that (precision.py)."""
    return agreement_tolerance(dtype)


def check_training_path(model_class: str, training_call, stock_call, lora_layers: dict, host_parameters,
                        dtype: torch.dtype, called=lambda name: True, seed: int = 0,
                        on_path=lambda name: True) -> tuple:
    """Run checks 1 and 2 (see the module's docstring); return check 1's relative difference.

    ``training_call()``: the denoiser call through the training clone, under gradients.
    ``stock_call()``: the same call as the stock model computes it (no gradient needed).
    ``lora_layers``: layer name -> its LoRA parameters. ``host_parameters``: (name, parameter) of
    the host model's weights. ``called(name)``: whether the training call ran that layer's LoRA.
    ``on_path(name)``: whether the module holding that layer ran in the training call (a block
    this input does not use, e.g. OmniGen2's reference-image refiner without reference images,
    runs none of its layers: that is no fault of the path).
    Returns (check 1's relative difference, the LoRA layers that get no gradient without a path
    fault: layers that ran but whose output never reaches the denoiser's output, e.g. the text
    stream of a last block whose text output is dropped, and layers of modules this input does not
    run; they stay zero and change nothing). The gradients the check makes are cleared again."""
    def refuse(check: str, detail: str):
        raise SelfCheckFailed(refusal(model_class, check, detail))

    with torch.no_grad():
        stock = stock_call().detach()
    try:
        trained = training_call()
    except RuntimeError as error:     # torch's errors (a cancel is no RuntimeError: it passes through)
        refuse("1 (training forward = stock forward)", f"the training clone's call fails where the stock call ran: "
               f"{type(error).__name__}: {str(error)[:300]}")
    if not isinstance(trained, torch.Tensor) or not trained.requires_grad:
        refuse("2 (the LoRA gets a gradient)", "the denoiser's output does not depend on the LoRA at all")
    if trained.shape != stock.shape:
        refuse("1 (training forward = stock forward)", f"the training call made {tuple(trained.shape)}, the stock "
               f"call {tuple(stock.shape)}")
    if not bool(torch.isfinite(stock).all()):
        refuse("1 (training forward = stock forward)", "the stock call's output is not finite on these inputs")
    scale = float(stock.abs().max())
    difference = float((trained.detach().float() - stock.float()).abs().max()) / max(scale, 1e-30)
    tolerance = forward_tolerance(dtype)
    if not difference <= tolerance:     # also refuses a NaN
        refuse("1 (training forward = stock forward)", f"the training clone's denoiser output differs from the stock "
               f"model's by {difference:.3g} of its scale (at most {tolerance:.3g} allowed in {dtype})")
    # A random direction: the gradient of <output, r> reaches every layer the output depends on
    # (the output's own square could vanish where the prediction happens to be zero).
    direction = torch.randn(trained.shape, generator=torch.Generator().manual_seed(seed)).to(trained.device)
    parameters = [p for params in lora_layers.values() for p in params]
    for p in parameters:
        p.grad = None
    clean = [p for _, p in host_parameters if p.grad is None]
    try:
        try:
            (trained.float() * direction).sum().backward()
        except RuntimeError as error:    # e.g. a block that overwrites in place what its backward needs
            refuse("2 (the LoRA gets a gradient)", f"backward through the model fails: {type(error).__name__}: "
                   f"{str(error)[:300]}")
        touched = [name for name, p in host_parameters if p.grad is not None]
        if touched:
            refuse("2 (gradients reach only the LoRA)", f"{len(touched)} weights of the host model got a gradient "
                   f"(first: {touched[0]})")
        unused = []
        for name, params in lora_layers.items():
            grads = [p.grad for p in params if p.grad is not None]
            if not all(bool(torch.isfinite(g).all()) for g in grads):
                refuse("2 (every LoRA layer gets a gradient)", f"LoRA layer {name} gets a gradient that is not finite")
            # with the LoRA at zero (up = 0) only up's gradient can be non-zero: down's is up^T (...)
            if any(bool(g.abs().max() > 0) for g in grads):
                continue
            if not called(name) and on_path(name):
                refuse("2 (every LoRA layer gets a gradient)", f"LoRA layer {name} gets none: the model computes that "
                       "layer past its forward, so nothing could be learned there")
            unused.append(name)
        if unused and len(unused) == len(lora_layers):
            refuse("2 (every LoRA layer gets a gradient)", "no LoRA layer's output reaches the denoiser's output")
    finally:
        for p in parameters:
            p.grad = None
        for p in clean:     # a refused run leaves no gradient on the user's weights
            p.grad = None
    return difference, unused
