"""Tiny random-weight stand-ins for the DiT image-model families, built through ComfyUI's own
classes (``comfy.supported_models.<Config>(unet_config).get_model({})`` -> ``ModelPatcher``),
with a tiny VAE of the kind each family really uses and conditioning shaped the way that
family's ``model_base.<Class>.extra_conds`` expects. Nothing here is a trained weight.

Works on ComfyUI 0.3.75 and 0.33.0: the differences between versions are feature-detected
(constructor signatures / dataclass fields / class attributes), never by version string.

As ``tests/tiny.py``, this module expects ComfyUI to be importable already (tests/conftest.py puts
the ComfyUI directory on sys.path and sets ``args.cpu``). Run directly it does that itself and
verifies every family (1 sampler step + VAE decode under inference mode, then a gradient check)::

    .venv/bin/python tests/tiny_families.py                        # the default .comfyui
    .venv-comfyui-0.33.0/bin/python tests/tiny_families.py --comfyui .cache/ComfyUI-0.33.0 [family ...]

Findings the checks here encode (both versions unless said):
  * VAE.decode is not differentiable for a VAE built under inference mode (its weights are
    inference tensors); a deep copy of first_stage_model decodes differentiably for every kind here.
  * process_latent_out of the Wan21 latent format (Qwen-Image, Cosmos) multiplies by per-channel
    mean/std tensors made under inference mode: not differentiable unless the latent format is copied.
  * Flux-layer blocks (Flux.2, Chroma, Chroma Radiance, HunyuanImage 2.1) add into their inputs in
    place (``img += ...``, ``x += ...``) after a LayerNorm saved them: backward needs the norms to
    read copies; activation checkpointing also needs the block inputs cloned.
  * 0.33 routes RoPE / qk-norm+RoPE through comfy_kitchen ops without autograd unless
    ``comfy.model_management.in_training`` is set; Cosmos Predict2's self-attention calls
    ``comfy.quant_ops.ck.rms_rope_split_half`` whatever the flag (no backward on 0.33).

Use from a test::

    import tiny_families as tf
    model = tf.build_model("flux2")          # ModelPatcher, tiny
    vae = tf.build_vae("flux2")              # comfy.sd.VAE of the family's kind, tiny
    positive = tf.conditioning("flux2", 0)   # [[cross_attn, extras]]
    latent = tf.empty_latent("flux2", 64, 64)  # {"samples": zeros of the right shape}
"""
from __future__ import annotations

import dataclasses
import inspect
import sys

if __name__ == "__main__":  # bootstrap ComfyUI as tests/conftest.py does (only when run as a script)
    import argparse
    import pathlib
    import tempfile
    _p = argparse.ArgumentParser()
    _p.add_argument("--comfyui", default=str(pathlib.Path(__file__).resolve().parents[1] / ".comfyui"))
    _p.add_argument("families", nargs="*")
    _ARGS = _p.parse_args()
    sys.path.insert(0, str(pathlib.Path(_ARGS.comfyui).resolve()))
    from comfy.cli_args import args as _cargs
    _cargs.cpu = True
    _cargs.base_directory = tempfile.mkdtemp(prefix="siso-tinyfam-")
    _cargs.disable_api_nodes = True
    import utils.extra_config  # noqa: F401
    import folder_paths  # noqa: F401
    import nodes  # noqa: F401

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models

CPU = torch.device("cpu")


# ----------------------------------------------------------------- feature detection helpers
def _accepted(target) -> tuple[set, set, bool]:
    """(all names, names without a default, takes **kwargs) of a dataclass or a callable."""
    if dataclasses.is_dataclass(target):
        fields = dataclasses.fields(target)
        required = {f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        return {f.name for f in fields}, required, False
    params = inspect.signature(target).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    required = {n for n, p in params.items() if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names, required, any(p.kind == p.VAR_KEYWORD for p in params.values())


def _with_optional(unet_config: dict, target, optional: dict) -> dict:
    """unet_config plus those ``optional`` keys that this ComfyUI's ``target`` (the model class,
    or the params dataclass it builds from **kwargs) knows. Keys of the base config that the
    target does not know raise, so a rename between versions cannot go unnoticed."""
    names, required, var_kw = _accepted(target)
    out = dict(unet_config)
    for key, value in optional.items():
        if key in names:
            out[key] = value
    outside = {"image_model", "final_layer", "dtype", "device", "operations"}  # taken by the model class itself
    missing = required - set(out) - outside - {"self"}
    if missing:
        raise TypeError(f"{getattr(target, '__name__', target)} needs {sorted(missing)} (a new ComfyUI field?)")
    if not var_kw:
        unknown = set(out) - names - outside
        if unknown:
            raise TypeError(f"{getattr(target, '__name__', target)} does not take {sorted(unknown)}")
    return out


def _ldm(path: str):
    import importlib
    return importlib.import_module(f"comfy.ldm.{path}")


# ----------------------------------------------------------------- diffusion model configs
F32 = torch.float32


def _sd3(x_block_self_attn_layers=(), qk_norm=None):
    # MMDiT: hidden = 64 * depth, heads = depth (head_dim 64 fixed); num_blocks sets the block
    # count. Real SD3.5: depth 24/38, adm 2048 (CLIP-L+G pooled), context 4096 (T5), patch 2.
    return dict(in_channels=16, out_channels=16, patch_size=2, depth=1, num_blocks=2, input_size=None,
                adm_in_channels=32, context_embedder_config={"target": "torch.nn.Linear",
                                                              "params": {"in_features": 48, "out_features": 64}},
                num_patches=16 * 16, pos_embed_max_size=16, pos_embed_scaling_factor=None, qk_norm=qk_norm,
                x_block_self_attn_layers=list(x_block_self_attn_layers), dtype=F32)


def _family_table():
    sm = comfy.supported_models
    flux_model = _ldm("flux.model")
    chroma_model = _ldm("chroma.model")
    hy_model = _ldm("hunyuan_video.model")
    qwen_model = _ldm("qwen_image.model")
    t = {}
    t["sd3"] = (sm.SD3, _sd3())
    t["sd35"] = (sm.SD3, _sd3(x_block_self_attn_layers=[0], qk_norm="rms"))  # 3.5 Medium-like (Large: qk_norm only)
    t["auraflow"] = (sm.AuraFlow, dict(in_channels=4, out_channels=4, patch_size=2, dim=64, n_layers=2,
                                       n_double_layers=1, n_heads=2, global_conddim=64, cond_seq_dim=48,
                                       max_seq=16 * 16, dtype=F32))
    # PixArt: hidden must be divisible by 3 with micro conditions (alpha); learn_sigma -> 8 out channels.
    t["pixart_alpha"] = (sm.PixArtAlpha, dict(image_model="pixart_alpha", patch_size=2, in_channels=4, hidden_size=48,
                                              depth=2, num_heads=2, caption_channels=32, model_max_length=16,
                                              input_size=16, micro_condition=True, dtype=F32))
    t["pixart_sigma"] = (sm.PixArtSigma, dict(image_model="pixart_sigma", patch_size=2, in_channels=4, hidden_size=48,
                                              depth=2, num_heads=2, caption_channels=32, model_max_length=16,
                                              input_size=16, micro_condition=False, dtype=F32))
    # Lumina 2 / Z-Image (NextDiT): head_dim = dim / n_heads = sum(axes_dims).
    t["lumina2"] = (sm.Lumina2, dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=32,
                                     n_layers=2, n_refiner_layers=1, qk_norm=True, n_heads=4, n_kv_heads=2,
                                     axes_dims=[4, 6, 6], axes_lens=[300, 64, 64], rope_theta=10000.0,
                                     ffn_dim_multiplier=4.0, multiple_of=16, dtype=F32))
    # Z-Image modulation feeds a 256-wide time embedding into Linear(min(dim, 256)): dim >= 256.
    t["zimage"] = (sm.ZImage, dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=32,
                                   n_layers=2, n_refiner_layers=1, qk_norm=True, n_heads=8, n_kv_heads=8,
                                   axes_dims=[8, 12, 12], axes_lens=[64, 64, 64], rope_theta=256.0,
                                   ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
                                   pad_tokens_multiple=32, multiple_of=16, dtype=F32))
    # Flux.2: 128 latent channels (32 VAE channels x 2x2, patchified inside the VAE), patch 1.
    t["flux2"] = (sm.Flux2, _with_optional(dict(
        image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=64, hidden_size=64,
        mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 8, 8, 8], theta=2000, patch_size=1,
        qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True, ops_bias=False,
        default_ref_method="index", ref_index_scale=10.0, dtype=F32),
        flux_model.FluxParams, {"txt_ids_dims": [3]}))  # 0.33 field (0.3.75 hard-codes axis 3 for 4 axes)
    # Chroma: Flux-like with an "Approximator" (distilled_guidance_layer) instead of per-block modulation.
    chroma = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=48, hidden_size=64,
                  mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
                  patch_size=2, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=64, n_layers=2, dtype=F32)
    t["chroma"] = (sm.Chroma, _with_optional(chroma, chroma_model.ChromaParams, {"txt_ids_dims": [], "vec_in_dim": None}))
    if hasattr(sm, "ChromaRadiance"):
        cr_model = _ldm("chroma_radiance.model")
        radiance = dict(chroma, image_model="chroma_radiance", in_channels=3, out_channels=3, patch_size=16,
                        nerf_hidden_size=16, nerf_mlp_ratio=2, nerf_depth=2, nerf_max_freqs=8, nerf_tile_size=32,
                        nerf_final_head_type="conv", nerf_embedder_dtype=F32)
        t["chroma_radiance"] = (sm.ChromaRadiance, _with_optional(radiance, cr_model.ChromaRadianceParams,
                                {"txt_ids_dims": [], "vec_in_dim": None, "use_x0": False, "use_sequential_txt_ids": False}))
    # Qwen-Image (MMDiT, 5-D Wan latent): inner = heads * head_dim, sum(axes) = head_dim.
    t["qwen_image"] = (sm.QwenImage, _with_optional(dict(
        image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32, axes_dims_rope=[8, 12, 12], dtype=F32),
        qwen_model.QwenImageTransformer2DModel, {"guidance_embeds": False, "default_ref_method": "index",
                                                  "use_additional_t_cond": False}))
    # HiDream: double + single stream MoE blocks; one llama hidden-state layer per block + T5.
    t["hidream"] = (sm.HiDream, dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16,
                                     num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
                                     caption_channels=[48, 40], text_emb_dim=32, num_routed_experts=4,
                                     num_activated_experts=2, axes_dims_rope=[16, 8, 8], max_resolution=[32, 32],
                                     llama_layers=[0, 1], dtype=F32))
    # HunyuanImage 2.1 (HunyuanVideo DiT with 2-D patches, 64-channel 32x latent). Real: byt5=True
    # (glyph ByT5 mapper with hard-coded 1472/2048 widths), hidden 3584, guidance_embed only in distilled.
    t["hunyuan_image21"] = (sm.HunyuanImage21, _with_optional(dict(
        image_model="hunyuan_video", in_channels=64, out_channels=64, patch_size=[1, 1], vec_in_dim=None,
        context_in_dim=48, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
        axes_dim=[16, 16], theta=256, qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False,
        use_cond_type_embedding=False, vision_in_dim=None, dtype=F32),
        hy_model.HunyuanVideoParams, {"meanflow_sum": False}))
    # Cosmos Predict2 text-to-image (MiniTrainDIT; 5-D Wan 2.1 latent; EDM-style RFlow sampling).
    t["cosmos_predict2"] = (sm.CosmosT2IPredict2, dict(
        image_model="cosmos_predict2", max_img_h=64, max_img_w=64, max_frames=8, in_channels=16, out_channels=16,
        patch_spatial=2, patch_temporal=1, concat_padding_mask=True, model_channels=64, num_blocks=2, num_heads=2,
        mlp_ratio=4.0, crossattn_emb_channels=48, pos_emb_cls="rope3d", pos_emb_learnable=True,
        pos_emb_interpolation="crop", min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=16,
        rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0,
        extra_per_block_abs_pos_emb=False, extra_h_extrapolation_ratio=1.0, extra_w_extrapolation_ratio=1.0,
        extra_t_extrapolation_ratio=1.0, rope_enable_fps_modulation=False, dtype=F32))
    return t


FAMILY_CONFIGS = _family_table()
FAMILIES = tuple(FAMILY_CONFIGS)


def _self_checked_table():
    """Tiny models of ComfyUI classes no row of the table names, which SISO trains through the
    self-checked path (tests/test_self_checked.py). Only on a ComfyUI that has the class (0.33:
    each is a subclass of a row's class)."""
    sm = comfy.supported_models
    t = {}
    if hasattr(sm, "Krea2"):   # no row: the structural rules; single-stream DiT after a text-fusion stack over 2 encoder layers
        t["krea2"] = (sm.Krea2, dict(image_model="krea2", features=64, tdim=32, txtdim=16, heads=2, kvheads=1,
                                     multiplier=2, layers=2, patch=2, channels=16, txtlayers=2, txtheads=2,
                                     txtkvheads=2, dtype=F32))
    if hasattr(sm, "Anima"):   # no row: the structural rules; Cosmos Predict2's MiniTrainDIT after an LLM adapter
        class TinyAnima(sm.Anima):
            """comfy.ldm.anima.model.Anima builds its LLMAdapter (Qwen3 states + T5 ids -> the DiT's context)
            at full size whatever the config (1024 wide, 6 blocks, a 32128-token embedding): the model with
            a tiny LLMAdapter of the same class in its place, on the operations ComfyUI picked for it."""

            def get_model(self, state_dict, prefix="", device=None):
                out = super().get_model(state_dict, prefix, device)
                ops = comfy.ops.pick_operations(self.unet_config.get("dtype"), self.manual_cast_dtype, model_config=self)
                out.diffusion_model.llm_adapter = _ldm("anima.model").LLMAdapter(
                    source_dim=32, target_dim=self.unet_config["crossattn_emb_channels"], model_dim=32, num_layers=1,
                    num_heads=2, device=device, dtype=self.unet_config.get("dtype"), operations=ops).requires_grad_(False).eval()   # as BaseModel leaves its denoiser
                return out
        t["anima"] = (TinyAnima, dict(FAMILY_CONFIGS["cosmos_predict2"][1], image_model="anima"))
    if hasattr(sm, "HunyuanDiT"):   # no row: the structural rules (both ComfyUIs); CLIP + mT5 text; an even depth (its skip links pair block i with block depth - 1 - i)
        t["hunyuan_dit"] = (sm.HunyuanDiT, dict(image_model="hydit", input_size=8, patch_size=2, in_channels=4,
                                                hidden_size=64, depth=4, num_heads=2, mlp_ratio=2.0, text_states_dim=32,
                                                text_states_dim_t5=32, text_len=8, text_len_t5=8, qk_norm=True,
                                                size_cond=False, use_style_cond=False, learn_sigma=True, norm="layer",
                                                dtype=F32))
    if hasattr(sm, "LongCatImage"):   # Flux subclass: no pooled vector, no guidance, RoPE ids on the text
        t["longcat_image"] = (sm.LongCatImage, _with_optional(dict(
            image_model="flux", in_channels=16, out_channels=16, vec_in_dim=None, context_in_dim=48, hidden_size=64,
            mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
            patch_size=2, qkv_bias=True, guidance_embed=False, dtype=F32),
            _ldm("flux.model").FluxParams, {"txt_ids_dims": [1, 2]}))
    if hasattr(sm, "ZImagePixelSpace"):   # Lumina2 subclass: Z-Image on RGB patches with a per-patch MLP decoder
        _, zimage = FAMILY_CONFIGS["zimage"]
        t["zimage_pixel"] = (sm.ZImagePixelSpace, dict(zimage, image_model="zimage_pixel", in_channels=3, patch_size=8,
                                                       decoder_hidden_size=32, decoder_num_res_blocks=1,
                                                       decoder_max_freqs=4, decoder_in_channels=8 * 8 * 3))
    if hasattr(sm, "MageFlow"):   # QwenImage subclass: Qwen-Image blocks on Flux.2's 128-channel latent
        t["mage_flow"] = (sm.MageFlow, dict(image_model="mage_flow", in_channels=128, out_channels=128, num_layers=2,
                                            attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48,
                                            axes_dims_rope=[8, 12, 12], dtype=F32))
    if hasattr(sm, "ErnieImage"):   # no row: the structural rules; single-stream DiT on Flux.2's 128-channel latent
        t["ernie_image"] = (sm.ErnieImage, dict(image_model="ernie", hidden_size=64, num_attention_heads=2, num_layers=2,
                                                ffn_hidden_size=128, in_channels=128, out_channels=128, patch_size=1,
                                                text_in_dim=48, rope_theta=256, rope_axes_dim=(8, 12, 12), dtype=F32))
    if hasattr(sm, "Lens"):   # no row: the structural rules; dual-stream MMDiT reading two text-encoder layers
        t["lens"] = (sm.Lens, dict(image_model="lens", patch_size=2, in_channels=128, out_channels=32, num_layers=2,
                                   attention_head_dim=32, num_attention_heads=2, enc_hidden_dim=16,
                                   axes_dims_rope=(8, 12, 12), rms_norm=True, multi_layer_encoder_feature=True,
                                   selected_layer_index=(0, 1), dtype=F32))
    if hasattr(sm, "Ideogram4"):   # no row: the structural rules; single-stream DiT over packed [text, image] tokens
        # its config's unet_extra_config fixes the full widths over any unet_config: a config subclass without it
        tiny_config = type("TinyIdeogram4", (sm.Ideogram4,), {"unet_extra_config": {}})
        t["ideogram4"] = (tiny_config, dict(image_model="ideogram4", in_channels=128, num_layers=2, num_attention_heads=2,
                                             attention_head_dim=32, intermediate_size=64, adaln_dim=32,
                                             llm_features_dim=48, rope_theta=10000, mrope_section=(8, 4, 4), dtype=F32))
    if hasattr(sm, "Kandinsky5Image"):   # no row: the structural rules (its video parent is refused); text + visual blocks
        t["kandinsky5_image"] = (sm.Kandinsky5Image, dict(
            image_model="kandinsky5", in_visual_dim=16, out_visual_dim=16, in_text_dim=48, in_text_dim2=32, time_dim=32,
            model_dim=64, ff_dim=128, visual_embed_dim=64, patch_size=(1, 2, 2), num_text_blocks=1,
            num_visual_blocks=2, axes_dims=(8, 12, 12), rope_scale_factor=(1.0, 1.0, 1.0), dtype=F32))
    if hasattr(sm, "Omnigen2"):   # no row: the structural rules; Lumina-style refiners + single-stream layers, GQA
        omnigen2 = dict(image_model="omnigen2", patch_size=2, in_channels=16, out_channels=None, hidden_size=64,
                        num_layers=1, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                        ffn_dim_multiplier=None, norm_eps=1e-5, axes_dim_rope=(8, 12, 12), axes_lens=(300, 512, 512),
                        text_feat_dim=48, timestep_scale=1000.0, dtype=F32)
        t["omnigen2"] = (sm.Omnigen2, omnigen2)
        if hasattr(sm, "Boogu"):   # Omnigen2 subclass (no row either): a dual-stream stage before the single-stream layers
            boogu = {k: v for k, v in omnigen2.items() if k != "text_feat_dim"}
            t["boogu"] = (sm.Boogu, dict(boogu, image_model="boogu", num_double_stream_layers=1, instruction_feat_dim=48))
    if hasattr(sm, "JoyImage"):   # no row: the structural rules; dual-stream DiT, comfy_kitchen's fused RMSNorm + RoPE
        # its config's unet_extra_config fixes the full RoPE axes over any unet_config: a config subclass with tiny ones
        tiny_config = type("TinyJoyImage", (sm.JoyImage,), {"unet_extra_config": {"theta": 10000,
                                                                                   "rope_dim_list": [8, 12, 12]}})
        t["joyimage"] = (tiny_config, dict(image_model="joyimage", patch_size=[1, 2, 2], in_channels=16, out_channels=16,
                                           hidden_size=64, num_attention_heads=2, text_dim=48, mlp_width_ratio=2.0,
                                           num_layers=2, dtype=F32))
    if hasattr(sm, "PixelDiTT2I"):   # no row: pixel space (patch MMDiT + per-pixel blocks); the self-check refuses it
        t["pixeldit"] = (sm.PixelDiTT2I, dict(image_model="pixeldit_t2i", in_channels=3, num_groups=2, hidden_size=64,
                                              pixel_hidden_size=8, pixel_attn_hidden_size=32, pixel_num_groups=2,
                                              patch_depth=2, pixel_depth=1, patch_size=8, txt_embed_dim=48,
                                              txt_max_length=16, dtype=F32))
    return t


SELF_CHECKED_CONFIGS = _self_checked_table()
FAMILY_CONFIGS.update(SELF_CHECKED_CONFIGS)    # build_model & co. take either; FAMILIES stays the table's

# Text-side shapes per family: (context width, pooled width or None, extra conditioning).
_COND = {
    "sd3": (48, 32), "sd35": (48, 32), "auraflow": (48, None), "pixart_alpha": (32, None), "pixart_sigma": (32, None),
    "lumina2": (32, None), "zimage": (32, None), "flux2": (64, None), "chroma": (48, None),
    "chroma_radiance": (48, None), "qwen_image": (48, None), "hidream": (48, 32), "hunyuan_image21": (48, None),
    "cosmos_predict2": (48, None), "longcat_image": (48, None), "zimage_pixel": (32, None), "mage_flow": (48, None),
    "hunyuan_dit": (32, None), "ernie_image": (48, None),
    "krea2": (32, None), "anima": (32, None),   # krea2: two encoder layers of width 16, side by side (its text-fusion input)
    "ideogram4": (48, None), "lens": (32, None),   # two encoder layers of width 16, side by side (LensTransformer2DModel's context)
    "kandinsky5_image": (48, 32),   # Qwen2.5-VL states + CLIP-L pooled (Kandinsky5's encode_adm: y)
    "omnigen2": (48, None), "boogu": (48, None), "pixeldit": (48, None), "joyimage": (48, None),
}

# Family -> (VAE kind, latent channels, latent dims (2: [B,C,H,W], 3: [B,C,T,H,W]), pixel/latent ratio).
VAE_KIND = {
    "sd3": ("sd3_flux_kl16", 16, 2, 8), "sd35": ("sd3_flux_kl16", 16, 2, 8),
    "auraflow": ("sdxl_kl4", 4, 2, 8), "pixart_alpha": ("sd15_kl4", 4, 2, 8), "pixart_sigma": ("sdxl_kl4", 4, 2, 8),
    "lumina2": ("sd3_flux_kl16", 16, 2, 8), "zimage": ("sd3_flux_kl16", 16, 2, 8),
    "chroma": ("sd3_flux_kl16", 16, 2, 8), "hidream": ("sd3_flux_kl16", 16, 2, 8),
    "flux2": ("flux2_kl32_bn", 128, 2, 16), "chroma_radiance": ("pixel_space", 3, 2, 1),
    "qwen_image": ("wan21", 16, 3, 8), "cosmos_predict2": ("wan21", 16, 3, 8),
    "hunyuan_image21": ("hunyuan_image21_dc", 64, 2, 32),
    "longcat_image": ("sd3_flux_kl16", 16, 2, 8), "zimage_pixel": ("pixel_space", 3, 2, 1),
    "mage_flow": ("flux2_kl32_bn", 128, 2, 16), "hunyuan_dit": ("sdxl_kl4", 4, 2, 8),
    "krea2": ("wan21", 16, 3, 8), "anima": ("wan21", 16, 3, 8),
    "ernie_image": ("flux2_kl32_bn", 128, 2, 16), "lens": ("flux2_kl32_bn", 128, 2, 16),
    "ideogram4": ("flux2_kl32_bn", 128, 2, 16),
    "kandinsky5_image": ("sd3_flux_kl16", 16, 2, 8),
    "omnigen2": ("sd3_flux_kl16", 16, 2, 8), "boogu": ("sd3_flux_kl16", 16, 2, 8), "pixeldit": ("pixel_space", 3, 2, 1),
    "joyimage": ("wan21", 16, 3, 8),
}


# Smallest image side (pixels) a family's forward accepts: PixArt's sin-cos position embedding
# divides by round(((H + W) / 2) / 64) * 64 / patch in latent units, 0 below a 40-latent side.
MIN_SIZE = {"pixart_alpha": 384, "pixart_sigma": 384}


# ----------------------------------------------------------------- building
def init_random(module: torch.nn.Module, seed: int = 0, std: float = 0.05):
    """Deterministic random init (ComfyUI leaves weights as torch.empty): 1-D norm/scale weights
    near 1, everything else N(0, std); float buffers that are loaded from checkpoints
    (``pos_embed`` and similar) too, plus BatchNorm running stats sane."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim == 1 and leaf != "bias" and (leaf in ("weight", "scale", "gamma") or "norm" in name):
                p.copy_(torch.ones_like(p) + 0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in module.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                b.copy_(torch.ones_like(b) + 0.1 * torch.rand(b.shape, generator=g))
            elif leaf == "running_mean":
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
            elif leaf in ("pos_embed",) and b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * std)
    return module


def build_model(name: str, seed: int = 0, inference: bool = True):
    """A MODEL (ModelPatcher) of the family, built in inference mode as ComfyUI's loaders do."""
    config_cls, unet_config = FAMILY_CONFIGS[name]
    with torch.inference_mode(inference):
        config = config_cls(dict(unet_config))
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model({})
        init_random(base.diffusion_model, seed)
        return comfy.model_patcher.ModelPatcher(base, load_device=CPU, offload_device=CPU)


def conditioning(name: str, seed: int = 0, tokens: int = 8):
    """CONDITIONING [[cross_attn, extras]] shaped for the family's extra_conds."""
    dim, pooled = _COND[name]
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        # CLIPTextEncode always sets pooled_output (None where the encoder has none); 0.3.75's
        # Flux/Chroma encode_adm indexes kwargs["pooled_output"].
        extra = {"pooled_output": torch.randn(1, pooled, generator=g) if pooled else None}
        if name == "flux2":
            extra["guidance"] = 4.0  # Flux.2 [dev] embeds guidance (FluxGuidance node); default 3.5 otherwise
        if name == "hidream":
            # [B, llama layers, tokens, width]: model_base.HiDream -> encoder_hidden_states_llama3
            _, cfg = FAMILY_CONFIGS[name]
            n = max(cfg["llama_layers"]) + 1
            extra["conditioning_llama3"] = torch.randn(1, n, tokens, cfg["caption_channels"][1], generator=g)
        if name == "anima":   # its text encoder: Qwen3 states (cross_attn) + the prompt's T5 token ids and weights
            extra["t5xxl_ids"] = torch.randint(0, 32128, (tokens + 2,), generator=g, dtype=torch.int)
            extra["t5xxl_weights"] = torch.ones(tokens + 2)
        if name == "hunyuan_dit":   # model_base.HunyuanDiT: CLIP mask, mT5 states and mask (as its text encoder sets)
            _, cfg = FAMILY_CONFIGS[name]
            tokens = cfg["text_len"]
            extra["attention_mask"] = torch.ones(1, tokens)
            extra["conditioning_mt5xl"] = torch.randn(1, cfg["text_len_t5"], cfg["text_states_dim_t5"], generator=g)
            extra["attention_mask_mt5xl"] = torch.ones(1, cfg["text_len_t5"])
        if name in ("omnigen2", "boogu"):   # its text encoder returns the mask; extra_conds counts the tokens from it
            extra["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
        cross = torch.randn(1, tokens, dim, generator=g)
        return [[cross, extra]]


def empty_latent(name: str, width: int = 64, height: int = 64, batch: int = 1):
    """{"samples": zeros} as the family's EmptyLatent node makes it (5-D for the Wan-latent families)."""
    _, channels, dims, ratio = VAE_KIND[name]
    shape = (batch, channels) + ((1,) if dims == 3 else ()) + (height // ratio, width // ratio)
    return {"samples": torch.zeros(shape)}


def _kl_config(z_channels, embed_dim=None, ch=32, ch_mult=(1, 2, 2, 2), **extra):
    return {"params": {"embed_dim": embed_dim or z_channels, "ddconfig": dict({
        "double_z": True, "z_channels": z_channels, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": ch,
        "ch_mult": list(ch_mult), "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}, **extra)}}


def _kl_vae(cfg, seed):
    from comfy.ldm.models.autoencoder import AutoencoderKL
    module = init_random(AutoencoderKL(**cfg["params"]), seed)
    return comfy.sd.VAE(sd=module.state_dict(), config=cfg)


def _swap_first_stage(vae, module, **attrs):
    """Put a tiny first_stage_model of the real kind into a VAE object, with the attributes
    comfy.sd.VAE's detection sets for that kind (the detection itself hard-codes full widths)."""
    module = module.eval().to(vae.vae_dtype)
    vae.first_stage_model = module
    vae.patcher = comfy.model_patcher.ModelPatcher(module, load_device=vae.device,
                                                   offload_device=comfy.model_management.vae_offload_device())
    vae.size = None
    for k, v in attrs.items():
        setattr(vae, k, v)
    return vae


def build_vae(name: str, seed: int = 1):
    """A tiny comfy.sd.VAE of the kind the family really uses (see VAE_KIND)."""
    kind = VAE_KIND[name][0]
    with torch.inference_mode():
        if kind in ("sd15_kl4", "sdxl_kl4"):  # AutoencoderKL with quant convs, as SD1.5/SDXL VAE files detect
            return _kl_vae(_kl_config(4), seed)
        if kind == "flux2_kl32_bn":
            # Real Flux.2 VAE detects as AutoencoderKL + batch_norm_latent: 32 channels, patchified 2x2 into
            # 128 and batch-normalised inside encode/decode; 16x. Detection fixes ch=128: config path + the
            # attributes detection sets.
            vae = _kl_vae(_kl_config(32, ch_mult=(1, 2, 2, 2), batch_norm_latent=True), seed)
            vae.downscale_ratio = vae.upscale_ratio = 16
            vae.latent_channels = 128
            return vae
        if kind == "sd3_flux_kl16":
            # Real SD3/Flux VAE files have no quant convs: detection builds AutoencodingEngine(Encoder, Decoder).
            from comfy.ldm.models.autoencoder import AutoencodingEngine
            dd = _kl_config(16)["params"]["ddconfig"]
            module = init_random(AutoencodingEngine(
                regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": dd},
                decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dd}), seed)
            # (detection would fix ch=128: build a tiny one and swap it in)
            return _swap_first_stage(_kl_vae(_kl_config(4), seed), module, latent_channels=16)
        if kind == "wan21":
            # Wan 2.1 VAE (Qwen-Image, Cosmos Predict2): 3-D causal conv VAE; detection reads `dim` from
            # decoder.head.0.gamma, so a dim=8 state dict detects as itself at tiny size.
            wan_vae = _ldm("wan.vae")
            module = init_random(wan_vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                                attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0), seed)
            return comfy.sd.VAE(sd=module.state_dict())
        if kind == "pixel_space":  # Chroma Radiance: identity-ish conversion VAE, latent = pixels
            return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
        if kind == "hunyuan_image21_dc":
            # HunyuanImage 2.1 VAE: 64-channel 32x DC-AE-like AutoencodingEngine(hunyuan_video.vae.Encoder/Decoder);
            # detection hard-codes widths 128..1024, so build a tiny one and swap it in.
            from comfy.ldm.models.autoencoder import AutoencodingEngine
            dd = {"block_out_channels": [32, 32, 64, 64, 128, 128], "in_channels": 3, "out_channels": 3,
                  "num_res_blocks": 1, "ffactor_spatial": 32, "downsample_match_channel": True,
                  "upsample_match_channel": True, "z_channels": 64}
            module = init_random(AutoencodingEngine(
                regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                encoder_config={"target": "comfy.ldm.hunyuan_video.vae.Encoder", "params": dd},
                decoder_config={"target": "comfy.ldm.hunyuan_video.vae.Decoder", "params": dd}), seed)
            vae = _kl_vae(_kl_config(4), seed)
            return _swap_first_stage(vae, module, latent_channels=64, downscale_ratio=32, upscale_ratio=32)
    raise KeyError(name)


# ----------------------------------------------------------------- structure facts
def block_lists(diffusion_model: torch.nn.Module) -> dict:
    """{attribute name: ModuleList} of the repeated transformer blocks of a diffusion model."""
    out = {}
    for name, child in diffusion_model.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) and all(
                type(c) is type(child[0]) for c in child) and len(linear_names(child[0])) >= 2:
            out[name] = child
    return out


def linear_names(block: torch.nn.Module) -> list:
    return [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]


# ----------------------------------------------------------------- verification (script)
def decode_gradients(vae, model, latent: torch.Tensor) -> dict:
    """Whether pixels are differentiable w.r.t. the latent:
    vae_decode: stock ``VAE.decode`` (its weights, made under inference mode, are inference tensors);
    process_latent_out: the model's ``process_latent_out`` (latent formats with per-channel
    mean/std tensors made under inference mode cannot enter autograd: Wan21);
    first_stage_copy: a deep copy of ``first_stage_model`` (and of the latent format) decoding
    directly, as siso_ops.host.DifferentiableDecoder does."""
    import copy
    res = {}

    def attempt(key, fn):
        z = latent.clone().requires_grad_(True)
        try:
            fn(z).float().square().mean().backward()
            res[key] = z.grad is not None and bool(torch.isfinite(z.grad).all()) and float(z.grad.abs().sum()) > 0
        except Exception as e:  # noqa: BLE001
            res[key] = f"{type(e).__name__}: {e}"[:90]

    with torch.inference_mode(False), torch.enable_grad():
        attempt("vae_decode", vae.decode)
        attempt("process_latent_out", model.model.process_latent_out)
        module = copy.deepcopy(vae.first_stage_model).float().requires_grad_(False)
        latent_format = copy.deepcopy(model.model.latent_format)
        attempt("first_stage_copy", lambda z: module.decode(latent_format.process_out(z)))
    return res


def _call_kwargs(base, name: str, x: torch.Tensor) -> dict:
    """The diffusion model's keyword conditions, as the sampler's extra_conds would build them."""
    cond = conditioning(name, 0)[0]
    h, w = x.shape[-2:]
    ratio = VAE_KIND[name][3]
    conds = base.extra_conds(cross_attn=cond[0], noise=x, device=CPU, width=w * ratio, height=h * ratio,
                             **{k: v for k, v in cond[1].items()})
    # conditioning made under inference mode (as CLIPTextEncode's is) must be copied before it
    # can enter autograd (Cosmos' cross-attention k/v read the context directly)
    return {k: (v.cond.clone() if isinstance(v.cond, torch.Tensor) else v.cond) for k, v in conds.items()}


class training_flag:
    """ComfyUI 0.33 routes RoPE / qk-norm through comfy_kitchen fused ops that have no autograd
    formula unless ``comfy.model_management.in_training`` is set (0.3.75 has no such flag)."""

    def __enter__(self):
        self.has = hasattr(comfy.model_management, "in_training")
        if self.has:
            self.saved, comfy.model_management.in_training = comfy.model_management.in_training, True
        return self

    def __exit__(self, *exc):
        if self.has:
            comfy.model_management.in_training = self.saved


def training_check(name: str, size: int = 64) -> dict:
    """Backward through the diffusion model with only the repeated blocks' Linear weights trainable
    (what a LoRA trains), in five variants: plain; each block under non-reentrant activation
    checkpointing; every norm layer inside the blocks reading a copy of its input (the pack's
    workaround for blocks that add into a normalised tensor in place); both; both with the
    checkpointed block reading copies of its inputs (the pack's _checkpointed(clone_inputs=True)). Also reports the
    blocks whose forward mutates a tensor argument in place (its version counter moves) and the
    block Linear weights that get no gradient at all (e.g. a last block's unused text stream)."""
    size = max(size, MIN_SIZE.get(name, 0))
    res = {}
    with torch.inference_mode(False), training_flag():
        model = build_model(name, inference=False)
        base = model.model
        dm = base.diffusion_model.requires_grad_(False)
        lists = block_lists(dm)
        params = {}
        for key, blocks in lists.items():
            for n, m in blocks.named_modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.requires_grad_(True)
                    params[f"{key}.{n}"] = m.weight
        x = torch.randn(empty_latent(name, size, size)["samples"].shape, generator=torch.Generator().manual_seed(2))
        sigma = torch.tensor([float(base.model_sampling.percent_to_sigma(0.5))])
        kwargs = _call_kwargs(base, name, x)
        blocks = [b for bl in lists.values() for b in bl]
        norms = [m for b in blocks for m in b.modules() if "norm" in type(m).__name__.lower()]
        mutated = {}

        def run():
            for p in params.values():
                p.grad = None
            with torch.enable_grad():
                base.apply_model(x, sigma, **kwargs).square().mean().backward()
            return {k: (p.grad.clone() if p.grad is not None else None) for k, p in params.items()}

        def patch(modules, make):
            for m in modules:
                m.forward = make(m.forward, m)

        def unpatch(modules):
            for m in modules:
                m.__dict__.pop("forward", None)

        def watching(orig, block):
            def fwd(*a, **kw):
                tensors = [(i, t) for i, t in list(enumerate(a)) + list(kw.items())
                           if isinstance(t, torch.Tensor) and not t.is_inference()]
                before = [t._version for _, t in tensors]
                out = orig(*a, **kw)
                for (i, t), v in zip(tensors, before):
                    if t._version != v:
                        mutated.setdefault(type(block).__name__, set()).add(str(i))
                return out
            return fwd

        def checkpointing(orig, block):
            return lambda *a, **kw: torch.utils.checkpoint.checkpoint(orig, *a, use_reentrant=False, **kw)

        def cloning(orig, module):
            return lambda x, *a, **kw: orig(x.clone(), *a, **kw)

        def checkpointing_cloned(orig, block):  # as siso_ops.host.training._checkpointed(clone_inputs=True)
            def fwd(*a, **kw):
                a = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in a)
                kw = {k: (t.clone() if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
                return orig(*a, **kw)
            return lambda *a, **kw: torch.utils.checkpoint.checkpoint(fwd, *a, use_reentrant=False, **kw)

        ref = None
        for variant, patches in (("plain", [(blocks, watching)]), ("checkpointed", [(blocks, checkpointing)]),
                                 ("norm_clone", [(norms, cloning)]),
                                 ("norm_clone_checkpointed", [(norms, cloning), (blocks, checkpointing)]),
                                 ("norm_clone_checkpointed_cloned_inputs", [(norms, cloning), (blocks, checkpointing_cloned)])):
            for mods, make in patches:
                patch(mods, make)
            try:
                grads = run()
                if ref is None:
                    ref = grads
                    res["no_grad_linears"] = sorted(k for k, g in grads.items() if g is None)
                same = all((g is None) == (ref[k] is None) and (g is None or torch.allclose(g, ref[k], rtol=1e-4, atol=1e-7))
                           for k, g in grads.items())
                res[variant] = True if same else "grads differ from the first variant that ran"
            except Exception as e:  # noqa: BLE001
                res[variant] = f"{type(e).__name__}: {e}"[:110]
            for mods, _ in patches:
                unpatch(mods)
        res["mutates_inputs"] = {k: sorted(v) for k, v in mutated.items()}
    return res


def verify(name: str, cfg: float = 1.0, size: int = 64) -> dict:
    import nodes
    res = {"family": name}
    model = build_model(name)
    dm = model.model.diffusion_model
    res["model_sampling"] = [c.__name__ for c in type(model.model.model_sampling).__bases__]
    res["params"] = sum(p.numel() for p in dm.parameters())
    res["blocks"] = {k: (type(v[0]).__name__, len(v)) for k, v in block_lists(dm).items()}
    res["linears"] = {k: linear_names(v[0]) for k, v in block_lists(dm).items()}
    vae = build_vae(name)
    res["vae"] = type(vae.first_stage_model).__name__
    res["vae_params"] = sum(p.numel() for p in vae.first_stage_model.parameters())
    pos, neg = conditioning(name, 0), conditioning(name, 7)
    size = max(size, MIN_SIZE.get(name, 0))
    with torch.inference_mode():
        latent = empty_latent(name, size, size)
        out = nodes.common_ksampler(model, 0, 1, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]
        res["latent_out"] = tuple(out.shape)
        img = vae.decode(out)
        res["image"] = tuple(img.shape)
        res["finite"] = bool(torch.isfinite(out).all() and torch.isfinite(img).all())
    res["decode_grad"] = decode_gradients(vae, model, out)
    res["training"] = training_check(name, size)
    return res


if __name__ == "__main__":
    import json
    import traceback
    import comfyui_version
    print("ComfyUI", comfyui_version.__version__)
    for fam in (_ARGS.families or FAMILIES):
        try:
            print(json.dumps(verify(fam), default=str))
        except Exception:  # noqa: BLE001
            print(json.dumps({"family": fam, "error": traceback.format_exc()[-1500:]}))
        sys.stdout.flush()
