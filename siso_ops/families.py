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
  attention, context projections and MLPs (the paper's FLUX runs train these).
- ``blocks``: the repeated blocks gradient checkpointing wraps. ``None``: the children of the
  denoiser's ModuleLists (every DiT); a tuple: these class names (the UNet's ResNet and
  transformer blocks, which are not list children one by one).
- ``in_place``: the blocks add into their inputs in place after a LayerNorm saved them (the
  Flux-style double/single-stream blocks): norms read copies and checkpointed blocks get copies.
- ``decoder_blocks``: VAE decoder blocks that may be recomputed in backward (KL autoencoders);
  ``()`` where decoding carries state between blocks (the Wan 2.1 causal VAE's feature cache),
  which a recomputation would advance twice.
- ``optimise`` / ``stage2``: the settings the pack recommends, and where each comes from.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

KL_DECODER_BLOCKS = ("ResnetBlock", "AttnBlock")
UNET_BLOCKS = ("ResBlock", "BasicTransformerBlock")


@dataclass(frozen=True)
class Family:
    name: str                 # in the user's words
    model_classes: tuple      # ComfyUI model_base class names
    lora: str = "blocks"      # "attention" or "blocks"
    blocks: tuple | None = None
    in_place: bool = False
    decoder_blocks: tuple = KL_DECODER_BLOCKS
    diffusers: str = ""       # the diffusers LoRA layout ComfyUI's key maps know: "unet", "flux", "mmdit", "pixart",
                              # "auraflow", or none
    editing: str = ""         # why subject swap (ReNoise inversion) is refused; "" = supported
    optimise: str = ""        # steps / grad_steps while optimising
    stage2: str = ""          # stage-2 sampling
    source: str = ""          # where the settings come from


FAMILIES = (
    Family("SD1.x / SD2.x (SD-Turbo)", ("BaseModel",), lora="attention", blocks=UNET_BLOCKS, diffusers="unet",
           optimise="1 step, grad_steps 1 (turbo); 20-step models: 4 steps, grad_steps 3",
           stage2="4 steps, cfg 1.0 (turbo)", source="the paper (SD-Turbo-like SDXL-Turbo runs)"),
    Family("SDXL (SDXL-Turbo)", ("SDXL",), lora="attention", blocks=UNET_BLOCKS, diffusers="unet",
           optimise="1 step, grad_steps 1", stage2="4 steps, cfg 1.0", source="the paper"),
    Family("Flux.1 (schnell, dev)", ("Flux",), in_place=True, diffusers="flux",
           optimise="1 step (schnell), grad_steps 1", stage2="4 steps (schnell), cfg 1.0", source="the paper (FLUX-schnell)"),
    Family("Flux.2 (dev, klein)", ("Flux2",), in_place=True,
           optimise="4 steps, grad_steps 1 (distilled klein); dev: 8 steps, grad_steps 2", stage2="klein: 4 steps, cfg 1.0; dev: 20+ steps",
           source="the model authors' sampling advice; SISO steps not measured"),
    Family("Chroma", ("Chroma",), in_place=True, optimise="8 steps, grad_steps 2", stage2="26+ steps, cfg 4",
           source="the model authors' sampling advice; SISO steps not measured"),
    Family("Chroma Radiance (pixel space)", ("ChromaRadiance",), in_place=True, decoder_blocks=(),
           optimise="8 steps, grad_steps 2", stage2="26+ steps, cfg 4",
           source="the model authors' sampling advice; SISO steps not measured"),
    Family("SD3 / SD3.5 (MMDiT)", ("SD3",), diffusers="mmdit", optimise="4 steps, grad_steps 1 (3.5 Large Turbo)",
           stage2="Large Turbo: 4 steps, cfg 1.0; others: 28 steps, cfg 4.5",
           source="the model authors' sampling advice; SISO steps not measured"),
    Family("Z-Image / Lumina 2 (NextDiT)", ("Lumina2",), optimise="Z-Image-Turbo: 8 steps, grad_steps 1",
           stage2="Z-Image-Turbo: 8 steps, cfg 1.0; Lumina 2: 30 steps, cfg 4",
           source="the model authors' sampling advice; SISO steps not measured"),
    Family("Qwen-Image", ("QwenImage",), decoder_blocks=(),
           optimise="4 steps with a Lightning LoRA, grad_steps 1",
           stage2="Lightning: 4-8 steps, cfg 1.0; base: 50 steps, cfg 4",
           source="the model authors' sampling advice; SISO steps not measured"),
    Family("HiDream", ("HiDream",), optimise="Fast: 16 steps, grad_steps 2", stage2="Fast: 16 steps, cfg 1.0; Full: 50 steps, cfg 5",
           source="the model authors' sampling advice; SISO steps not measured"),
    Family("AuraFlow", ("AuraFlow",), diffusers="auraflow", optimise="8 steps, grad_steps 2", stage2="25+ steps, cfg 3.5",
           source="the model authors' sampling advice; SISO steps not measured"),
    Family("HunyuanImage 2.1", ("HunyuanImage21",), in_place=True, decoder_blocks=(),
           optimise="distilled: 8 steps, grad_steps 1", stage2="distilled: 8 steps, cfg 1.0; base: 50 steps, cfg 3.5",
           source="the model authors' sampling advice; SISO steps not measured"),
    Family("Cosmos Predict2 (text to image)", ("CosmosPredict2",), decoder_blocks=(),
           optimise="8 steps, grad_steps 2", stage2="35 steps, cfg 7",
           source="the model authors' sampling advice; SISO steps not measured"),
    Family("PixArt (Alpha, Sigma)", ("PixArt",), diffusers="pixart", optimise="LCM / DMD variants: 1-4 steps, grad_steps 1",
           stage2="20 steps, cfg 4.5", source="the model authors' sampling advice; SISO steps not measured"),
)

# Image families ComfyUI loads that SISO refuses, and why (video, audio and 3D models are
# refused by their latent shape with the model class named).
REFUSED = {
    "StableCascade_C": "a two-model cascade (stage C then B); SISO trains one denoiser whose output a VAE decodes",
    "StableCascade_B": "a two-model cascade (stage C then B); SISO trains one denoiser whose output a VAE decodes",
}


def family_of(model_class_name: str) -> Family | None:
    for family in FAMILIES:
        if model_class_name in family.model_classes:
            return family
    return None


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
            if is_linear_map(module) and not _MODULATION.search(name):
                chosen.add(f"{block_name}.{name}")
    return chosen


def checkpointed_blocks(root: torch.nn.Module, family: Family) -> set:
    """Qualified names of the blocks gradient checkpointing recomputes."""
    if family.blocks is not None:
        return {name for name, m in root.named_modules() if type(m).__name__ in family.blocks}
    return {name for name, _ in repeated_blocks(root)}


def supported_models_markdown() -> str:
    """The README's supported-models table, generated from FAMILIES and REFUSED (a test keeps
    the README equal to it)."""
    lora_words = {"attention": "attention q/k/v/out", "blocks": "attention, context and MLP layers of every block"}
    rows = ["| model family | ComfyUI class | LoRA layers (default) | low_memory recomputes | subject swap | optimise with | stage 2 | settings from |",
            "|---|---|---|---|---|---|---|---|"]
    for f in FAMILIES:
        blocks = ", ".join(f.blocks) if f.blocks else "every repeated block"
        decoder = " + decoder blocks" if f.decoder_blocks else " (decoder kept: it carries state)"
        swap = "yes" if not f.editing else f"refused: {f.editing}"
        rows.append(f"| {f.name} | {', '.join(f.model_classes)} | {lora_words[f.lora]} | {blocks}{decoder} | {swap} | "
                    f"{f.optimise} | {f.stage2} | {f.source} |")
    for name, reason in REFUSED.items():
        rows.append(f"| refused | {name} | {reason} | | | | | |")
    rows.append("| refused | video, audio and 3D models | SISO optimises images: refused before any work, naming the model class | | | | | |")
    rows.append("| refused | any other image model class (e.g. HunyuanDiT, Kandinsky 5, OmniGen 2) | no tiny "
                "test model pins its path yet: refused before any work, naming the class and the supported families | | | | | |")
    return "\n".join(rows)


def settings_note() -> str:
    """The recommended settings per family as plain lines, for the two-stage workflow's note."""
    return "\n".join(f"- {f.name}: optimise {f.optimise}; stage 2 {f.stage2} ({f.source})" for f in FAMILIES)
