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
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import logging
import os
import threading
import types
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import masks as M
from .weights import WeightFileError, read_checkpoint as read_state

log = logging.getLogger("siso")

BERT_FOLDER = "bert-base-uncased"
BERT_SOURCE = "https://huggingface.co/google-bert/bert-base-uncased"
BERT_REQUIRED = ("config.json", "vocab.txt")
BERT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
BERT_TOKENIZER = ("tokenizer.json", "tokenizer_config.json")
GROUNDING_DINO_SOURCE = (
    "groundingdino_swint_ogc.pth from https://github.com/IDEA-Research/GroundingDINO/releases "
    "(or https://huggingface.co/ShilongLiu/GroundingDINO) with GroundingDINO_SwinT_OGC.cfg.py beside it")
SAM_SOURCE = ("sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or sam_vit_h_4b8939.pth from "
              "https://github.com/facebookresearch/segment-anything#model-checkpoints")
# Community pairs of checkpoint and config file names (as other ComfyUI packs expect them).
KNOWN_CONFIGS = {"groundingdino_swint_ogc": "GroundingDINO_SwinT_OGC.cfg.py",
                 "groundingdino_swinb_cogcoor": "GroundingDINO_SwinB.cfg.py"}
# The configs inside the groundingdino package, by the Swin backbone's embedding width.
SHIPPED_CONFIGS = {96: "GroundingDINO_SwinT_OGC.py", 128: "GroundingDINO_SwinB_cfg.py"}
SWIN_PATCH_KEY = "backbone.0.patch_embed.proj.weight"
# Grounding DINO's test-time resize: short side 800, long side at most 1333.
DETECTOR_SIZE = (800, 1333)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# SAM's image encoder sees 1024 px in 16 px patches: global-attention blocks carry relative
# positions for 64 tokens per side (2 * 64 - 1 rows), windowed blocks for 14 (27 rows).
SAM_TOKENS_PER_SIDE = 64


# ----------------------------------------------------------------------------- safe reading
def read_checkpoint(path: str, what: str) -> dict:
    """A detector/segmenter checkpoint (``what``: "SAM" or "Grounding DINO"). Training scripts of
    the DETR family store their argparse.Namespace beside the weights: a plain attribute bag, the
    one class allowed."""
    import argparse
    source = {"SAM": SAM_SOURCE, "Grounding DINO": GROUNDING_DINO_SOURCE}.get(what)
    return read_state(path, what, allowed=(argparse.Namespace,), source=source)


def read_config(path: str) -> dict:
    """Values of a Python-syntax config file, read as DATA: only top-level ``name = value`` lines
    whose value is a literal (numbers, strings, lists, dicts, True/False/None) are accepted; the
    file is parsed, never executed. Anything else refuses the whole file."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), filename=name)
    except (OSError, SyntaxError, ValueError) as error:
        raise WeightFileError(f"config {path} could not be parsed: {error}") from error
    values, refused = {}, []
    for node in tree.body:
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target, value = node.target.id, node.value
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        if target is None:
            refused.append(f"line {node.lineno}: {_statement_kind(node)}")
            continue
        try:
            values[target] = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            refused.append(f"line {node.lineno}: '{target} = ...' is not a plain value")
    if refused:
        raise WeightFileError(
            f"config {name} is read as data and never run, so only lines of the form `name = value` with plain "
            f"values (numbers, strings, lists, True/False/None) are allowed; refused: {'; '.join(refused[:6])}. "
            f"Use the config published with the checkpoint, or delete {name} to use the values the "
            "groundingdino package ships.")
    return values


def _statement_kind(node) -> str:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return "an import"
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        return "a function call"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        return "a definition"
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        return "an assignment to something other than a plain name"
    return f"a {type(node).__name__} statement"


def shipped_config_path(file_name: str) -> str:
    """A config inside the installed groundingdino package, found without importing it."""
    spec = importlib.util.find_spec("groundingdino")
    if spec is None or not spec.submodule_search_locations:
        raise WeightFileError("the groundingdino-py package is not installed: pip install -r requirements.txt")
    return os.path.join(list(spec.submodule_search_locations)[0], "config", file_name)


def config_path_for(checkpoint_path: str) -> str | None:
    """The config file beside a checkpoint: '<name>.cfg.py', or the community name of its pair."""
    folder = os.path.dirname(checkpoint_path)
    stem = os.path.splitext(os.path.basename(checkpoint_path))[0]
    for name in (f"{stem}.cfg.py", KNOWN_CONFIGS.get(stem.lower())):
        if name and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def grounding_dino_config(checkpoint_path: str, state_dict: dict) -> tuple:
    """(config values, where they came from) for a checkpoint: its own config file over the
    keys of the shipped SwinT config, or the shipped config matching its backbone width."""
    base = read_config(shipped_config_path(SHIPPED_CONFIGS[96]))
    path = config_path_for(checkpoint_path)
    if path is not None:
        return {**base, **read_config(path)}, os.path.basename(path)
    width = int(state_dict[SWIN_PATCH_KEY].shape[0]) if SWIN_PATCH_KEY in state_dict else None
    if width not in SHIPPED_CONFIGS:
        raise WeightFileError(
            f"no config found for {os.path.basename(checkpoint_path)}: put its .cfg.py beside it "
            f"({' or '.join(KNOWN_CONFIGS.values())}, or {os.path.splitext(os.path.basename(checkpoint_path))[0]}.cfg.py)")
    shipped = shipped_config_path(SHIPPED_CONFIGS[width])
    return {**base, **read_config(shipped)}, f"{SHIPPED_CONFIGS[width]} (shipped with groundingdino)"


def check_bert_folder(folder: str):
    """A local copy of BERT for Grounding DINO's text encoder: raise naming what is missing."""
    if not os.path.isdir(folder):
        raise WeightFileError(missing_bert_message([folder]))
    missing = [f for f in BERT_REQUIRED if not os.path.isfile(os.path.join(folder, f))]
    if not any(os.path.isfile(os.path.join(folder, f)) for f in BERT_WEIGHTS):
        missing.append(" or ".join(BERT_WEIGHTS))
    if missing:
        raise WeightFileError(
            f"the BERT folder {folder} lacks {', '.join(missing)}. Put the files of {BERT_SOURCE} there "
            f"({', '.join(BERT_REQUIRED + BERT_TOKENIZER + BERT_WEIGHTS[:1])}); nothing is downloaded.")


def missing_bert_message(looked_in: list) -> str:
    return (f"Grounding DINO needs its BERT text encoder in a local folder named '{BERT_FOLDER}' and none was found "
            f"(looked for {', '.join(looked_in)}). Create one, e.g. {looked_in[0]}, with the files of {BERT_SOURCE}: "
            f"{', '.join(BERT_REQUIRED + BERT_TOKENIZER + BERT_WEIGHTS[:1])}. Nothing is downloaded.")


# ----------------------------------------------------------------------------- SAM
@dataclass(frozen=True)
class SamArchitecture:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple


def sam_architecture(state_dict: dict) -> SamArchitecture:
    """The image encoder's size from the tensors' shapes: vit_b / vit_l / vit_h or any other."""
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state_dict:
        raise WeightFileError(f"not a segment-anything SAM (ViT) checkpoint: it has no {key} "
                              "(SAM 2, HQ-SAM and MobileSAM files are not supported)")
    embed_dim = int(state_dict[key].shape[0])
    blocks = {int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    global_rows = 2 * SAM_TOKENS_PER_SIDE - 1
    global_blocks = tuple(i for i in range(depth)
                          if state_dict.get(f"image_encoder.blocks.{i}.attn.rel_pos_h", torch.empty(0, 0)).shape[0] == global_rows)
    if depth == 0 or not global_blocks:
        raise WeightFileError("the SAM checkpoint's image encoder has no global-attention block with "
                              f"{global_rows}-row relative positions; not a 1024-px segment-anything SAM")
    head_dim = int(state_dict[f"image_encoder.blocks.{global_blocks[0]}.attn.rel_pos_h"].shape[1])
    if head_dim <= 0 or embed_dim % head_dim:
        raise WeightFileError(f"SAM encoder width {embed_dim} is not a multiple of its head size {head_dim}")
    return SamArchitecture(embed_dim, depth, embed_dim // head_dim, global_blocks)


def build_sam(architecture: SamArchitecture) -> torch.nn.Module:
    from segment_anything.build_sam import _build_sam
    return _build_sam(encoder_embed_dim=architecture.embed_dim, encoder_depth=architecture.depth,
                      encoder_num_heads=architecture.num_heads,
                      encoder_global_attn_indexes=list(architecture.global_attn_indexes), checkpoint=None)


def load_sam(path: str) -> torch.nn.Module:
    state = read_checkpoint(path, "SAM")
    architecture = sam_architecture(state)
    with torch.inference_mode(False):
        model = build_sam(architecture)
        _load_strict(model, state, os.path.basename(path), "SAM")
    log.info("SubjectMask: SAM %s (%s)", os.path.basename(path), architecture)
    return model.eval().requires_grad_(False)


def _load_strict(model, state: dict, name: str, what: str, optional_prefixes=()):
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(optional_prefixes or ("\0",))]
    misshaped = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in state.items()
                 if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    if missing or misshaped:
        raise WeightFileError(
            f"{name} does not fit the {what} model built for it: {len(missing)} missing tensors {missing[:4]}, "
            f"{len(misshaped)} of another shape {misshaped[:4]}")
    if unexpected:
        log.info("SubjectMask: %s: %d unused tensors ignored (%s)", name, len(unexpected), ", ".join(unexpected[:5]))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


# ----------------------------------------------------------------------------- Grounding DINO
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
        hint = (" opencv-python (a groundingdino-py dependency) needs libGL; on a server without a display "
                "install opencv-python-headless instead." if "libGL" in str(error) or error.name == "cv2" else "")
        raise ImportError(f"groundingdino-py could not be imported ({error}); pip install -r requirements.txt.{hint}") from error
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
        _load_strict(model, state, os.path.basename(path), f"Grounding DINO ({source})", optional_prefixes=("bert.",))
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
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = detector((x - mean) / std, captions=[caption])
    return out["pred_logits"][0].float().cpu(), out["pred_boxes"][0].float().cpu()


def detect(detector, image: torch.Tensor, caption: str, box_threshold: float, text_threshold: float) -> M.Detections:
    """Detections of ``caption`` in one H x W x 3 image in [0, 1], boxes in its pixels."""
    logits, boxes = detector_outputs(detector, image, caption)
    token_scores = logits.sigmoid()
    special = set(detector.specical_tokens)  # [CLS], [SEP], '.', '?' (sic: groundingdino's name)
    ids = detector.tokenizer(caption)["input_ids"][: token_scores.shape[1]]
    words = [i for i, token in enumerate(ids) if token not in special]
    return M.select_detections(token_scores, boxes, words, box_threshold, text_threshold, image.shape[1], image.shape[0])


def segment_boxes(sam, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """SAM masks (K x H x W bool) for K boxes in one H x W x 3 image in [0, 1]."""
    from segment_anything import SamPredictor
    predictor = SamPredictor(sam)
    pixels = (image[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    predictor.set_image(pixels, image_format="RGB")
    prompts = predictor.transform.apply_boxes_torch(boxes.float().to(predictor.device), pixels.shape[:2])
    masks, _, _ = predictor.predict_torch(None, None, boxes=prompts, multimask_output=False)
    predictor.reset_image()
    return masks[:, 0].cpu()


# ----------------------------------------------------------------------------- model cache
def file_key(path: str) -> tuple:
    if os.path.isdir(path):
        return (path,) + tuple(file_key(os.path.join(path, f)) for f in sorted(os.listdir(path)))
    stat = os.stat(path)
    return (path, stat.st_mtime_ns, stat.st_size)


class ModelCache:
    """Loaded models, one per kind (loading another file of a kind replaces it), keyed by the
    files' paths and modification times, kept on the CPU. Models are released by ``clear()``,
    and when the last of the holders registered with ``hold`` is garbage-collected."""

    def __init__(self):
        self._lock = threading.RLock()
        self._slots = {}
        self._holders = 0

    def get(self, kind: str, key: tuple, load: Callable):
        with self._lock:
            slot = self._slots.get(kind)
            if slot is not None and slot[0] == key:
                return slot[1]
            self._slots.pop(kind, None)  # release the previous file before loading another
        model = load()
        with self._lock:
            self._slots[kind] = (key, model)
        return model

    def hold(self, owner):
        with self._lock:
            self._holders += 1
        weakref.finalize(owner, self._release)

    def _release(self):
        with self._lock:
            self._holders -= 1
            if self._holders <= 0:
                self._holders = 0
                self._slots.clear()

    def clear(self):
        with self._lock:
            self._slots.clear()

    def loaded(self) -> dict:
        with self._lock:
            return {kind: slot[1] for kind, slot in self._slots.items()}


MODELS = ModelCache()


def cached_models(grounding_dino_path: str, bert_folder: str, sam_path: str) -> tuple:
    config = config_path_for(grounding_dino_path)
    dino_key = (file_key(grounding_dino_path), file_key(config) if config else None, file_key(bert_folder))
    detector = MODELS.get("grounding_dino", dino_key, lambda: load_grounding_dino(grounding_dino_path, bert_folder))
    sam = MODELS.get("sam", file_key(sam_path), lambda: load_sam(sam_path))
    return detector, sam


# ----------------------------------------------------------------------------- the pipeline
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
                where = f"image {i + 1} of {batch} (batch index {i})" if batch > 1 else "the image (batch index 0)"
                message = (f"SubjectMask found no '{settings.text}' (prompt '{caption}') in {where} at box_threshold "
                           f"{settings.box_threshold} and text_threshold {settings.text_threshold}")
                if settings.when_nothing_found == "error":
                    raise M.NothingFound(f"{message}. Lower the thresholds, change the text, or set "
                                         "when_nothing_found to 'empty mask (warn)'.")
                warnings.append(f"{message}: its mask is empty.")
            found.append(detections)
            step()
    masks = torch.zeros(batch, height, width)
    previews = torch.zeros(batch, height, width, 3)
    with torch.inference_mode(), on_device(sam, runtime):
        for i, detections in enumerate(found):
            runtime.check_interrupt()
            chosen = []
            if len(detections):
                # The most confident detection is known before segmenting: segment only it.
                candidates = detections.take(slice(0, 1)) if settings.keep == "most confident" else detections
                segments = segment_boxes(sam, rgb[i], candidates.boxes)
                mask, chosen = M.choose_mask(segments, candidates.scores, settings.keep)
                masks[i] = M.grow_mask(mask, settings.grow_pixels)
                if settings.grow_pixels < 0 and bool(mask.any()) and not bool(masks[i].any()):
                    where = f"image {i + 1} of {batch}" if batch > 1 else "the image"
                    message = (f"SubjectMask found '{settings.text}' in {where}, but grow_pixels "
                               f"{settings.grow_pixels} shrank its mask to nothing")
                    if settings.when_nothing_found == "error":
                        raise M.NothingFound(f"{message}: use a grow_pixels closer to 0.")
                    warnings.append(f"{message}: its mask is empty.")
            previews[i] = M.preview(rgb[i], masks[i], detections.boxes, chosen)
            step()
    return MaskResult(masks, previews, found, warnings)
