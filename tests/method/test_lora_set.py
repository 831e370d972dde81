"""lora.LoRASet (issue 27): a run's LoRA deltas in one float32 buffer, cast to half precision
by one kernel per forward pass and back by one in backward, where lone deltas cast themselves
per layer and call (two kernels each way). The same function and gradients, fewer launches.
Pure torch, on the CPU (bfloat16 autocast runs there too)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import siso_ops.lora as lora_mod
import siso_ops.optimize as optimize_mod

SHAPES = [(12, 8), (8, 12), (16, 8), (8, 16)]     # (out, in) of four chained linear layers
RANK, ALPHA = 4, 4.0


class Kernels(TorchDispatchMode):
    """The operators dispatched while active that run a kernel (views and reshapes left out);
    ``count``: how many of them are dtype casts (aten::_to_copy)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func._schema.name not in ("aten::_unsafe_view", "aten::alias"):
            self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return self.names.count("aten::_to_copy")


def _lone_deltas(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [lora_mod.LoRADelta(o, i, RANK, ALPHA, generator=generator) for o, i in SHAPES]


def _set(seed=0):
    return lora_mod.LoRASet(SHAPES, RANK, ALPHA, generator=torch.Generator().manual_seed(seed))


def _weights(dtype):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(o, i, generator=generator).to(dtype) for o, i in SHAPES]


def _forward(deltas, weights, x, calls=1):
    """The layers as the training forward computes them: the frozen layer plus its LoRA."""
    out = x
    for _ in range(calls):
        for delta, weight in zip(deltas, weights):
            out = torch.nn.functional.linear(out, weight) + delta.on_input(out)
    return out


def _with_up(deltas, seed=2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in deltas:
            delta.up.copy_(torch.randn(delta.up.shape, generator=generator) * 0.1)
    return deltas


def test_a_set_draws_what_lone_deltas_draw_from_one_seed():
    lone, grouped = _lone_deltas(), _set().deltas
    for a, b in zip(lone, grouped):
        assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up) and not b.up.any()
        assert b.down.is_leaf and b.down.requires_grad and b.up.is_leaf


def test_under_gradients_in_bfloat16_the_set_casts_once_each_way_with_the_same_result():
    """Lone deltas: two casts per layer in the forward pass and two in backward; the set: one
    each way for all of them, and bitwise the same output and float32 gradients (the same
    bfloat16 values multiply, one call per delta: the gradients are summed nowhere)."""
    weights = _weights(torch.bfloat16)
    x = torch.randn(3, SHAPES[0][1], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    results = {}
    lora_set = _set()     # held: a delta refers to its set weakly (the run holds the set)
    for name, deltas in (("lone", _with_up(_lone_deltas())), ("set", _with_up(lora_set.deltas))):
        forward, backward = Kernels(), Kernels()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with forward:
                out = _forward(deltas, weights, x)
            with backward:
                out.float().square().sum().backward()
        results[name] = (forward.count, backward.count, out, [p.grad for d in deltas for p in (d.down, d.up)])
    # backward counts the loss's own float() and its backward too (2)
    assert results["lone"][:2] == (2 * len(SHAPES), 2 * len(SHAPES) + 2)
    assert results["set"][:2] == (1, 1 + 2)
    assert torch.equal(results["lone"][2], results["set"][2])
    for a, b in zip(results["lone"][3], results["set"][3]):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_in_float32_nothing_is_cast_and_the_parameters_are_used_as_they_are():
    lora_set = _set()
    deltas = _with_up(lora_set.deltas)
    counter = Kernels()
    with counter:
        out = _forward(deltas, _weights(torch.float32), torch.randn(2, SHAPES[0][1]))
        out.square().sum().backward()
    assert counter.count == 0 and all(d.down.grad is not None and d.up.grad.any() for d in deltas)


def test_the_set_casts_again_after_any_change_and_after_backward():
    """An optimiser step, a warm start or a check that changes one delta in place is seen by the
    next forward (the parameters share the buffer's version counter), and each iteration's
    backward uses up its own cast (no 'backward through the graph a second time'): three AdamW
    iterations give the lone deltas' losses and parameters bitwise."""
    weights = _weights(torch.bfloat16)
    x = torch.randn(3, SHAPES[0][1], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    runs = {}
    lora_set = _set()
    for name, deltas in (("lone", _lone_deltas()), ("set", lora_set.deltas)):
        params = [p for d in deltas for p in (d.down, d.up)]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _forward(deltas, weights, x).float().square().mean()
            losses.append(float(loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            deltas[1].up.zero_()        # one delta changed in place, as a warm start or a check does
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(float(_forward(deltas, weights, x).float().square().mean().detach()))
        runs[name] = (losses, [p.detach().clone() for p in params])
    assert runs["lone"][0] == runs["set"][0] and len(set(runs["set"][0])) == 4
    assert all(torch.equal(a, b) for a, b in zip(runs["lone"][1], runs["set"][1]))


def test_a_delta_called_twice_sums_its_gradient_in_the_compute_dtype():
    """Two calls before one backward (two denoising steps with gradients): lone deltas add the
    two float32 casts of their bfloat16 gradients; the set adds them in bfloat16 and casts once,
    as autocast's own cast cache does. Each bfloat16 addition of two bfloat16 values rounds
    once, by at most bfloat16's unit roundoff u = 2^-8 of the sum, which the float32 sum holds
    exactly (two bfloat16 values within 2^16 of each other add exactly in float32's 24 bits);
    a third operand pair would add another u. Bound: 2u relative, elementwise, on top of float32's
    own 2^-24 relative (rounding of the product chain is the same in both)."""
    weights = _weights(torch.bfloat16)
    x = torch.randn(3, SHAPES[0][1], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    grads = {}
    lora_set = _set()     # held: a delta refers to its set weakly (the run holds the set)
    for name, deltas in (("lone", _with_up(_lone_deltas())), ("set", _with_up(lora_set.deltas))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _forward(deltas[:2], weights[:2], x, calls=2)
        out.float().square().sum().backward()
        grads[name] = [p.grad for d in deltas[:2] for p in (d.down, d.up)]
    differ = 0
    for a, b in zip(grads["lone"], grads["set"]):
        assert bool(((a - b).abs() <= 2 * 2**-8 * a.abs() + 2**-24 * a.abs().max()).all())
        differ += int((a != b).sum())
    assert differ > 0      # the check can fail: the sums do round differently somewhere


def test_without_gradients_each_delta_casts_itself_and_sees_a_change_at_once():
    """No gradients (the checks before the loop, steps without gradients): the per-call cast,
    so a check that changes one delta and calls its layer sees the change, with no recast of
    the whole set per change."""
    lora_set = _set()
    deltas = _with_up(lora_set.deltas)
    weights = _weights(torch.bfloat16)
    x = torch.randn(2, SHAPES[0][1]).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = deltas[0].on_input(x)
        counter = Kernels()
        with counter:
            deltas[0].up.mul_(2)
            after = deltas[0].on_input(x)
    assert counter.count == 2 and torch.equal(after, lora_mod.lora_output(x, deltas[0].down, deltas[0].up, 1.0))
    assert not torch.equal(before, after)
    del weights


def test_a_set_kept_cast_frees_with_its_owner_without_the_garbage_collector():
    """The cast of a forward pass without backward (the last iteration's) holds a graph node
    that refers to the set weakly: dropping the run's set and deltas frees the buffer at once
    (no reference cycle waiting for the garbage collector, holding GPU memory)."""
    gc.disable()
    try:
        lora_set = _set()
        deltas = _with_up(lora_set.deltas)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _forward(deltas, _weights(torch.bfloat16), torch.randn(2, SHAPES[0][1]).to(torch.bfloat16))
        set_ref = weakref.ref(lora_set)
        del lora_set, deltas, out
        assert set_ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("mixed", [False, True])
def test_the_best_states_snapshot_is_a_copy(mixed):
    """optimize.snapshot: one concatenation for parameters of one dtype (one kernel on a GPU, not
    one per tensor), a copy each otherwise; either way later steps do not change it."""
    params = {f"p{i}": torch.nn.Parameter(torch.randn(3, 2 + i)) for i in range(3)}
    if mixed:
        params["half"] = torch.nn.Parameter(torch.randn(4).to(torch.bfloat16))
    before = {name: p.detach().clone() for name, p in params.items()}
    state = optimize_mod.snapshot(params)
    with torch.no_grad():
        for p in params.values():
            p.add_(1)
    assert set(state) == set(params)
    for name, p in params.items():
        assert state[name].dtype == p.dtype and torch.equal(state[name], before[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lora_is_added_to_the_layers_output_by_one_multiply_add(dtype):
    """lora_output(..., base=layer output): the second product, the scale and the sum in one
    addmm (one kernel less per layer and call), on the training forward's 3-D activations. The
    same function in another float order: the product and the sum rounded apart round once
    together, so the two differ by at most one rounding of the sum and one of the product, 2u
    of |base| + |product| elementwise (u: 2^-24 in float32, 2^-8 in bfloat16)."""
    generator = torch.Generator().manual_seed(4)
    delta = lora_mod.LoRADelta(12, 8, RANK, 2.0 * RANK, generator=generator)   # scale 2
    with torch.no_grad():
        delta.up.copy_(torch.randn(delta.up.shape, generator=generator))
    x = torch.randn(2, 5, 8, generator=generator).to(dtype)
    base = torch.randn(2, 5, 12, generator=generator).to(dtype)
    apart, fused = Kernels(), Kernels()
    with torch.no_grad():
        with apart:
            product = delta.on_input(x)
            expected = base + product
        with fused:
            got = delta.on_input(x, base=base)
    assert got.shape == base.shape and got.dtype == dtype
    casts = 2 if dtype != torch.float32 else 0
    assert len(apart.names) == casts + 4 and len(fused.names) == casts + 2 and "aten::addmm" in fused.names
    u = 2.0 ** -24 if dtype == torch.float32 else 2.0 ** -8
    bound = 2 * u * (base.float().abs() + product.float().abs())
    assert bool(((got.float() - expected.float()).abs() <= bound).all())
    # a base of another dtype (a layer that outputs float32 from a half input): added apart
    other = delta.on_input(x, base=base.double())
    assert other.dtype == torch.float64 and torch.allclose(other, base.double() + product.double())


def _run_optimize(deltas, weights, x, max_grad_norm, dtype, iterations=4, lr=1e-2):
    """optimize() on these deltas: the loss of each iteration and the parameters at the end."""
    params = {f"{i}:{part}": p for i, d in enumerate(deltas) for part, p in (("down", d.down), ("up", d.up))}
    settings = optimize_mod.OptimizationSettings(max_iterations=iterations, learning_rate=lr,
                                                 max_grad_norm=max_grad_norm, early_stop_patience=50)

    def generate():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return _forward(deltas, weights, x)

    result = optimize_mod.optimize(params, generate, lambda out: {"loss": out.float().square().mean()}, settings)
    return [h["loss"] for h in result.history], [p.detach().clone() for p in params.values()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_optimize_steps_a_set_as_one_tensor_with_the_per_parameter_result(dtype):
    """optimize() on a LoRASet's parameters runs AdamW and the clip on its one buffer. AdamW is
    elementwise, so with the clip not engaged (max_grad_norm far above the gradient's norm: both
    multiply by exactly 1) three steps give bitwise the per-parameter run of lone deltas. With the
    clip engaged its total norm is one float32 norm of the whole gradient instead of the norm of
    the per-parameter norms: the coefficient differs by a few roundings of a float32 sum over at
    most 128 terms (<= 128 u, u = 2^-24, about 8e-6 relative), and AdamW divides the scale of the
    gradient out again (m / sqrt(v)), so each step moves a parameter by lr within that relative
    error plus the rounding of the update itself: 3 steps x lr x 2^-16 bounds both."""
    weights = _weights(dtype)
    x = torch.randn(3, SHAPES[0][1], generator=torch.Generator().manual_seed(3)).to(dtype)
    for max_grad_norm in (1e6, 1e-3):
        lone_losses, lone_params = _run_optimize(_with_up(_lone_deltas()), weights, x, max_grad_norm, dtype)
        lora_set = _set()
        set_losses, set_params = _run_optimize(_with_up(lora_set.deltas), weights, x, max_grad_norm, dtype)
        start = [p.detach() for d in _with_up(_lone_deltas()) for p in (d.down, d.up)]
        assert len(set(lone_losses)) == 4         # three steps that changed the loss
        assert max(float((a - b).abs().max()) for a, b in zip(lone_params, start)) > 1e-3   # ~lr per step
        if max_grad_norm > 1:
            assert set_losses == lone_losses
            assert all(torch.equal(a, b) for a, b in zip(lone_params, set_params))
        else:
            gap = max(float((a - b).abs().max()) for a, b in zip(lone_params, set_params))
            assert gap <= 3 * 1e-2 * 2.0 ** -16, gap
        # the parameters are still the buffer's views, and the next cast sees the steps
        assert all(p.untyped_storage().data_ptr() == lora_set.buffer.untyped_storage().data_ptr()
                   for p in lora_set.parameters)


def test_in_half_precision_the_gradients_already_are_one_tensor():
    """The set's cast back gives every parameter's gradient as a part of one float32 tensor, so
    optimize() hands AdamW that tensor without a copy; lone float32 gradients are joined by one
    concatenation, in the buffer's order."""
    weights = _weights(torch.bfloat16)
    x = torch.randn(3, SHAPES[0][1], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float32):
        lora_set = _set()
        deltas = _with_up(lora_set.deltas)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            out = _forward(deltas, [w.to(dtype) for w in weights], x.to(dtype))
        out.float().square().sum().backward()
        flat = optimize_mod.flat_view(lora_set.parameters)
        assert flat is not None and flat.data_ptr() == lora_set.buffer.data_ptr() and flat.shape == lora_set.buffer.shape
        gradient = optimize_mod.flat_gradient(lora_set.parameters, flat)
        first = lora_set.parameters[0].grad
        shared = gradient.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        assert shared == (dtype == torch.bfloat16)
        assert torch.equal(gradient, torch.cat([p.grad.reshape(-1) for p in lora_set.parameters]))


def _optimizer_kernels(monkeypatch, layers: int, grouped: bool) -> int:
    """Kernels dispatched by optimize()'s one step (gathering the gradient, the clip, AdamW)."""
    shapes = [(8, 8)] * layers
    generator = torch.Generator().manual_seed(0)
    if grouped:
        lora_set = lora_mod.LoRASet(shapes, RANK, ALPHA, generator=generator)   # held while its deltas run
        deltas = lora_set.deltas
    else:
        deltas = [lora_mod.LoRADelta(o, i, RANK, ALPHA, generator=generator) for o, i in shapes]
    counter = Kernels()

    def counted(f):
        def wrapper(*args, **kwargs):
            with counter:
                return f(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(torch.optim.AdamW, "step", counted(torch.optim.AdamW.step))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counted(torch.nn.utils.clip_grad_norm_))
    monkeypatch.setattr(optimize_mod, "flat_gradient", counted(optimize_mod.flat_gradient))
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))

    def generate():
        out = x
        for delta in deltas:
            out = out + delta.on_input(out)
        return out

    settings = optimize_mod.OptimizationSettings(max_iterations=2, learning_rate=1e-2, early_stop_patience=50)
    params = {f"{i}:{part}": p for i, d in enumerate(deltas) for part, p in (("down", d.down), ("up", d.up))}
    optimize_mod.optimize(params, generate, lambda out: {"loss": out.square().mean()}, settings)
    monkeypatch.undo()
    return len(counter.names)


def test_the_optimiser_step_of_a_set_does_not_grow_with_its_layers(monkeypatch):
    """Per parameter, the clip and AdamW dispatch about a dozen operators each (on the CPU a loop
    over the tensors; on a GPU multi-tensor kernels in chunks of a few dozen tensors); on a set's
    one buffer, a fixed number however many layers it has (here: 4 and 8 layers in float32,
    where the gradients are not yet one tensor and are joined by one concatenation)."""
    grouped = {layers: _optimizer_kernels(monkeypatch, layers, True) for layers in (4, 8)}
    lone = {layers: _optimizer_kernels(monkeypatch, layers, False) for layers in (4, 8)}
    assert grouped[4] == grouped[8] <= 30
    assert lone[8] - lone[4] >= 8 * 10        # at least ten more per added parameter
    assert lone[4] > 2 * grouped[4]
