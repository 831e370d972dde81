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
# (ComfyUI-free, in tests/method so the method's own venv writes the same files)
from method.network_files import dino_state_dict, ir_state_dict, write_feature_files  # noqa: E402,F401


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
