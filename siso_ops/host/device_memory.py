"""Device memory around a training run: what ComfyUI holds loaded is unloaded to make room, and
its cache emptied after."""
from __future__ import annotations

import logging

import torch

import comfy.model_management

log = logging.getLogger("siso")


def keep_similarity_networks_while(node) -> None:
    """The similarity networks (about 1.75 GiB in bfloat16, twice that in float32) stay loaded
    between runs while a SISO Optimize or SISO Subject Score node object lives in ComfyUI's node
    cache, as SubjectMask's models do (keep_segmentation_models_while): "Free model and node cache"
    (POST /free with free_memory) replaces that cache, the objects are collected and the networks
    released; the next run reads their files again."""
    from .. import loaded_networks
    loaded_networks.networks.hold(node)


def unload_loaded(which):
    """Unload (weights unpatched, off the device) every model ComfyUI holds loaded whose patcher
    satisfies ``which``."""
    for loaded in list(comfy.model_management.current_loaded_models):
        if which(loaded.model):
            loaded.model_unload()
            comfy.model_management.current_loaded_models.remove(loaded)


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
    unloaded = unload_everything_from(device)
    if unloaded:
        log.info("SISO: unloaded %d model(s) from %s to make room for training", unloaded, device)
    return unloaded


def make_room_for(nbytes: int, device) -> int:
    """Before SISO Subject Score puts the similarity networks (``nbytes`` of weights) on a GPU, ask
    ComfyUI to offload what it must for them plus its inference reserve, as its own loaders do
    (a diffusion model left loaded after a KSampler fills a 12 GB card). On a CPU nothing is
    unloaded. Returns how many models were unloaded."""
    device = torch.device(device)
    if device.type == "cpu":
        return 0
    return len(comfy.model_management.free_memory(nbytes + comfy.model_management.minimum_inference_memory(), device))


def unload_everything_from(device) -> int:
    # ComfyUI's free_memory unloads models until the request fits; no request fits this one.
    return len(comfy.model_management.free_memory(1e30, device))
