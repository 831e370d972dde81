"""Reference images in the conditioning: Flux.2's and Flux.1 Kontext's ReferenceLatent, Qwen-Image-Edit's
text encoders (TextEncodeQwenImageEdit / ...Plus) put VAE latents of the reference pictures into the
CONDITIONING under ``reference_latents``; the model appends their tokens to the image's at every call.

SISO needs nothing of its own for them: its loop samples through ComfyUI's guider with the user's
conditioning (sampling.run_with_denoiser), which copies them as plain tensors that take no gradient,
so the LoRA learns on the image tokens' path while the references ride along unchanged. What this
module refuses is a model whose reference path keeps state between denoiser calls."""
from __future__ import annotations


def reference_latents(positive) -> list:
    """The reference latents of a CONDITIONING, in the order the model reads them."""
    found = []
    for entry in positive or ():
        extras = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
        found.extend(extras.get("reference_latents") or ())
    return found


def _stateful_patches(model) -> list:
    """Model patches that keep state through one sampling run: ComfyUI calls a patch's ``cleanup``
    when sampling ends (ModelPatcher.model_patches_call_function), which is how a patch says it
    holds something from one denoiser call for the next (ComfyUI 0.33's Flux KV Cache)."""
    options = getattr(model, "model_options", {}).get("transformer_options", {})
    found = []
    for patches in options.get("patches", {}).values():
        found.extend(p for p in patches if callable(getattr(p, "cleanup", None)))
    for patches in options.get("patches_replace", {}).values():
        found.extend(p for p in patches.values() if callable(getattr(p, "cleanup", None)))
    return found


def check_reference_path(model, positive):
    """Before any work: refuse a MODEL whose reference images SISO's loop could not train through.

    A patch that keeps state between denoiser calls (Flux KV Cache keeps the reference tokens' keys
    and values from the first call and reuses them in every later one) would live through all of
    SISO's iterations, since they run inside one sampling run: every iteration after the first would
    attend to references computed with iteration 0's LoRA, through iteration 0's autograd graph."""
    if not reference_latents(positive):
        return
    stateful = _stateful_patches(model)
    if stateful:
        name = type(stateful[0]).__name__
        what = "Flux KV Cache" if name == "KV_Attn_Input" else f"a model patch ({name})"
        raise ValueError(
            f"SISO cannot optimise through {what}: it keeps the reference images' attention keys and values from "
            "the first denoiser call and reuses them in every later call, and SISO's iterations all run inside one "
            "sampling run, so every iteration after the first would see references computed with the first "
            "iteration's LoRA (no gradient could be taken through them). Connect SISO Optimize to the model before "
            f"{what}; the LoRA it makes can then be used with it.")
