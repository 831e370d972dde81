"""Similarity-network files in the published key layouts, with random values (nothing here is a
trained weight): DINOv2 in Meta's and timm's layouts, the IR checkpoint in the SISO authors'
layout. Plain torch and safetensors, no ComfyUI: the method's tests (``make test-method``, also
with the oldest timm, safetensors and numpy the pack supports) and the ComfyUI suite (through
``tiny``) both write their files with these."""
import os

import safetensors.torch
import torch


def _vit_blocks(prefix, width, depth, g, names):
    sd = {}
    for i in range(depth):
        for key, shape in names(width):
            sd[f"{prefix}{i}.{key}"] = _rand(shape, key, g)
    return sd


def _rand(shape, key, g):
    if key.endswith(("norm1.weight", "norm2.weight", "ln_1.weight", "ln_2.weight", "gamma")) or key in ("norm.weight",):
        return torch.ones(shape) + 0.05 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * 0.02


def dino_state_dict(width=128, depth=2, meta_format=True, seed=0):
    """DINOv2 ViT/14 at 518 px: Meta's key layout (with mask_token) or timm's (without)."""
    g = torch.Generator().manual_seed(seed)
    block = lambda w: [("norm1.weight", (w,)), ("norm1.bias", (w,)), ("attn.qkv.weight", (3 * w, w)),
                       ("attn.qkv.bias", (3 * w,)), ("attn.proj.weight", (w, w)), ("attn.proj.bias", (w,)),
                       ("ls1.gamma", (w,)), ("norm2.weight", (w,)), ("norm2.bias", (w,)),
                       ("mlp.fc1.weight", (4 * w, w)), ("mlp.fc1.bias", (4 * w,)), ("mlp.fc2.weight", (w, 4 * w)),
                       ("mlp.fc2.bias", (w,)), ("ls2.gamma", (w,))]
    sd = {"cls_token": torch.randn(1, 1, width, generator=g) * 0.02,
          "pos_embed": torch.randn(1, 37 * 37 + 1, width, generator=g) * 0.02,
          "patch_embed.proj.weight": torch.randn(width, 3, 14, 14, generator=g) * 0.02,
          "patch_embed.proj.bias": torch.zeros(width),
          "norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)}
    if meta_format:
        sd["mask_token"] = torch.zeros(1, width)
    sd.update(_vit_blocks("blocks.", width, depth, g, block))
    return sd


def ir_state_dict(width=160, depth=2, proj=32, module_prefix=False, seed=0, with_fc2=True, tower="backbone."):
    """The IR checkpoint layout, key names written out by hand: the state dict of the SISO
    authors' wrapper (``add_layer_model``: ``backbone`` = OpenCLIP's visual tower with 577
    positions, ``fc1``, ``fc2``), which their loader reads with ``strict=True``.
    ``tower="visual."``: the same tower under OpenCLIP's own prefix."""
    g = torch.Generator().manual_seed(seed)
    block = lambda w: [("ln_1.weight", (w,)), ("ln_1.bias", (w,)), ("attn.in_proj_weight", (3 * w, w)),
                       ("attn.in_proj_bias", (3 * w,)), ("attn.out_proj.weight", (w, w)), ("attn.out_proj.bias", (w,)),
                       ("ln_2.weight", (w,)), ("ln_2.bias", (w,)), ("mlp.c_fc.weight", (4 * w, w)),
                       ("mlp.c_fc.bias", (4 * w,)), ("mlp.c_proj.weight", (w, 4 * w)), ("mlp.c_proj.bias", (w,))]
    sd = {f"{tower}class_embedding": torch.randn(width, generator=g) * 0.02,
          f"{tower}positional_embedding": torch.randn(577, width, generator=g) * 0.02,
          f"{tower}conv1.weight": torch.randn(width, 3, 14, 14, generator=g) * 0.02,
          f"{tower}ln_pre.weight": torch.ones(width), f"{tower}ln_pre.bias": torch.zeros(width),
          f"{tower}ln_post.weight": torch.ones(width), f"{tower}ln_post.bias": torch.zeros(width),
          f"{tower}proj": torch.randn(width, proj, generator=g) * 0.05,
          "fc1.weight": torch.randn(64, proj, generator=g) * 0.1, "fc1.bias": torch.zeros(64)}
    if with_fc2:
        sd["fc2.weight"] = torch.randn(10, 64, generator=g)
    sd.update(_vit_blocks(f"{tower}transformer.resblocks.", width, depth, g, block))
    if module_prefix:
        sd = {f"module.{k}": v for k, v in sd.items()}
    return sd


def write_feature_files(folder, seed=0):
    """Tiny DINO (.safetensors, timm layout) and IR (.pth, module. prefix) files; returns names."""
    os.makedirs(folder, exist_ok=True)
    safetensors.torch.save_file(dino_state_dict(meta_format=False, seed=seed), os.path.join(folder, "dinov2_vitl14.safetensors"))
    torch.save(ir_state_dict(module_prefix=True, seed=seed + 1), os.path.join(folder, "ir_features.pth"))
    return "dinov2_vitl14.safetensors", "ir_features.pth"
