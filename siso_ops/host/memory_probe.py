"""What siso_ops/memory.py needs from ComfyUI: the device's free memory as ComfyUI counts it, the
weights a run keeps resident, and the forward passes of the model and of the decoder on
shape-only ("meta") copies, driven the way the training loop drives them."""
from __future__ import annotations

import contextlib

import torch

import comfy.model_management
import comfy.samplers

from ..lora import LoRADelta
from .environment import training_attention
from .layer_forwards import AS_STORED, OWN_CAST, CloneInput, training_layer
from .models import is_dynamic, lora_target_names, model_family
from .sampling import detach_copy


def device_memory(device) -> dict:
    """Bytes on ``device``: ``free`` now (ComfyUI's get_free_memory: on a CPU the RAM the system
    can still give, psutil's ``available``), ``unloadable``: what unloading the models ComfyUI holds
    there frees (make_room_for_training unloads them all from a GPU before training; on a CPU it
    unloads nothing), and ``total``."""
    device = torch.device(device)
    management = comfy.model_management
    free = int(management.get_free_memory(device))
    unloadable = 0
    if device.type != "cpu":
        for loaded in list(management.current_loaded_models):
            if torch.device(loaded.device) == device:
                unloadable += int(loaded.model_loaded_memory())
    return {"free": free, "unloadable": unloadable, "total": int(management.get_total_memory(device))}


def memory_reserve(device) -> int:
    """What ComfyUI keeps free beyond a load's own estimate (``minimum_inference_memory``)."""
    return int(comfy.model_management.minimum_inference_memory())


def model_weight_bytes(model) -> int:
    """The diffusion model's weights as ComfyUI sizes its load (state dict bytes)."""
    return int(model.model_size())


def model_weights_in_ram(model) -> bool:
    """Whether the model's weights already live in this process's RAM, shared by the training
    clone (a regular patcher on a CPU); a dynamic VRAM patcher's clone reloads them, and a model
    ComfyUI has not loaded yet (ComfyUI 0.33 leaves a GGUF model's weights on the meta device
    until its first sampler call) loads them inside the run."""
    if is_dynamic(model):
        return False
    devices = {p.device.type for p in model.model.diffusion_model.parameters()}
    return devices == {"cpu"}


def decoder_weight_bytes(vae, dtype: torch.dtype) -> int:
    """DifferentiableDecoder's private copy: the first stage without its encoder, in ``dtype``."""
    first_stage = vae.first_stage_model
    encoder = getattr(first_stage, "encoder", None)
    skip = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(p.numel() * size for p in first_stage.parameters() if id(p) not in skip)


def lora_parameter_count(model, rank: int, target: str) -> int:
    """Parameters of the LoRA TrainableModel would add (same layer choice)."""
    targets = lora_target_names(model, target)
    count = 0
    for name, module in model.model.diffusion_model.named_modules():
        if name in targets:
            count += int(rank) * (module.weight.shape[0] + module.weight.shape[1])
    return count


def model_conditioning(model, positive, latent: torch.Tensor) -> dict:
    """The keyword tensors ComfyUI's guider hands ``apply_model`` for this prompt and latent
    (cross-attention context, SDXL's size vector, Flux's guidance, ...), on the CPU."""
    import comfy.sampler_helpers
    conds = comfy.sampler_helpers.convert_cond(detach_copy(positive))
    conds = comfy.samplers.encode_model_conds(model.model.extra_conds, conds, latent, torch.device("cpu"),
                                              "positive", latent_image=latent, seed=0)
    out = {}
    for key, cond in conds[0]["model_conds"].items():
        out[key] = cond.process_cond(batch_size=latent.shape[0], area=None, device=torch.device("cpu")).cond
    return out


class _ProbeForward:
    """A stock layer's forward on a shape-only copy, as the training forward computes it, from
    the training path's own decision for the layer (layer_forwards.training_layer): the weight
    itself, or a copy in the input's dtype where ComfyUI would cast, or nothing of the weight
    where the layer goes through its own cast path; the LoRA on the input side (lora.lora_output,
    through LoRADelta); the input copied where the training forward copies it."""

    def __init__(self, layer, lora=None):
        self.layer, self.lora = layer, lora

    def __call__(self, x):
        layer = self.layer
        module = layer.module
        keeps = layer.keeps(x)
        weight, bias = module.weight, getattr(module, "bias", None)
        if keeps != AS_STORED and weight is not None:
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        if layer.clone_input:
            x = x.clone()
        op = layer.functional()
        if keeps == OWN_CAST:     # _ThroughOwnCast: the output is kept by its users, nothing else
            with torch.no_grad():
                out = op(module, x, weight, bias)
            out = out + x.new_zeros(()).requires_grad_() if torch.is_grad_enabled() else out
        else:
            out = op(module, x, weight, bias)
        return out if self.lora is None else self.lora.on_input(x, base=out)


def prepare_denoiser_probe(base, model, rank: int, alpha: float, target: str):
    """On a shape-only copy ``base`` of ``model.model``: every stock layer computes as
    TrainableModel's training forward does, with the LoRA on the same layers (ComfyUI's cast
    machinery is not run on shapes)."""
    targets = lora_target_names(model, target)
    in_place = model_family(model).in_place
    for name, module in list(base.diffusion_model.named_modules()):
        layer = training_layer(module, in_place)
        lora = None
        if name in targets:
            # the training clone's own LoRA class, on shapes (drawn from a generator of its own:
            # the estimate leaves the global random state alone)
            lora = LoRADelta(module.weight.shape[0], module.weight.shape[1], int(rank), float(alpha or rank),
                             device="meta", generator=torch.Generator())
            module.siso_probe_lora = lora      # a child, so its parameters count as weights, not activations
        if layer.computed:
            module.forward = _ProbeForward(layer, lora)
        elif layer.clone_input:
            module.forward = CloneInput(module.forward)
    return base


def probe_apply_model(base, x: torch.Tensor, sigma: torch.Tensor, conds: dict) -> torch.Tensor:
    """``apply_model`` as the guider calls it, with the training clone's attention."""
    options = {"optimized_attention_override": training_attention}
    return base.apply_model(x, sigma, transformer_options=options, **conds)


def _vae_math_attention(q, k, v):
    # What ComfyUI's slice_attention keeps for backward, at any slice count: the whole softmax.
    b, c, h, w = q.shape
    q = q.reshape(b, c, -1).permute(0, 2, 1)
    k = k.reshape(b, c, -1)
    v = v.reshape(b, c, -1)
    weights = torch.nn.functional.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2).permute(0, 2, 1)
    return torch.bmm(v, weights).reshape(b, c, h, w)


def prepare_decoder_probe(first_stage):
    """On a shape-only copy of the VAE's first stage: its attention blocks (SD's AttnBlock,
    Wan's, ...) use what ComfyUI picked for them: slice attention, which keeps the full attention
    matrix for backward (where PyTorch attention is off for VAEs, e.g. on CPUs), or else PyTorch's
    fused kernel (xformers keeps what it keeps)."""
    from comfy.ldm.modules.diffusionmodules import model as vae_model
    for block in first_stage.modules():
        chosen = vars(block).get("optimized_attention")
        if chosen is None:
            continue
        if chosen in (vae_model.normal_attention, vae_model.slice_attention):
            block.optimized_attention = _vae_math_attention
        elif chosen is getattr(vae_model, "xformers_attention", None):
            block.optimized_attention = vae_model.pytorch_attention
    return first_stage


@contextlib.contextmanager
def probe_environment():
    """While a shape-only pass runs: ComfyUI's free-memory query answers for the meta device
    (code that sizes its chunks by free memory, e.g. sub-quadratic attention, asks it; the answer
    is "plenty", so the pass takes the unchunked path a roomy device takes). Real devices are
    answered as before. Model code that turns autocast off for its tensors' device (0.33's Anima:
    ``torch.autocast(device_type=x.device.type, enabled=False)``) gets the CPU's autocast for the
    meta device, which torch has none of (the pass emulates autocast itself: _ShapeRun)."""
    management = comfy.model_management
    original, autocast = management.get_free_memory, torch.autocast

    def free_memory(dev=None, torch_free_too=False):
        if getattr(dev, "type", None) == "meta":
            plenty = 1 << 50
            return (plenty, plenty) if torch_free_too else plenty
        return original(dev, torch_free_too)

    class MetaAutocast(autocast):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)
    management.get_free_memory = free_memory
    torch.autocast = MetaAutocast
    try:
        yield
    finally:
        management.get_free_memory = original
        torch.autocast = autocast


def probe_decode(first_stage, model, model_latent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """DifferentiableDecoder.__call__ on a shape-only copy."""
    latent = model.model.process_latent_out(model_latent)
    pixels = first_stage.decode(latent.to(dtype))
    if pixels.ndim == 5:        # [B, C, T, H, W] of a video VAE decoding one frame
        pixels = pixels[:, :, 0]
    return (pixels.float() + 1.0) / 2.0


def vae_first_stage(vae):
    """(first stage module, its encoder or None): the decoder copy leaves the encoder out."""
    first_stage = vae.first_stage_model
    return first_stage, getattr(first_stage, "encoder", None)
