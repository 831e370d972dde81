"""The ONE table of what is specific to each image model family SISO trains on, and the rules
that find a family's LoRA layers and repeated blocks from the module structure (torch only; the
ComfyUI side, siso_ops/host, reads the table).

Everything not in this table is the same for every family: the LoRA acts through ComfyUI's own
layers (any model built from ``comfy.ops``), sampling goes through ComfyUI's sampler with the
model's own conditioning and sigma schedule, and decoding through a private copy of the VAE's
first stage. What differs, per family:

- ``lora``: which Linear layers get a LoRA by default. ``"attention"``: the q/k/v/out Linear
  layers of the attention modules (UNets, as in the paper's SDXL-Turbo runs). ``"blocks"``: every
  Linear layer inside the repeated transformer blocks except the modulation (adaLN) layers, i.e.
  attention, context projections and MLPs (the paper's FLUX runs train these). ``"named"``: the
  Linear layers of each repeated block named in ``lora_names`` (where the model's authors name the
  layers their own LoRA scripts train, and the structure gives no rule: Sana's linear self-attention
  class is called LiteLA).
- ``blocks``: the repeated blocks gradient checkpointing wraps. ``None``: the children of the
  denoiser's ModuleLists (every DiT); a tuple: these class names (the UNet's ResNet and
  transformer blocks, which are not list children one by one).
- ``in_place``: the blocks add into their inputs in place after a LayerNorm saved them (the
  Flux-style double/single-stream blocks): norms read copies and checkpointed blocks get copies.
- ``decoder_blocks``: VAE decoder blocks that may be recomputed in backward (KL autoencoders);
  ``()`` where decoding carries state between blocks (the Wan 2.1 causal VAE's feature cache),
  which a recomputation would advance twice.
- ``optimise`` / ``stage2``: the settings the pack recommends, and where each comes from.
- ``steps`` / ``grad_steps`` / ``size`` / ``learning_rate``: the same advice as numbers, what
  SISO Optimize's ``auto`` inputs (0) take: ``optimise``'s first variant (the distilled one where
  a row names several), the optimisation size (the paper's 512 px for its models; 768 px for
  the 1-megapixel families, which keeps memory down while the model still draws its own
  resolution's composition) and the paper's generation learning rate. Editing takes its size
  and steps from the inversion and the paper's editing rate (``EDIT_LEARNING_RATE``).
- ``variants``: where one row covers a step-distilled and an undistilled model that the loaded
  file tells apart, the advice for each and what shows it: a value of the model config ComfyUI
  detects from the file's keys (``unet_config``; Flux.1 dev and Flux.2 dev carry a guidance
  embedding, schnell and klein do not; SD3's Medium and Large differ in depth). The run takes the
  variant the file shows (``for_config``), else the row's own numbers. Variants a file cannot show (Z-Image-Turbo or
  Z-Image base, klein or klein base) keep the distilled advice: set steps by hand for those.
- ``checked``: "" for a row of the table (a tiny model pins its path). Otherwise why SISO takes
  the self-checked path for a class no row names (a subclass of a row's class, or a class with
  no row at all): before the loop, on the run's own inputs, the path is checked (self_check.py)
  and the run is refused when it is wrong.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

KL_DECODER_BLOCKS = ("ResnetBlock", "AttnBlock")
UNET_BLOCKS = ("ResBlock", "BasicTransformerBlock")


@dataclass(frozen=True)
class Variant:
    """One model of a row, told apart by its file: ComfyUI's detected model config (``unet_config``)
    holds ``key`` = ``value``. Its advice as SISO Optimize's auto values."""
    name: str                 # in the user's words, with what shows it
    key: str
    value: object
    steps: int
    grad_steps: int
    absent: object = None     # what a config without ``key`` means (ComfyUI leaves out a key whose value is
                              # the network's default); None: nothing


@dataclass(frozen=True)
class Family:
    name: str                 # in the user's words
    model_classes: tuple      # ComfyUI model_base class names
    lora: str = "blocks"      # "attention", "blocks" or "named"
    lora_names: tuple = ()    # lora "named": the layers' names inside each repeated block
    blocks: tuple | None = None
    in_place: bool = False
    decoder_blocks: tuple = KL_DECODER_BLOCKS
    diffusers: str = ""       # the diffusers LoRA layout ComfyUI's key maps know: "unet", "flux", "mmdit", "pixart",
                              # "auraflow", or none
    optimise: str = ""        # steps / grad_steps while optimising
    stage2: str = ""          # stage-2 sampling
    source: str = ""          # where the settings come from
    checked: str = ""         # "" = a table row; else why the path is self-checked (see the module's docstring)
    steps: int = 1            # SISO Optimize's auto values: denoising steps per iteration,
    grad_steps: int = 1       # the last steps gradients flow through,
    size: int = 512           # width and height of the optimised image (px),
    learning_rate: float = 2e-4   # AdamW's rate when generating (the paper's generation rate)
    variants: tuple = ()      # Variant: the models of the row a loaded file tells apart
    variant: str = ""         # the Variant the loaded file showed (for_config), "" for the row's own numbers


PAPER_LEARNING_RATE = 2e-4    # the paper's (generation README's) rate
EDIT_LEARNING_RATE = 3e-4     # the paper's editing rate: auto when SISO Optimize edits an inversion
# A class with no row and no row's ancestor (the structural rules): the non-distilled rows'
# advice (Chroma, AuraFlow, Cosmos), at the 1-megapixel families' optimisation size.
GENERIC_SETTINGS = dict(steps=8, grad_steps=2, size=768, learning_rate=PAPER_LEARNING_RATE)


FAMILIES = (
    Family("SD1.x / SD2.x (SD-Turbo)", ("BaseModel",), lora="attention", blocks=UNET_BLOCKS, diffusers="unet",
           optimise="1 step, grad_steps 1 (turbo); 20-step models: 4 steps, grad_steps 3",
           stage2="4 steps, cfg 1.0 (turbo)", source="the paper (SD-Turbo-like SDXL-Turbo runs)",
           steps=1, grad_steps=1, size=512),
    Family("SDXL (SDXL-Turbo)", ("SDXL",), lora="attention", blocks=UNET_BLOCKS, diffusers="unet",
           optimise="1 step, grad_steps 1", stage2="4 steps, cfg 1.0", source="the paper",
           steps=1, grad_steps=1, size=512),
    Family("Flux.1 (schnell, dev)", ("Flux",), in_place=True, diffusers="flux",
           optimise="schnell: 1 step, grad_steps 1; dev: 8 steps, grad_steps 2",
           stage2="schnell: 4 steps, cfg 1.0; dev: 20+ steps, FluxGuidance 3.5",
           source="the paper (FLUX-schnell); dev: the model authors' sampling advice, SISO steps not measured",
           steps=1, grad_steps=1, size=512,
           variants=(Variant("schnell (the file has no guidance embedding)", "guidance_embed", False, 1, 1),
                     Variant("dev (the file has a guidance embedding)", "guidance_embed", True, 8, 2))),
    Family("Flux.2 (dev, klein)", ("Flux2",), in_place=True,
           optimise="klein (distilled): 4 steps, grad_steps 1; dev: 8 steps, grad_steps 2",
           stage2="klein: 4 steps, cfg 1.0; dev: 20+ steps",
           source="the model authors' sampling advice; SISO steps not measured",
           steps=4, grad_steps=1, size=768,
           variants=(Variant("klein (the file has no guidance embedding; klein base: set steps by hand)",
                             "guidance_embed", False, 4, 1),
                     Variant("dev (the file has a guidance embedding)", "guidance_embed", True, 8, 2))),
    Family("Chroma", ("Chroma",), in_place=True, optimise="8 steps, grad_steps 2", stage2="26+ steps, cfg 4",
           source="the model authors' sampling advice; SISO steps not measured",
           steps=8, grad_steps=2, size=768),
    Family("Chroma Radiance (pixel space)", ("ChromaRadiance",), in_place=True, decoder_blocks=(),
           optimise="8 steps, grad_steps 2", stage2="26+ steps, cfg 4",
           source="the model authors' sampling advice; SISO steps not measured",
           steps=8, grad_steps=2, size=768),
    Family("SD3 / SD3.5 (MMDiT)", ("SD3",), diffusers="mmdit",
           optimise="3.5 Large Turbo: 4 steps, grad_steps 1; Medium: 8 steps, grad_steps 2",
           stage2="Large Turbo: 4 steps, cfg 1.0; others: 28 steps, cfg 4.5",
           source="the model authors' sampling advice; SISO steps not measured",
           steps=4, grad_steps=1, size=768,
           # ComfyUI's detection reads depth as the MMDiT's width / 64: 24 (SD3 Medium, SD3.5 Medium,
           # neither distilled), 38 (SD3.5 Large and its distilled Large Turbo: the same layers)
           variants=(Variant("Large (38 blocks: Large Turbo's advice; 3.5 Large: set steps by hand)", "depth", 38, 4, 1),
                     Variant("Medium (24 blocks: SD3 Medium or SD3.5 Medium, not distilled)", "depth", 24, 8, 2))),
    Family("Z-Image / Lumina 2 (NextDiT)", ("Lumina2",),
           optimise="Z-Image-Turbo: 8 steps, grad_steps 1; Lumina 2: 8 steps, grad_steps 2",
           stage2="Z-Image-Turbo: 8 steps, cfg 1.0; Lumina 2: 30 steps, cfg 4",
           source="the model authors' sampling advice; SISO steps not measured",
           steps=8, grad_steps=1, size=768,
           variants=(Variant("Z-Image (the file has Z-Image's modulation; Z-Image base: set steps by hand)",
                             "z_image_modulation", True, 8, 1, absent=False),
                     Variant("Lumina 2 (the file has no Z-Image modulation)", "z_image_modulation", False, 8, 2,
                             absent=False))),
    Family("Qwen-Image", ("QwenImage",), decoder_blocks=(),
           optimise="4 steps with a Lightning LoRA, grad_steps 1",
           stage2="Lightning: 4-8 steps, cfg 1.0; base: 50 steps, cfg 4",
           source="the model authors' sampling advice; SISO steps not measured",
           steps=4, grad_steps=1, size=768),
    Family("HiDream", ("HiDream",), optimise="Fast: 16 steps, grad_steps 2", stage2="Fast: 16 steps, cfg 1.0; Full: 50 steps, cfg 5",
           source="the model authors' sampling advice; SISO steps not measured",
           steps=16, grad_steps=2, size=768),
    Family("AuraFlow", ("AuraFlow",), diffusers="auraflow", optimise="8 steps, grad_steps 2", stage2="25+ steps, cfg 3.5",
           source="the model authors' sampling advice; SISO steps not measured",
           steps=8, grad_steps=2, size=768),
    Family("HunyuanImage 2.1", ("HunyuanImage21",), in_place=True, decoder_blocks=(),
           optimise="distilled: 8 steps, grad_steps 1; base: 8 steps, grad_steps 2",
           stage2="distilled: 8 steps, cfg 1.0; base: 50 steps, cfg 3.5",
           source="the model authors' sampling advice; SISO steps not measured",
           steps=8, grad_steps=1, size=768,
           variants=(Variant("distilled (the file has a guidance embedding)", "guidance_embed", True, 8, 1),
                     Variant("base (the file has no guidance embedding)", "guidance_embed", False, 8, 2))),
    Family("Cosmos Predict2 (text to image)", ("CosmosPredict2",), decoder_blocks=(),
           optimise="8 steps, grad_steps 2", stage2="35 steps, cfg 7",
           source="the model authors' sampling advice; SISO steps not measured",
           steps=8, grad_steps=2, size=768),
    Family("PixArt (Alpha, Sigma)", ("PixArt",), diffusers="pixart", optimise="LCM / DMD variants: 1-4 steps, grad_steps 1",
           stage2="20 steps, cfg 4.5", source="the model authors' sampling advice; SISO steps not measured",
           steps=4, grad_steps=1, size=512),
    # Loaded by the ComfyUI_ExtraModels pack (SanaCheckpointLoader; ComfyUI has no Sana class): a
    # BaseModel subclass of that pack whose network is plain torch.nn layers. The LoRA layers are the
    # ones the Sana authors' own LoRA script trains (to_q/to_k/to_v in diffusers' names: the fused
    # self-attention qkv, and the cross-attention's q and kv projections).
    Family("Sana (ComfyUI_ExtraModels)", ("EXM_Sana_Model",), lora="named",
           lora_names=("attn.qkv", "cross_attn.q_linear", "cross_attn.kv_linear"),
           decoder_blocks=("ResBlock", "EfficientViTBlock"),    # DC-AE's decoder blocks (the pack's and diffusers' names)
           optimise="20 steps, grad_steps 3", stage2="20 steps, cfg 4.5",
           source="the paper (Sana: 20 steps, backpropagating through the last 3)",
           steps=20, grad_steps=3, size=512),   # 512 px: the paper's size for its other backbones; a multiple of DC-AE's 32
)

# Image model classes ComfyUI loads that SISO refuses, and why. Matched by class name, and for a
# subclass by its nearest refused ancestor (host/models.py).
_NEEDS_AN_IMAGE = "it generates from an input image it needs at every step"
REFUSED = {
    "StableCascade_C": "a two-model cascade (stage C then B); SISO trains one denoiser whose output a VAE decodes",
    "StableCascade_B": "a two-model cascade (stage C then B); SISO trains one denoiser whose output a VAE decodes",
    "SDXLRefiner": "a refiner stage: it denoises the last steps of another model's image, it does not generate one",
    "HunyuanImage21Refiner": "a refiner stage: it denoises the last steps of HunyuanImage 2.1's image, it does not "
                             "generate one",
    "SD21UNCLIP": f"an image-variation model: {_NEEDS_AN_IMAGE} (a CLIP image embedding)",
    "SD15_instructpix2pix": f"an instruction-editing model: {_NEEDS_AN_IMAGE} (concatenated to the latent)",
    "SDXL_instructpix2pix": f"an instruction-editing model: {_NEEDS_AN_IMAGE} (concatenated to the latent)",
    "Stable_Zero123": f"a novel-view model: {_NEEDS_AN_IMAGE} (the object seen from another angle)",
    "SD_X4Upscaler": f"an upscaler: {_NEEDS_AN_IMAGE} (the low-resolution image)",
    "Lotus": "a depth / normal estimator built on a diffusion UNet: it predicts maps of an input image",
    "RT_DETR_v4": "an object detector ComfyUI loads as a model, not an image generator",
    "DepthAnything3": "a depth estimator ComfyUI loads as a model, not an image generator",
    "SAM3": "a segmentation model ComfyUI loads as a model, not an image generator",
    "PiD": f"a pixel decoder of another model's latent: {_NEEDS_AN_IMAGE} (PiD Conditioning's low-quality latent)",
}

# Model classes of ComfyUI that make video, audio or 3D: refused at run time by their latent's
# shape (latent_dimensions other than 2), with the class named. Listed here so the test that
# notices new ComfyUI classes (tests/test_model_classes.py) can tell them from new image classes.
NOT_IMAGE = {
    "video": ("SVD_img2vid", "SV3D_u", "SV3D_p", "GenmoMochi", "LTXV", "LTXAV", "HunyuanVideo", "HunyuanVideoI2V",
              "HunyuanVideoSkyreelsI2V", "HunyuanVideo15", "HunyuanVideo15_SR_Distilled", "CosmosVideo", "WAN21",
              "WAN21_Vace", "WAN21_Camera", "WAN21_HuMo", "WAN22_Animate", "WAN22_S2V", "WAN22", "WAN21_CausalAR",
              "WAN_Animate2", "WAN21_FlowRVS", "WAN21_SCAIL", "WAN21_SCAIL2", "WAN22_WanDancer", "Kandinsky5",
              "CogVideoX", "SeedVR2"),
    "audio": ("StableAudio1", "StableAudio3", "ACEStep", "ACEStep15", "MiniMaxMusic3"),
    "3D": ("Hunyuan3Dv2", "Hunyuan3Dv2_1", "Trellis2", "TripoSplat", "MiniMaxH3"),
}

# Image model classes no row names, which SISO trains through the self-checked path (families
# of their own: inherited_family, structural_family), and what the tests show of each. A class
# not listed here takes the same path; this list is what docs/models.md says and what the
# new-class test accepts.
SELF_CHECKED = {
    "LongCatImage": "subclass of Flux: Flux.1's row; a tiny model trains (tests/test_self_checked.py)",
    "ZImagePixelSpace": "subclass of Lumina2: Z-Image's row; a tiny model trains (tests/test_self_checked.py)",
    "MageFlow": "subclass of QwenImage: Qwen-Image's row; a tiny model trains (tests/test_self_checked.py)",
    "Boogu": "subclass of Omnigen2: no row (structural rules); a tiny model trains (tests/test_self_checked.py); its "
             "reference-image refiner runs only with reference images: without them its LoRA layers stay zero",
    "Kandinsky5Image": "no row (structural rules); a tiny model trains (tests/test_self_checked.py)",
    "HunyuanDiT": "no row (structural rules); a tiny model trains (tests/test_self_checked.py)",
    "Omnigen2": "no row (structural rules); a tiny model trains (tests/test_self_checked.py); its reference-image "
                "refiner runs only with reference images: without them its LoRA layers stay zero",
    "Lens": "no row (structural rules); a tiny model trains (tests/test_self_checked.py)",
    "Anima": "no row (structural rules; a one-frame Wan 2.1 latent); a tiny model trains (tests/test_self_checked.py)",
    "PixelDiTT2I": "no row (structural rules); the check REFUSES it on ComfyUI 0.33: its pixel blocks modulate a "
                   "norm's output in place (apply_adaln_), which backward needs (tests/test_self_checked.py)",
    "HiDreamO1": "no row (structural rules); the check REFUSES it on ComfyUI 0.33: its Llama blocks add with out= "
                 "(torch.add(..., out=)), which autograd cannot differentiate, and it caches the text prefix's keys "
                 "and values between calls (found on a tiny model; no kept test)",
    "JoyImage": "no row (structural rules; a one-frame Wan 2.1 latent); a tiny model trains (tests/test_self_checked.py; "
                "comfy_kitchen's fused RMSNorm + RoPE is swapped for its plain-torch version while SISO trains)",
    "Ideogram4": "no row (structural rules); a tiny model trains (tests/test_self_checked.py)",
    "Krea2": "no row (structural rules; a one-frame Wan 2.1 latent); a tiny model trains (tests/test_self_checked.py)",
    "ErnieImage": "no row (structural rules); a tiny model trains (tests/test_self_checked.py)",
}

# The nearest ComfyUI ancestor with a table row of each SELF_CHECKED class that is a subclass of
# one: the class takes that row's blocks and decoder (inherited_family), which docs/models.md says
# (tests/test_self_checked.py holds each to the family the host finds for a tiny model).
SELF_CHECKED_ROWS = {"LongCatImage": "Flux", "ZImagePixelSpace": "Lumina2", "MageFlow": "QwenImage"}

UNKNOWN_SETTINGS = "not known for this class: start from the model authors' sampling advice"


def family_of(model_class_name: str) -> Family | None:
    for family in FAMILIES:
        if model_class_name in family.model_classes:
            return family
    return None


def for_config(family: Family, config) -> Family:
    """``family`` with the auto values of the variant the loaded file shows: the first of
    ``family.variants`` whose key has its value in ``config`` (ComfyUI's detected model config,
    ``unet_config``). A config that names none (a key missing: a class of another pack, an older
    ComfyUI) keeps the row's own numbers."""
    if not isinstance(config, dict):
        return family
    for variant in family.variants:
        shown = config[variant.key] if variant.key in config else variant.absent
        if shown is not None and shown == variant.value:
            return replace(family, steps=variant.steps, grad_steps=variant.grad_steps, variant=variant.name)
    return family


def inherited_family(row: Family, class_name: str, parent: str) -> Family:
    """The row of ``parent`` for its subclass ``class_name``: the same layers, blocks and decoder
    rules, self-checked before the loop. The diffusers layout is not claimed (ComfyUI's key maps
    were written for the parent's layers; nothing has shown the subclass keeps them)."""
    return replace(row, name=f"{row.name}: {class_name}", model_classes=(class_name,), diffusers="",
                   checked=f"a subclass of {parent}, on {row.name}'s row")


def structural_family(class_name: str) -> Family:
    """The structural rules for an image model class no row names: a LoRA on the linear layers of
    the repeated blocks (not the modulation layers), checkpointing of those blocks. The safe
    choice where the table would say more: norms and checkpointed blocks read copies of their
    inputs (blocks that add into their inputs in place then still train; a copy changes no
    value), and the decoder is never recomputed (a decoder that carries state between blocks
    would advance it twice). SISO Optimize's auto values: ``GENERIC_SETTINGS``."""
    return Family(f"{class_name} (no table row)", (class_name,), lora="blocks", blocks=None, in_place=True,
                  decoder_blocks=(), optimise=UNKNOWN_SETTINGS, stage2=UNKNOWN_SETTINGS, source="",
                  checked="no table row, structural rules", **GENERIC_SETTINGS)


def unlisted_family(ancestors: list, latent_dimensions: int, described: str) -> Family:
    """The family of a model class no row names, decided from its class name and its ComfyUI
    model ancestors' names (``ancestors``: the class first, then its parents nearest first), or a
    ValueError naming the class (``described``: the model in the user's words): a refused class
    or a subclass of one; video, audio and 3D classes (listed, or by their latent's shape); a
    subclass of a row's class takes that row, self-checked; any other image class takes the
    structural rules, self-checked."""
    name = ancestors[0]
    supported = "; ".join(f.name for f in FAMILIES)
    # a class the self-checked list names is an image model whatever its ancestors are (Kandinsky
    # 5 Image derives from the video Kandinsky 5) or its latent's shape (a one-frame Wan latent)
    listed = name in SELF_CHECKED
    for depth, own in enumerate(ancestors):
        derived = f" (a subclass of {own})" if depth else ""
        if depth:
            row = family_of(own)
            if row is not None:
                return inherited_family(row, name, own)
            if listed:
                continue
        if own in REFUSED:
            raise ValueError(f"SISO cannot optimise {described}{derived}: {REFUSED[own]}. Supported: {supported}.")
        kind = next((k for k, names in NOT_IMAGE.items() if own in names), None)
        if kind is not None:
            raise ValueError(f"SISO optimises image models; {described}{derived} is a {kind} model. "
                             f"Supported: {supported}.")
    if latent_dimensions != 2 and not listed:
        kind = {1: "an audio", 3: "a video or 3D"}.get(latent_dimensions, f"a {latent_dimensions}-D")
        raise ValueError(f"SISO optimises image models; {described} is {kind} model (its latent is not "
                         f"an image's). Supported: {supported}.")
    return structural_family(name)


# A modulation (adaLN) layer: it turns the timestep / pooled text into per-block scales and
# shifts; the paper's FLUX LoRA leaves these alone (attention, context and MLP layers learn).
_MODULATION = re.compile(r"(^|\.)(mod[A-Z0-9]*|\w+_mod|\w*modulation\w*|\w*ada_?ln\w*)(\.|$)", re.IGNORECASE)
_ATTENTION = re.compile(r"attention|attn", re.IGNORECASE)


def is_linear_map(module: torch.nn.Module) -> bool:
    """Whether ``module`` acts as a linear map ``x W^T + b`` with a ``[out, in]`` weight: a
    ``torch.nn.Linear``, or a layer of ComfyUI's quantised ops (MixedPrecisionOps.Linear subclasses
    ``torch.nn.Module``) or of another pack (ComfyUI-GGUF) that says so by its ``in_features`` /
    ``out_features``. Its weight may be stored quantised; ``.shape`` is the logical shape."""
    if isinstance(module, torch.nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
            and isinstance(weight, torch.Tensor) and tuple(weight.shape) == (module.out_features, module.in_features))


def repeated_blocks(root: torch.nn.Module) -> list:
    """(qualified name, module) of every child of the ModuleLists under ``root``: a DiT's
    transformer blocks, whatever the family calls them."""
    out = []
    for name, module in root.named_modules():
        if isinstance(module, torch.nn.ModuleList):
            for index, child in enumerate(module):
                if any(is_linear_map(m) for m in child.modules()):
                    out.append((f"{name}.{index}", child))
    # a ModuleList nested in a block (e.g. an MLP's layers) is part of that block, not a block
    names = [n for n, _ in out]
    return [(n, m) for n, m in out if not any(n.startswith(other + ".") for other in names if other != n)]


def lora_layers(root: torch.nn.Module, family: Family, all_linear: bool = False) -> set:
    """Qualified names of the linear-map layers of ``root`` (the denoiser) that get a LoRA."""
    linear = {name for name, m in root.named_modules() if is_linear_map(m)}
    if all_linear:
        return linear
    if family.lora == "attention":
        modules = dict(root.named_modules())

        def owner(name):   # the layer's nearest ancestor that is not a plain container
            while "." in name:
                name = name.rsplit(".", 1)[0]
                if not isinstance(modules[name], (torch.nn.Sequential, torch.nn.ModuleList)):
                    return modules[name]
            return root
        return {name for name in linear if _ATTENTION.search(type(owner(name)).__name__)}
    chosen = set()
    for block_name, block in repeated_blocks(root):
        for name, module in block.named_modules():
            if family.lora == "named":
                if is_linear_map(module) and any(name == n or name.endswith("." + n) for n in family.lora_names):
                    chosen.add(f"{block_name}.{name}")
            elif is_linear_map(module) and not _MODULATION.search(name):
                chosen.add(f"{block_name}.{name}" if name else block_name)   # a list of bare layers: the block is one
    return chosen


def checkpointed_blocks(root: torch.nn.Module, family: Family) -> set:
    """Qualified names of the blocks gradient checkpointing recomputes."""
    if family.blocks is not None:
        return {name for name, m in root.named_modules() if type(m).__name__ in family.blocks}
    return {name for name, _ in repeated_blocks(root)}


def recompute_words(family: Family) -> str:
    """What low_memory recomputes for ``family``, as docs/models.md says it."""
    blocks = ", ".join(family.blocks) if family.blocks else "every repeated block"
    return blocks + (" + decoder blocks" if family.decoder_blocks else " (decoder kept: it carries state)")


def self_checked_family(class_name: str) -> Family:
    """The family a SELF_CHECKED class takes: its row's (SELF_CHECKED_ROWS) or the structural rules."""
    parent = SELF_CHECKED_ROWS.get(class_name)
    return inherited_family(family_of(parent), class_name, parent) if parent else structural_family(class_name)


def supported_models_markdown() -> str:
    """The supported-models table of docs/models.md, generated from FAMILIES and REFUSED (a test
    keeps docs/models.md equal to it)."""
    lora_words = {"attention": "attention q/k/v/out", "blocks": "attention, context and MLP layers of every block",
                  "named": "these layers of every block: {}"}
    rows = ["| model family | ComfyUI class | LoRA layers (default) | low_memory recomputes | subject swap | optimise with | stage 2 | settings from |",
            "|---|---|---|---|---|---|---|---|"]
    for f in FAMILIES:
        # every row inverts (tests/test_families.py inverts and edits on each)
        layers = lora_words[f.lora].format(", ".join(f.lora_names))
        rows.append(f"| {f.name} | {', '.join(f.model_classes)} | {layers} | {recompute_words(f)} | yes | "
                    f"{f.optimise} | {f.stage2} | {f.source} |")
    for name, what in SELF_CHECKED.items():
        rows.append(f"| self-checked | {name} | {what} | {recompute_words(self_checked_family(name))} | | | "
                    f"{UNKNOWN_SETTINGS} | |")
    rows.append("| self-checked | any other image model class | a subclass of a row's class (not of SD1.x's BaseModel, "
                "which every model class derives from) takes that row, any other "
                "class the structural rules (LoRA on the linear layers of the repeated blocks, not the modulation "
                "layers); before the loop, on the run's own inputs, the training forward must equal the stock forward "
                "and the LoRA (no host weight) must get a finite gradient, or the run is refused naming the class "
                "and the check | a row's, or every repeated block (decoder kept: it carries state) | | | | |")
    for name, reason in REFUSED.items():
        rows.append(f"| refused | {name} | {reason} | | | | | |")
    for kind, names in NOT_IMAGE.items():
        rows.append(f"| refused | {kind}: {', '.join(names)} | SISO optimises images: refused before any work, naming "
                    "the model class | | | | | |")
    return "\n".join(rows)


def settings_note() -> str:
    """The recommended settings per family as plain lines, for the two-stage workflow's note."""
    return "\n".join(f"- {f.name}: optimise {f.optimise}; stage 2 {f.stage2} ({f.source})" for f in FAMILIES)
