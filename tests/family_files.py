"""Model files of the new (DiT) families written with random weights in the layout of the published
files, small enough to be cheap, for ComfyUI's stock loaders to detect. Nothing here is a trained
weight; write them to a temporary folder, never into the repository.

SD3 Medium (``sd3_medium.safetensors``, the file without text encoders): a single-file checkpoint
that CheckpointLoaderSimple detects as SD3 (comfy.model_detection: ``joint_blocks.0.context_block
.attn.qkv.weight`` -> MMDiT, every width read from the shapes) with the 16-channel SD3 VAE under
``first_stage_model.`` (comfy.sd.VAE: ``decoder.conv_in.weight`` with 16 input channels and no
quant convs -> AutoencodingEngine). What is cut down, and where detection allows it:

* the MMDiT: depth 2 (hidden 128 = 64 x depth, 2 heads, 2 joint blocks; sd3_medium: depth 24,
  hidden 1536), a 32 x 32 position-embedding grid (sd3_medium: 192 x 192); patch 2 and 16
  latent channels as published. Detection reads depth from ``x_embedder.proj.weight``, the grid
  from ``pos_embed``, the text widths from ``context_embedder.weight`` and ``y_embedder.mlp.0.weight``.
* the text widths: 768 for the token context and 768 for the pooled vector, the widths of the
  CLIP-L text encoder in the test suite's tiny SD1.5 checkpoint (tests/checkpoint.py), so stock
  CLIPTextEncode with that CLIP conditions this model (sd3_medium: 4096 = T5-XXL, 2048 = CLIP-L +
  CLIP-G pooled, three text encoders of 5+ GB shipped as separate files).
* nothing in the VAE: comfy.sd.VAE builds the full SD VAE (ch 128, ch_mult 1 2 4 4, 2 res blocks)
  whatever the shapes say, so the file holds it at full size (84 M parameters, fp16).

``sd3_medium_layout`` spells the published key names and shapes out by hand (from the SD3
reference MMDiT and the LDM autoencoder, not from ComfyUI's classes); the writer builds the
weights with ComfyUI's own classes and refuses to write unless the two agree key for key.
"""
from __future__ import annotations

import os

import numpy as np
import torch

import comfy.supported_models
from comfy.ldm.models.autoencoder import AutoencodingEngine
from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

import tiny

# The tiny MMDiT, as comfy.model_detection.detect_unet_config reads it back from the weights.
SD3_DEPTH = 2                       # hidden = 64 * depth, heads = depth, joint blocks = depth
SD3_HIDDEN = 64 * SD3_DEPTH
SD3_CONTEXT_WIDTH = 768             # CLIP-L's token width (tests/checkpoint.py's CLIP)
SD3_POOLED_WIDTH = 768              # CLIP-L's pooled (projected) width
SD3_POS_EMBED_MAX_SIZE = 32         # latent side up to 64 (512 px) at patch 2
SD3_UNET = dict(in_channels=16, out_channels=16, patch_size=2, depth=SD3_DEPTH, input_size=None,
                adm_in_channels=SD3_POOLED_WIDTH,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": SD3_CONTEXT_WIDTH, "out_features": SD3_HIDDEN}},
                num_patches=SD3_POS_EMBED_MAX_SIZE ** 2, pos_embed_max_size=SD3_POS_EMBED_MAX_SIZE,
                pos_embed_scaling_factor=None, x_block_self_attn_layers=[], dtype=torch.float32)
# The SD3 VAE (sd3_medium's first_stage_model; ae.safetensors of Flux has the same layout).
SD3_VAE = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
           "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


# ----------------------------------------------------------------- the published layout, by hand
def _linear(prefix, out_features, in_features):
    return {f"{prefix}.weight": (out_features, in_features), f"{prefix}.bias": (out_features,)}


def _mmdit_layout(depth, context_width, pooled_width, grid, in_channels=16, patch=2):
    h = 64 * depth
    keys = {"pos_embed": (1, grid * grid, h),
            "x_embedder.proj.weight": (h, in_channels, patch, patch), "x_embedder.proj.bias": (h,)}
    keys.update(_linear("context_embedder", h, context_width))
    keys.update(_linear("t_embedder.mlp.0", h, 256))
    keys.update(_linear("t_embedder.mlp.2", h, h))
    keys.update(_linear("y_embedder.mlp.0", h, pooled_width))
    keys.update(_linear("y_embedder.mlp.2", h, h))
    for i in range(depth):
        for stream in ("x_block", "context_block"):
            block = f"joint_blocks.{i}.{stream}"
            # the last block's context stream is "pre only": it gives keys and values to the joint
            # attention and nothing after it (2 modulation vectors instead of 6, no proj, no MLP)
            pre_only = stream == "context_block" and i == depth - 1
            keys.update(_linear(f"{block}.adaLN_modulation.1", (2 if pre_only else 6) * h, h))
            keys.update(_linear(f"{block}.attn.qkv", 3 * h, h))
            if not pre_only:
                keys.update(_linear(f"{block}.attn.proj", h, h))
                keys.update(_linear(f"{block}.mlp.fc1", 4 * h, h))
                keys.update(_linear(f"{block}.mlp.fc2", h, 4 * h))
    keys.update(_linear("final_layer.adaLN_modulation.1", 2 * h, h))
    keys.update(_linear("final_layer.linear", patch * patch * in_channels, h))
    return keys


def _kl_autoencoder_layout(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16):
    """The LDM autoencoder's keys (encoder.* / decoder.*, no quant convs as in SD3's and Flux's VAE)."""
    keys = {}

    def conv(prefix, cout, cin, k=3):
        keys[f"{prefix}.weight"], keys[f"{prefix}.bias"] = (cout, cin, k, k), (cout,)

    def norm(prefix, c):
        keys[f"{prefix}.weight"], keys[f"{prefix}.bias"] = (c,), (c,)

    def resnet(prefix, cin, cout):
        norm(f"{prefix}.norm1", cin)
        conv(f"{prefix}.conv1", cout, cin)
        norm(f"{prefix}.norm2", cout)
        conv(f"{prefix}.conv2", cout, cout)
        if cin != cout:
            conv(f"{prefix}.nin_shortcut", cout, cin, 1)

    def mid(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{name}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    levels = len(ch_mult)
    conv("encoder.conv_in", ch, 3)
    block_in = ch
    for level, mult in enumerate(ch_mult):
        for b in range(num_res_blocks):
            resnet(f"encoder.down.{level}.block.{b}", block_in, ch * mult)
            block_in = ch * mult
        if level != levels - 1:
            conv(f"encoder.down.{level}.downsample.conv", block_in, block_in)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", 2 * z_channels, block_in)

    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", block_in, z_channels)
    mid("decoder", block_in)
    for level in reversed(range(levels)):
        for b in range(num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{b}", block_in, ch * ch_mult[level])
            block_in = ch * ch_mult[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", 3, block_in)
    return keys


def sd3_medium_layout(depth=SD3_DEPTH, context_width=SD3_CONTEXT_WIDTH, pooled_width=SD3_POOLED_WIDTH,
                      grid=SD3_POS_EMBED_MAX_SIZE) -> dict:
    """{key: shape} of sd3_medium.safetensors (MMDiT + VAE, no text encoders) at these sizes.
    ``sd3_medium_layout(24, 4096, 2048, 192)`` is the published file's."""
    keys = {f"model.diffusion_model.{k}": v for k, v in _mmdit_layout(depth, context_width, pooled_width, grid).items()}
    keys.update({f"first_stage_model.{k}": v for k, v in _kl_autoencoder_layout().items()})
    return keys


# ----------------------------------------------------------------- the weights, built with ComfyUI's classes
def sd3_mmdit_state_dict(seed: int = 0) -> dict:
    config = comfy.supported_models.SD3(dict(SD3_UNET))
    config.set_inference_dtype(torch.float32, None)
    diffusion = config.get_model({}).diffusion_model
    tiny.init_random(diffusion, seed, std=0.02)
    # pos_embed is a buffer (ComfyUI leaves it empty): the fixed 2-D sin-cos table SD3 ships
    grid = get_2d_sincos_pos_embed(SD3_HIDDEN, SD3_POS_EMBED_MAX_SIZE)
    diffusion.pos_embed.copy_(torch.from_numpy(np.asarray(grid, dtype=np.float32)).unsqueeze(0))
    return diffusion.state_dict()


def sd3_vae_state_dict(seed: int = 1) -> dict:
    params = {"target": "comfy.ldm.modules.diffusionmodules.model.{}", "params": SD3_VAE}
    module = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config=dict(params, target=params["target"].format("Encoder")),
        decoder_config=dict(params, target=params["target"].format("Decoder")))
    tiny.init_random(module, seed, std=0.02)
    return module.state_dict()


def tiny_sd3_state_dict(seed: int = 0, dtype=torch.float16) -> dict:
    with torch.inference_mode(False), torch.no_grad():
        sd = {f"model.diffusion_model.{k}": v.detach().to(dtype).contiguous() for k, v in sd3_mmdit_state_dict(seed).items()}
        sd.update({f"first_stage_model.{k}": v.detach().to(dtype).contiguous()
                   for k, v in sd3_vae_state_dict(seed + 1).items()})
    expected = sd3_medium_layout()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != expected:
        extra, missing = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
        shapes = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise AssertionError(f"ComfyUI's SD3 classes no longer give sd3_medium's layout: not published {extra[:5]}, "
                             f"missing {missing[:5]}, other shapes {[(k, got[k], expected[k]) for k in shapes[:5]]}")
    return sd


def write_tiny_sd3_checkpoint(path, seed: int = 0) -> str:
    """Write the checkpoint to ``path`` (a .safetensors file, about 170 MB); returns the path."""
    import safetensors.torch
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part"
    safetensors.torch.save_file(tiny_sd3_state_dict(seed), tmp,
                                metadata={"format": "pt", "siso.note": "random tiny SD3 test checkpoint"})
    os.replace(tmp, path)
    return path



# ----------------------------------------------------------------- Flux.2 [klein]: a diffusion model + a VAE file
# What UNETLoader and VAELoader read for the refine route (tests/test_today_templates.py). Detection
# (comfy.model_detection) recognises Flux.2 by ``double_stream_modulation_img.lin.weight`` and reads
# the widths from the weights; ComfyUI 0.33 derives the heads from the width (hidden / 128), while
# 0.3.75 fixes 48 heads of 128 channels (a 6144-wide model: no tiny file detects there).
# The tiny model: hidden 128 (1 head), one double and one single block, no guidance embedding
# (klein is guidance-distilled), 768-wide text tokens: the CLIP-L width of the suite's tiny SD1.5
# checkpoint, whose CLIPTextEncode output conditions it (klein's real Qwen3-4B encoder is 8 GB).
FLUX2_HIDDEN = 128
FLUX2_CONTEXT_WIDTH = 768
FLUX2_UNET = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                  context_in_dim=FLUX2_CONTEXT_WIDTH, hidden_size=FLUX2_HIDDEN, mlp_ratio=3.0, num_heads=FLUX2_HIDDEN // 128,
                  depth=1, depth_single_blocks=1, axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False,
                  guidance_embed=False, global_modulation=True, mlp_silu_act=True, ops_bias=False,
                  default_ref_method="index", ref_index_scale=10.0, dtype=torch.float32)
# Flux.2's VAE as its file is laid out: the SD autoencoder (detection fixes ch 128, ch_mult 1 2 4 4)
# with 32 latent channels, quant convs and a batch norm over the 2x2-patchified latent.
FLUX2_VAE = dict(SD3_VAE, z_channels=32, batch_norm_latent=True)


def flux2_unet_config() -> dict:
    import dataclasses
    from comfy.ldm.flux.model import FluxParams
    config = dict(FLUX2_UNET)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
        config["txt_ids_dims"] = [3]     # 0.33's field (0.3.75 hard-codes it)
    return config


def tiny_flux2_state_dict(seed: int = 0) -> dict:
    import comfy.model_detection
    with torch.inference_mode(False), torch.no_grad():
        config = comfy.supported_models.Flux2(flux2_unet_config())
        config.set_inference_dtype(torch.float32, None)
        diffusion = config.get_model({}).diffusion_model
        tiny.init_random(diffusion, seed, std=0.02)
        sd = {k: v.detach().clone().contiguous() for k, v in diffusion.state_dict().items()}
    detected = comfy.model_detection.detect_unet_config(sd, "")
    wanted = {k: FLUX2_UNET[k] for k in ("image_model", "hidden_size", "num_heads", "context_in_dim", "in_channels", "depth",
                                         "depth_single_blocks", "guidance_embed")}
    got = {k: detected.get(k) for k in wanted}
    if got != wanted:
        raise AssertionError(f"this ComfyUI reads the tiny Flux.2 file as {got}, not {wanted}")
    return sd


def tiny_flux2_vae_state_dict(seed: int = 1, dtype=torch.float16) -> dict:
    from comfy.ldm.models.autoencoder import AutoencoderKL
    with torch.inference_mode(False), torch.no_grad():
        module = AutoencoderKL(embed_dim=32, ddconfig=dict(FLUX2_VAE))
        tiny.init_random(module, seed, std=0.02)
        module.bn.running_mean.zero_()
        module.bn.running_var.fill_(1.0)
        return {k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in module.state_dict().items()}


def write_tiny_flux2_files(unet_path, vae_path, seed: int = 0) -> tuple:
    """The diffusion model (a few MB) and the VAE (about 170 MB at fp16); returns both paths."""
    import safetensors.torch
    out = []
    for path, sd in ((unet_path, tiny_flux2_state_dict(seed)), (vae_path, tiny_flux2_vae_state_dict(seed + 1))):
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        safetensors.torch.save_file(sd, path + ".part", metadata={"format": "pt", "siso.note": "random tiny Flux.2 test file"})
        os.replace(path + ".part", path)
        out.append(path)
    return tuple(out)


if __name__ == "__main__":  # python tests/family_files.py OUT.safetensors  (with ComfyUI on sys.path)
    import sys
    print(write_tiny_sd3_checkpoint(sys.argv[1]))
