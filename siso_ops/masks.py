"""Subject masks from detections: the pure geometry of SubjectMask (no models, no ComfyUI).

Conventions: an image is H x W x C in [0, 1]; a mask is H x W (or B x H x W) float in [0, 1]
with 1 = subject, the same convention as the MASK that ComfyUI's mask editor produces through
LoadImage (1 = painted). Boxes are x0, y0, x1, y1 in pixels of the original image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KEEP_RULES = ("largest", "most confident", "union")
NOTHING_FOUND = ("error", "empty mask (warn)")
# Detections passed on to segmentation, best first: the detector proposes up to 900 boxes and
# overlapping duplicates of one object are common; each segmented box costs a SAM decoder pass.
MAX_CANDIDATES = 8
NMS_IOU = 0.5


@dataclass
class Detections:
    """Boxes (N x 4, x0 y0 x1 y1 pixels) with their scores (N), best first."""
    boxes: torch.Tensor
    scores: torch.Tensor

    def __len__(self):
        return int(self.boxes.shape[0])

    def take(self, index) -> "Detections":
        return Detections(self.boxes[index], self.scores[index])


class NothingFound(ValueError):
    """The detector found nothing above the thresholds."""


# Grounding DINO reads at most 256 tokens of its text (its max_text_len; BERT's position table
# ends at 512, and a longer text fails inside BERT with "index out of range in self"). BERT's
# WordPiece makes at most one token of each character, so a caption of this many characters,
# plus [CLS] and [SEP], always fits: checked at queue time, without loading the tokenizer.
MAX_CAPTION_CHARACTERS = 250


def caption_for(text: str) -> str:
    """'Dog' -> 'dog.': Grounding DINO was trained on lower-case phrases ending with a dot."""
    words = " ".join(str(text).split()).lower().rstrip(" .,;")
    if not words:
        raise ValueError("the text is empty: type what the subject is, e.g. 'dog'")
    if len(words) + 1 > MAX_CAPTION_CHARACTERS:
        raise ValueError(f"the text is {len(words) + 1} characters long; Grounding DINO reads at most 256 tokens of it "
                         f"(its BERT text encoder 512): describe the subject in a few words, at most "
                         f"{MAX_CAPTION_CHARACTERS} characters, e.g. 'dog'")
    return words + "."


def boxes_to_pixels(boxes_cxcywh: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Normalised centre/size boxes (the detector's output) -> x0 y0 x1 y1 pixels inside the image."""
    cx, cy, w, h = boxes_cxcywh.float().unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    scale = torch.tensor([width, height, width, height], dtype=xyxy.dtype)
    xyxy = xyxy * scale
    xyxy[..., 0::2] = xyxy[..., 0::2].clamp(0, width)
    xyxy[..., 1::2] = xyxy[..., 1::2].clamp(0, height)
    return xyxy


def select_detections(token_scores: torch.Tensor, boxes_cxcywh: torch.Tensor, word_positions: list,
                      box_threshold: float, text_threshold: float, width: int, height: int) -> Detections:
    """Grounding DINO's rule: a query is a detection when its best token score exceeds the box
    threshold; we also ask that at least one word of the text (not [CLS]/[SEP]/'.') exceeds the
    text threshold. token_scores: Q x T sigmoid scores; boxes: Q x 4 normalised cx cy w h."""
    scores = token_scores.float().max(dim=1).values
    keep = scores > box_threshold
    if word_positions:
        words = token_scores.float()[:, list(word_positions)].max(dim=1).values
        keep &= words > text_threshold
    else:
        keep &= False
    boxes = boxes_to_pixels(boxes_cxcywh[keep], width, height)
    scores = scores[keep]
    order = torch.argsort(scores, descending=True)
    return Detections(boxes[order], scores[order])


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def non_max_suppression(detections: Detections, iou: float = NMS_IOU, limit: int | None = None) -> Detections:
    """Greedy NMS over detections sorted best first; at most ``limit`` (MAX_CANDIDATES) survive."""
    limit = limit or MAX_CANDIDATES
    if len(detections) == 0:
        return detections
    order = torch.argsort(detections.scores, descending=True)
    boxes = detections.boxes[order]
    overlaps = box_iou(boxes, boxes)
    kept = []
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if suppressed[i]:
            continue
        kept.append(i)
        if len(kept) == limit:
            break
        suppressed |= overlaps[i] > iou
    return detections.take(order[torch.tensor(kept, dtype=torch.long)])


def choose_mask(masks: torch.Tensor, scores: torch.Tensor, rule: str) -> tuple:
    """Which segmented detection(s) make the subject mask. masks: K x H x W (bool or float);
    scores: K. Returns (H x W float mask, list of chosen indices).
    - largest: the detection whose mask covers the most pixels (the method's rule);
    - most confident: the detection the detector scored highest;
    - union: every detection together."""
    if rule not in KEEP_RULES:
        raise ValueError(f"unknown keep rule '{rule}', choose one of {KEEP_RULES}")
    if masks.shape[0] == 0:
        raise ValueError("no masks to choose from")
    binary = masks > 0.5 if masks.dtype != torch.bool else masks
    if rule == "union":
        return binary.any(dim=0).float(), list(range(masks.shape[0]))
    if rule == "largest":
        index = int(torch.argmax(binary.flatten(1).sum(dim=1)))
    else:
        index = int(torch.argmax(scores))
    return binary[index].float(), [index]


def grow_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow (positive) or shrink (negative) a mask by whole pixels with a square structuring
    element (max-pool to grow, min-pool to shrink; separable, so cost is linear in ``pixels``).
    Accepts H x W or B x H x W; returns the same shape and dtype float."""
    pixels = int(pixels)
    if pixels == 0:
        return mask.float()
    squeeze = mask.ndim == 2
    m = mask.float()
    m = m[None, None] if squeeze else m[:, None]
    r = abs(pixels)
    if pixels < 0:
        m = 1.0 - m  # shrinking the subject = growing the background
    # Outside the image counts for nothing, so a subject cut by the frame is not eaten from there.
    m = F.pad(m, (r, r, r, r), value=0.0)
    m = F.max_pool2d(m, kernel_size=(1, 2 * r + 1), stride=1)
    m = F.max_pool2d(m, kernel_size=(2 * r + 1, 1), stride=1)
    if pixels < 0:
        m = 1.0 - m
    return m[0, 0] if squeeze else m[:, 0]


def draw_box(image: torch.Tensor, box, color, thickness: int) -> None:
    """Outline a box in place on an H x W x 3 image."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    x0, x1 = max(0, min(x0, w - 1)), max(0, min(x1, w))
    y0, y1 = max(0, min(y0, h - 1)), max(0, min(y1, h))
    if x1 <= x0 or y1 <= y0:
        return
    c = torch.tensor(color, dtype=image.dtype)
    t = thickness
    image[y0:min(y0 + t, y1), x0:x1] = c
    image[max(y1 - t, y0):y1, x0:x1] = c
    image[y0:y1, x0:min(x0 + t, x1)] = c
    image[y0:y1, max(x1 - t, x0):x1] = c


PREVIEW_TINT = (1.0, 0.15, 0.1)
CHOSEN_BOX = (0.1, 1.0, 0.2)
OTHER_BOX = (1.0, 0.85, 0.0)


def preview(image: torch.Tensor, mask: torch.Tensor, boxes: torch.Tensor | None = None, chosen=()) -> torch.Tensor:
    """The photo with the mask tinted red, chosen boxes in green and other detections in yellow.
    image: H x W x C in [0, 1]; mask: H x W. Returns H x W x 3."""
    rgb = image[..., :3].float() if image.shape[-1] >= 3 else image[..., :1].float().expand(-1, -1, 3)
    out = rgb.clone()
    tint = torch.tensor(PREVIEW_TINT, dtype=out.dtype)
    alpha = 0.5 * mask.float().clamp(0, 1)[..., None]
    out = out * (1 - alpha) + tint * alpha
    if boxes is not None and len(boxes):
        thickness = max(1, round(min(out.shape[:2]) / 200))
        chosen = set(int(i) for i in chosen)
        for i in range(len(boxes)):
            if i not in chosen:
                draw_box(out, boxes[i], OTHER_BOX, thickness)
        for i in sorted(chosen):
            draw_box(out, boxes[i], CHOSEN_BOX, thickness)
    return out.clamp(0, 1)
