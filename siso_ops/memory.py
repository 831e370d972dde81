"""How much memory one SISO iteration needs, known before any of it is spent, and whether the
run should recompute activations (gradient checkpointing, the node's ``low_memory``) to fit.

Method (no per-family table: everything is read from the run's own objects)
- Weights that must be resident on the compute device: the diffusion model's state dict as
  ComfyUI sizes its load, the private decoder copy (the VAE's first stage without its encoder,
  in the compute precision), the similarity networks in the compute precision (their parameter
  count from the loaded network or from the shapes in the file, read without its data; the
  published architecture when the file cannot be read, whose own error comes later), and the
  LoRA with its gradient, two AdamW moments and the best-iteration snapshot (5 copies, float32).
- Activations: the forward passes of one iteration run on shape-only copies of the model, the
  decoder and the networks (PyTorch's ``meta`` device: no memory, no arithmetic, about a second),
  at the run's real size, under ``saved_tensors_hooks`` that record every tensor autograd keeps
  for backward, counted once per storage and without the weights. So what the code keeps is
  counted, not modelled: the model's own layers, ComfyUI's conditioning for the family, the LoRA
  on the layers it trains, the attention ComfyUI picked (fused kernels keep O(tokens); the VAE's
  slice attention, ComfyUI's choice on CPUs, keeps the whole attention matrix), the cast copies
  mixed precision makes (emulated on the shapes: what ``torch.autocast`` runs in bfloat16 gets
  bfloat16 copies of its inputs; on CUDA what it runs in float32 gets float32 copies). Against a
  real CPU run of the tiny models the decoder's and both networks' kept bytes agree to the byte,
  the denoiser's within 6 % (tests/test_memory.py); a full-size DINOv2 ViT-L at 518 px to the byte.
- Checkpointing from the same pass: each block the run would checkpoint (the denoiser's
  ResNet / transformer / DiT blocks, the decoder's ResNet and attention blocks, the networks'
  transformer blocks) then keeps only its inputs; the largest block's own activations come
  back once, while backward recomputes it.
- Peak = weights + kept activations (the denoiser's times the steps with gradients) + the
  largest kept tensor twice (backward holds the gradient of a tensor and of its input while the
  tensors kept for it are still alive). On a CPU the kept tensors below 32 MiB count 1.5x
  (CPU_HEAP_FACTOR: glibc's heap keeps the gaps between them resident).
- Measured error (estimate / measured - 1; on a CPU the memory the run adds to the process,
  peak RSS less RSS at its start, against the estimate less the weights already in RAM):
  SD-Turbo architecture at 256 px, float32: low_memory on -3.8 %, off +12.8 % (auto chose off on
  a 24 GiB machine: +13.9 %) (``benchmarks/bench.py --models sd_turbo --configs
  checkpointing-on,checkpointing-off,defaults --paths generation --iterations 1 --estimate``);
  tiny SD1.5 at 384 px: on about +8 %, off about +20 % (tests/test_memory.py). Not yet measured
  on a GPU (no GPU was lent): there the count is the same, without the heap factor, and CUDA's
  allocator rounding and cuDNN workspaces are left to the margin.
- Not counted: the text encoders (the prompt is encoded before the loop) and the short peak of
  reading a network file (about twice the network, before the loop).

Available memory: ComfyUI's own count (``get_free_memory``) plus, on a GPU, what unloading the
models ComfyUI holds there frees (SISO unloads them before training). On a CPU the weights that
are already in RAM (the model, networks cached by an earlier run) are not asked for again.
"""
from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
import os
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .runtime import host
from .targets import ATTENTION

log = logging.getLogger("siso")

GiB = 2 ** 30
# auto turns checkpointing off only when the estimate, grown by this fraction and by ComfyUI's
# inference reserve, fits. The largest underestimate measured is 3.8 % (module docstring); the
# rest covers what was not measured (a GPU's allocator, another platform's heap), because a run
# that does not fit costs far more than one that recomputes.
SAFETY_FRACTION = 0.15
# On a CPU, glibc serves allocations below its largest mmap threshold (32 MiB on 64-bit Linux)
# from its heap, where the gaps that freed temporaries leave between the tensors autograd keeps
# stay resident; larger ones are mapped and returned whole. Measured for DINOv2 ViT-L at 518 px
# and the IR ViT-H at 290 px (all their tensors below 32 MiB): forward peaks at 1.51x and 1.46x
# the kept bytes; with MALLOC_MMAP_THRESHOLD_=1 MiB (every tensor mapped) the same run peaks at
# the kept bytes + 1 %. So kept bytes in tensors below the limit count 1.5x on a CPU.
HEAP_LIMIT = 32 * 2 ** 20
CPU_HEAP_FACTOR = 1.5
NETWORK_BLOCKS = ("Block", "ResidualAttentionBlock")     # timm's ViT blocks, checkpointed by set_grad_checkpointing
CHECKPOINT_MODES = ("auto", True, False)


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


class _NoInit(TorchFunctionMode):
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


class _ShapeRun(TorchFunctionMode):
    """While active: fused attention in place of PyTorch's (whose meta kernel is the O(N^2)
    reference), and autocast's casts, made as copies autograd keeps like the real ones."""

    def __init__(self, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.dtype = dtype
        self.float32_ops = _FLOAT32_CUDA if device_type == "cuda" else set()
        self.mixed = dtype != torch.float32

    def _cast(self, value, dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
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


def _count_kept(run, modules, block_names, dtype: torch.dtype, device_type: str) -> ActivationCount:
    """Run ``run()`` (a forward pass over shape-only ``modules``) and count what autograd keeps."""
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
                fx_config.patch(meta_nonzero_assume_all_nonzero=True), _ShapeRun(dtype, device_type), \
                torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
            run()
    finally:
        for handle in handles:
            handle.remove()
    return recorder.count()


# ----------------------------------------------------------------------------- the parts
# Counts already made, per model / VAE / network object (weakly: they go with it) and settings,
# so a second run of the same workflow gets its estimate at once.
_COUNTS = weakref.WeakKeyDictionary()


def _remembered(owner, key, make):
    try:
        table = _COUNTS.setdefault(owner, {})
    except TypeError:       # an object that cannot be weakly referenced: count every time
        return make()
    if key not in table:
        table[key] = make()
    return table[key]


def _signature(tensors: dict) -> tuple:
    return tuple(sorted(((k, tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else (k, repr(v)))
                        for k, v in tensors.items()))


def denoiser_activations(model, positive, latent: torch.Tensor, device_type: str, dtype: torch.dtype, rank: int = 4,
                         alpha: float = 0.0, target: str = ATTENTION) -> ActivationCount:
    """One denoiser pass with gradients at the run's latent size, the LoRA on its layers."""
    real_conds = host.model_conditioning(model, positive, latent)

    def count():
        conds = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in real_conds.items()}
        base = host.prepare_denoiser_probe(meta_copy(model.model), model, rank, alpha, target)
        # The latent entering a step with gradients does not require them (noise, or earlier steps
        # run without): autograd records from the first LoRA layer on, as in the run.
        x = torch.zeros(latent.shape, device="meta")
        sigma = torch.ones(latent.shape[0], device="meta")
        return _count_kept(lambda: host.probe_apply_model(base, x, sigma, conds), [base],
                           host.checkpoint_block_classes(model), dtype, device_type)
    key = ("denoiser", tuple(latent.shape), device_type, dtype, int(rank), float(alpha), target, _signature(real_conds))
    return _remembered(model.model, key, count)


def decoder_activations(vae, model, latent: torch.Tensor, device_type: str, dtype: torch.dtype):
    """One pass of the private decoder copy; returns (count, the image's shape)."""
    first_stage, _ = host.vae_first_stage(vae)
    key = ("decoder", tuple(latent.shape), device_type, dtype, type(model.model.latent_format).__name__,
           tuple(host.model_family(model).decoder_blocks))
    return _remembered(first_stage, key, lambda: _decoder_activations(vae, model, latent, device_type, dtype))


def _decoder_activations(vae, model, latent: torch.Tensor, device_type: str, dtype: torch.dtype):
    first_stage, encoder = host.vae_first_stage(vae)
    module = meta_copy(first_stage)
    for name, child in first_stage._modules.items():
        if child is not None and child is encoder:
            module._modules[name] = None      # DifferentiableDecoder's copy leaves the encoder out
    module = host.prepare_decoder_probe(module.to(dtype))
    z = torch.zeros(latent.shape, device="meta", requires_grad=True)
    shape = []

    def run():
        shape.append(tuple(host.probe_decode(module, model, z, dtype).shape))
    count = _count_kept(run, [module], host.model_family(model).decoder_blocks, dtype, device_type)
    return count, shape[0]


def network_activations(network, image_shape, device_type: str, dtype: torch.dtype) -> ActivationCount:
    """One embedding of the decoded image (``network``: a FeatureNetwork on the meta device)."""
    def count():
        image = torch.zeros(image_shape, device="meta", requires_grad=True)
        return _count_kept(lambda: network.embed(image), [network.module], NETWORK_BLOCKS, dtype, device_type)
    return _remembered(network.module, ("network", tuple(image_shape), device_type, dtype), count)


def _shapes(path: str) -> dict:
    """name -> (shape, dtype) of a weight file's tensors, without reading their data."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), None) for k in f.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _depth(keys, pattern: str) -> int:
    import re
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def meta_network(kind: str, path: str | None, dtype: torch.dtype = torch.float32):
    """A shape-only FeatureNetwork of the architecture in ``path`` (widths and depths read from
    its tensor shapes), or of the published architecture when the file cannot be read."""
    try:
        stamp = (os.path.abspath(path), os.path.getmtime(path), os.path.getsize(path))
    except (OSError, TypeError):
        stamp = None
    return _meta_network(kind, path if stamp else None, stamp, dtype)


@functools.lru_cache(maxsize=4)
def _meta_network(kind: str, path: str | None, stamp, dtype: torch.dtype):
    from . import feature_networks as fn
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    import timm
    shapes = {}
    if path:
        try:
            shapes = _shapes(path)
        except Exception as error:  # the loader reports the file's problem later, with its own message
            log.debug("SISO memory estimate: %s unreadable (%s); published architecture assumed", path, error)
    with torch.device("meta"), _NoInit():
        if kind == "dino":
            shapes = {k[len("module."):] if k.startswith("module.") else k: v for k, v in shapes.items()}
            width = shapes["cls_token"][0][-1] if "cls_token" in shapes else 1024
            depth = _depth(shapes, r"blocks\.(\d+)\.") or 24
            module = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=fn.DINO_IMAGE_SIZE,
                                       embed_dim=width, depth=depth, num_heads=width // fn.DINO_HEAD_DIM, num_classes=0)
            network = fn.FeatureNetwork(module, fn.DINO_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, "DINOv2 (shapes)")
        else:
            cut = {}
            for key, value in shapes.items():
                key = key.split("module.")[-1]
                cut["visual." + key[len("backbone."):] if key.startswith("backbone.") else key] = value
            width = cut["visual.class_embedding"][0][-1] if "visual.class_embedding" in cut else 1280
            depth = _depth(cut, r"visual\.transformer\.resblocks\.(\d+)\.") or 32
            proj = cut["visual.proj"][0][-1] if "visual.proj" in cut else 1024
            module = fn.IRNetwork(fn._build_ir_backbone(width, depth, proj), torch.nn.Linear(proj, fn.IR_EMBED_DIM))
            network = fn.FeatureNetwork(module, fn.IR_IMAGE_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "IR (shapes)")
    network.module.to(dtype).eval().requires_grad_(False)   # stored in the compute precision, as the cache keeps them
    return network


def _network_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


# ----------------------------------------------------------------------------- the estimate
@dataclass
class NetworkUse:
    """A similarity network the run will use: its loaded object when there is one (given by the
    caller, or cached from an earlier run: ``in_ram`` then), else the file it will be read from."""
    kind: str                       # "dino" or "ir"
    network: object = None          # a FeatureNetwork, or None
    path: str | None = None
    in_ram: bool = False


@dataclass
class MemoryEstimate:
    """One iteration's peak on the compute device, in bytes, with and without checkpointing."""
    device: str
    width: int
    height: int
    weights: dict = field(default_factory=dict)      # part -> bytes that must be resident
    activations: dict = field(default_factory=dict)  # part -> ActivationCount
    already_in_ram: int = 0        # of the weights, bytes a CPU run already holds in RAM
    heap_factor: float = 1.0       # CPU_HEAP_FACTOR on a CPU

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    def activation_count(self) -> ActivationCount:
        total = ActivationCount()
        for count in self.activations.values():
            total = total + count
        return total

    def peak(self, checkpointing: bool) -> int:
        """Bytes one iteration holds on the device at its peak."""
        return self.weight_bytes + self.activation_count().peak(checkpointing, self.heap_factor)

    def needed(self, checkpointing: bool) -> int:
        """Bytes the run must still get from the device (the peak less what is already in RAM)."""
        return self.peak(checkpointing) - self.already_in_ram

    def describe(self) -> str:
        return (f"{self.width} x {self.height} on {self.device}: about {self.peak(True) / GiB:.1f} GiB with low_memory "
                f"on, {self.peak(False) / GiB:.1f} GiB off (weights {self.weight_bytes / GiB:.1f} GiB"
                + (f", {self.already_in_ram / GiB:.1f} GiB of them already in RAM" if self.already_in_ram else "")
                + ")")


def estimate_iteration(model, vae, positive, width: int, height: int, device, dtype: torch.dtype, grad_steps: int = 1,
                       rank: int = 4, alpha: float = 0.0, target: str = ATTENTION, networks=()) -> MemoryEstimate:
    """The estimate for one iteration of ``optimize_subject`` with these settings (see the module
    docstring). ``networks``: NetworkUse of each network the loss uses."""
    device = torch.device(device)
    estimate = MemoryEstimate(str(device), int(width), int(height),
                              heap_factor=CPU_HEAP_FACTOR if device.type == "cpu" else 1.0)
    latent = host.empty_latent(model, width, height, vae)
    estimate.weights["diffusion model"] = host.model_weight_bytes(model)
    if device.type == "cpu" and host.model_weights_in_ram(model):
        estimate.already_in_ram += estimate.weights["diffusion model"]
    estimate.weights["decoder copy"] = host.decoder_weight_bytes(vae, dtype)
    estimate.weights["LoRA and AdamW"] = 5 * 4 * host.lora_parameter_count(model, rank, target)
    with host.training_mode():
        denoiser = denoiser_activations(model, positive, latent, device.type, dtype, rank, alpha, target)
        estimate.activations["denoiser"] = denoiser.times(int(grad_steps))
        model_latent = torch.zeros(latent.shape)
        estimate.activations["decoder"], image_shape = decoder_activations(vae, model, model_latent, device.type, dtype)
        for use in networks:
            shaped = meta_network(use.kind, use.path, dtype) if use.network is None else _meta_feature_network(use.network)
            size = _network_bytes(shaped.module)
            estimate.weights[use.kind] = size
            if use.in_ram and device.type == "cpu":
                estimate.already_in_ram += size
            estimate.activations[use.kind] = network_activations(shaped, image_shape, device.type, dtype)
    return estimate


def _meta_feature_network(network):
    shaped = copy.copy(network)
    shaped.module = meta_copy(network.module)
    shaped.interrupt_hooks = []
    shaped.set_checkpointing(False)     # the copy's own flag: one pass counts both ways
    return shaped


# ----------------------------------------------------------------------------- the decision
@dataclass
class DeviceMemory:
    """Bytes the run can have on its device: free now, plus what unloading other models frees."""
    device: str
    free: int
    unloadable: int = 0
    total: int = 0
    reserve: int = 0                # kept free beyond any estimate (ComfyUI's inference reserve)

    @property
    def usable(self) -> int:
        return self.free + self.unloadable

    def describe(self) -> str:
        where = "RAM available" if self.device.startswith("cpu") else "free on the GPU"
        unload = f" after unloading other models ({self.unloadable / GiB:.1f} GiB of them)" if self.unloadable else ""
        return f"{self.usable / GiB:.1f} GiB {where}{unload}, of {self.total / GiB:.1f} GiB"


def available_memory(device) -> DeviceMemory:
    found = host.device_memory(device)
    return DeviceMemory(str(torch.device(device)), found["free"], found["unloadable"], found["total"],
                        host.memory_reserve(device))


def fits(estimate: MemoryEstimate, available: DeviceMemory, checkpointing: bool, margin: bool = True) -> bool:
    need = estimate.needed(checkpointing)
    if margin:
        need = need * (1 + SAFETY_FRACTION) + available.reserve
    return need <= available.usable


def check_mode(mode):
    if not (mode == "auto" or mode is True or mode is False):
        raise ValueError(f"gradient checkpointing (low_memory) must be 'auto', True or False, got {mode!r}")


def resolve_checkpointing(mode, estimate: MemoryEstimate | None, available: DeviceMemory | None,
                          precision_dtype: torch.dtype | None = None) -> bool:
    """The gradient checkpointing to use. ``auto``: off when the run fits without it (with the
    safety margin), on when only with it. An explicit True / False is kept. Raises ValueError
    when the chosen mode does not fit even by the bare estimate: a run that cannot fit is refused
    before any work. Without an estimate (it could not be made), auto means on."""
    check_mode(mode)
    if estimate is None or available is None:
        return True if mode == "auto" else bool(mode)
    if mode == "auto":
        chosen = not fits(estimate, available, False)
    else:
        chosen = bool(mode)
    if not fits(estimate, available, chosen, margin=mode == "auto" and chosen is False):
        raise ValueError(refusal(estimate, available, chosen, mode, precision_dtype))
    return chosen


def refusal(estimate: MemoryEstimate, available: DeviceMemory, checkpointing: bool, mode, precision_dtype=None) -> str:
    need = estimate.needed(checkpointing)
    in_ram = (f" ({estimate.already_in_ram / GiB:.1f} GiB of weights already in RAM not counted)"
              if estimate.already_in_ram else "")
    advice = []
    activations = need - (estimate.weight_bytes - estimate.already_in_ram)
    room = available.usable - (estimate.weight_bytes - estimate.already_in_ram)
    pixels = estimate.width * estimate.height
    if room > 0 and activations > 0:
        side = int(math.sqrt(pixels * room / activations / 1.25) // 64 * 64)
        if side >= 64:
            advice.append(f"a smaller width and height (activations grow with the pixel count; about {side} x {side} "
                          "or less)")
        else:
            advice.append("a smaller width and height")
    else:
        advice.append("a device with more memory: the weights alone take "
                      f"{(estimate.weight_bytes - estimate.already_in_ram) / GiB:.1f} GiB")
    if not checkpointing:
        advice.append(f"turn low_memory on (about {estimate.needed(True) / GiB:.1f} GiB)")
    if precision_dtype is None or precision_dtype == torch.float32:
        advice.append("precision bf16 where the hardware supports it (about half the activations; fast on NVIDIA "
                      "GPUs from Ampere on and CPUs with AVX-512 BF16 or AMX)")
    mode_text = {True: "on", False: "off"}.get(mode, "auto")
    return (f"SISO Optimize: this run does not fit. One iteration at {estimate.width} x {estimate.height} needs about "
            f"{need / GiB:.1f} GiB on {estimate.device} with low_memory {'on' if checkpointing else 'off'}"
            f"{' (chosen by auto)' if mode_text == 'auto' else ''}{in_ram}, but the device has "
            f"{available.describe()}. Change: " + "; ".join(advice) + ".")


@dataclass
class MemoryPlan:
    """What was estimated and chosen for a run (for the log and the node's report)."""
    estimate: MemoryEstimate | None
    available: DeviceMemory | None
    mode: object
    checkpointing: bool

    def describe(self) -> str:
        chosen = "on" if self.checkpointing else "off"
        why = {"auto": " (auto)"}.get(self.mode, "") if isinstance(self.mode, str) else ""
        if self.estimate is None:
            return f"low_memory {chosen}{why}; no memory estimate"
        return (f"low_memory {chosen}{why}; estimated peak {self.estimate.peak(self.checkpointing) / GiB:.1f} GiB "
                f"({self.estimate.describe()}); {self.available.describe()}")


def plan(mode, model, vae, positive, width, height, device, dtype, grad_steps, rank, alpha, target, networks) -> MemoryPlan:
    """Estimate, measure the device, decide (raises ValueError when nothing fits)."""
    check_mode(mode)
    try:
        estimate = estimate_iteration(model, vae, positive, width, height, device, dtype, grad_steps, rank, alpha,
                                      target, networks)
    except Exception as error:   # an exotic layer the shape-only pass cannot run: no estimate, no refusal
        log.warning("SISO: memory estimate unavailable (%s: %s); low_memory %s", type(error).__name__, error,
                    "on" if mode == "auto" else mode)
        return MemoryPlan(None, None, mode, resolve_checkpointing(mode, None, None))
    available = available_memory(device)
    chosen = resolve_checkpointing(mode, estimate, available, dtype)
    result = MemoryPlan(estimate, available, mode, chosen)
    log.info("SISO: %s", result.describe())
    return result
