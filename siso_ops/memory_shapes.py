"""The memory estimate's engine (memory.py): forward passes on shape-only copies of modules
(PyTorch's ``meta`` device: no memory, no arithmetic), counting every tensor autograd keeps for
backward, once per storage and without the weights, with and without the blocks checkpointed.

Where the meta kernels would count something the real run does not keep (PyTorch's reference
attention is O(N^2); its normalisation decompositions take seconds), ``_ShapeRun`` swaps in an
operation that keeps what the real kernel keeps; it also makes autocast's casts as copies, as the
real run does. Counts already made are remembered per module object and settings.
"""
from __future__ import annotations

import copy
import itertools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .runtime import host

# On a CPU, glibc serves allocations below its largest mmap threshold (32 MiB on 64-bit Linux)
# from its heap, where the gaps that freed temporaries leave between the tensors autograd keeps
# stay resident; larger ones are mapped and returned whole. Measured for DINOv2 ViT-L at 518 px
# and the IR ViT-H at 290 px (all their tensors below 32 MiB): forward peaks at 1.51x and 1.46x
# the kept bytes; with MALLOC_MMAP_THRESHOLD_=1 MiB (every tensor mapped) the same run peaks at
# the kept bytes + 1 %. So kept bytes in tensors below the limit count 1.5x on a CPU.
HEAP_LIMIT = 32 * 2 ** 20
CPU_HEAP_FACTOR = 1.5


# ----------------------------------------------------------------------------- shape-only copies
def meta_copy(module: torch.nn.Module, _copies: dict | None = None) -> torch.nn.Module:
    """A structural copy of ``module`` whose parameters and buffers live on the meta device
    (shapes and dtypes only). Each submodule is copied shallowly: its own containers (hooks,
    lists) are new, so nothing done to the copy reaches the original; anything else it refers
    to (ComfyUI's patcher, options) is shared, never duplicated, so no weight is ever copied."""
    copies = {} if _copies is None else _copies
    if id(module) in copies:
        return copies[id(module)]
    clone = copy.copy(module)
    copies[id(module)] = clone
    for name, value in list(vars(clone).items()):
        if isinstance(value, (dict, list, set)):
            vars(clone)[name] = copy.copy(value)

    def shell(tensor, parameter: bool):
        if tensor is None:
            return None
        if id(tensor) not in copies:
            if type(tensor) in (torch.Tensor, torch.nn.Parameter):
                empty = torch.empty_like(tensor, device="meta")
            else:
                # a quantised weight (ComfyUI-GGUF's GGMLTensor, ComfyUI's QuantizedTensor): its
                # logical shape; the layer computes with it in the input's dtype (the probe casts)
                empty = torch.empty(tuple(tensor.shape), device="meta", dtype=torch.float16)
            copies[id(tensor)] = torch.nn.Parameter(empty, requires_grad=False) if parameter else empty
        return copies[id(tensor)]
    clone._parameters = {n: shell(p, True) for n, p in module._parameters.items()}
    clone._buffers = {n: shell(b, False) for n, b in module._buffers.items()}
    clone._modules = {n: None if m is None else meta_copy(m, copies) for n, m in module._modules.items()}
    return clone


def _storage_key(tensor: torch.Tensor):
    return tensor.untyped_storage()._cdata


class _ShapeOnly(torch.autograd.Function):
    """An operation counted on shapes: its forward keeps what the real kernel keeps; it is never
    differentiated."""

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - shapes only, never differentiated
        raise RuntimeError("a memory probe is not differentiated")


class _FusedAttention(_ShapeOnly):
    """scaled_dot_product_attention on shapes: keeps what the fused kernels keep (flash and
    memory-efficient on CUDA, flash on CPU): q, k, v, the output and the float32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out


class _Normalization(_ShapeOnly):
    """group_norm / layer_norm on shapes: keeps what their kernels keep (the input, and the mean
    and reciprocal deviation per group or row). PyTorch's own meta versions are Python
    decompositions, seconds for a full-size UNet; this is the same count at no cost."""

    @staticmethod
    def forward(ctx, x, stats_shape):
        mean = x.new_empty(stats_shape, dtype=torch.float32)
        rstd = x.new_empty(stats_shape, dtype=torch.float32)
        ctx.save_for_backward(x, mean, rstd)
        return torch.empty_like(x)


class _KeepsInput(_ShapeOnly):
    """An elementwise operation whose backward needs its input (GELU, SiLU), on shapes."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.empty_like(x)


class _Selected(_ShapeOnly):
    """masked_select on shapes, under a mask whose values are known (real): ``count`` elements;
    its backward keeps the source and the mask, as masked_select's own does."""

    @staticmethod
    def forward(ctx, source, mask, count):
        ctx.save_for_backward(source, mask)
        return source.new_empty((count,))


class _Resized(_ShapeOnly):
    """A bicubic / bilinear resize on shapes: its backward needs only the sizes, keeps nothing."""

    @staticmethod
    def forward(ctx, x, size):
        return x.new_empty(tuple(x.shape[:2]) + tuple(size))


def _linear(input, weight, bias=None):
    # The same saving as linear's own backward formula (matmul keeps an operand only when the
    # other needs a gradient), through C++ meta kernels instead of linear's Python ones.
    out = torch.matmul(input, weight.t())
    return out if bias is None else out + bias


def _interpolate(func, args, kwargs):
    x = args[0]
    size = kwargs.get("size", args[1] if len(args) > 1 else None)
    mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
    if mode in ("bicubic", "bilinear") and size is not None and x.dim() == 4:
        return _Resized.apply(x, tuple(size) if isinstance(size, (tuple, list)) else (size, size))
    return func(*args, **kwargs)


def _group_norm(x, num_groups, *args, **kwargs):
    return _Normalization.apply(x, (x.shape[0], num_groups))


def _layer_norm(x, normalized_shape, *args, **kwargs):
    return _Normalization.apply(x, tuple(x.shape[:x.dim() - len(normalized_shape)]) + (1,) * len(normalized_shape))


class NoInit(TorchFunctionMode):
    """While building a network on the meta device: initialisers and in-place writes do nothing
    (shapes need no values; timm's initialisation on meta tensors takes seconds)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")
        if isinstance(target, torch.Tensor) and target.is_meta and (
                getattr(func, "__module__", "") == "torch.nn.init"
                or (name.endswith("_") and not name.startswith("_") and name != "requires_grad_")):
            return target
        return func(*args, **kwargs)


# Operations torch.autocast runs in the lower precision (CPU and CUDA lists agree on these) and,
# on CUDA only, those it runs in float32. Tensor methods are listed with the functions.
_LOWER = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
          torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.mm,
          torch.Tensor.mm, torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm, torch.einsum,
          F.scaled_dot_product_attention}
_FLOAT32_CUDA = {F.layer_norm, F.group_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax,
                 torch.Tensor.log_softmax, torch.exp, torch.Tensor.exp, torch.log, torch.rsqrt, torch.pow,
                 torch.Tensor.pow, F.cosine_similarity, torch.cumsum}


_LIKE = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like}


def _tensors(values) -> list:
    if isinstance(values, torch.Tensor):
        return [values]
    if isinstance(values, (list, tuple)):
        return [t for v in values for t in _tensors(v)]
    if isinstance(values, dict):
        return [t for v in values.values() for t in _tensors(v)]
    return []


def _meta(values):
    """``values`` (nested lists, tuples and dicts) with each real tensor replaced by a meta one."""
    if isinstance(values, torch.Tensor):
        return values if values.is_meta else values.detach().to("meta")
    if isinstance(values, (list, tuple)):
        return type(values)(_meta(v) for v in values) if not hasattr(values, "_fields") else \
            type(values)(*(_meta(v) for v in values))
    if isinstance(values, dict):
        return {k: _meta(v) for k, v in values.items()}
    return values


class _ShapeRun(TorchFunctionMode):
    """While active: fused attention in place of PyTorch's (whose meta kernel is the O(N^2)
    reference), and autocast's casts, made as copies autograd keeps like the real ones.

    With ``real_inputs``: the model's inputs may be real tensors (its conditioning, small), for a
    model whose forward reads their VALUES (Sana counts its caption's non-zero rows with
    ``.item()``, then ``masked_select``s the caption with a mask built from that count). What is
    computed from real tensors alone stays real, moves to the meta device included; where a real
    tensor meets a meta one it becomes a meta one; ``masked_select`` of a meta tensor under a real
    mask gives a meta tensor of the mask's count."""

    def __init__(self, dtype: torch.dtype, device_type: str, real_inputs: bool = False):
        super().__init__()
        self.dtype = dtype
        self.float32_ops = _FLOAT32_CUDA if device_type == "cuda" else set()
        self.mixed = dtype != torch.float32
        self.real_inputs = real_inputs

    def _real_inputs_call(self, func, args, kwargs):
        """Under real_inputs: (the result, or None where the usual handling follows, args, kwargs)."""
        tensors = _tensors((args, kwargs))
        if not tensors or not any(t.is_meta for t in tensors):
            # a move of a real tensor to the meta device (ComfyUI's cast_to: empty_like + copy_) stays real
            if func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor):
                moved = func(*_meta(args), **_meta(kwargs))   # where and as what it would go
                if isinstance(moved, torch.Tensor) and moved.is_meta:
                    return args[0].to(dtype=moved.dtype), args, kwargs
            if func in _LIKE and tensors and torch.device(kwargs.get("device") or tensors[0].device).type == "meta":
                kwargs = dict(kwargs, device=tensors[0].device)
            return None, args, kwargs
        if func in (torch.masked_select, torch.Tensor.masked_select) and len(tensors) == 2 \
                and tensors[0].is_meta and not tensors[1].is_meta:
            source, mask = tensors
            count = int(mask.expand(torch.broadcast_shapes(source.shape, mask.shape)).bool().sum())
            return _Selected.apply(source, mask, count), args, kwargs
        return None, _meta(args), _meta(kwargs)

    def _cast(self, value, dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.real_inputs:
            result, args, kwargs = self._real_inputs_call(func, args, kwargs)
            if result is not None:
                return result
        if self.mixed and func in _LOWER:
            args = self._cast(args, self.dtype)
            kwargs = {k: self._cast(v, self.dtype) for k, v in kwargs.items()}
        elif self.mixed and func in self.float32_ops:
            args = self._cast(args, torch.float32)
            kwargs = {k: self._cast(v, torch.float32) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            return _FusedAttention.apply(q, k, v)
        if func is F.linear:
            return _linear(*args, **kwargs)
        if func is F.interpolate:
            return _interpolate(func, args, kwargs)
        if func in (F.gelu, F.silu) and not kwargs.get("inplace", False):
            return _KeepsInput.apply(args[0])
        if func is F.group_norm:
            return _group_norm(*args, **kwargs)
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


@dataclass
class ActivationCount:
    """What autograd keeps for one forward pass, in bytes; each ``*_heap`` field is the part of
    the one before it made of tensors below HEAP_LIMIT (see CPU_HEAP_FACTOR)."""
    kept: int = 0                 # everything, without checkpointing
    kept_heap: int = 0
    kept_checkpointed: int = 0    # with the blocks checkpointed: their inputs instead of their insides
    kept_checkpointed_heap: int = 0
    largest_block: int = 0        # the largest block's own activations (recomputed in backward)
    largest_block_heap: int = 0
    largest_tensor: int = 0       # the largest single kept tensor

    def __add__(self, other):
        block = max((self.largest_block, self.largest_block_heap), (other.largest_block, other.largest_block_heap))
        return ActivationCount(self.kept + other.kept, self.kept_heap + other.kept_heap,
                               self.kept_checkpointed + other.kept_checkpointed,
                               self.kept_checkpointed_heap + other.kept_checkpointed_heap, block[0], block[1],
                               max(self.largest_tensor, other.largest_tensor))

    def times(self, n: int):
        return ActivationCount(self.kept * n, self.kept_heap * n, self.kept_checkpointed * n,
                               self.kept_checkpointed_heap * n, self.largest_block, self.largest_block_heap,
                               self.largest_tensor)

    def peak(self, checkpointing: bool, heap_factor: float = 1.0) -> int:
        """Kept activations plus backward's own: the gradients of a tensor and of its input
        (twice the largest tensor), and with checkpointing the largest block recomputed.
        ``heap_factor`` grows the bytes an allocator serves from its heap (CPU_HEAP_FACTOR)."""
        grown = heap_factor - 1.0
        if checkpointing:
            return int(self.kept_checkpointed + grown * self.kept_checkpointed_heap + self.largest_block
                       + grown * self.largest_block_heap + 2 * self.largest_tensor)
        return int(self.kept + grown * self.kept_heap + 2 * self.largest_tensor)


class _Recorder:
    """saved_tensors_hooks + block hooks: kept storages, in order, and which block kept them."""

    def __init__(self, weights: set):
        self.weights = weights
        self.kept = {}                # storage key -> bytes, first-kept order
        self.inside = set()           # keys first kept inside a checkpointed block
        self.block_inputs = {}        # storage key -> bytes
        self.blocks = []              # bytes each block kept itself
        self.depth = 0
        self._mark = 0

    def pack(self, tensor):
        key = _storage_key(tensor)
        if key not in self.weights and key not in self.kept:
            self.kept[key] = tensor.untyped_storage().nbytes()
            if self.depth:
                self.inside.add(key)
        return tensor

    def before_block(self, module, args, kwargs):
        self.depth += 1
        if self.depth == 1:
            self._mark = len(self.kept)
            for value in itertools.chain(args, kwargs.values()):
                if isinstance(value, torch.Tensor) and _storage_key(value) not in self.weights:
                    self.block_inputs[_storage_key(value)] = value.untyped_storage().nbytes()

    def after_block(self, module, args, kwargs, output):
        self.depth -= 1
        if self.depth == 0:
            sizes = list(itertools.islice(self.kept.values(), self._mark, None))
            self.blocks.append((sum(sizes), _heap_bytes(sizes)))

    def count(self) -> ActivationCount:
        outside = {k: v for k, v in self.kept.items() if k not in self.inside}
        checkpointed = {**outside, **self.block_inputs}
        block = max(self.blocks, default=(0, 0))
        return ActivationCount(kept=sum(self.kept.values()), kept_heap=_heap_bytes(self.kept.values()),
                               kept_checkpointed=sum(checkpointed.values()),
                               kept_checkpointed_heap=_heap_bytes(checkpointed.values()),
                               largest_block=block[0], largest_block_heap=block[1],
                               largest_tensor=max(self.kept.values(), default=0))


def _heap_bytes(sizes) -> int:
    return sum(size for size in sizes if size < HEAP_LIMIT)


def count_kept(run, modules, block_names, dtype: torch.dtype, device_type: str,
               real_inputs: bool = False) -> ActivationCount:
    """Run ``run()`` (a forward pass over shape-only ``modules``) and count what autograd keeps
    (``real_inputs``: see _ShapeRun)."""
    weights = {_storage_key(t) for m in modules for t in itertools.chain(m.parameters(), m.buffers())}
    recorder = _Recorder(weights)
    handles = []
    for module in modules:
        for block in module.modules():
            if type(block).__name__ in block_names:
                handles.append(block.register_forward_pre_hook(recorder.before_block, with_kwargs=True))
                handles.append(block.register_forward_hook(recorder.after_block, with_kwargs=True))
    import torch.fx.experimental._config as fx_config
    try:
        # meta_nonzero_assume_all_nonzero: data-dependent indexing (a mixture of experts' routing)
        # is counted as if every element were selected: an upper bound.
        with torch.inference_mode(False), torch.enable_grad(), host.probe_environment(), \
                fx_config.patch(meta_nonzero_assume_all_nonzero=True), _ShapeRun(dtype, device_type, real_inputs), \
                torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
            run()
    finally:
        for handle in handles:
            handle.remove()
    return recorder.count()


# ----------------------------------------------------------------------------- counts remembered
# Counts already made, per model / VAE / network object (weakly: they go with it) and settings,
# so a second run of the same workflow gets its estimate at once.
_COUNTS = weakref.WeakKeyDictionary()


def remembered(owner, key, make):
    try:
        table = _COUNTS.setdefault(owner, {})
    except TypeError:       # an object that cannot be weakly referenced: count every time
        return make()
    if key not in table:
        table[key] = make()
    return table[key]


