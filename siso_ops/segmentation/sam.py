"""SAM (segment-anything): its image encoder's size read from the checkpoint's shapes, the
model built by the package and loaded from the file, and boxes segmented into masks."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ..weights import WeightFileError, block_count, load_exactly
from .config import read_checkpoint

log = logging.getLogger("siso")

# SAM's image encoder sees 1024 px in 16 px patches: global-attention blocks carry relative
# positions for 64 tokens per side (2 * 64 - 1 rows), windowed blocks for 14 (27 rows).
SAM_TOKENS_PER_SIDE = 64


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
    depth = block_count(state_dict, r"image_encoder\.blocks\.(\d+)\.")
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
        load_exactly(model, state, os.path.basename(path), "SAM", unused_ok=True)
    log.info("SubjectMask: SAM %s (%s)", os.path.basename(path), architecture)
    return model.eval().requires_grad_(False)



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
