"""SubjectMask with ComfyUI's own SAM3: the MODEL and CLIP that the stock Load Checkpoint gives for a
SAM3 file (models/checkpoints/sam3.1_multiplex_fp16.safetensors, or SAM3's), run by the stock
SAM3_Detect node itself, so the detection, its crop-and-refine passes and the model's memory
handling stay ComfyUI's. The pack adds only what SubjectMask promises on every route: the text as
one prompt per phrase, the keep rule, grow, the refusals and the preview (siso_ops.segmentation).

SAM3 is looked up in ComfyUI's node registry when it is used, never assumed: ComfyUI 0.3.75 has
no SAM3 (its SubjectMask runs on Grounding DINO + SAM only)."""
from __future__ import annotations

import torch

from .. import masks as M
from .. import segmentation
from .models import throw_if_interrupted

SAM3_NODE = "SAM3_Detect"
# Only for the words of the message: the pack finds SAM3 by its node (sam3_available), never by
# version. The stock SAM3 nodes came with Comfy-Org/ComfyUI PR 13408 (merged 2026-04-23); the PR's
# thread shows them absent from v0.19.5, and Comfy-Org/ComfyUI issue 14243 shows SAM3 Detect in a
# clean 0.22.0, so the first release is 0.20, 0.21 or 0.22: the message names the oldest one seen
# with them. 0.33 is the one tested here.
SAM3_SINCE = "0.22"
SAM3_FILE = "sam3.1_multiplex_fp16.safetensors"
SAM3_URL = "https://huggingface.co/Comfy-Org/sam3.1/resolve/main/checkpoints/sam3.1_multiplex_fp16.safetensors"
# SAM3_Detect's own default number of SAM decoder passes that refine each detected mask
REFINE_ITERATIONS = 2


def comfyui_version() -> str:
    try:
        import comfyui_version
        return str(comfyui_version.__version__)
    except Exception:
        return "unknown"


def sam3_detect_node():
    """The stock SAM3_Detect node class of the running ComfyUI, or None where it has none."""
    import nodes
    return nodes.NODE_CLASS_MAPPINGS.get(SAM3_NODE)


def sam3_available() -> bool:
    return sam3_detect_node() is not None


def missing_sam3_message() -> str:
    return (f"this ComfyUI ({comfyui_version()}) has no SAM3 (no stock {SAM3_NODE} node; SAM3 needs ComfyUI >= "
            f"{SAM3_SINCE}): update ComfyUI, or disconnect sam3_model and sam3_clip to use SAM + Grounding DINO")


def sam3_problem(model, clip) -> str | None:
    """Why this MODEL / CLIP pair cannot be SubjectMask's SAM3, or None. Either may be
    ``checks.LINKED``-like (known to be connected, not yet loaded): only what is known is checked."""
    if (model is None) != (clip is None):
        missing = "sam3_clip" if clip is None else "sam3_model"
        return (f"{missing}: SAM3 needs both sam3_model and sam3_clip: connect the MODEL and CLIP outputs of the "
                f"Load Checkpoint that loads the SAM3 file ({SAM3_FILE} in models/checkpoints)")
    if model is None:
        return None
    if not sam3_available():
        return f"sam3_model: {missing_sam3_message()}"
    import comfy.model_base
    sam3_class = getattr(comfy.model_base, "SAM3", None)
    inner = getattr(model, "model", None)
    if inner is not None and (sam3_class is None or not isinstance(inner, sam3_class)):
        return (f"sam3_model: the connected MODEL is {type(inner).__name__}, not SAM3: connect the MODEL output of "
                f"the Load Checkpoint that loads the SAM3 file ({SAM3_FILE} in models/checkpoints)")
    encoder = getattr(clip, "cond_stage_model", None)
    if encoder is not None:
        try:
            from comfy.text_encoders.sam3_clip import SAM3ClipModelWrapper
        except ImportError:
            SAM3ClipModelWrapper = None
        if SAM3ClipModelWrapper is None or not isinstance(encoder, SAM3ClipModelWrapper):
            return (f"sam3_clip: the connected CLIP is {type(encoder).__name__}, not SAM3's text encoder: connect the "
                    "CLIP output of the same Load Checkpoint as sam3_model")
    return None


def sam3_finder(model, clip, settings: "segmentation.MaskSettings"):
    """``find(rgb)`` for ``segmentation.subject_masks_found_and_segmented``: SAM3_Detect on one
    image with the text encoded once, every detection above box_threshold as its own mask."""
    detect = sam3_detect_node()
    tokens = clip.tokenize(segmentation.sam3_prompt(settings.text))
    conditioning = clip.encode_from_tokens_scheduled(tokens)

    def find(rgb: torch.Tensor):
        throw_if_interrupted()
        height, width = rgb.shape[:2]
        with torch.inference_mode():
            out = detect.execute(model=model, image=rgb[None], conditioning=conditioning,
                                 threshold=settings.box_threshold, refine_iterations=REFINE_ITERATIONS,
                                 individual_masks=True)
        masks, boxes = out.result[0], out.result[1][0]
        if len(boxes) != masks.shape[0]:
            raise RuntimeError(f"{SAM3_NODE} gave {masks.shape[0]} masks for {len(boxes)} boxes: this ComfyUI's SAM3 "
                               "node answers differently from the one SubjectMask was written for")
        corners = torch.tensor([[b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]] for b in boxes],
                               dtype=torch.float32).reshape(-1, 4)
        scores = torch.tensor([float(b.get("score", 0.0)) for b in boxes], dtype=torch.float32)
        order = torch.argsort(scores, descending=True, stable=True)
        segments = masks.detach().float().cpu().reshape(-1, height, width)[order] > 0.5
        return M.Detections(corners[order], scores[order]), segments
    return find


def subject_masks_sam3(images, settings, model, clip, on_step=None):
    """SubjectMask's SAM3 route: refusals first, then one mask per image."""
    settings.check()
    problem = sam3_problem(model, clip)
    if problem:
        raise ValueError(problem)
    runtime = segmentation.Runtime(check_interrupt=throw_if_interrupted)
    return segmentation.subject_masks_found_and_segmented(images, settings, sam3_finder(model, clip, settings),
                                                          runtime, on_step)
