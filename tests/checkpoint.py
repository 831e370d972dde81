"""A small random-weight single-file SD1.5 checkpoint that ComfyUI's stock CheckpointLoaderSimple
detects as SD15 and loads (comfy.sd.load_checkpoint_guess_config).

Every part is built with ComfyUI's own classes so the key layout is exactly what ComfyUI writes and
reads: the UNet is a shallow SD1.5 UNet (model_channels 320, context_dim 768, channel_mult [1, 2],
one res block per level, transformer depth 1 - the keys model detection needs to pick SD15), the
VAE is the full-size SD VAE and the text encoder is CLIP-L. Values are random (fp16, about 550 MB);
nothing here is a trained weight. Write it to a temporary folder, never into the repository.
"""
from __future__ import annotations

import os

import torch

import comfy.ops
import comfy.sd1_clip
import comfy.supported_models
from comfy.ldm.models.autoencoder import AutoencoderKL

import tiny

# The SD1.5 UNet shape, cut down to two levels with one res block and a depth-1 transformer each.
SD15_UNET = dict(
    use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False, use_spatial_transformer=True,
    legacy=False, adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
    num_heads=8, num_head_channels=-1, dtype=torch.float32)

# The standard SD VAE (same ddconfig as every SD1.x/2.x checkpoint).
SD_VAE = dict(embed_dim=4, ddconfig={
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0})


def _prefixed(prefix: str, state_dict: dict, dtype) -> dict:
    return {prefix + k: v.detach().to(dtype).contiguous() for k, v in state_dict.items()}


def unet_state_dict(seed: int = 0) -> dict:
    config = comfy.supported_models.SD15(dict(SD15_UNET))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    tiny.init_random(base.diffusion_model, seed, std=0.02)
    return base.diffusion_model.state_dict()


def vae_state_dict(seed: int = 1) -> dict:
    module = AutoencoderKL(**SD_VAE)
    tiny.init_random(module, seed, std=0.02)
    return module.state_dict()


def clip_state_dict(seed: int = 2) -> dict:
    """CLIP-L text model keys as SD1.5 checkpoints store them: ``transformer.text_model.*``."""
    module = comfy.sd1_clip.SDClipModel(dtype=torch.float32)
    tiny.init_random(module, seed, std=0.02)
    return {k: v for k, v in module.state_dict().items() if k.startswith("transformer.text_model.")}


def tiny_sd15_state_dict(seed: int = 0, dtype=torch.float16) -> dict:
    with torch.inference_mode(False), torch.no_grad():
        sd = {}
        sd.update(_prefixed("model.diffusion_model.", unet_state_dict(seed), dtype))
        sd.update(_prefixed("first_stage_model.", vae_state_dict(seed + 1), dtype))
        sd.update(_prefixed("cond_stage_model.", clip_state_dict(seed + 2), dtype))
    return sd


def write_tiny_sd15_checkpoint(path, seed: int = 0) -> str:
    """Write the checkpoint to ``path`` (a .safetensors file); returns the path."""
    import safetensors.torch
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sd = tiny_sd15_state_dict(seed)
    tmp = path + ".part"
    safetensors.torch.save_file(sd, tmp, metadata={"format": "pt", "siso.note": "random tiny SD1.5 test checkpoint"})
    os.replace(tmp, path)
    return path


if __name__ == "__main__":  # python tests/checkpoint.py OUT.safetensors  (with ComfyUI on sys.path)
    import sys
    print(write_tiny_sd15_checkpoint(sys.argv[1]))
