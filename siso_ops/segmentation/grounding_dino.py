"""Grounding DINO: built by the groundingdino package from config values with the pack's own
BERT text encoder in its wrapper's place (``GroundingTextEncoder``: groundingdino 0.4.0's wrapper
calls transformers 4.x internals later releases renamed or removed), loaded from its checkpoint,
and run to find the boxes of a text in an image."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import types

import torch
import torch.nn.functional as F

from .. import masks as M
from ..packages import install_command
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize
from ..weights import WeightFileError, load_exactly
from .config import (SUBJECT_MASK_REQUIREMENTS, check_bert_folder, grounding_dino_config, grounding_dino_package_missing,
                     read_checkpoint)

log = logging.getLogger("siso")

# Grounding DINO's test-time resize: short side 800, long side at most 1333.
DETECTOR_SIZE = (800, 1333)


_BUILD_LOCK = threading.Lock()


class GroundingTextEncoder(torch.nn.Module):
    """Grounding DINO's BERT text encoder, run through transformers' public building blocks only.

    groundingdino-py 0.4.0 (last released 2023) wraps BERT in its ``BertModelWarper``, whose
    forward re-implements ``BertModel.forward`` against transformers 4.x internals: it copies
    ``get_extended_attention_mask`` / ``get_head_mask`` off the model (removed in transformers
    5) and calls the embeddings with ``past_key_values_length`` (renamed ``cache_length`` in
    5.24) and the encoder with 4.x keywords. Each transformers release can break it again.

    This module takes the wrapper's place. It keeps the same submodules (``embeddings``,
    ``encoder``, ``pooler``, so the checkpoint's ``bert.*`` keys load as before) and computes
    what the wrapper computes for Grounding DINO's use (an encoder, no cache, no head mask):
    embeddings from ids, token types and positions; Grounding DINO's per-token 0/1 attention
    mask turned into an additive mask (0 where attended, the dtype's minimum elsewhere); each
    BERT layer in turn. Only calls that every transformers release from 4.x on accepts are used:
    ``embeddings(input_ids=, token_type_ids=, position_ids=)`` and ``layer(hidden, mask)``."""

    def __init__(self, bert_model):
        super().__init__()
        self.config = bert_model.config
        self.embeddings = bert_model.embeddings
        self.encoder = bert_model.encoder
        self.pooler = bert_model.pooler  # unused by Grounding DINO; kept for the checkpoint's keys

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **unused):
        if input_ids is None:
            raise ValueError("Grounding DINO's text encoder needs input_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, device=input_ids.device)
        # 2D (padding) or 3D (per-token, as Grounding DINO builds it) -> broadcast over heads.
        keep = attention_mask[:, None] if attention_mask.dim() == 3 else attention_mask[:, None, None]
        additive = (1.0 - keep.to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.encoder.layer:
            out = layer(hidden, additive)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
        return {"last_hidden_state": hidden}


@contextlib.contextmanager
def _local_text_encoder(folder: str):
    """While Grounding DINO is built, its tokenizer and BERT come from ``folder`` only
    (local_files_only: no network), and the BERT is wrapped in ``GroundingTextEncoder`` instead
    of groundingdino's ``BertModelWarper``. The three groundingdino names are restored
    afterwards (under a lock: nothing else sees them swapped)."""
    from groundingdino.models.GroundingDINO import groundingdino as architecture
    from groundingdino.util import get_tokenlizer as loaders
    from transformers import AutoTokenizer, BertModel

    def tokenizer(_name):
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)

    def language_model(_name):
        return BertModel.from_pretrained(folder, local_files_only=True).float()

    with _BUILD_LOCK:
        saved = loaders.get_tokenlizer, loaders.get_pretrained_language_model, architecture.BertModelWarper
        loaders.get_tokenlizer, loaders.get_pretrained_language_model = tokenizer, language_model
        architecture.BertModelWarper = GroundingTextEncoder
        try:
            yield
        finally:
            loaders.get_tokenlizer, loaders.get_pretrained_language_model, architecture.BertModelWarper = saved


def _import_groundingdino():
    try:
        from groundingdino.models import build_model
    except ImportError as error:
        missing = grounding_dino_package_missing()
        if missing:
            raise ImportError(missing) from error
        hint = (" opencv-python (a groundingdino-py dependency) needs libGL; on a server without a display "
                "install opencv-python-headless instead." if "libGL" in str(error) or error.name == "cv2" else "")
        raise ImportError(f"groundingdino-py is installed but could not be imported ({error}); reinstall it with "
                          f"{install_command(os.path.basename(SUBJECT_MASK_REQUIREMENTS))} in ComfyUI's Python.{hint}") from error
    return build_model


def build_grounding_dino(config: dict, bert_folder: str) -> torch.nn.Module:
    """A Grounding DINO with random detector weights built by the package from config values."""
    check_bert_folder(bert_folder)
    build_model = _import_groundingdino()
    # Activation checkpointing is for training; it changes no weight.
    args = types.SimpleNamespace(**{**config, "text_encoder_type": os.path.abspath(bert_folder),
                                    "use_checkpoint": False, "use_transformer_ckpt": False})
    if getattr(args, "modelname", "groundingdino") != "groundingdino":
        raise WeightFileError(f"the config describes a '{args.modelname}' model, not groundingdino")
    with torch.inference_mode(False), _local_text_encoder(bert_folder):
        return build_model(args)


def load_grounding_dino(path: str, bert_folder: str) -> torch.nn.Module:
    state = read_checkpoint(path, "Grounding DINO")
    config, source = grounding_dino_config(path, state)
    try:
        model = build_grounding_dino(config, bert_folder)
    except (KeyError, NotImplementedError, AssertionError) as error:  # an unknown backbone or setting
        raise WeightFileError(f"Grounding DINO could not be built from {source}: {type(error).__name__}: {error}") from error
    with torch.inference_mode(False):
        # BERT tensors missing from a checkpoint keep the local BERT's weights.
        load_exactly(model, state, os.path.basename(path), f"Grounding DINO ({source})", optional_prefixes=("bert.",),
                     unused_ok=True)
    log.info("SubjectMask: Grounding DINO %s with config %s, text encoder %s", os.path.basename(path), source, bert_folder)
    return model.eval().requires_grad_(False)


def detector_input_size(width: int, height: int, size: int | None = None, max_size: int | None = None) -> tuple:
    """(height, width) of Grounding DINO's resize (its RandomResize([800], max_size=1333) rule)."""
    size, max_size = size or DETECTOR_SIZE[0], max_size or DETECTOR_SIZE[1]
    short, long = min(width, height), max(width, height)
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def detector_outputs(detector, image: torch.Tensor, caption: str) -> tuple:
    """Grounding DINO on one H x W x 3 image in [0, 1]: (Q x 256 token logits, Q x 4 normalised
    cx cy w h boxes), after the detector's own resize and ImageNet normalisation."""
    height, width = image.shape[:2]
    device = next(detector.parameters()).device
    x = image.permute(2, 0, 1)[None].float().to(device)
    x = F.interpolate(x, size=detector_input_size(width, height), mode="bilinear", align_corners=False, antialias=True)
    out = detector(normalize(x, IMAGENET_MEAN, IMAGENET_STD), captions=[caption])
    return out["pred_logits"][0].float().cpu(), out["pred_boxes"][0].float().cpu()


def detect(detector, image: torch.Tensor, caption: str, box_threshold: float, text_threshold: float) -> M.Detections:
    """Detections of ``caption`` in one H x W x 3 image in [0, 1], boxes in its pixels."""
    logits, boxes = detector_outputs(detector, image, caption)
    token_scores = logits.sigmoid()
    special = set(detector.specical_tokens)  # [CLS], [SEP], '.', '?' (sic: groundingdino's name)
    ids = detector.tokenizer(caption)["input_ids"][: token_scores.shape[1]]
    words = [i for i, token in enumerate(ids) if token not in special]
    return M.select_detections(token_scores, boxes, words, box_threshold, text_threshold, image.shape[1], image.shape[0])
