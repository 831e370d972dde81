"""SubjectMask's models (Grounding DINO + SAM): resolved from their folders, cached on the CPU,
moved to ComfyUI's device only while predicting. See keep_segmentation_models_while for how
"Free model and node cache" releases them."""
from __future__ import annotations

import comfy.model_management

from .. import segmentation
from .folders import bert_folder_for, grounding_dino_path, sam_model_path
from .models import throw_if_interrupted


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
