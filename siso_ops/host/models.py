"""What SISO asks of a MODEL before any work: its family (the row of families.py), whether it
can be trained or inverted, whether a VAE or a LoRA file fits it, which of its layers get a LoRA,
and the LoRA key layouts (ComfyUI's, diffusers') of its layers."""
from __future__ import annotations

import itertools

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.sd
import comfy.utils

from .. import families, lora
from .layer_forwards import can_carry_lora, training_layer
from ..lora import lora_file_rank, lora_layers


# How a model's noisy latent is written, in k-diffusion's terms: x = D + sigma * eps (EPS, V-prediction,
# and Cosmos' rectified flow, whose x ComfyUI keeps in that space and rescales only at the model's
# input) or x = (1 - sigma) * D + sigma * eps (CONST, the flow-matching models). The sampler
# (siso_ops/sampler.py) knows these two.
SUPPORTED_SAMPLING = (comfy.model_sampling.EPS, comfy.model_sampling.V_PREDICTION, comfy.model_sampling.CONST,
                      comfy.model_sampling.COSMOS_RFLOW)


from ..targets import TARGETS  # noqa: E402,F401  (the method's names; re-exported for the nodes)


def describe_model(model) -> str:
    base = model.model
    sampling = type(model.get_model_object("model_sampling")).__name__
    return f"{type(base).__name__} ({type(base.model_config).__name__}, {sampling})"


# ComfyUI's model configs in modelspec's architecture words (what LoRA files name their base)
ARCHITECTURES = {"SD15": "stable-diffusion-v1", "SD20": "stable-diffusion-v2", "SD21UnclipL": "stable-diffusion-v2",
                 "SDXL": "stable-diffusion-xl-v1-base", "SDXLRefiner": "stable-diffusion-xl-v1-refiner",
                 "Flux": "flux-1-dev", "FluxSchnell": "flux-1-schnell"}


def model_architecture(model) -> str:
    config = type(model.model.model_config).__name__
    return ARCHITECTURES.get(config, config.lower())


def subject_lora_layouts(model) -> dict:
    """What a SISO_LORA records of its model so SISO Save LoRA can write other layouts."""
    try:
        targets = diffusers_lora_targets(model)[1]
    except ValueError:
        targets = None
    return {"architecture": model_architecture(model), "diffusers_targets": targets}


_PLAIN_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _judged_weight(weight):
    """The weight lora_file_rank may read values of: a plain float tensor as it is; a stored form
    whose values are not the layer's (fp8 with its scale kept apart, ComfyUI's quantised tensors,
    ComfyUI-GGUF's packed blocks) as a meta tensor of the layer's shape, so only the shapes and
    the LoRA's own change are judged."""
    if type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype in _PLAIN_FLOATS:
        return weight
    return torch.empty(tuple(weight.shape), device="meta")


def check_lora_fits(model, tensors: dict, name: str):
    """A ComfyUI-layout LoRA file against the MODEL, layer by layer (siso_ops/lora.py); its rank."""
    # the layers' own weights, not state_dict()'s detached copies: ComfyUI-GGUF's copy of a packed
    # weight reports its packed shape, the layer's its logical one
    weights = {key: _judged_weight(value) for key, value in
               itertools.chain(model.model.named_parameters(), model.model.named_buffers())}
    return lora_file_rank(tensors, weights, name, describe_model(model))


def _model_classes(cls) -> list:
    """``cls`` and then its ComfyUI model ancestors, nearest first (BaseModel, the root every
    model class derives from and SD1.x's own class, is not an ancestor here)."""
    root = comfy.model_base.BaseModel
    return [cls] + [c for c in cls.__mro__[1:] if c is not root and isinstance(c, type) and issubclass(c, root)]


def _unlisted_family(model, cls) -> families.Family:
    """The family table's policy for a class no row names (families.unlisted_family)."""
    dimensions = getattr(getattr(model.model, "latent_format", None), "latent_dimensions", 2)
    return families.unlisted_family([c.__name__ for c in _model_classes(cls)], dimensions, describe_model(model))


def model_family(model) -> families.Family:
    """The MODEL's row of the family table, or for a class no row names the family of the
    self-checked path (``checked`` set: see families.py), with the auto values of the variant
    its file shows (families.for_config); raises before any work when SISO cannot
    train it."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(model, "get_model_object"):
        raise TypeError(f"expected a ComfyUI MODEL, got {type(model).__name__}")
    family = families.family_of(type(base).__name__)
    if family is None:
        family = _unlisted_family(model, type(base))
    # the row's variant the loaded file shows (Flux.1 dev or schnell...): its auto values
    family = families.for_config(family, getattr(getattr(base, "model_config", None), "unet_config", None))
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, SUPPORTED_SAMPLING):
        raise ValueError(f"SISO cannot optimise {describe_model(model)}: its sampling "
                         f"({type(sampling).__name__}) is not EPS, V-prediction, flow (CONST) or Cosmos' RFlow.")
    return family


def self_checked_path(model) -> str:
    """"" for a MODEL of a table row; else the report's words for its self-checked path."""
    family = model_family(model)
    if not family.checked:
        return ""
    return f"no table row: self-checked path ({type(model.model).__name__}: {family.checked})"


def check_supported(model):
    """Raise before any work when the MODEL has no differentiable path we know."""
    model_family(model)


def check_vae(vae, model):
    """Raise before any work when the VAE makes latents of another shape than the model's (a VAE
    of another family: e.g. Flux's 16-channel VAE with an SD1.5 model), which would otherwise
    fail after the first denoiser pass with a convolution shape error."""
    check_supported(model)
    if not hasattr(vae, "first_stage_model"):
        raise TypeError(f"expected a ComfyUI VAE, got {type(vae).__name__}")
    # The decoder's first convolution is what the latents really meet (ComfyUI's own
    # latent_channels attribute keeps its default 4 when a VAE is built from a config).
    conv_in = getattr(getattr(vae.first_stage_model, "decoder", None), "conv_in", None)
    candidates = {int(c) for c in (getattr(conv_in, "in_channels", None), getattr(vae, "latent_channels", None))
                  if c is not None}
    # Flux.2's VAE decodes 32 channels after unpatchifying the model's 128: either count may match
    vae_channels = getattr(conv_in, "in_channels", None) or getattr(vae, "latent_channels", None)
    model_channels = latent_channels(model)
    if candidates and model_channels not in candidates:
        raise ValueError(
            f"the VAE makes {vae_channels}-channel latents but {describe_model(model)} works on {model_channels} "
            "channels: the VAE belongs to another model family. Connect the VAE of this checkpoint (its "
            "CheckpointLoader's VAE output) or the VAE file made for this model.")


def compute_device():
    return comfy.model_management.get_torch_device()


def throw_if_interrupted():
    comfy.model_management.throw_exception_if_processing_interrupted()


def is_flow(model) -> bool:
    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def latent_channels(model) -> int:
    return int(model.model.latent_format.latent_channels)


def lora_target_names(model, target: str = None) -> set:
    """The denoiser's layers (names under diffusion_model) that get a LoRA: the family's rule
    (families.py), or every linear layer; only layers the training forward can carry a LoRA on
    (ComfyUI's own ops, and plain torch.nn layers of a third-party pack's network)."""
    diffusion = model.model.diffusion_model
    names = families.lora_layers(diffusion, model_family(model), all_linear=target == TARGETS[1])
    modules = dict(diffusion.named_modules())
    return {name for name in names if can_carry_lora(modules[name])}


def checkpoint_block_classes(model) -> set:
    """Class names of the denoiser's blocks that gradient checkpointing recomputes (the family's:
    UNet ResNet and transformer blocks, a DiT's repeated blocks), for the memory estimate."""
    diffusion = model.model.diffusion_model
    names = families.checkpointed_blocks(diffusion, model_family(model))
    modules = dict(diffusion.named_modules())
    return {type(modules[name]).__name__ for name in names}


def _rows_overlap(a, b) -> bool:
    if a is None or b is None:
        return True
    return a[0] == b[0] and a[1] < b[1] + b[2] and b[1] < a[1] + a[2]


def diffusers_lora_targets(model) -> tuple:
    """(prefix, {ComfyUI layer 'diffusion_model.<module>': [(diffusers module, rows or None)]}):
    where each of the model's layers lives in a diffusers pipeline, from ComfyUI's own key maps
    (the ones its LoRA loader uses to read diffusers files). ``rows`` = (dim, start, length)
    where ComfyUI fuses layers diffusers keeps apart (Flux's q, k, v); ``reorder``: ComfyUI's
    function between the two row orders where they differ (Flux's final modulation)."""
    config = model.model.model_config.unet_config
    layout = model_family(model).diffusers
    transformer_maps = {"flux": "flux_to_diffusers", "mmdit": "mmdit_to_diffusers", "pixart": "pixart_to_diffusers",
                        "auraflow": "auraflow_to_diffusers"}
    if layout in transformer_maps:
        to_diffusers = getattr(comfy.utils, transformer_maps[layout])
        prefix, mapping = "transformer.", to_diffusers(config, output_prefix="diffusion_model.")
    elif layout == "unet":
        prefix = "unet."
        mapping = {k: f"diffusion_model.{v}" for k, v in comfy.utils.unet_to_diffusers(config).items()}
    else:
        raise ValueError(f"no diffusers LoRA layout is known for {describe_model(model)}: save in the comfyui format")
    targets = {}
    for diffusers_key, target in mapping.items():
        target = target if isinstance(target, tuple) else (target, None)
        comfy_key, rows, reorder = target[0], target[1], (target[2] if len(target) > 2 else None)
        if diffusers_key.endswith(".weight") and comfy_key.endswith(".weight"):
            places = targets.setdefault(comfy_key[:-len(".weight")], [])
            # ComfyUI's maps also list other layouts' names of a module after diffusers' own
            # (LyCoris's ff.linear_in for ff.net.0.proj, Flux.2's to_qkv_mlp_proj for the whole
            # of linear1): the first name wins for any rows already covered
            if not any(_rows_overlap(rows, other) for _, other, _ in places):
                places.append((prefix + diffusers_key[:-len(".weight")], rows, reorder))
    return prefix, targets


def stored_quantised(module) -> bool:
    """Whether a layer's weight is stored in a form a merged LoRA would be rounded into: fp8 or
    int8 storage, a scale beside it, ComfyUI's QuantizedTensor or a GGUF tensor."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return True
    return weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) or \
        getattr(module, "scale_weight", None) is not None


class LoRAOnTheFly:
    """A layer's forward plus a LoRA on its input side, ``layer(x) + s * up (down x)``: the
    function SISO trained, in the layer's output units, without merging ``s * up @ down`` into a
    quantised weight (fp8 storage would round most of a small update away). ``previous``: the
    forward it wraps (another LoRA applied this way before), else the layer's own."""

    def __init__(self, module, up: torch.Tensor, down: torch.Tensor, scale: float, previous=None):
        self.module, self.scale, self.previous = module, float(scale), previous
        self.up, self.down = up.detach().float(), down.detach().float()
        self.input_read_only = training_layer(module, in_place=False).input_read_only

    def __call__(self, x, *args, **kwargs):
        # as in training, a layer of a class that may write into its input (0.3.75's fp8_linear
        # clamps it in place) gets a copy: the LoRA must see what the layer was given
        layer_input = x if self.input_read_only else x.clone()
        out = self.previous(layer_input, *args, **kwargs) if self.previous is not None else \
            type(self.module).forward(self.module, layer_input, *args, **kwargs)
        # moved for this call only: a copy kept on the device would stay there after ComfyUI
        # unloads the model (its accounting and unpatching know nothing of it), rank x (in + out)
        # float32 values per layer (about 2.4 GB for Flux's linear layers at rank 128)
        return lora.lora_output(x, self.down.to(x.device), self.up.to(x.device), self.scale, base=out)


def apply_lora(model, lora_tensors: dict, strength: float):
    """A patched clone of the MODEL. Layers stored as plain floats take the stock LoRA path (the
    same as LoraLoaderModelOnly: merged into the weights); layers stored quantised (fp8, scaled,
    ComfyUI's quantised layers, GGUF) get the LoRA on the fly (LoRAOnTheFly), so the stock
    sampler computes what SISO optimised."""
    if strength == 0:
        return model
    modules = dict(model.model.named_modules())
    layers = lora_layers(lora_tensors)
    on_the_fly = {base for base in layers if base in modules and stored_quantised(modules[base])}
    merged = {k: v for k, v in lora_tensors.items() if not any(k.startswith(base + ".") for base in on_the_fly)}
    if merged:      # layers stored as plain floats, or keys of another layout (diffusers') ComfyUI maps
        patched, _ = comfy.sd.load_lora_for_models(model, None, merged, strength, 0)
    else:
        patched = model.clone()
    for base in sorted(on_the_fly):
        up, down, alpha = layers[base]
        key = f"{base}.forward"
        patched.add_object_patch(key, LoRAOnTheFly(modules[base], up, down, alpha / down.shape[0] * strength,
                                                   patched.object_patches.get(key)))
    return patched


def is_dynamic(model) -> bool:
    """ComfyUI's dynamic VRAM patcher (``ModelPatcherDynamic``, the default on NVIDIA GPUs in
    ComfyUI 0.12 and later; absent from 0.3.75) streams weights on demand."""
    return bool(getattr(model, "is_dynamic", lambda: False)())
