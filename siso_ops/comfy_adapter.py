"""The one module that knows ComfyUI's internals (0.3.75 and 0.33; where they differ it checks
for the feature, never the version string: the training flag, dynamic VRAM patchers).

It turns the host's MODEL / VAE / CONDITIONING into what the SISO loop needs: a trainable
LoRA on a *clone* of the model, a denoiser callable over sigma driven through ComfyUI's own
guider (so SDXL's size vectors and Flux's guidance are built by ComfyUI, not by hand), a
sigma schedule, and a differentiable decoder. The host's objects are never mutated: the
LoRA lives in object patches (training forwards) of the clone's layers, the decoder is a
private copy, and the clone is unloaded in a ``finally`` so the shared modules return to their
stock state.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import re

import torch
import torch.utils.checkpoint

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths

from . import families
from .feature_networks import DINO_SOURCE, IR_SOURCE, WeightFileError
from .lora import LoRADelta, export_lora, lora_layers

log = logging.getLogger("siso")

WEIGHTS_FOLDER = "siso"
SAM_FOLDER = "sams"                   # the community's folders for SubjectMask's models
GROUNDING_DINO_FOLDER = "grounding-dino"
SUPPORTED_SAMPLING = (comfy.model_sampling.EPS, comfy.model_sampling.V_PREDICTION, comfy.model_sampling.CONST)
SCHEDULERS = tuple(comfy.samplers.SCHEDULER_NAMES)

TARGETS = ("attention (DiT: + context and MLP)", "all linear layers")


# ----------------------------------------------------------------------------- model folders
def _register_folder(name: str):
    """models/<name>, added after any entries extra_model_paths.yaml already made."""
    default = os.path.join(folder_paths.models_dir, name)
    known = folder_paths.folder_names_and_paths.get(name)
    if known is None or default not in known[0]:
        folder_paths.add_model_folder_path(name, default)
    paths, extensions = folder_paths.folder_names_and_paths[name]
    folder_paths.folder_names_and_paths[name] = (paths, set(extensions) | set(folder_paths.supported_pt_extensions))


def register_model_folders():
    """models/siso (similarity networks), models/sams and models/grounding-dino (SubjectMask)."""
    for name in (WEIGHTS_FOLDER, SAM_FOLDER, GROUNDING_DINO_FOLDER):
        _register_folder(name)


def weight_file_choices() -> list:
    return folder_paths.get_filename_list(WEIGHTS_FOLDER)


EXPECTED_FILES = {
    "dino": ("DINOv2 ViT-L/14", "dinov2_vitl14.safetensors (or dinov2_vitl14_pretrain.pth)", DINO_SOURCE),
    "ir": ("IR ViT-H/14 + fc1", "ir_features.pth (or ir_features.safetensors)", IR_SOURCE),
}


def weight_file_path(kind: str, name: str) -> str:
    what, expected, source = EXPECTED_FILES[kind]
    folders = folder_paths.get_folder_paths(WEIGHTS_FOLDER)
    path = folder_paths.get_full_path(WEIGHTS_FOLDER, name) if name else None
    if path is None:
        raise WeightFileError(
            f"{what} weights '{name}' not found. Put {expected} into one of the '{WEIGHTS_FOLDER}' "
            f"model folders {folders} (or add a '{WEIGHTS_FOLDER}:' entry to extra_model_paths.yaml) "
            f"and refresh. Source: {source}.")
    return path


# ----------------------------------------------------------------------------- model checks
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


def check_lora_fits(model, tensors: dict, name: str):
    """A ComfyUI-layout LoRA file against the MODEL: every layer exists with these shapes."""
    weights = model.model.state_dict()
    layers = lora_layers(tensors)
    if not layers:
        kind = "diffusers / PEFT (lora_A / lora_B)" if any(".lora_A." in k for k in tensors) else "unknown"
        raise ValueError(f"{name} holds no ComfyUI-layout LoRA layers (*.lora_up.weight / *.lora_down.weight); its "
                         f"layout is {kind}. SISO Load LoRA reads files saved by SISO Save LoRA in the comfyui format.")
    wrong = [base for base, (up, down, _) in layers.items()
             if tuple(weights.get(f"{base}.weight", torch.empty(0)).shape[:2]) != (up.shape[0], down.shape[1])]
    if wrong:
        raise ValueError(f"{name} does not fit {describe_model(model)}: {len(wrong)} of its {len(layers)} layers are "
                         f"missing or shaped differently in this model (first: {wrong[0]}). It was made for another "
                         "model: load the checkpoint it was trained on.")
    ranks = sorted({down.shape[0] for _, down, _ in layers.values()})
    if len(ranks) != 1:
        raise ValueError(f"{name} mixes LoRA ranks {ranks}: it is not a SISO LoRA")
    return ranks[0]


def model_family(model) -> families.Family:
    """The MODEL's row of the family table; raises before any work when SISO cannot train it."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(model, "get_model_object"):
        raise TypeError(f"expected a ComfyUI MODEL, got {type(model).__name__}")
    name = type(base).__name__
    family = families.family_of(name)
    supported = "; ".join(f.name for f in families.FAMILIES)
    if family is None:
        if name in families.REFUSED:
            raise ValueError(f"SISO cannot optimise {describe_model(model)}: {families.REFUSED[name]}. "
                             f"Supported: {supported}.")
        dimensions = getattr(getattr(base, "latent_format", None), "latent_dimensions", 2)
        kind = {1: "audio", 3: "video or 3D"}.get(dimensions, "image")
        raise ValueError(f"SISO optimises image models; {describe_model(model)} is "
                         + (f"a {kind} model" if kind != "image" else "an image model it has no tested path for")
                         + f". Supported: {supported}.")
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, SUPPORTED_SAMPLING):
        raise ValueError(f"SISO cannot optimise {describe_model(model)}: its sampling "
                         f"({type(sampling).__name__}) is not EPS, V-prediction or flow (CONST).")
    return family


def check_supported(model):
    """Raise before any work when the MODEL has no differentiable path we know."""
    model_family(model)


def check_editing(model):
    """Raise before any work when subject swap (ReNoise inversion) is not available for the MODEL."""
    family = model_family(model)
    if family.editing:
        raise ValueError(f"subject swap (SISO ReNoise Invert) is not available for {family.name} yet: "
                         f"{family.editing}. Generating with SISO Optimize (no inversion connected) works.")


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


def is_dit(model) -> bool:
    return model_family(model).lora == "blocks"


def compute_device():
    return comfy.model_management.get_torch_device()


def throw_if_interrupted():
    comfy.model_management.throw_exception_if_processing_interrupted()


# ----------------------------------------------------------------------------- conditioning
def _detach_copy(obj):
    """Normal (non-inference) copies of every tensor in a conditioning structure."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _detach_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_detach_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_detach_copy(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------- trainable clone
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


class _TrainingForward:
    """The forward of one of the clone's layers while it trains, installed as an object patch.

    It does what ComfyUI's layer does (its cast path whenever ComfyUI would cast: lowvram
    offload, manual cast, patches applied on the fly), except that the weight is read through
    a zero-copy view autograd can save, instead of a full copy of every weight at every call,
    and a LoRA adds its low-rank product on the input side: ``W x + s * up (down x)``. That is
    the same function as ComfyUI's merged ``(W + s * up @ down) x``, but backward needs no
    full-size weight gradient and the forward pass no merged weight, and in bfloat16 small LoRA
    updates are not rounded away against the weight. ``clone_input``: the layer reads a copy of
    its input (ComfyUI's DiT blocks add into a LayerNorm's input in place after it was saved)."""

    def __init__(self, module, op, lora=None, clone_input: bool = False):
        self.module = module
        self.op = op
        self.lora = lora
        self.clone_input = clone_input

    def __call__(self, x):
        module = self.module
        comfy.ops.run_every_op()     # ComfyUI's Cancel check, as its own layers make it
        if module.weight is None:
            weight = bias = None
        elif module.comfy_cast_weights or module.weight_function or module.bias_function:
            weight, bias = comfy.ops.cast_bias_weight(module, x)
        else:
            weight, bias = module.weight, module.bias
        if self.clone_input:
            x = x.clone()
        out = self.op(module, x, _trainable_view(weight), _trainable_view(bias))
        if self.lora is not None:
            out = out + self.lora.on_input(x)
        return out


class _CloneInput:
    """Calls a layer on a copy of its input (see _TrainingForward's ``clone_input``)."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, x, *args, **kwargs):
        return self.forward(x.clone(), *args, **kwargs)


def checkpoint_block_classes(model) -> set:
    """Class names of the denoiser's blocks that gradient checkpointing recomputes (the family's:
    UNet ResNet and transformer blocks, a DiT's repeated blocks), for the memory estimate."""
    diffusion = model.model.diffusion_model
    names = families.checkpointed_blocks(diffusion, model_family(model))
    modules = dict(diffusion.named_modules())
    return {type(modules[name]).__name__ for name in names}


def _pytorch_attention(func, *args, **kwargs):
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


def _attention_for_training(model_options: dict):
    """ComfyUI picks sub-quadratic (or split) attention where it does not enable PyTorch's
    fused attention, e.g. on CPUs. Those chunk attention with Python loops, which backward
    then walks too; the training clone uses PyTorch's scaled_dot_product_attention instead
    (the same mathematics). A user's own attention override is kept."""
    attention = comfy.ldm.modules.attention
    chunked = (attention.attention_sub_quad, attention.attention_split, attention.attention_basic)
    options = model_options.setdefault("transformer_options", {})
    if attention.optimized_attention in chunked and "optimized_attention_override" not in options:
        options["optimized_attention_override"] = _pytorch_attention


def _unload_loaded(which):
    """Unload (weights unpatched, off the device) every model ComfyUI holds loaded whose patcher
    satisfies ``which``."""
    for loaded in list(comfy.model_management.current_loaded_models):
        if which(loaded.model):
            loaded.model_unload()
            comfy.model_management.current_loaded_models.remove(loaded)


def is_dynamic(model) -> bool:
    """ComfyUI's dynamic VRAM patcher (``ModelPatcherDynamic``, the default on NVIDIA GPUs in
    ComfyUI 0.12 and later; absent from 0.3.75) streams weights on demand."""
    return bool(getattr(model, "is_dynamic", lambda: False)())


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


def lora_target_names(model, target: str = None) -> set:
    """The denoiser's layers (names under diffusion_model) that get a LoRA: the family's rule
    (families.py), or every linear layer; only layers ComfyUI can patch (its own ops)."""
    diffusion = model.model.diffusion_model
    names = families.lora_layers(diffusion, model_family(model), all_linear=target == TARGETS[1])
    modules = dict(diffusion.named_modules())
    return {name for name in names if hasattr(modules[name], "weight_function")}


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
        self.deltas = {}
        self.lora_layers = {}     # weight key -> the layer its delta acts on
        self.forward_patched = []
        device = model.load_device
        diffusion = self.patcher.model.diffusion_model
        family = model_family(model)
        targets = lora_target_names(model, target)
        blocks = families.checkpointed_blocks(diffusion, family) if checkpointing else set()
        generator = torch.Generator().manual_seed(int(seed))
        for name, module in diffusion.named_modules():
            full = f"diffusion_model.{name}"
            dit_norm = family.in_place and isinstance(module, torch.nn.LayerNorm)
            op = _training_op(module)
            key = f"{full}.weight"
            delta = None
            if name in targets:
                delta = LoRADelta(module.weight.shape[0], module.weight.shape[1], self.rank, self.alpha,
                                  device=device, generator=generator)
                self.deltas[key] = delta
                self.lora_layers[key] = module
            if op is not None:
                # An object patch of the clone: applied while it is loaded, undone in unload().
                self._patch_forward(full, module, _TrainingForward(module, op, delta, clone_input=dit_norm))
                continue
            if hasattr(module, "weight_function"):
                # Another pack's layer class: its own forward, with a detached copy of each weight
                # and the LoRA added to the weight (ComfyUI's weight-wrapper mechanism).
                if getattr(module, "weight", None) is not None:
                    self.patcher.add_weight_wrapper(key, _detached)
                    if delta is not None:
                        self.patcher.add_weight_wrapper(key, delta)
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
        _attention_for_training(self.patcher.model_options)
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
        for key, delta in self.deltas.items():
            layer = self.lora_layers[key]
            forward = vars(layer).get("forward")
            if not ((isinstance(forward, _TrainingForward) and forward.lora is delta)
                    or any(f is delta for f in layer.weight_function)):
                raise RuntimeError("ComfyUI loaded the model without SISO's LoRA layers; nothing would be learned. "
                                   "Free the model cache (Manager: 'Free model and node cache') and run again.")

    def unload(self):
        """Detach the clone from the shared modules (weights, wrappers and object patches)."""
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


# ----------------------------------------------------------------------------- sampling
def sigma_schedule(model, scheduler: str, steps: int) -> torch.Tensor:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{scheduler}', choose one of {SCHEDULERS}")
    sampling = model.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(sampling, scheduler, steps).float()


def is_flow(model) -> bool:
    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def latent_channels(model) -> int:
    return int(model.model.latent_format.latent_channels)


def encode_photo(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Stock VAE encode of a BHWC photo (sizes already checked: no silent crop), in inference mode
    as ComfyUI's VAEEncode runs it (a VAE loaded outside it cannot decode inside it on a GPU)."""
    with torch.inference_mode():
        return vae.encode(pixels[..., :3]).detach().float().clone().cpu()


def decode_latent(vae, model, model_latent: torch.Tensor) -> torch.Tensor:
    """Stock VAE decode of a model-space latent, BHWC in [0, 1]."""
    with torch.inference_mode():
        latent = model.model.process_latent_out(model_latent.detach().float().clone())
        return vae.decode(latent).detach().float().clone().cpu()


def latent_scale(vae) -> int:
    """Pixels per latent cell of the VAE: 8 (SD, SDXL, Flux.1, SD3, Qwen-Image...), 16 (Flux.2),
    32 (HunyuanImage 2.1), 1 (pixel-space models)."""
    return int(vae.spacial_compression_encode()) if vae is not None else 8


def check_size(vae, width: int, height: int):
    scale = latent_scale(vae)
    for name, value in (("width", width), ("height", height)):
        if value % scale:
            raise ValueError(f"{name} {value} is not a multiple of {scale}: this model's VAE works on {scale}-pixel "
                             f"blocks; use {value - value % scale} or {value - value % scale + scale}")


def empty_latent(model, width: int, height: int, vae=None) -> torch.Tensor:
    """The zeros a stock EmptyLatentImage-like node gives this model: its latent channels and
    dimensions (one frame for the Wan-latent image models), at the VAE's scale."""
    latent_format = model.model.latent_format
    scale = latent_scale(vae)
    frames = (1,) if getattr(latent_format, "latent_dimensions", 2) == 3 else ()
    latent = torch.zeros((1, 4) + frames + (height // scale, width // scale))
    return comfy.sample.fix_empty_latent_channels(model, latent)


def seed_noise(latent: torch.Tensor, seed: int) -> torch.Tensor:
    # The exact noise a stock KSampler draws for this seed, so iteration 0 matches it.
    return comfy.sample.prepare_noise(latent, seed)


class _LoopSampler(comfy.samplers.Sampler):
    """A ComfyUI sampler whose "sampling" is the caller's whole optimisation loop.

    ComfyUI's guider loads the model, builds the model-specific conditioning and then calls
    ``sample``; we hand the caller a denoiser over (x, sigma), the start latent (noise scaled
    to sigmas[0]) and the clean latent, both in the model's latent space."""

    def __init__(self, body, trainable=None):
        self.body = body
        self.trainable = trainable
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        sampling = model_wrap.inner_model.model_sampling

        def denoise(x, sigma):
            return model_wrap(x, sigma.reshape(1).expand(x.shape[0]).to(x), **extra_args)

        if self.trainable is not None:
            self.trainable.check_loaded()
        start = sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        self.result = self.body(denoise, start, sigmas, latent_image)
        return latent_image


def run_with_denoiser(model, positive, latent: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, seed: int,
                      body):
    """Run ``body(denoise, start_latent, sigmas, clean_latent)`` inside ComfyUI's guider and
    return its result. ``model``: a TrainableModel, or the host MODEL itself for work that
    needs no gradient into the model (inversion), which is then used exactly as KSampler uses it."""
    trainable = model if isinstance(model, TrainableModel) else None
    if trainable is not None:
        trainable.unload_host_copies()
    guider = comfy.samplers.CFGGuider(model if trainable is None else trainable.patcher)
    guider.set_conds(_detach_copy(positive), [])
    guider.set_cfg(1.0)
    sampler = _LoopSampler(body, trainable)
    guider.sample(noise, latent, sampler, sigmas, seed=seed)
    return sampler.result


# ----------------------------------------------------------------------------- decoding
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


class DifferentiableDecoder:
    """A private copy of the VAE decoder: model latents -> unclamped RGB in [0, 1] range, BCHW.

    ``VAE.decode`` clamps (zero gradients), may tile and moves data off the device; the host
    VAE's weights are inference tensors, so we decode with our own copy. The latent format is
    copied too: some keep their statistics as inference tensors (Wan 2.1's, for Qwen-Image)."""

    def __init__(self, vae, model, device, dtype=torch.float32, checkpointing: bool = False):
        first_stage = vae.first_stage_model
        encoder = getattr(first_stage, "encoder", None)
        memo = {id(encoder): None} if encoder is not None else {}
        self.module = copy.deepcopy(first_stage, memo)  # the encoder is not needed to decode
        self.module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if checkpointing:
            # Our private copy, so its blocks may be rewrapped: each ResNet / attention block
            # keeps only its input for backward and recomputes the rest (KL autoencoders; not
            # where decoding keeps state across blocks, see families.py).
            blocks = model_family(model).decoder_blocks
            for block in self.module.modules():
                if type(block).__name__ in blocks:
                    block.forward = _checkpointed(block.forward)
        # Cancel within one block's work: ComfyUI's stock layers check its interrupt flag, other
        # layer classes and the work between layers need not, so every block of the copy checks
        # it before it runs. Blocks are found from the structure, so this holds for every VAE
        # ComfyUI builds (SD's 4-channel, Flux's 16-channel, ...).
        from .feature_networks import check_before_blocks
        self.interrupt_hooks = check_before_blocks(self.module, throw_if_interrupted)
        self.model = model.model
        self.latent_format = copy.copy(model.model.latent_format)
        for name, value in vars(self.latent_format).items():
            if isinstance(value, torch.Tensor):
                setattr(self.latent_format, name, value.detach().clone())
        self.dtype = dtype

    def __call__(self, model_latent: torch.Tensor) -> torch.Tensor:
        latent = self.latent_format.process_out(model_latent)
        pixels = self.module.decode(latent.to(self.dtype))
        if pixels.ndim == 5:        # [B, C, T, H, W] of a video VAE decoding one frame
            pixels = pixels[:, :, 0]
        return (pixels.float() + 1.0) / 2.0

    def release(self):
        for handle in self.interrupt_hooks:
            handle.remove()
        self.interrupt_hooks = []
        self.module = None


# ----------------------------------------------------------------------------- LoRA use
def apply_lora(model, lora_tensors: dict, strength: float):
    """The stock LoRA path (same as LoraLoaderModelOnly): a patched clone of the MODEL."""
    if strength == 0:
        return model
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_tensors, strength, 0)
    return patched


def lora_folder() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def lora_choices() -> list:
    return folder_paths.get_filename_list("loras")


def lora_file(name: str) -> str:
    return _model_file("loras", name, "LoRA file", "a SISO LoRA saved by SISO Save LoRA")


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
    if layout == "flux":
        prefix, mapping = "transformer.", comfy.utils.flux_to_diffusers(config, output_prefix="diffusion_model.")
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


@contextlib.contextmanager
def training_mode():
    """Gradients inside a node: ComfyUI runs nodes under inference_mode.

    Newer ComfyUIs (0.2x on) also have a process-wide ``model_management.in_training`` flag,
    which their own LoRA trainer sets for its loop: with it, model code takes its
    differentiable paths (e.g. Flux's RoPE in plain torch instead of comfy-kitchen's
    ``apply_rope``, which has no autograd formula). It is set for this block only and put back
    as it was, so sampling outside SISO's loop runs exactly as before. ComfyUI 0.3.75 has no
    such flag (its paths are all differentiable) and is left alone."""
    management = comfy.model_management
    has_flag = hasattr(management, "in_training")
    saved = management.in_training if has_flag else None
    with torch.inference_mode(False), torch.enable_grad():
        if has_flag:
            management.in_training = True
        try:
            yield
        finally:
            if has_flag:
                management.in_training = saved


# ----------------------------------------------------------------------------- SubjectMask models
# Community folders: SAM checkpoints in models/sams, Grounding DINO checkpoint + .cfg.py (and
# the local BERT folder) in models/grounding-dino. Loaded models are cached on the CPU and
# moved to ComfyUI's device only while predicting; see keep_segmentation_models_while for
# how "Free model and node cache" releases them.
from . import segmentation  # noqa: E402  (light: its heavy imports happen on first use)

def sam_model_choices() -> list:
    return folder_paths.get_filename_list(SAM_FOLDER)


def grounding_dino_choices() -> list:
    # The BERT folder's weights sit inside a grounding-dino folder; they are no detector.
    return [name for name in folder_paths.get_filename_list(GROUNDING_DINO_FOLDER)
            if segmentation.BERT_FOLDER not in name.replace("\\", "/").split("/")[:-1]]


def _model_file(folder: str, name: str, what: str, expected: str) -> str:
    path = folder_paths.get_full_path(folder, name) if name else None
    if path is None:
        raise WeightFileError(
            f"{what} '{name}' not found. Put {expected} into one of the '{folder}' model folders "
            f"{folder_paths.get_folder_paths(folder)} (or add a '{folder}:' entry to extra_model_paths.yaml) "
            "and refresh.")
    return path


def sam_model_path(name: str) -> str:
    return _model_file(SAM_FOLDER, name, "SAM checkpoint", segmentation.SAM_SOURCE)


def grounding_dino_path(name: str) -> str:
    return _model_file(GROUNDING_DINO_FOLDER, name, "Grounding DINO checkpoint", segmentation.GROUNDING_DINO_SOURCE)


def bert_folder_for(checkpoint_path: str) -> str:
    """The 'bert-base-uncased' folder beside the checkpoint, else in any grounding-dino folder,
    else models/bert-base-uncased (where other segmentation packs keep it)."""
    places = [os.path.dirname(checkpoint_path)] + folder_paths.get_folder_paths(GROUNDING_DINO_FOLDER) + [folder_paths.models_dir]
    candidates = list(dict.fromkeys(os.path.join(place, segmentation.BERT_FOLDER) for place in places))
    for folder in candidates:
        if os.path.isdir(folder):
            segmentation.check_bert_folder(folder)
            return folder
    raise WeightFileError(segmentation.missing_bert_message(candidates))


def segmentation_runtime() -> "segmentation.Runtime":
    device = comfy.model_management.get_torch_device()
    return segmentation.Runtime(
        device=device,
        # Ask ComfyUI to offload other models first, as its own loaders do.
        make_room=lambda nbytes: comfy.model_management.free_memory(
            nbytes + comfy.model_management.minimum_inference_memory(), device),
        check_interrupt=throw_if_interrupted)


def subject_masks(images, settings, sam_model: str, grounding_dino_model: str, on_step=None):
    """Resolve the files, load (or reuse) the models, make one mask per image."""
    settings.check()
    dino_path = grounding_dino_path(grounding_dino_model)
    bert_folder = bert_folder_for(dino_path)
    sam_path = sam_model_path(sam_model)
    detector, sam = segmentation.cached_models(dino_path, bert_folder, sam_path)
    return segmentation.subject_masks(images, settings, detector, sam, segmentation_runtime(), on_step)


def keep_segmentation_models_while(node):
    """The cached models live as long as a SubjectMask node object lives in ComfyUI's node cache.

    ComfyUI 0.3.75's executor creates one object per node id of the running workflow and keeps
    it in its node-object cache (``PromptExecutor.caches.objects``). POST /free with
    ``free_memory`` (the "Free model and node cache" button) replaces those caches
    (``PromptExecutor.reset()``, after ``unload_all_models()``); a node that leaves the workflow
    is dropped from them too. When the last SubjectMask object is collected, the cache lets go
    of the models and their memory is freed; the next run loads them again."""
    segmentation.MODELS.hold(node)


# ============================================================================= memory estimate
# What siso_ops/memory.py needs from ComfyUI (appended section): the device's free memory as
# ComfyUI counts it, the weights a run keeps resident, and the forward passes of the model and of
# the decoder on shape-only ("meta") copies, driven the way the training loop drives them.



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
    clone (a regular patcher on a CPU); a dynamic VRAM patcher's clone reloads them."""
    if is_dynamic(model):
        return False
    first = next(model.model.diffusion_model.parameters(), None)
    return first is not None and first.device.type == "cpu"


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
    conds = comfy.sampler_helpers.convert_cond(_detach_copy(positive))
    conds = comfy.samplers.encode_model_conds(model.model.extra_conds, conds, latent, torch.device("cpu"),
                                              "positive", latent_image=latent, seed=0)
    out = {}
    for key, cond in conds[0]["model_conds"].items():
        out[key] = cond.process_cond(batch_size=latent.shape[0], area=None, device=torch.device("cpu")).cond
    return out


class _ProbeLoRA(torch.nn.Module):
    """LoRADelta.on_input on shapes: the same operations, so autograd keeps the same tensors
    (a LoRA layer keeps its input for the LoRA's gradient, which a frozen layer does not)."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float):
        super().__init__()
        self.down = torch.nn.Parameter(torch.empty(rank, in_features, device="meta"))
        self.up = torch.nn.Parameter(torch.empty(out_features, rank, device="meta"))
        self.scale = scale

    def on_input(self, x):
        out = torch.nn.functional.linear(torch.nn.functional.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))
        return out if self.scale == 1.0 else out * self.scale


class _ProbeForward:
    """A stock layer's forward on a shape-only copy, as _TrainingForward computes it: the weight
    itself, or a copy in the input's dtype where ComfyUI would cast (manual cast), the LoRA on
    the input side, the input copied where the training forward copies it."""

    def __init__(self, module, op, cast: bool, lora=None, clone_input: bool = False):
        self.module, self.op, self.cast, self.lora, self.clone_input = module, op, cast, lora, clone_input

    def __call__(self, x):
        weight, bias = self.module.weight, getattr(self.module, "bias", None)
        if self.cast and weight is not None:
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        if self.clone_input:
            x = x.clone()
        out = self.op(self.module, x, weight, bias)
        return out if self.lora is None else out + self.lora.on_input(x)


def prepare_denoiser_probe(base, model, rank: int, alpha: float, target: str):
    """On a shape-only copy ``base`` of ``model.model``: every stock layer computes as
    TrainableModel's training forward does, with the LoRA on the same layers (ComfyUI's cast
    machinery is not run on shapes)."""
    targets = lora_target_names(model, target)
    in_place = model_family(model).in_place
    for name, module in list(base.diffusion_model.named_modules()):
        dit_norm = in_place and isinstance(module, torch.nn.LayerNorm)
        lora = None
        if name in targets:
            lora = _ProbeLoRA(module.weight.shape[0], module.weight.shape[1], int(rank), float(alpha or rank) / int(rank))
            module.siso_probe_lora = lora      # a child, so its parameters count as weights, not activations
        op = _training_op(module)
        if op is not None:
            cast = bool(getattr(module, "comfy_cast_weights", False))
            module.forward = _ProbeForward(module, op, cast, lora, clone_input=dit_norm)
        elif dit_norm:
            module.forward = _CloneInput(module.forward)
    return base


def probe_apply_model(base, x: torch.Tensor, sigma: torch.Tensor, conds: dict) -> torch.Tensor:
    """``apply_model`` as the guider calls it, with the training clone's attention."""
    options = {"optimized_attention_override": _pytorch_attention}
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
    answered as before."""
    management = comfy.model_management
    original = management.get_free_memory

    def free_memory(dev=None, torch_free_too=False):
        if getattr(dev, "type", None) == "meta":
            plenty = 1 << 50
            return (plenty, plenty) if torch_free_too else plenty
        return original(dev, torch_free_too)
    management.get_free_memory = free_memory
    try:
        yield
    finally:
        management.get_free_memory = original


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
