"""The similarity networks' side of the memory estimate (memory.py): shape-only copies of
DINOv2 and the image-retrieval network (from a loaded network, or built from the shapes in a
weight file without reading its data), their weight bytes, and what one embedding keeps."""
from __future__ import annotations

import copy
import functools
import itertools
import logging
import os

import torch

from .memory_shapes import ActivationCount, NoInit, count_kept, meta_copy, remembered

log = logging.getLogger("siso")

NETWORK_BLOCKS = ("Block", "ResidualAttentionBlock")     # timm's ViT blocks, checkpointed by set_grad_checkpointing


def network_activations(network, image_shape, device_type: str, dtype: torch.dtype) -> ActivationCount:
    """One embedding of the decoded image (``network``: a FeatureNetwork on the meta device)."""
    def count():
        image = torch.zeros(image_shape, device="meta", requires_grad=True)
        return count_kept(lambda: network.embed(image), [network.module], NETWORK_BLOCKS, dtype, device_type)
    return remembered(network.module, ("network", tuple(image_shape), device_type, dtype), count)


def _shapes(path: str) -> dict:
    """name -> (shape, dtype) of a weight file's tensors, without reading their data."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), None) for k in f.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _depth(keys, pattern: str) -> int:
    import re
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def meta_network(kind: str, path: str | None, dtype: torch.dtype = torch.float32):
    """A shape-only FeatureNetwork of the architecture in ``path`` (widths and depths read from
    its tensor shapes), or of the published architecture when the file cannot be read."""
    try:
        stamp = (os.path.abspath(path), os.path.getmtime(path), os.path.getsize(path))
    except (OSError, TypeError):
        stamp = None
    return _meta_network(kind, path if stamp else None, stamp, dtype)


@functools.lru_cache(maxsize=4)
def _meta_network(kind: str, path: str | None, stamp, dtype: torch.dtype):
    from . import feature_networks as fn
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    import timm
    shapes = {}
    if path:
        try:
            shapes = _shapes(path)
        except Exception as error:  # the loader reports the file's problem later, with its own message
            log.debug("SISO memory estimate: %s unreadable (%s); published architecture assumed", path, error)
    with torch.device("meta"), NoInit():
        if kind == "dino":
            shapes = {k[len("module."):] if k.startswith("module.") else k: v for k, v in shapes.items()}
            width = shapes["cls_token"][0][-1] if "cls_token" in shapes else 1024
            depth = _depth(shapes, r"blocks\.(\d+)\.") or 24
            module = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=fn.DINO_IMAGE_SIZE,
                                       embed_dim=width, depth=depth, num_heads=width // fn.DINO_HEAD_DIM, num_classes=0)
            network = fn.FeatureNetwork(module, fn.DINO_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, "DINOv2 (shapes)")
        else:
            cut = {}
            for key, value in shapes.items():
                key = key.split("module.")[-1]
                cut["visual." + key[len("backbone."):] if key.startswith("backbone.") else key] = value
            width = cut["visual.class_embedding"][0][-1] if "visual.class_embedding" in cut else 1280
            depth = _depth(cut, r"visual\.transformer\.resblocks\.(\d+)\.") or 32
            proj = cut["visual.proj"][0][-1] if "visual.proj" in cut else 1024
            module = fn.IRNetwork(fn._build_ir_backbone(width, depth, proj), torch.nn.Linear(proj, fn.IR_EMBED_DIM))
            network = fn.FeatureNetwork(module, fn.IR_IMAGE_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "IR (shapes)")
    network.module.to(dtype).eval().requires_grad_(False)   # stored in the compute precision, as the cache keeps them
    return network


def network_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


def meta_feature_network(network):
    shaped = copy.copy(network)
    shaped.module = meta_copy(network.module)
    shaped.interrupt_hooks = []
    shaped.set_checkpointing(False)     # the copy's own flag: one pass counts both ways
    return shaped
