"""Grounding DINO finds the subject named by a text, SAM segments the box: the subject mask.

Both models are built by their own packages (``groundingdino-py``, ``segment-anything``) from
the community's files, safely and offline:
- checkpoints load with ``torch.load(weights_only=True)``; a file holding anything but tensors
  and plain data is refused, naming the refused classes;
- Grounding DINO's ``.cfg.py`` is parsed with ``ast`` (``name = value`` lines only) and never
  executed; without one, the values of the config the groundingdino package ships are used
  (parsed the same way);
- Grounding DINO's BERT text encoder loads from a local folder ``bert-base-uncased`` with
  ``local_files_only=True``: nothing is downloaded;
- groundingdino 0.4.0 was written for transformers 4.x and its BERT wrapper calls transformers'
  internals that later releases renamed or removed; the pack builds the model with its own
  text encoder in the wrapper's place (``GroundingTextEncoder``), which uses only calls every
  transformers release since 4.x accepts (transformers' classes are never patched).

groundingdino, segment_anything and transformers are imported inside functions, when the first
mask is made, so that importing the pack stays cheap. Nothing here imports ComfyUI: the caller
passes a ``Runtime`` (device, making room on it, interruption).

    config          safe reading: checkpoints, ``.cfg.py`` as data, the local BERT folder
    sam             SAM's architecture from its file, loading, segmenting boxes
    grounding_dino  the text encoder shim, building and loading, detecting a text's boxes
    cache           the loaded models, kept on the CPU between runs
    (here)          the pipeline: one mask per image

The names below are the interface (``from siso_ops import segmentation``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import masks as M
from ..weights import WeightFileError  # noqa: F401  (callers catch it from here)
from .cache import MODELS, ModelCache, cached_models, file_key  # noqa: F401
from .config import (  # noqa: F401
    BERT_FOLDER, BERT_REQUIRED, BERT_SOURCE, BERT_TOKENIZER, BERT_WEIGHTS, DRAWN_MASK_WAY_OUT, GROUNDING_DINO_SOURCE,
    KNOWN_CONFIGS, SAM_SOURCE, SHIPPED_CONFIGS, SUBJECT_MASK_REQUIREMENTS, SWIN_PATCH_KEY, check_bert_folder, config_path_for,
    grounding_dino_config, grounding_dino_package_missing, missing_bert_message, read_checkpoint, read_config, shipped_config_path)
# (Grounding DINO's test-time resize, DETECTOR_SIZE, is read where it is used: grounding_dino.DETECTOR_SIZE)
from .grounding_dino import (  # noqa: F401
    GroundingTextEncoder, build_grounding_dino, detect, detector_input_size, detector_outputs, load_grounding_dino)
from .sam import SAM_TOKENS_PER_SIDE, SamArchitecture, build_sam, load_sam, sam_architecture, segment_boxes  # noqa: F401


@dataclass
class MaskSettings:
    text: str
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    keep: str = "largest"
    grow_pixels: int = 0
    when_nothing_found: str = "error"

    def check(self):
        M.caption_for(self.text)
        if self.keep not in M.KEEP_RULES:
            raise ValueError(f"keep must be one of {M.KEEP_RULES}, got '{self.keep}'")
        if self.when_nothing_found not in M.NOTHING_FOUND:
            raise ValueError(f"when_nothing_found must be one of {M.NOTHING_FOUND}, got '{self.when_nothing_found}'")
        for name in ("box_threshold", "text_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


@dataclass
class Runtime:
    """Where models run while predicting, and the host's hooks: ``make_room(bytes)`` frees that
    much device memory before a model moves there; ``check_interrupt()`` raises on Cancel."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    make_room: Callable = lambda nbytes: None
    check_interrupt: Callable = lambda: None


@dataclass
class MaskResult:
    masks: torch.Tensor       # B x H x W, 1 = subject
    previews: torch.Tensor    # B x H x W x 3
    detections: list          # per image: the Detections that were segmented
    warnings: list


@contextlib.contextmanager
def on_device(module: torch.nn.Module, runtime: Runtime):
    """The model sits on the compute device only inside this block, on the CPU otherwise."""
    if runtime.device.type == "cpu":
        yield module
        return
    runtime.make_room(sum(t.numel() * t.element_size() for t in module.state_dict().values()))
    module.to(runtime.device)
    try:
        yield module
    finally:
        module.to("cpu")


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """A ComfyUI IMAGE (B x H x W x C, C in 1/3/4) as B x H x W x 3 float on the CPU."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE (batch, height, width, 1/3/4 channels), got shape {tuple(images.shape)}")
    rgb = images[..., :3] if images.shape[-1] >= 3 else images.expand(-1, -1, -1, 3)
    return rgb.detach().float().cpu().clamp(0, 1)


def subject_masks(images: torch.Tensor, settings: MaskSettings, detector, sam, runtime: Runtime | None = None,
                  on_step: Callable | None = None) -> MaskResult:
    """One mask per image of the batch: detect the text, segment the detections, keep by the
    rule, grow or shrink. All images are detected before any is segmented, so an image where
    nothing is found fails fast, and only one model is on the device at a time."""
    settings.check()
    runtime = runtime or Runtime()
    step = on_step or (lambda: None)
    caption = M.caption_for(settings.text)
    rgb = as_rgb(images)
    batch, height, width = rgb.shape[:3]
    found, warnings = [], []
    with torch.inference_mode(), on_device(detector, runtime):
        for i in range(batch):
            runtime.check_interrupt()
            detections = M.non_max_suppression(
                detect(detector, rgb[i], caption, settings.box_threshold, settings.text_threshold))
            if len(detections) == 0:
                _nothing_found(settings, f"SubjectMask found no '{settings.text}' (prompt '{caption}') in "
                                         f"{_where(i, batch)} at box_threshold {settings.box_threshold} and "
                                         f"text_threshold {settings.text_threshold}",
                               ". Lower the thresholds, change the text, or set when_nothing_found to 'empty mask (warn)'.",
                               warnings)
            found.append(detections)
            step()
    masks = torch.zeros(batch, height, width)
    previews = torch.zeros(batch, height, width, 3)
    with torch.inference_mode(), on_device(sam, runtime):
        for i, detections in enumerate(found):
            runtime.check_interrupt()
            segments = None
            if len(detections):
                # The most confident detection is known before segmenting: segment only it.
                if settings.keep == "most confident":
                    detections = detections.take(slice(0, 1))
                segments = segment_boxes(sam, rgb[i], detections.boxes)
            masks[i], previews[i] = _keep_and_grow(settings, rgb[i], found[i], detections, segments, i, batch, warnings)
            step()
    return MaskResult(masks, previews, found, warnings)


def _where(i: int, batch: int) -> str:
    return f"image {i + 1} of {batch} (batch index {i})" if batch > 1 else "the image (batch index 0)"


def _nothing_found(settings: MaskSettings, message: str, fix: str, warnings: list) -> None:
    """Stop with ``message + fix`` (when_nothing_found 'error') or record the warning: the image's
    mask stays empty."""
    if settings.when_nothing_found == "error":
        raise M.NothingFound(message + fix)
    warnings.append(f"{message}: its mask is empty.")


def _keep_and_grow(settings: MaskSettings, rgb: torch.Tensor, shown: "M.Detections", detections: "M.Detections",
                   segments, i: int, batch: int, warnings: list) -> tuple:
    """One image's mask and preview from its segmented detections (``segments`` K x H x W for the
    K ``detections``; None: nothing found): the keep rule, then grow or shrink; ``shown`` are
    the boxes drawn on the preview (``detections`` are among them, first)."""
    mask = torch.zeros(rgb.shape[:2])
    chosen = []
    if segments is not None and len(detections):
        picked, chosen = M.choose_mask(segments, detections.scores, settings.keep)
        mask = M.grow_mask(picked, settings.grow_pixels)
        if settings.grow_pixels < 0 and bool(picked.any()) and not bool(mask.any()):
            where = f"image {i + 1} of {batch}" if batch > 1 else "the image"
            _nothing_found(settings, f"SubjectMask found '{settings.text}' in {where}, but grow_pixels "
                                     f"{settings.grow_pixels} shrank its mask to nothing",
                           ": use a grow_pixels closer to 0.", warnings)
    return mask, M.preview(rgb, mask, shown.boxes, chosen)


def sam3_prompt(text: str) -> str:
    """The text as ComfyUI's SAM3 text encoder reads it: each phrase of the Grounding DINO caption
    ('dog.', 'dog. cat.') becomes one SAM3 prompt asking for up to MAX_CANDIDATES detections
    ('dog:8, cat:8'; SAM3's tokenizer splits prompts at commas and reads ':N' as their number)."""
    phrases = [" ".join(p.replace(",", " ").replace(":", " ").split()) for p in M.caption_for(text).split(".")]
    return ", ".join(f"{p}:{M.MAX_CANDIDATES}" for p in phrases if p)


def subject_masks_found_and_segmented(images: torch.Tensor, settings: MaskSettings, find: Callable,
                                      runtime: Runtime | None = None, on_step: Callable | None = None,
                                      model_name: str = "SAM3") -> MaskResult:
    """One mask per image for a model that finds and segments the text in one pass (SAM3):
    ``find(rgb)`` (one H x W x 3 image) gives its Detections (best first) and their K x H x W
    masks. The same keep rule, grow, refusals and preview as ``subject_masks``; only
    ``box_threshold`` applies (the caller passes it to the model as its score threshold)."""
    settings.check()
    runtime = runtime or Runtime()
    step = on_step or (lambda: None)
    prompt = sam3_prompt(settings.text)
    rgb = as_rgb(images)
    batch, height, width = rgb.shape[:3]
    masks = torch.zeros(batch, height, width)
    previews = torch.zeros(batch, height, width, 3)
    found, warnings = [], []
    for i in range(batch):
        runtime.check_interrupt()
        detections, segments = find(rgb[i])
        if len(detections) == 0:
            _nothing_found(settings, f"SubjectMask found no '{settings.text}' ({model_name} prompt '{prompt}') in "
                                     f"{_where(i, batch)} at box_threshold {settings.box_threshold} ({model_name}'s "
                                     "score threshold)",
                           ". Lower box_threshold, change the text, or set when_nothing_found to 'empty mask (warn)'.",
                           warnings)
            segments = None
        found.append(detections)
        masks[i], previews[i] = _keep_and_grow(settings, rgb[i], detections, detections, segments, i, batch, warnings)
        step()
    return MaskResult(masks, previews, found, warnings)
