"""Tiny random-weight stand-ins built with ComfyUI's own model classes, and similarity-network
files written in the published key layouts. Nothing here is a trained weight."""
from __future__ import annotations

import torch

import comfy.model_base
import comfy.model_patcher
import comfy.sd
import comfy.supported_models

CPU = torch.device("cpu")

_UNET_COMMON = dict(use_checkpoint=False, image_size=32, out_channels=4, in_channels=4, use_spatial_transformer=True,
                    legacy=False, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
                    use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float32)
FAMILIES = {
    # SD2.x and SDXL configs force 64-channel attention heads, hence 64 model channels there.
    "sd15": (comfy.supported_models.SD15, dict(_UNET_COMMON, adm_in_channels=None, transformer_depth=[1, 1],
             transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1], use_linear_in_transformer=False,
             context_dim=768, num_heads=4), None),
    "sd2_eps": (comfy.supported_models.SD20, dict(_UNET_COMMON, adm_in_channels=None, transformer_depth=[1, 1],
                transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1], use_linear_in_transformer=True,
                context_dim=1024, model_channels=64), comfy.model_base.ModelType.EPS),
    "sd2_v": (comfy.supported_models.SD20, dict(_UNET_COMMON, adm_in_channels=None, transformer_depth=[1, 1],
              transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1], use_linear_in_transformer=True,
              context_dim=1024, model_channels=64), comfy.model_base.ModelType.V_PREDICTION),
    "sdxl": (comfy.supported_models.SDXL, dict(_UNET_COMMON, num_classes="sequential", adm_in_channels=2816,
             transformer_depth=[0, 1], transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1],
             use_linear_in_transformer=True, context_dim=2048, model_channels=64), None),
    "flux_schnell": (comfy.supported_models.FluxSchnell, dict(image_model="flux", in_channels=16, out_channels=16,
                     vec_in_dim=32, context_in_dim=64, hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1,
                     depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
                     guidance_embed=False), None),
    "flux_dev": (comfy.supported_models.Flux, dict(image_model="flux", in_channels=16, out_channels=16,
                 vec_in_dim=32, context_in_dim=64, hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1,
                 depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
                 guidance_embed=True), None),
}
# ComfyUI 0.33's FluxParams requires txt_ids_dims (which text-position axes get RoPE ids;
# Flux.1 has none: [] as its model detection sets); 0.3.75's has no such field.
import dataclasses  # noqa: E402
import comfy.ldm.flux.model  # noqa: E402
if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
    for _family in ("flux_schnell", "flux_dev"):
        FAMILIES[_family][1]["txt_ids_dims"] = []
CONTEXT = {"sd15": (768, None), "sd2_eps": (1024, None), "sd2_v": (1024, None), "sdxl": (2048, 1280),
           "flux_schnell": (64, 32), "flux_dev": (64, 32)}


def init_random(module: torch.nn.Module, seed: int = 0, std: float = 0.02):
    """Deterministic random init for layers ComfyUI leaves uninitialised (torch.empty)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim == 1 and (name.endswith("weight") or name.endswith("scale") or "norm" in name) and not name.endswith("bias"):
                p.copy_(torch.ones_like(p) + 0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def build_model(family: str, seed: int = 0, inference: bool = True):
    """A MODEL (ModelPatcher) of the family, built in inference mode as ComfyUI's loaders do
    (``inference=False``: with normal tensors that require grad, as a custom loader might)."""
    config_cls, unet_config, model_type = {**FAMILIES, **FULL_SIZE}[family]
    with torch.inference_mode(inference):
        config = config_cls(dict(unet_config))
        config.set_inference_dtype(torch.float32, None)
        if model_type is None:
            base = config.get_model({})
        else:
            base = comfy.model_base.BaseModel(config, model_type=model_type)
        init_random(base.diffusion_model, seed, std=0.05)
        return comfy.model_patcher.ModelPatcher(base, load_device=CPU, offload_device=CPU)


def vae_config(latent_channels: int = 4):
    return {"params": {"embed_dim": latent_channels, "ddconfig": {
        "double_z": True, "z_channels": latent_channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


def build_vae(latent_channels: int = 4, seed: int = 1):
    from comfy.ldm.models.autoencoder import AutoencoderKL
    with torch.inference_mode():
        cfg = vae_config(latent_channels)
        module = AutoencoderKL(**cfg["params"])
        init_random(module, seed, std=0.05)
        vae = comfy.sd.VAE(sd=module.state_dict(), config=cfg)
        # what ComfyUI's detection sets for a VAE loaded from a file (the config path keeps 4)
        vae.latent_channels = latent_channels
        return vae


def conditioning(family: str, seed: int = 0, tokens: int = 8):
    dim, pooled = CONTEXT[family]
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        extra = {}
        if pooled:
            extra["pooled_output"] = torch.randn(1, pooled, generator=g)
        if family == "flux_dev":
            extra["guidance"] = 3.5
        return [[torch.randn(1, tokens, dim, generator=g), extra]]


# ----------------------------------------------------------------- similarity network files
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
    import os
    import safetensors.torch
    os.makedirs(folder, exist_ok=True)
    safetensors.torch.save_file(dino_state_dict(meta_format=False, seed=seed), os.path.join(folder, "dinov2_vitl14.safetensors"))
    torch.save(ir_state_dict(module_prefix=True, seed=seed + 1), os.path.join(folder, "ir_features.pth"))
    return "dinov2_vitl14.safetensors", "ir_features.pth"


# ----------------------------------------------------------------- full-size architectures (benchmarks)
_FULL_COMMON = dict(use_checkpoint=False, image_size=32, out_channels=4, in_channels=4, use_spatial_transformer=True,
                    legacy=False, model_channels=320, use_temporal_attention=False, use_temporal_resblock=False,
                    dtype=torch.float32, num_head_channels=64)
FULL_SIZE = {
    # SD 2.1 UNet (SD-Turbo), random weights
    "sd_turbo": (comfy.supported_models.SD20,
                 dict(_FULL_COMMON, adm_in_channels=None, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                      transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                      transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_linear_in_transformer=True,
                      context_dim=1024), comfy.model_base.ModelType.EPS),
    # SDXL UNet (SDXL-Turbo), random weights
    "sdxl_turbo": (comfy.supported_models.SDXL,
                   dict(_FULL_COMMON, num_classes="sequential", adm_in_channels=2816, channel_mult=[1, 2, 4],
                        num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_linear_in_transformer=True,
                        context_dim=2048), None),
}
CONTEXT.update({"sd_turbo": (1024, None), "sdxl_turbo": (2048, 1280)})
