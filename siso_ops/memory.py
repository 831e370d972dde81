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

Code: this module holds the estimate and the decision; the shape-only engine is in
memory_shapes.py and the similarity networks' shapes in memory_networks.py.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from .memory_networks import (NETWORK_BLOCKS, meta_feature_network, meta_network,  # noqa: F401
                              network_activations, network_bytes)
from .memory_shapes import (CPU_HEAP_FACTOR, HEAP_LIMIT, ActivationCount, count_kept, meta_copy,  # noqa: F401
                            remembered)
from .runtime import host
from .targets import ATTENTION

log = logging.getLogger("siso")

GiB = 2 ** 30
# auto turns checkpointing off only when the estimate, grown by this fraction and by ComfyUI's
# inference reserve, fits. The largest underestimate measured is 3.8 % (module docstring); the
# rest covers what was not measured (a GPU's allocator, another platform's heap), because a run
# that does not fit costs far more than one that recomputes.
SAFETY_FRACTION = 0.15


# ----------------------------------------------------------------------------- the model's parts
def _signature(tensors: dict) -> tuple:
    return tuple(sorted(((k, tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else (k, repr(v)))
                        for k, v in tensors.items()))


def denoiser_activations(model, positive, latent: torch.Tensor, device_type: str, dtype: torch.dtype, rank: int = 4,
                         alpha: float = 0.0, target: str = ATTENTION) -> ActivationCount:
    """One denoiser pass with gradients at the run's latent size, the LoRA on its layers."""
    real_conds = host.model_conditioning(model, positive, latent)

    def count_with(real_inputs: bool):
        conds = {k: (v.clone() if real_inputs else v.to("meta")) if isinstance(v, torch.Tensor) else v
                 for k, v in real_conds.items()}
        base = host.prepare_denoiser_probe(meta_copy(model.model), model, rank, alpha, target)
        # The latent entering a step with gradients does not require them (noise, or earlier steps
        # run without): autograd records from the first LoRA layer on, as in the run.
        x = torch.zeros(latent.shape, device="meta")
        sigma = torch.ones(latent.shape[0], device="meta")
        return count_kept(lambda: host.probe_apply_model(base, x, sigma, conds), [base],
                          host.checkpoint_block_classes(model), dtype, device_type, real_inputs)

    def count():
        try:
            return count_with(real_inputs=False)
        except Exception as error:
            if host.is_cancel(error):   # ComfyUI's layers check Cancel in the probe too (and clear the flag)
                raise
            # A forward that reads its conditioning's values (Sana: the caption's length by .item(),
            # which no meta tensor has): again with the conditioning real (memory_shapes._ShapeRun).
            try:
                return count_with(real_inputs=True)
            except Exception:
                raise error from None
    key = ("denoiser", tuple(latent.shape), device_type, dtype, int(rank), float(alpha), target, _signature(real_conds))
    return remembered(model.model, key, count)


def decoder_activations(vae, model, latent: torch.Tensor, device_type: str, dtype: torch.dtype):
    """One pass of the private decoder copy; returns (count, the image's shape)."""
    first_stage, _ = host.vae_first_stage(vae)
    key = ("decoder", tuple(latent.shape), device_type, dtype, type(model.model.latent_format).__name__,
           tuple(host.model_family(model).decoder_blocks))
    return remembered(first_stage, key, lambda: _decoder_activations(vae, model, latent, device_type, dtype))


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
    count = count_kept(run, [module], host.model_family(model).decoder_blocks, dtype, device_type)
    return count, shape[0]


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
            shaped = meta_network(use.kind, use.path, dtype) if use.network is None else meta_feature_network(use.network)
            size = network_bytes(shaped.module)
            estimate.weights[use.kind] = size
            if use.in_ram and device.type == "cpu":
                estimate.already_in_ram += size
            estimate.activations[use.kind] = network_activations(shaped, image_shape, device.type, dtype)
    return estimate


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
        if host.is_cancel(error):    # the user's Cancel, raised by a ComfyUI layer in the probe: not a failure
            raise
        log.warning("SISO: memory estimate unavailable (%s: %s); low_memory %s", type(error).__name__, error,
                    "on (auto, the safe side without an estimate)" if mode == "auto" else ("on" if mode else "off"))
        return MemoryPlan(None, None, mode, resolve_checkpointing(mode, None, None))
    available = available_memory(device)
    chosen = resolve_checkpointing(mode, estimate, available, dtype)
    result = MemoryPlan(estimate, available, mode, chosen)
    log.info("SISO: %s", result.describe())
    return result
