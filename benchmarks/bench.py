"""The SISO Optimize benchmark: the paper's settings against the pack's defaults, on the REAL
SD-Turbo and SDXL-Turbo architectures (random weights, built with ComfyUI's own classes, so no
files are needed), with full-size DINOv2 ViT-L/14 (518 px) and IR ViT-H/14 (290 px).

  (a) paper:    everything float32, no gradient checkpointing, the full VAE decode, DINOv2 at 518
                and IR at 290, and LoRA also on the text encoders (as the authors' SDXL README runs
                it), so the prompt is re-encoded with gradients at every iteration; the text
                encoders stay on the device.
  (b) defaults: the pack's SISO Optimize defaults on the model as ComfyUI loads it (the
                published turbo files are float16; ComfyUI keeps that on a GPU and uses float32
                on a CPU); the prompt is encoded once by the stock CLIP Text Encode, whose model
                ComfyUI offloads from a GPU when it needs the room (on a CPU it stays in RAM).

Both the generation path (1 step) and the editing path (3 steps from a DDIM inversion of a
synthetic photo, gradients through the last; how the inversion was made does not change the
cost of an iteration) run in each process. Every (model, configuration) runs in its own fresh
process, alternating paper / defaults. Peak memory: process RSS on a CPU (the kernel's
high-water mark, reset between the paths), torch.cuda.max_memory_allocated on a GPU; both
include the weights each configuration keeps on the device.

    python benchmarks/bench.py [--size N] [--iterations N] [--rounds N] [--models a,b]
                               [--early-stop] [--write]
    python benchmarks/bench.py --tiny        # smoke: tiny models, 64 px (the CI test runs this)
    python benchmarks/bench.py ... --profile DIR    # also where one iteration's time goes
    python benchmarks/bench.py ... --count-ops      # also the operators (GPU kernel launches) of one iteration
    python benchmarks/bench.py --thin --count-ops   # the same count on thin models, in seconds (see THIN)
    python benchmarks/bench.py ... --estimate       # also SISO's memory estimate against each measured peak
    python benchmarks/bench.py --from-json a.json,b.json --write   # one table from saved runs

Real DiT architectures (``--models zimage,flux2_klein --configs defaults``): Z-Image-Turbo (ComfyUI's
Lumina 2 / NextDiT as its detection reads z_image_turbo_bf16.safetensors: dim 3840, 30 layers, 30
heads, Qwen3-4B context 2560; 6.15 B parameters) with the Flux.1 16-channel VAE, and Flux.2 klein
4B (hidden 3072, 5 double + 20 single blocks, 24 heads, context 7680 = three Qwen3-4B layers;
3.88 B parameters; needs a ComfyUI that detects klein, e.g. 0.33: 0.3.75 hard-codes Flux.2 [dev]'s
48 heads) with Flux.2's own 32-channel VAE (128 latent channels after its 2x2 patchify, 16x).
ComfyUI's model detection picks the config from the published files' key names and shapes (given
as meta tensors, no data); ComfyUI's classes build the model and both VAEs (random weights).
Deviations, printed with the results: the diffusion weights stay in bfloat16 as the published
files are (ComfyUI on a CPU would compute through its manual cast to float32 all the same, and
the pack's default precision applies on top; in float32 Z-Image's weights alone are 24.6 GB); the
text encoder (Qwen3-4B) is NOT built, since it runs once before the loop: the conditioning is
random, of the exact shape and dtype ComfyUI's CLIP Text Encode gives for the prompt (token count
from ComfyUI's own tokenizer and chat template for the model: Z-Image [1, 13, 2560] float32, klein
padded to [1, 512, 7680] float32; ``pooled_output`` None and the ``attention_mask`` both give).
No paper configuration for them (it trains a LoRA on the text encoder), no tiny version.

Storage and conditioning variants (``--configs``): ``fp8`` stores the diffusion weights as
UNETLoader's weight_dtype fp8_e4m3fn does; ``q8_0`` writes them to a GGUF Q8_0 file and loads it with
ComfyUI-GGUF's UnetLoaderGGUF (found as the tests find it, tests/third_party.py: in the ComfyUI's
custom_nodes, else ../shared/comfyui-gguf unpacked into the in-process ComfyUI); ``reference`` adds
one reference image to the conditioning as ReferenceLatent does (for Flux.2 klein: what a
reference costs). ``--iterations 0`` runs ONE iteration (forward and backward,
so the peak) and reports its time including the warm-up: for models whose iteration takes minutes
on a CPU.

On a CPU it runs at 256 px by default (512 px costs about 4x the time); on a GPU at 512 px.
``--write`` puts the table into BENCHMARKS.md (between this device's markers). `make bench` runs
it with --write.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --thin: every network with its real layers, blocks and depths, at a fraction of the width: the
# UNet at 64 model channels (320 in both turbo models; SD2 and SDXL fix 64-channel heads), the VAE
# decoder at 32 base channels (128), DINOv2 ViT-L/14's 24 blocks at width 64 (1024), the IR ViT-H/14's
# 32 at 160 (1280). The operators an iteration dispatches (--count-ops) depend on the layers, not
# their widths, so the count is the full-size models' in seconds of arithmetic; its times are not.
THIN = {"model_channels": 64, "vae_ch": 32, "dino_width": 64, "ir_width": 160}
thin = False
CONFIGS = ("paper", "defaults")
# Variants of the defaults with one setting changed (--configs), to show that setting's trade-off.
VARIANTS = {"checkpointing-off": {"gradient_checkpointing": False}, "checkpointing-on": {"gradient_checkpointing": True},
            "fp32": {"precision": "fp32"},
            # the diffusion weights stored as UNETLoader's weight_dtype fp8_e4m3fn stores them (ComfyUI's
            # manual cast computes in the compute dtype); the rest of the defaults unchanged
            "fp8": {"weights": "float8_e4m3fn"},
            "fp8-checkpointing-off": {"weights": "float8_e4m3fn", "gradient_checkpointing": False},
            # the diffusion weights written to a GGUF Q8_0 file (the gguf package's writer, as
            # ComfyUI-GGUF's convert tools write them) and loaded by ComfyUI-GGUF's UnetLoaderGGUF
            "q8_0": {"weights": "gguf_q8_0"},
            "q8_0-checkpointing-off": {"weights": "gguf_q8_0", "gradient_checkpointing": False},
            # one reference image in the conditioning, as ComfyUI's ReferenceLatent node adds it (the
            # synthetic photo at the run's size, VAE-encoded): what a reference costs (Flux.2, Kontext)
            "reference": {"references": 1},
            # the same with low_memory pinned, so that layouts and references compare at one setting
            "fp8-checkpointing-on": {"weights": "float8_e4m3fn", "gradient_checkpointing": True},
            "q8_0-checkpointing-on": {"weights": "gguf_q8_0", "gradient_checkpointing": True},
            "reference-checkpointing-on": {"references": 1, "gradient_checkpointing": True},
            "reference-checkpointing-off": {"references": 1, "gradient_checkpointing": False},
            # the similarity networks and the decoder copy compiled (siso_ops/compiled.py), with the
            # fastest memory setting
            "compiled": {"compile": "on", "gradient_checkpointing": False}}
PATHS = ("generation", "editing")
PROMPT = "a photo of a dog"


# ----------------------------------------------------------------------------- memory
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Memory:
    """Peak memory of this process: RSS high-water mark on a CPU, allocated memory on a GPU."""

    def __init__(self, device, limit_mb: float | None):
        self.device = device
        self.limit_mb = limit_mb
        if limit_mb and device.type == "cpu":
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        # The kernel would kill the process (or a neighbour) past the machine's memory: stop
        # first and say so, so that the table reports why a configuration cannot run here.
        while True:
            rss = _status_mb("VmRSS")
            if rss > self.limit_mb:
                print(json.dumps({"aborted": f"process memory reached {rss:.0f} MB, over the {self.limit_mb:.0f} MB "
                                             "this machine can give it"}), flush=True)
                os._exit(0)
            time.sleep(0.05)

    def reset(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")   # resets VmHWM to the current RSS

    def current_mb(self) -> float:
        import torch
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated() / 2**20
        return _status_mb("VmRSS")

    def peak_mb(self) -> float:
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _status_mb("VmHWM")


# ----------------------------------------------------------------------------- real DiT architectures
# Z-Image-Turbo and Flux.2 klein 4B: ComfyUI's own model detection decides the architecture from
# the keys and shapes of the published files (only the tensors detection reads are given, on the
# meta device: no data); the model is then built by ComfyUI's classes with random weights.
BIG_MODELS = {
    "zimage": "Z-Image-Turbo (z_image_turbo_bf16.safetensors: NextDiT dim 3840, 30 layers, Qwen3-4B context 2560)",
    "flux2_klein": "Flux.2 klein 4B (flux-2-klein-4b.safetensors: hidden 3072, 5 double + 20 single blocks, "
                   "Qwen3-4B context 3 x 2560)",
}


def big_detected_config(model_name: str):
    """(ComfyUI's model config object, its unet_config) as ComfyUI's detection builds them for the
    published file: ``comfy.model_detection.model_config_from_unet`` on the file's keys and
    shapes (meta tensors: only the keys detection reads, with the published shapes)."""
    import torch
    import comfy.model_detection

    def meta(*shape):
        return torch.empty(shape, device="meta", dtype=torch.bfloat16)
    sd = {}
    if model_name == "zimage":
        # Z-Image-Turbo: 30 main layers, cap_embedder = RMSNorm(2560) + Linear(2560 -> 3840); the file has
        # cap_pad_token / x_pad_token (so detection sets pad_tokens_multiple 32).
        sd["cap_embedder.0.weight"] = meta(2560)
        sd["cap_embedder.1.weight"] = meta(3840, 2560)
        sd["cap_pad_token"] = meta(1, 3840)
        sd["x_pad_token"] = meta(1, 3840)
        for i in range(30):
            sd[f"layers.{i}.attention.qkv.weight"] = meta(3 * 3840, 3840)
            sd[f"layers.{i}.ffn_norm1.weight"] = meta(3840)   # 0.33 reads its spread (fp16 fitness; GPU only)
        for i in range(2):
            sd[f"noise_refiner.{i}.attention.k_norm.weight"] = meta(128)   # 0.33 requires it for Lumina 2
    elif model_name == "flux2_klein":
        # Flux.2 klein 4B: img_in 128 -> 3072, txt_in 7680 (3 Qwen3-4B layers x 2560) -> 3072, no
        # guidance_in (distilled), no vector_in, 5 double and 20 single blocks.
        sd["img_in.weight"] = meta(3072, 128)
        sd["txt_in.weight"] = meta(3072, 7680)
        sd["double_stream_modulation_img.lin.weight"] = meta(6 * 3072 * 2, 3072)
        for i in range(5):
            sd[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = meta(128)
        for i in range(20):
            sd[f"single_blocks.{i}.norm.key_norm.scale"] = meta(128)
    else:
        raise KeyError(model_name)
    model_config = comfy.model_detection.model_config_from_unet(sd, "")
    if model_config is None:
        raise SystemExit(f"this ComfyUI does not detect {BIG_MODELS[model_name]}")
    if model_name == "flux2_klein" and model_config.unet_config.get("num_heads") != 24:
        # ComfyUI 0.3.75 hard-codes Flux.2 [dev]'s 48 heads (head width 64 against RoPE axes of 128):
        # klein needs a ComfyUI that derives the heads from the width (0.33 does).
        raise SystemExit(f"this ComfyUI builds Flux.2 klein with {model_config.unet_config.get('num_heads')} heads "
                         "(Flux.2 [dev]'s); klein needs ComfyUI >= 0.3.77 (e.g. SISO_COMFYUI_DIR=.cache/ComfyUI-0.33.0)")
    return model_config


def big_vae(model_name: str, fill_random):
    """The family's VAE as comfy.sd.VAE detects it from the published file's state dict, random
    weights: Z-Image uses the Flux.1 VAE (16 channels, no quant convs: AutoencodingEngine),
    Flux.2 its own 32-channel VAE with quant convs and a batch-normalised 2x2-patchified latent
    (128 channels, 16x)."""
    import torch
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine
    z = 16 if model_name == "zimage" else 32
    dd = {"double_z": True, "z_channels": z, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.inference_mode():
        if model_name == "zimage":
            module = AutoencodingEngine(
                regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": dd},
                decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dd})
        else:
            module = AutoencoderKL(ddconfig=dict(dd, batch_norm_latent=True), embed_dim=z)
        fill_random(module, 1)
        sd = module.state_dict()
        if model_name == "flux2_klein":
            sd["bn.running_var"] = torch.ones_like(sd["bn.running_var"])
        vae = comfy.sd.VAE(sd=sd)
        del module, sd
    return vae


def big_conditioning(model_name: str, seed: int = 2):
    """CONDITIONING of the shape and dtype ComfyUI's CLIP Text Encode gives for PROMPT with the
    model's real text encoder (Qwen3-4B), with random values: the token count comes from
    ComfyUI's own tokenizer for the model (its chat template and padding); the text encoder is
    not built (it runs once before the loop, never inside it)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    if model_name == "zimage":
        import comfy.text_encoders.z_image as te
        tokens = te.ZImageTokenizer().tokenize_with_weights(PROMPT)["qwen3_4b"]
        width = 2560                      # Qwen3-4B hidden state, layer -2
    else:
        import comfy.text_encoders.flux as te
        tokens = te.KleinTokenizer().tokenize_with_weights(PROMPT)["qwen3_4b"]
        width = 3 * 2560                  # Qwen3-4B layers 9, 18, 27 side by side
    ids = [t[0] for section in tokens for t in section]
    mask = torch.tensor([[0 if i == 151643 else 1 for i in ids]], dtype=torch.long)   # 151643: Qwen's pad
    cross = torch.randn(1, len(ids), width, generator=g)
    info = {"tokens": len(ids), "real_tokens": int(mask.sum()), "shape": list(cross.shape), "dtype": "float32",
            "extras": ["pooled_output (None)", "attention_mask"]}
    return [[cross, {"pooled_output": None, "attention_mask": mask}]], info


GGUF_ARCH = {"zimage": "lumina2", "flux2_klein": "flux", "sd_turbo": "sd1", "sdxl_turbo": "sdxl"}


def gguf_model(base, model_name: str, layout: str):
    """(MODEL, weight dtype, manual cast) as ComfyUI-GGUF's UnetLoaderGGUF gives them for a GGUF file
    of ``base``'s weights: the linear weights quantised to ``layout`` by the gguf package's writer
    (tests/quantised_files.py, the layout ComfyUI-GGUF's loader reads), written into the in-process
    ComfyUI's diffusion_models folder and loaded by the pack's own node (its model detection, its
    GGMLOps layers and GGMLTensor weights). ``base`` is the caller's to free afterwards."""
    import torch
    import comfy.model_management
    import nodes as comfy_nodes
    import conftest
    import quantised_files as qf
    import third_party
    # the same lookup as the tests: the ComfyUI's own custom_nodes, else ../shared/comfyui-gguf
    try:
        third_party.load(third_party.GGUF, conftest.BASE / "custom_nodes", conftest.COMFYUI)
    except third_party.PackMissing as missing:
        raise SystemExit(f"--configs q8_0 loads its file with ComfyUI-GGUF's UnetLoaderGGUF: {missing}") from None
    name = f"bench_{model_name}_{layout}.gguf"
    path = conftest.BASE / "models" / "diffusion_models" / name
    started = time.perf_counter()
    state_dict = base.diffusion_model.state_dict()
    qf.write(path, state_dict, qf.linear_weight_keys(base.diffusion_model), layout, arch=GGUF_ARCH[model_name])
    del state_dict
    print(f"# {model_name}: wrote {path.stat().st_size / 2**30:.2f} GiB {layout} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)
    with torch.inference_mode():
        model = comfy_nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]().load_unet(name)[0]
        # ComfyUI loads the weights when a sampler first asks for the model, and the file's pages
        # enter RAM when a layer first reads them: both now, as a first sample in ComfyUI would,
        # so that the weights are resident before the loop like the other layouts' (the memory
        # estimate counts what the run adds to what is already in RAM).
        comfy.model_management.load_models_gpu([model])
        touched = 0
        for tensor in model.model.diffusion_model.state_dict().values():
            if tensor.device.type == "meta":
                continue
            raw = tensor.as_subclass(torch.Tensor).reshape(-1)
            touched += int(raw[::max(1, 4096 // raw.element_size())].float().sum().isfinite())
    return model, model.model.get_dtype(), model.model.manual_cast_dtype


# ----------------------------------------------------------------------------- the child process
def random_filler(device):
    """``fill_random(module, seed)`` for this device."""
    import torch

    def fill_random(module, seed):
        """Deterministic weights at a scale that keeps deep random networks finite (std
        1/sqrt(fan_in)); ComfyUI's classes leave them uninitialised."""
        where = device if device.type == "cuda" else torch.device("cpu")   # a GPU draws billions faster
        g = torch.Generator(where).manual_seed(seed)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.ndim <= 1:
                    p.fill_(1.0)
                elif p.dtype == torch.bfloat16 and p.device.type == "cpu":
                    # billions of bfloat16 weights: drawn in place, in their own dtype, one
                    # parameter at a time (no float32 copy of the model)
                    p.normal_(0.0, 1.0 / max(p[0].numel(), 1) ** 0.5, generator=g)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=where) / max(p[0].numel(), 1) ** 0.5)
        return module

    return fill_random


def build_model(model_name: str, device, big: bool, paper: bool, tiny_models: bool, weights, gguf: bool,
                fill_random):
    """The diffusion model as ComfyUI's loaders would load it (random weights): (MODEL, weight dtype,
    manual cast, parameter count)."""
    import torch
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import tiny
    with torch.inference_mode():
        if big:
            model_config, model_type = big_detected_config(model_name), None
        else:
            family = {"sd_turbo": "sd2_eps", "sdxl_turbo": "sdxl"}[model_name] if tiny_models else model_name
            config_cls, unet_config, model_type = {**tiny.FAMILIES, **tiny.FULL_SIZE}[family]
            unet_config = dict(unet_config, **({"model_channels": THIN["model_channels"]} if thin else {}))
            model_config = config_cls(unet_config)
        if big:
            # DEVIATION: the weights stay in bfloat16, as the published files are (in float32 Z-Image's
            # 6.2 B parameters are 24.6 GB, more than this machine has); the compute dtype is what
            # ComfyUI picks for bfloat16 weights on this device (its manual cast) and the pack's
            # default precision (autocast) on top.
            dtype = torch.bfloat16
            manual_cast = comfy.model_management.unet_manual_cast(dtype, device, model_config.supported_inference_dtypes)
        elif paper:
            dtype, manual_cast = torch.float32, None
        else:   # the published turbo checkpoints are float16 files
            dtype = comfy.model_management.unet_dtype(device, 10**9, model_config.supported_inference_dtypes,
                                                      weight_dtype=torch.float16)
            manual_cast = comfy.model_management.unet_manual_cast(dtype, device, model_config.supported_inference_dtypes)
        if weights and not gguf:
            # as UNETLoader with weight_dtype: ComfyUI's layers are created with their weights in
            # that dtype and compute through the manual cast; nothing else is converted
            dtype = getattr(torch, weights)
            manual_cast = comfy.model_management.unet_manual_cast(dtype, device, model_config.supported_inference_dtypes)
        model_config.set_inference_dtype(dtype, manual_cast)
        base = (model_config.get_model({}) if model_type is None
                else comfy.model_base.BaseModel(model_config, model_type=model_type))
        fill_random(base.diffusion_model, 0)
        if not weights:
            base.diffusion_model.to(dtype)
        unet_params = sum(p.numel() for p in base.diffusion_model.parameters())
        if gguf:
            model, dtype, manual_cast = gguf_model(base, model_name, weights)
            del base
        else:
            model = comfy.model_patcher.ModelPatcher(base, load_device=device,
                                                     offload_device=comfy.model_management.unet_offload_device())

    return model, dtype, manual_cast, unet_params


def build_vae_and_prompt(model_name: str, device, big: bool, paper: bool, tiny_models: bool, fill_random,
                         unet_params: int, dtype, manual_cast):
    """The VAE and the prompt's conditioning: (VAE, positive, text-encoder parameters, (text encoder,
    encode(), its device) for the paper's text-encoder LoRA or None, the random conditioning's shape
    for the big models or None)."""
    import torch
    import comfy.sd
    import tiny
    text, cond_info = None, None
    from comfy.ldm.models.autoencoder import AutoencoderKL
    if big:
        # the family's own VAE; no text encoder: conditioning of the real shape, random values
        vae = big_vae(model_name, fill_random)
        positive, cond_info = big_conditioning(model_name)
        te_params = 0
        print(f"# {model_name}: {BIG_MODELS[model_name]}; {unet_params / 1e6:.0f} M parameters in {dtype}, ComfyUI "
              f"manual cast {manual_cast}; VAE latent {vae.latent_channels} channels, {vae.downscale_ratio}x; text "
              f"encoder not built: random conditioning {cond_info}", file=sys.stderr, flush=True)
    else:
        vae_cfg = tiny.vae_config(4) if tiny_models else {"params": {"embed_dim": 4, "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
            "ch": THIN["vae_ch"] if thin else 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}}
        with torch.inference_mode():
            module = fill_random(AutoencoderKL(**vae_cfg["params"]), 1)
            vae = comfy.sd.VAE(sd=module.state_dict(), config=vae_cfg)
            del module

        import comfy.sdxl_clip
        import comfy.text_encoders.sd2_clip as sd2_clip
        te_options = ({f"{name}_model_config": {"num_hidden_layers": 3} for name in ("clip_h", "clip_l", "clip_g")}
                      if tiny_models else {})
        te_device = device if paper else torch.device("cpu")
        with torch.inference_mode(paper is False):
            if model_name == "sdxl_turbo":
                text_encoder = comfy.sdxl_clip.SDXLClipModel(device=te_device, dtype=torch.float32, model_options=te_options)
                tokenizer = comfy.sdxl_clip.SDXLTokenizer()
            else:
                text_encoder = sd2_clip.SD2ClipModel(device=te_device, dtype=torch.float32, model_options=te_options)
                tokenizer = sd2_clip.SD2Tokenizer()
            fill_random(text_encoder, 2)
            text_encoder.requires_grad_(False)
        tokens = tokenizer.tokenize_with_weights(PROMPT)
        te_params = sum(p.numel() for p in text_encoder.parameters())

        def encode():
            cond, pooled = text_encoder.encode_token_weights(tokens)[:2]
            return cond, pooled

        with torch.inference_mode():
            cond, pooled = encode()
            positive = [[cond.detach().cpu(), {"pooled_output": pooled.detach().cpu()} if model_name == "sdxl_turbo" else {}]]
        text = (text_encoder, encode, te_device)
    return vae, positive, te_params, text, cond_info


def build_networks(tiny_models: bool, fill_random, compute_dtype):
    """DINOv2 and the IR network (tiny files through the pack's loaders, or the real architectures with
    random weights) in the compute precision: (dino, ir, their parameter count)."""
    import torch
    import conftest
    import tiny
    from conftest import siso
    fn, pre, gen = (siso(f"siso_ops.{m}") for m in ("feature_networks", "preprocess", "generation"))
    with torch.inference_mode(False):
        if tiny_models:
            folder = os.path.join(conftest.BASE, "models", "siso")
            names = tiny.write_feature_files(folder)
            dino, ir = fn.load_dino(os.path.join(folder, names[0])), fn.load_ir(os.path.join(folder, names[1]))
        else:
            import timm
            dino_width = {"embed_dim": THIN["dino_width"], "num_heads": 1} if thin else {}
            ir_width, ir_dim = (THIN["ir_width"], 64) if thin else (1280, 1024)
            with torch.device("meta"):     # no timm init: fill_random draws the weights
                dino_module = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=518, num_classes=0,
                                                **dino_width)
                ir_module = fn.IRNetwork(fn._build_ir_backbone(ir_width, 32, ir_dim), torch.nn.Linear(ir_dim, 64))
            dino_module, ir_module = (fill_random(m.to_empty(device="cpu"), 3 + i).eval().requires_grad_(False)
                                      for i, m in enumerate((dino_module, ir_module)))
            dino = fn.FeatureNetwork(dino_module, fn.DINO_IMAGE_SIZE, pre.IMAGENET_MEAN, pre.IMAGENET_STD,
                                     "DINOv2 ViT-L/14 random")
            ir = fn.FeatureNetwork(ir_module, fn.IR_IMAGE_SIZE, pre.OPENAI_CLIP_MEAN, pre.OPENAI_CLIP_STD,
                                   "IR ViT-H/14 random")
        # the pack's network cache stores them in the compute precision, then hands the memory
        # the float32 copies held back to the system
        dino.to(dtype=compute_dtype)
        ir.to(dtype=compute_dtype)
        gen.release_freed_memory()
        feature_params = sum(p.numel() for n in (dino, ir) for p in n.module.parameters())
    return dino, ir, feature_params


def install_paper_loop(text_encoder, encode, te_device):
    """The paper's loop in this process: a LoRA on the text encoder too, the prompt re-encoded with
    gradients at every iteration."""
    import torch
    from conftest import siso
    host, gen, lora_mod = (siso(f"siso_ops.{m}") for m in ("host", "generation", "lora"))
    lora_targets = [m for n, m in text_encoder.named_modules()
                    if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) and hasattr(m, "weight_function")]
    # ComfyUI's CLIP layers add into their input in place after a LayerNorm saved it (fine
    # for inference); for training, each LayerNorm reads a copy.
    for m in text_encoder.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.forward = (lambda f: lambda x, *a, **k: f(x.clone(), *a, **k))(m.forward)
    
    class MergedLoRA:
        """The paper's text-encoder LoRA as a ComfyUI weight wrapper: merged into the weight at
        every call, moved with the text encoder (ComfyUI calls move_to on weight wrappers)."""
    
        def __init__(self, delta):
            self.delta = delta
    
        def __call__(self, weight):
            delta = (self.delta.up @ self.delta.down) * self.delta.scale
            return weight + delta.reshape(weight.shape).to(weight.dtype)
    
        def move_to(self, device=None):
            if device is not None:
                self.delta.to(device)
            return sum(p.numel() * p.element_size() for p in self.delta.parameters())
    
    class PaperTrainable(host.TrainableModel):
        def __init__(self, model, rank=4, alpha=None, target=host.TARGETS[0], seed=0, checkpointing=False):
            super().__init__(model, rank, alpha, target, seed, checkpointing)
            g = torch.Generator().manual_seed(seed + 1)
            self.te_deltas = []
            for m in lora_targets:
                delta = lora_mod.LoRADelta(m.weight.shape[0], m.weight.shape[1], self.rank, self.alpha,
                                           device=te_device, generator=g)
                m.weight_function = [MergedLoRA(delta)]
                self.te_deltas.append(delta)
            self.patcher.set_model_unet_function_wrapper(self.reencode)
    
        def reencode(self, apply_model, args):
            c = dict(args["c"])
            x = args["input"]
            cond, pooled = encode()
            c["c_crossattn"] = cond.to(x.device)
            if "y" in c:     # SDXL: the pooled prompt is part of the size/pooled vector
                h, w = x.shape[-2] * 8, x.shape[-1] * 8
                c["y"] = self.patcher.model.encode_adm(pooled_output=pooled, width=w, height=h).to(x.device)
            return apply_model(x, args["timestep"], **c)
    
        def parameters(self):
            out = super().parameters()
            for i, delta in enumerate(self.te_deltas):
                out[f"text_encoder.{i}:down"], out[f"text_encoder.{i}:up"] = delta.down, delta.up
            return out
    
        def unload(self):
            for m in lora_targets:
                m.weight_function = []
            super().unload()
    
    gen.host.TrainableModel = PaperTrainable   # this process only: the paper's loop


@dataclasses.dataclass
class PathRun:
    """What every measured path of one child shares: the host objects, the synthetic inputs, the
    similarity networks, the settings builder and the memory meter."""
    model: object
    vae: object
    positive: list
    subject: object
    photo: object
    mask: object
    networks: tuple
    settings_for: object      # (max_iterations, patience) -> GenerationSettings
    memory: Memory

    def optimise(self, settings, **kwargs):
        from conftest import siso
        return siso("siso_ops.generation").optimize_subject(self.model, self.vae, self.positive, self.subject, None,
                                                            None, settings, feature_networks=self.networks, **kwargs)


def synthetic_inputs(size: int, vae, positive: list, references: int, subject_mod):
    """(subject, photo, editing mask, conditioning): a fixed synthetic subject and photo (smooth
    colour fields), the centre square as the mask; with ``references``, the photo as VAEEncode +
    ReferenceLatent would append it to the conditioning's reference_latents."""
    import torch

    def synthetic(seed):
        g = torch.Generator().manual_seed(seed)
        base_image = torch.rand(1, 3, 8, 8, generator=g)
        return torch.nn.functional.interpolate(base_image, size=(size, size), mode="bilinear").permute(0, 2, 3, 1)

    subject = subject_mod.prepare_subject(synthetic(1))
    photo = synthetic(2)
    if references:
        with torch.inference_mode():
            reference = vae.encode(photo)
        positive = [[cond, dict(extra, reference_latents=list(extra.get("reference_latents", [])) + [reference] * references)]
                    for cond, extra in positive]
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    return subject, photo, mask, positive


def memory_estimate_entry(plan) -> dict | None:
    """The run's memory estimate (siso_ops.memory's plan) as the JSON entry reports it."""
    if plan is None or plan.estimate is None:
        return None
    chosen, estimate = plan.checkpointing, plan.estimate
    return {"checkpointing": chosen, "peak_mb": estimate.peak(chosen) / 2**20,
            "needed_mb": estimate.needed(chosen) / 2**20, "other_mode_peak_mb": estimate.peak(not chosen) / 2**20,
            "weights_mb": {k: v / 2**20 for k, v in estimate.weights.items()},
            "activations_mb": {k: v.peak(chosen) / 2**20 for k, v in estimate.activations.items()},
            "available_mb": plan.available.usable / 2**20}


def measure_path(run: PathRun, path: str, iterations: int):
    """(the path's entry, the checkpointing the run chose or None): ``iterations`` timed
    iterations after a warm-up one (0: one iteration, the warm-up included), wall and CPU seconds,
    peak memory, losses and the memory estimate against the peak."""
    import torch
    from conftest import siso
    editing, renoise = siso("siso_ops.editing"), siso("siso_ops.renoise")
    inversion = None
    if path == "editing":
        with torch.inference_mode():
            inversion, _ = editing.invert_photo(run.model, run.vae, run.photo, run.positive, editing.InversionSettings(
                renoise=renoise.ReNoiseSettings().ddim()))
    stamps, cpu_stamps = [], []
    run.memory.reset()
    start_mb = run.memory.current_mb()
    before, cpu_before = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        _, _, result = run.optimise(
            run.settings_for(iterations + 2, iterations + 2) if iterations else run.settings_for(1, 1),
            inversion=inversion, mask=run.mask if inversion is not None else None,
            on_iteration=lambda r: (stamps.append(time.perf_counter()), cpu_stamps.append(time.process_time())))
    seconds = [b - a for a, b in zip(stamps, stamps[1:])][1:]    # the first step warms up
    if not iterations:
        # --iterations 0: one iteration only (a forward and a backward: the peak), its time
        # including the warm-up; for models whose iteration takes minutes on this machine
        seconds = [stamps[0] - before]
    # CPU seconds the process got per timed iteration (all its threads) and the load average:
    # on a shared machine, wall time grows when other processes take the cores
    cpu_seconds = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])][1:] if iterations else [cpu_stamps[0] - cpu_before]
    entry = {"seconds": seconds, "median_s": statistics.median(seconds), "peak_mb": run.memory.peak_mb(),
             "start_mb": start_mb, "first_iteration_s": stamps[0] - before, "cpu_seconds": cpu_seconds,
             "load_average": os.getloadavg(), "threads": torch.get_num_threads(),
             "losses": [h["loss"] for h in result.history]}
    if getattr(result, "compiled", ""):   # what was compiled and how long it took (the report's words)
        entry["compiled"] = result.compiled
    plan = getattr(result, "memory", None)
    estimate = memory_estimate_entry(plan)
    if estimate is not None:
        entry["estimate"] = estimate
    return entry, (plan.checkpointing if plan is not None else None)


def extra_measurements(run: PathRun, entry: dict, stem: str, early_stop: bool, profile_dir: str | None,
                       count_ops: bool):
    """The generation path's optional runs, added to its entry: to the early stop (at most 50
    iterations, patience 7), the profiled iterations, the operator counts."""
    import torch
    from conftest import siso
    host, gen, fn = siso("siso_ops.host"), siso("siso_ops.generation"), siso("siso_ops.feature_networks")
    if early_stop:
        run.memory.reset()
        start = time.perf_counter()
        with torch.inference_mode():
            _, _, result = run.optimise(run.settings_for(50, 7))
        entry["early_stop"] = {"wall_s": time.perf_counter() - start, "iterations": result.iterations,
                               "stop_reason": result.stop_reason}
    if profile_dir:
        entry["profile"] = profile_iteration(
            lambda on_iteration: run.optimise(run.settings_for(4, 4), on_iteration=on_iteration),
            os.path.join(profile_dir, stem), gen, host, fn)
    if count_ops:
        entry["count"] = count_iteration(
            lambda on_iteration: run.optimise(run.settings_for(3, 3), on_iteration=on_iteration), gen, host, fn)


def child(model_name: str, config: str, size: int, iterations: int, early_stop: bool, tiny_models: bool,
          paths=PATHS, profile_dir: str | None = None, count_ops: bool = False):
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import conftest  # noqa: F401  (ComfyUI in-process with the pack loaded; device from SISO_DEVICE)
    import torch
    from conftest import siso

    host, gen, opt, subject_mod = (siso(f"siso_ops.{m}") for m in ("host", "generation", "optimize", "subject"))
    device = host.compute_device()
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    memory = Memory(device, total_mb - 1536 if device.type == "cpu" else None)
    paper = config == "paper"
    variant = dict(VARIANTS.get(config, {}))
    weights = variant.pop("weights", None)       # a storage dtype for the diffusion weights, not a setting
    references = variant.pop("references", 0)    # reference images in the conditioning, not a setting
    gguf = weights is not None and weights.startswith("gguf_")
    torch.manual_seed(0)

    fill_random = random_filler(device)

    # --- the diffusion model, as ComfyUI's checkpoint loader would load it
    big = model_name in BIG_MODELS
    if big and (paper or tiny_models):
        print(json.dumps({"aborted": f"{model_name}: the pack's defaults (and their variants) at full size only: the "
                                     "paper configuration trains a LoRA on the text encoder, which is not built here, "
                                     "and there is no tiny version"}), flush=True)
        return
    model, dtype, manual_cast, unet_params = build_model(model_name, device, big, paper, tiny_models, weights, gguf,
                                                         fill_random)

    # --- the VAE (the SD/SDXL VAE architecture) and the text encoder(s)
    vae, positive, te_params, text, cond_info = build_vae_and_prompt(model_name, device, big, paper, tiny_models,
                                                                      fill_random, unet_params, dtype, manual_cast)

    # --- the similarity networks
    compute_dtype = siso("siso_ops.precision").compute_dtype(
        device, "fp32" if paper else variant.get("precision", gen.GenerationSettings().precision))
    dino, ir, feature_params = build_networks(tiny_models, fill_random, compute_dtype)

    # --- the paper's text-encoder LoRA: re-encode the prompt with gradients at every iteration
    if paper:
        install_paper_loop(*text)

    subject, photo, mask, positive = synthetic_inputs(size, vae, positive, references, subject_mod)

    def settings_for(max_iterations, patience):
        optimization = opt.OptimizationSettings(max_iterations=max_iterations, early_stop_patience=patience)
        if paper:
            return gen.GenerationSettings(width=size, height=size, precision="fp32", gradient_checkpointing=False,
                                          optimization=optimization)
        return gen.GenerationSettings(width=size, height=size, optimization=optimization, **variant)   # the defaults

    weights_mb = memory.current_mb()
    out = {"model": model_name, "config": config, "size": size, "device": str(device),
           "unet_dtype": str(dtype).replace("torch.", ""), "compute_dtype": str(compute_dtype).replace("torch.", ""),
           "unet_params_m": unet_params / 1e6, "text_encoder_params_m": te_params / 1e6,
           "feature_params_m": feature_params / 1e6, "resident_mb": weights_mb, "paths": {}}
    if big:
        out.update(architecture=BIG_MODELS[model_name], manual_cast=str(manual_cast).replace("torch.", ""),
                   text_encoder="not built: random conditioning of the real encoder's shape", conditioning=cond_info,
                   vae_latent_channels=vae.latent_channels)
    out["low_memory"] = settings_for(1, 1).gradient_checkpointing      # True, False or "auto"
    if thin:
        out["thin"] = THIN
    if weights:
        out["weights"] = weights
    if references:
        out["references"] = references
    run = PathRun(model=model, vae=vae, positive=positive, subject=subject, photo=photo, mask=mask,
                  networks=(dino, ir), settings_for=settings_for, memory=memory)
    for path in paths:
        entry, checkpointing = measure_path(run, path, iterations)
        if checkpointing is not None:
            out["gradient_checkpointing"] = checkpointing
        if path == "generation":
            extra_measurements(run, entry, f"{model_name}-{config}", early_stop, profile_dir, count_ops)
        out["paths"][path] = entry
        print(f"# {model_name} {config} {path}: {entry['median_s']:.2f} s/iteration, peak {entry['peak_mb']:.0f} MB"
              + (f" (estimate {estimate_against_peak(entry, device.type)[0]:.0f} MB against measured "
                 f"{estimate_against_peak(entry, device.type)[1]:.0f} MB)" if "estimate" in entry else "")
              + (f"; {entry['compiled']}" if "compiled" in entry else ""),
              file=sys.stderr, flush=True)
    print(json.dumps(out), flush=True)


def estimate_against_peak(entry: dict, device_type: str):
    """(estimate, measured) in MB, like for like. On a CPU: what the run added to the process
    (peak RSS less the RSS when it started; the estimate leaves out the weights already in RAM).
    On a GPU: the device's peak allocation, everything on it, against the estimated peak."""
    estimate = entry["estimate"]
    if device_type == "cpu":
        return estimate["needed_mb"], entry["peak_mb"] - entry["start_mb"]
    return estimate["peak_mb"], entry["peak_mb"]


# ----------------------------------------------------------------------------- profiling
PHASES = ("denoise", "decode", "embed", "backward")


@contextlib.contextmanager
def phases_marked(gen, host, fn, mark, detailed: bool = False):
    """While inside: each phase's function (denoise, decode, embed, backward) is replaced by
    ``mark(label, function)``; restored on the way out. ``detailed``: the two similarity networks
    are told apart ("dino", "ir" instead of "embed") and AdamW's step is a phase ("optimiser")."""
    import torch
    patches = [(host.DifferentiableDecoder, "__call__", "decode"), (fn.FeatureNetwork, "embed", "embed"),
               (gen, "sample", "denoise"), (torch.Tensor, "backward", "backward")]
    if detailed:
        patches.append((torch.optim.AdamW, "step", "optimiser"))
    # what each owner held itself (None: inherited, e.g. AdamW's step from Adam): put back, or removed
    originals = [(owner, name, vars(owner).get(name)) for owner, name, _ in patches]
    for owner, name, label in patches:
        if detailed and label == "embed":
            setattr(owner, name, _network_marked(mark, getattr(owner, name)))
        else:
            setattr(owner, name, mark(label, getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, f in originals:
            if f is None:
                delattr(owner, name)
            else:
                setattr(owner, name, f)


def _network_marked(mark, embed):
    """FeatureNetwork.embed marked "dino" or "ir" by the network it runs (its name says which)."""
    dino, ir = mark("dino", embed), mark("ir", embed)

    def marked(network, *args, **kwargs):
        return (dino if network.name.startswith("DINO") else ir)(network, *args, **kwargs)
    return marked


PROFILE_PHASES = ("denoise", "decode", "dino", "ir", "backward", "optimiser")


# Operators that only make tensor metadata (views, an empty tensor re-pointed at a storage):
# dispatched like any other, but no kernel runs on the device.
_NO_KERNEL = {"aten::empty", "aten::set_", "aten::_unsafe_view", "aten::lift_fresh", "aten::alias"}


def count_iteration(run, gen, host, fn) -> dict:
    """Operators one whole iteration dispatches, per phase (denoise, decode, embed, backward; the
    rest, AdamW included, is "other"), split into those that run a kernel and those that only
    make metadata (views). Nearly device-independent: on a GPU each kernel is a launch with a few
    microseconds of Python and dispatcher work before it (metadata operators cost that work
    without the launch), so an iteration of many small kernels is bound by their count rather
    than by its arithmetic. ``run(on_iteration)`` runs the optimisation; iteration 1 is counted
    whole (the backward pass and AdamW step of iteration 0, then its own forward passes)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    phase = ["other"]
    ops = {}
    metadata = {}
    by_name = {}       # phase -> operator -> kernels: which operators a phase's count is made of

    def marked(label, f):
        def wrapper(*args, **kwargs):
            outer = phase[0]
            phase[0] = label if outer == "other" else outer     # the outermost phase owns nested calls
            try:
                return f(*args, **kwargs)
            finally:
                phase[0] = outer
        return wrapper

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kernel = not (func.is_view or func._schema.name in _NO_KERNEL)
            counts = ops if kernel else metadata
            counts[phase[0]] = counts.get(phase[0], 0) + 1
            if kernel:
                names = by_name.setdefault(phase[0], {})
                names[func._schema.name] = names.get(func._schema.name, 0) + 1
            return func(*args, **(kwargs or {}))

    counter = Counter()
    seen = []

    def step(report):
        seen.append(report.iteration)
        if len(seen) == 1:
            counter.__enter__()
        elif len(seen) == 2:
            counter.__exit__(None, None, None)
    try:
        with phases_marked(gen, host, fn, marked), torch.inference_mode():
            run(step)
    finally:
        if len(seen) == 1:
            counter.__exit__(None, None, None)
    top = {label: dict(sorted(names.items(), key=lambda kv: -kv[1])[:12]) for label, names in by_name.items()}
    return {"ops": ops, "ops_total": sum(ops.values()), "metadata_ops": metadata,
            "metadata_total": sum(metadata.values()), "top_operators": top}


def profile_iteration(run, stem: str, gen, host, fn) -> dict:
    """One whole iteration (backward and AdamW step of the one before, then denoise, decode and
    score) under torch.profiler, with the phases marked. Writes ``stem``.txt (the tables) and
    returns where the time went: the iteration's wall time and the device's busy time."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    def marked(label, f):
        def wrapper(*args, **kwargs):
            with record_function(f"siso:{label}"):
                return f(*args, **kwargs)
        return wrapper

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    stamps = []
    captured = []
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=1, repeat=1),
                 on_trace_ready=lambda p: captured.append(p.key_averages())) as prof:
        def step(report):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            prof.step()
        with phases_marked(gen, host, fn, marked, detailed=True), torch.inference_mode():
            run(step)
    events = captured[0]
    on_device = [e for e in events if e.device_type.name != "CPU"]
    device_busy_us = sum(e.self_device_time_total for e in on_device)
    launches = sum(e.count for e in on_device)      # kernels, copies and fills the device ran
    wall_s = stamps[2] - stamps[1]
    # Each phase's share: of the iteration's wall time (the host thread inside the phase's range)
    # and, on a GPU, of the device's busy time (kernels launched inside the range). "other" is the
    # rest: Python between the phases, the loss bookkeeping, waiting.
    by_name = {e.key: e for e in events}
    phases = {}
    for label in PROFILE_PHASES:
        e = by_name.get(f"siso:{label}")
        phases[label] = {"wall_share": (e.cpu_time_total / 1e6 / wall_s) if e else 0.0,
                         "device_share": (e.device_time_total / device_busy_us) if e and device_busy_us else 0.0}
    phases["other"] = {"wall_share": max(0.0, 1 - sum(p["wall_share"] for p in phases.values())),
                       "device_share": max(0.0, 1 - sum(p["device_share"] for p in phases.values()))
                       if device_busy_us else 0.0}
    with open(stem + ".txt", "w") as f:
        f.write(f"iteration wall {wall_s:.3f} s; device kernels busy {device_busy_us / 1e6:.3f} s "
                f"({device_busy_us / 1e6 / wall_s:.0%}); {launches} device launches\n")
        f.write("phase shares (wall, device): " + ", ".join(
            f"{k} {v['wall_share']:.0%} / {v['device_share']:.0%}" for k, v in phases.items()) + "\n\n")
        f.write(events.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60) + "\n")
        if torch.cuda.is_available():
            f.write(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=60) + "\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60) + "\n")
    return {"wall_s": wall_s, "device_busy_s": device_busy_us / 1e6, "device_busy_fraction": device_busy_us / 1e6 / wall_s,
            "device_launches": launches, "phases": phases}


def profile_table(results: list) -> list:
    """--profile: where one generation iteration's time went, per configuration."""
    rows = [(r["model"], r["config"], r["paths"]["generation"]["profile"]) for r in results
            if "profile" in r.get("paths", {}).get("generation", {})]
    if not rows:
        return []
    names = PROFILE_PHASES + ("other",)
    lines = ["Where one generation iteration's time goes (`--profile`, torch.profiler, one iteration after a "
             "warm-up): its wall time, the share of it the device was busy, the device launches (kernels, copies, "
             "fills), and each phase's share of the wall time / of the device's busy time (backward is every "
             "network's backward together; other = Python between phases, bookkeeping, waiting).", "",
             "| model | configuration | wall s | device busy | launches | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for model_name, config, p in rows:
        lines.append(f"| {model_name} | {config} | {p['wall_s']:.3f} | {p.get('device_busy_fraction', 0):.0%} | "
                     f"{p.get('device_launches', 0)} | " + " | ".join(
                         f"{p['phases'][n]['wall_share']:.0%} / {p['phases'][n]['device_share']:.0%}"
                         for n in names) + " |")
    return lines + [""]


# ----------------------------------------------------------------------------- the parent
def run_child(model_name, config, args, device) -> dict:
    env = dict(os.environ, SISO_DEVICE=device, PYTHONUNBUFFERED="1")
    command = [sys.executable, os.path.abspath(__file__), "--child", model_name, config, "--size", str(args.size),
               "--iterations", str(args.iterations), "--paths", args.paths] + (["--early-stop"] if args.early_stop else []) + \
              (["--tiny"] if args.tiny else []) + (["--thin"] if args.thin else []) + \
              (["--profile", args.profile] if args.profile else []) + (["--count-ops"] if args.count_ops else [])
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in proc.stderr.splitlines():
        if line.startswith("# "):
            print(line, file=sys.stderr, flush=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        reason = "killed by the system (out of memory?)" if proc.returncode < 0 else f"exit code {proc.returncode}"
        return {"model": model_name, "config": config, "aborted": f"{reason}: {proc.stderr[-6000:]}"}
    result = json.loads(lines[-1])
    result.setdefault("model", model_name)
    result.setdefault("config", config)
    result["process_s"] = time.perf_counter() - started
    return result


def machine(device: str) -> str:
    import torch
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
        flags = " with AVX-512 BF16" if "avx512_bf16" in info else ""
    except OSError:
        name = platform.processor()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores ({name}{flags}), {total:.0f} GiB RAM, no GPU; torch {torch.__version__}"


def summarise(results: list, args, device: str) -> str:
    rows = {}
    for r in results:
        rows.setdefault((r["model"], r["config"]), []).append(r)
    lines = [
        f"Machine: {machine(device)}. Date: {datetime.date.today().isoformat()}. "
        + ("Commands: " if len(args.commands) > 1 else "Command: ")
        + "; ".join(f"`python benchmarks/bench.py {' '.join(c)}`".replace(" `", "`") for c in args.commands)
        + f". Image size {args.size} px, "
        f"{args.iterations} timed iterations per path after one warm-up, {args.rounds} round(s), each (model, "
        "configuration) in its own fresh process, paper and defaults alternating. Medians.",
        "",
        "| model | path | configuration | s / iteration | time vs paper | peak memory | memory vs paper |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for model_name in args.models:
        for path in args.paths.split(","):
            cells = {}
            for config in args.configs:
                runs = rows.get((model_name, config), [])
                done = [r["paths"][path] for r in runs if "paths" in r and path in r["paths"]]
                for r in runs:
                    if "aborted" in r:
                        notes.append(f"- {model_name} {config}: could not run here: {r['aborted'].strip().splitlines()[-1][:300]}")
                if done:
                    cells[config] = (statistics.median(s for d in done for s in d["seconds"]),
                                     statistics.median(d["peak_mb"] for d in done))
            paper_cell = cells.get("paper")
            for config in args.configs:
                if config not in cells:
                    lines.append(f"| {model_name} | {path} | {config} | could not run here (below) | | | |")
                    continue
                seconds, peak = cells[config]
                ratios = ("", "") if config == "paper" or paper_cell is None else (
                    f"**{seconds / paper_cell[0]:.2f}**", f"**{peak / paper_cell[1]:.2f}**")
                lines.append(f"| {model_name} | {path} | {config} | {seconds:.2f} | {ratios[0]} | {peak / 1024:.2f} GiB | "
                             f"{ratios[1]} |")
    lines.append("")
    if getattr(args, "estimate", False):
        lines += estimate_table(results, args, device)
    lines += operator_table(results, args)
    lines += profile_table(results)
    for r in results:
        if "paths" not in r:
            continue
        extra = ""
        stop = r["paths"].get("generation", {}).get("early_stop")
        compiled = r["paths"].get("generation", {}).get("compiled")
        if compiled:   # compile time, apart from the timed iterations
            extra += f"; {compiled}"
        if stop:
            extra += (f"; start to early stop: {stop['wall_s']:.1f} s over {stop['iterations']} iterations "
                     f"({stop['stop_reason']})")
        if "architecture" in r:   # a real DiT architecture with bfloat16 weights, no text encoder
            cond = r["conditioning"]
            what = (f"{r['architecture']}: diffusion model {r['unet_params_m']:.0f} M parameters in {r['unet_dtype']} "
                    f"(ComfyUI's manual cast to {r['manual_cast']}), ")
            te = (f"text encoder not built (random conditioning {cond['shape']} {cond['dtype']}: {cond['tokens']} tokens "
                  f"as ComfyUI's tokenizer gives \"{PROMPT}\", {cond['real_tokens']} of them not padding, with an "
                  "attention mask)")
        else:
            what = f"UNet {r['unet_params_m']:.0f} M parameters in {r['unet_dtype']}, "
            te = f"text encoder(s) {r['text_encoder_params_m']:.0f} M"
        lines.append(f"- {r['model']} {r['config']}: {what}"
                     f"compute {r['compute_dtype']}, gradient checkpointing "
                     f"{'on' if r.get('gradient_checkpointing', r.get('low_memory')) else 'off'}"
                     f"{' (auto)' if r.get('low_memory') == 'auto' else ''}, {te}, similarity networks "
                     f"{r['feature_params_m']:.0f} M; "
                     f"{r['resident_mb'] / 1024:.2f} GiB resident before the loop{extra}")
    return "\n".join(lines + sorted(set(notes)))


def estimate_table(results: list, args, device: str) -> list:
    """--estimate: SISO's memory estimate (siso_ops/memory.py, made before the run) against the
    measured peak of each run."""
    what = ("memory the run added to the process (peak RSS less the RSS at its start; weights already in RAM "
            "are in neither)" if device == "cpu" else "peak GPU allocation (everything on the device)")
    lines = [f"Memory estimate against measurement ({what}); error = estimate / measured - 1. The paper "
             "configuration also trains LoRAs on the text encoders, which the estimate does not know of.", "",
             "| model | path | configuration | low_memory | estimate | measured | error |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for path, entry in r.get("paths", {}).items():
            if "estimate" not in entry:
                continue
            estimate, measured = estimate_against_peak(entry, device)
            chosen = "on" if entry["estimate"]["checkpointing"] else "off"
            lines.append(f"| {r['model']} | {path} | {r['config']} | {chosen}{' (auto)' if r.get('low_memory') == 'auto' else ''} "
                         f"| {estimate / 1024:.2f} GiB | {measured / 1024:.2f} GiB | {estimate / measured - 1:+.1%} |")
    return lines + [""]


def operator_table(results: list, args) -> list:
    """--count-ops: operators dispatched in one generation iteration, per phase, against the paper."""
    counts = {(r["model"], r["config"]): r["paths"]["generation"]["count"] for r in results
              if "count" in r.get("paths", {}).get("generation", {})}
    if not counts:
        return []

    def phases(count):
        return sum(count["ops"].get(p, 0) for p in PHASES)

    lines = ["Operators that run a kernel in one generation iteration (`--count-ops`; on a GPU each is a kernel "
             "launch), per phase, and the metadata-only operators (views) dispatched besides. The four phases "
             "dispatch nearly the same operators on any device (autocast's lists of what it casts differ a little "
             "between CPU and CUDA); \"other\" does not: on a CPU, AdamW and the gradient clipping loop over the "
             "LoRA's tensors, on a GPU they use a few multi-tensor kernels. So \"four phases\" is the GPU's "
             "launch count to compare.", "",
             "| model | configuration | " + " | ".join(PHASES) + " | four phases | vs paper | other (AdamW, "
             "bookkeeping) | metadata operators |",
             "|---|---|" + "---|" * (len(PHASES) + 4)]
    for model_name in args.models:
        paper = counts.get((model_name, "paper"))
        for config in args.configs:
            count = counts.get((model_name, config))
            if count is None:
                continue
            ratio = f"**{phases(count) / phases(paper):.2f}**" if paper and config != "paper" else ""
            lines.append(f"| {model_name} | {config} | " + " | ".join(str(count["ops"].get(p, 0)) for p in PHASES)
                         + f" | {phases(count)} | {ratio} | {count['ops'].get('other', 0)} | "
                         f"{count.get('metadata_total', 'not counted')} |")
    return lines + [""]


def write_section(text: str, device: str):
    path = os.path.join(REPO, "BENCHMARKS.md")
    start, end = f"<!-- bench:{device}:start -->", f"<!-- bench:{device}:end -->"
    with open(path) as f:
        doc = f.read()
    if start not in doc:
        raise SystemExit(f"BENCHMARKS.md has no {start} ... {end} markers")
    head, rest = doc.split(start, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{text}\n{end}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "CONFIG"))
    parser.add_argument("--size", type=int)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--models", default="sd_turbo,sdxl_turbo",
                        help="sd_turbo, sdxl_turbo (UNets, float16 files), zimage, flux2_klein (real DiT architectures, "
                             "bfloat16 weights, no text encoder; --configs defaults or its variants)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"paper, defaults and variants of the defaults: {', '.join(VARIANTS)}")
    parser.add_argument("--paths", default=",".join(PATHS), help="generation, editing or both")
    parser.add_argument("--early-stop", action="store_true", help="also time a run from start to early stop")
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny models at 64 px")
    parser.add_argument("--thin", action="store_true",
                        help="SD-Turbo / SDXL-Turbo and both networks with their real layers at a fraction of the "
                             "width: --count-ops gives the full-size count in seconds (times are not the real ones)")
    parser.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    parser.add_argument("--json", help="also save the raw results to this file")
    parser.add_argument("--from-json", metavar="FILES",
                        help="run nothing: make the table (and --write it) from the --json files of earlier runs, "
                             "comma-separated")
    parser.add_argument("--profile", metavar="DIR",
                        help="also profile one generation iteration per process; tables go to DIR/<model>-<config>.txt")
    parser.add_argument("--estimate", action="store_true",
                        help="also tabulate SISO's memory estimate (made before each run) against the measured peak")
    parser.add_argument("--count-ops", action="store_true",
                        help="also count the operators (kernel launches on a GPU) of one generation iteration, per phase")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    global thin
    thin = args.thin
    if thin and (args.tiny or set(args.models.split(",")) - {"sd_turbo", "sdxl_turbo"}):
        parser.error("--thin is for --models sd_turbo,sdxl_turbo (without --tiny)")
    if args.profile:
        args.profile = os.path.abspath(args.profile)
        os.makedirs(args.profile, exist_ok=True)
    args.argv = [a for a in argv if a != "--write"]
    if args.child:
        return child(args.child[0], args.child[1], args.size, args.iterations, args.early_stop, args.tiny,
                     args.paths.split(","), args.profile, args.count_ops)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size is None:
        args.size = 64 if args.tiny else (512 if device == "cuda" else 256)
    args.models = args.models.split(",")
    args.configs = args.configs.split(",")
    unknown = set(args.configs) - set(CONFIGS) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --configs: {sorted(unknown)}")
    results = []
    args.commands = [args.argv]
    if args.from_json:
        args.commands = []
        for name in args.from_json.split(","):
            with open(name) as f:
                saved = json.load(f)
            results += saved["results"]
            args.commands.append([a for a in saved["args"] if a != "--json" and not a.endswith(".json")])
    for _ in range(0 if args.from_json else args.rounds):
        for model_name in args.models:
            for config in args.configs:
                result = run_child(model_name, config, args, device)
                print(json.dumps({k: v for k, v in result.items() if k != "aborted"} if "paths" in result else result),
                      flush=True)
                results.append(result)
                if args.json:    # after every process, so a run cut short keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump({"args": args.argv, "device": device, "results": results}, f, indent=1)
    text = summarise(results, args, device)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": args.argv, "device": device, "results": results, "table": text}, f, indent=1)
    if args.write and not (args.tiny or args.thin):
        write_section(text, device)
    return results


if __name__ == "__main__":
    main()
