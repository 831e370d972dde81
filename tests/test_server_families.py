"""A new model family through the REAL ComfyUI server with stock loaders: SD3 Medium.

The file: ``tests/family_files.py`` writes a random-weight single-file checkpoint laid out key for
key as ``sd3_medium.safetensors`` (``model.diffusion_model.*`` MMDiT + ``first_stage_model.*``
16-channel VAE, no text encoders), with a tiny MMDiT (depth 2). The stock CheckpointLoaderSimple
detects it as SD3 from the keys and shapes alone (comfy.model_detection / comfy.sd.VAE), on ComfyUI
0.3.75 and 0.33 alike. Why SD3: it is published as a single-file checkpoint, so the stock
CheckpointLoaderSimple path its users take is the one tested; and its detection scales with the
weights (hidden = 64 x depth and heads = depth from ``x_embedder``, the text widths from
``context_embedder`` and ``y_embedder``, the position grid from ``pos_embed``), so a depth-2 MMDiT
detects as itself. The other new families' detection fixes full-size values a tiny model cannot
meet: Lumina 2 / Z-Image set heads and RoPE axes only for dim 2304 / 3840, Flux.2 fixes 48 heads
of 128 channels.

The conditioning route: SD3's real text encoders (CLIP-L + CLIP-G + T5-XXL, 4096-wide tokens and
2048-wide pooled vectors) are gigabytes. The tiny MMDiT instead takes 768-wide tokens and a
768-wide pooled vector, the widths of the CLIP-L in the suite's tiny SD1.5 checkpoint
(tests/checkpoint.py, already in the server's checkpoints folder). A second stock
CheckpointLoaderSimple loads that checkpoint, and only its CLIP output is used: stock CLIPTextEncode
gives [tokens (1, 77, 768), {"pooled_output": (1, 768)}], which model_base.SD3.extra_conds turns
into the MMDiT's ``context`` and ``y`` exactly as it does with the real encoders' output.

The workflow: SD3 checkpoint -> SISO Load Subject -> SISO Optimize (3 iterations, 1 step, 64 x 64
px) -> SISO Save LoRA; SISO Apply LoRA -> KSampler -> VAEDecode -> SaveImage; then, in a second
prompt, the stock LoraLoaderModelOnly loading the saved file -> the same KSampler (same seed) ->
VAEDecode -> SaveImage. Both images must be the same pixels.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import family_files
from comfy_server import CKPT_NAME
from conftest import siso
from test_server import api_prompt, run_prompt

host = siso("siso_ops.host")

SD3_CKPT = "siso_tiny_sd3_medium.safetensors"
LORA = "siso_sd3_lora"
RANDOM_LORA = "siso_sd3_random_up"
CLIP_LOADER = "20"   # the tiny SD1.5 checkpoint, for its CLIP only


@pytest.fixture(scope="module")
def sd3_checkpoint(tmp_path_factory):
    started = time.monotonic()
    path = family_files.write_tiny_sd3_checkpoint(tmp_path_factory.mktemp("sd3") / SD3_CKPT)
    print(f"\nwrote the tiny SD3 checkpoint in {time.monotonic() - started:.1f} s")
    return path


def test_the_tiny_sd3_file_is_detected_as_sd3_by_the_stock_loader(sd3_checkpoint):
    """In-process, the same call CheckpointLoaderSimple makes: the model, the VAE, no CLIP."""
    import comfy.model_base
    import comfy.sd
    import comfy.supported_models
    import safetensors
    with safetensors.safe_open(sd3_checkpoint, "pt") as f:
        layout = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert layout == family_files.sd3_medium_layout()
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sd3_checkpoint, output_vae=True, output_clip=True)
    assert type(model.model) is comfy.model_base.SD3
    assert type(model.model.model_config) is comfy.supported_models.SD3
    detected = model.model.model_config.unet_config
    assert {k: detected[k] for k in family_files.SD3_UNET if k != "dtype"} == \
        {k: v for k, v in family_files.SD3_UNET.items() if k != "dtype"}, detected
    assert clip is None     # sd3_medium.safetensors ships without text encoders
    assert vae.latent_channels == 16 and type(vae.first_stage_model).__name__ == "AutoencodingEngine"
    assert host.model_family(model).name == "SD3 / SD3.5 (MMDiT)"
    host.check_vae(vae, model)


# ----------------------------------------------------------------------------- the server
def _sd3_two_stage_prompt() -> dict:
    """tests/workflows/siso_two_stage_api.json (SISO Optimize's settings: 3 iterations, 1 step,
    64 x 64) with the model and VAE from the SD3 checkpoint, the CLIP from the tiny SD1.5 one and
    SD3's empty latent."""
    prompt = api_prompt()
    prompt["1"]["inputs"]["ckpt_name"] = SD3_CKPT
    prompt[CLIP_LOADER] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}}
    for node in prompt.values():
        if node["class_type"] == "CLIPTextEncode":
            node["inputs"]["clip"] = [CLIP_LOADER, 1]
    assert prompt["9"]["class_type"] == "EmptyLatentImage"
    prompt["9"] = {"class_type": "EmptySD3LatentImage", "inputs": dict(prompt["9"]["inputs"])}
    prompt["13"]["inputs"].update(name=LORA, overwrite=True, format="comfyui")
    prompt["12"]["inputs"]["filename_prefix"] = "siso_sd3_apply"
    prompt["14"]["inputs"]["filename_prefix"] = "siso_sd3_best"
    return prompt


def _stage2(prompt: dict, model: list, prefix: str, ids: tuple) -> None:
    """KSampler (the two-stage workflow's: same seed, steps, prompts, latent) + VAEDecode +
    SaveImage on ``model``, added to ``prompt`` under ``ids``."""
    sampler, decode, save = ids
    first = _sd3_two_stage_prompt()
    prompt[sampler] = {"class_type": "KSampler", "inputs": dict(first["10"]["inputs"], model=model)}
    prompt[decode] = {"class_type": "VAEDecode", "inputs": {"samples": [sampler, 0], "vae": ["1", 2]}}
    prompt[save] = {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": [decode, 0]}}


def _pixels(server, entry: dict, node_id: str) -> np.ndarray:
    from PIL import Image
    images = entry["outputs"].get(node_id, {}).get("images", [])
    assert len(images) == 1, entry["outputs"].get(node_id)
    path = server.base / images[0]["type"] / images[0].get("subfolder", "") / images[0]["filename"]
    with Image.open(path) as png:
        assert png.size == (64, 64), png.size
        return np.asarray(png.convert("RGB")).copy()


def _expected_lora_layers() -> dict:
    """{layer: (out, in)} SISO's default target gives an MMDiT ('blocks': every Linear layer of the
    joint blocks but the adaLN modulation), from the published key layout."""
    prefix = "model.diffusion_model."
    return {k[len(prefix):-len(".weight")]: shape for k, shape in family_files.sd3_medium_layout().items()
            if k.startswith(prefix + "joint_blocks.") and k.endswith(".weight") and len(shape) == 2
            and "adaLN_modulation" not in k}


def test_sd3_checkpoint_through_the_server_lora_file_matches_apply_lora(server, sd3_checkpoint):
    import safetensors
    import safetensors.torch
    started = time.monotonic()
    log_start = len(server.log_path.read_bytes())
    link = server.base / "models" / "checkpoints" / SD3_CKPT
    if not link.exists():
        link.symlink_to(sd3_checkpoint)

    # 1. optimise, save the LoRA, apply it with SISO Apply LoRA and sample
    first = run_prompt(server, _sd3_two_stage_prompt())
    outputs = first["outputs"]
    report = outputs.get("5", {}).get("text", [])
    assert report and "iteration cap reached after 3 iterations" in report[0], outputs.get("5")
    best = outputs.get("14", {}).get("images", [])
    assert best and (server.base / "output" / best[0]["filename"]).is_file(), outputs.get("14")
    assert outputs.get("13", {}).get("text") == [f"{LORA}.safetensors"], outputs.get("13")
    lora_path = server.base / "models" / "loras" / f"{LORA}.safetensors"
    with safetensors.safe_open(str(lora_path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    assert metadata.get("siso.iterations") == "3", metadata
    assert metadata.get("siso.model", "").startswith("SD3 (SD3, "), metadata   # model_base.SD3 (supported_models.SD3, ...)
    # the file's layers are SD3's joint-block layers, under the keys ComfyUI's LoRA loader maps
    expected = _expected_lora_layers()
    ups = {k[len("diffusion_model."):-len(".lora_up.weight")]: v for k, v in tensors.items() if k.endswith(".lora_up.weight")}
    assert set(ups) == set(expected) and len(expected) == 13, sorted(set(ups) ^ set(expected))
    for layer, (out_features, in_features) in expected.items():
        down = tensors[f"diffusion_model.{layer}.lora_down.weight"]
        assert ups[layer].shape == (out_features, 4) and down.shape == (4, in_features), layer
        assert ups[layer].dtype == down.dtype == torch.float32
    assert all(k.startswith("diffusion_model.joint_blocks.") for k in tensors), sorted(tensors)[:4]

    # a second file: the same layers with random up weights, so that the LoRA surely changes the
    # image (the run's best may be its iteration 0, where every up weight is still zero)
    g = torch.Generator().manual_seed(0)
    random_up = {k: (torch.randn(v.shape, generator=g) * 0.05 if k.endswith(".lora_up.weight") else v)
                 for k, v in tensors.items()}
    safetensors.torch.save_file(random_up, str(lora_path.with_name(f"{RANDOM_LORA}.safetensors")), metadata=metadata)

    # 2. stage 2 with the stock LoraLoaderModelOnly: the saved file, the random-up file (also
    # through SISO Load LoRA + SISO Apply LoRA), and the model without a LoRA; nodes 1, 20 and
    # the prompts and latent are the first prompt's, so the server reuses their outputs
    second = {k: v for k, v in _sd3_two_stage_prompt().items() if k in ("1", CLIP_LOADER, "7", "8", "9")}
    second["30"] = {"class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": ["1", 0], "lora_name": f"{LORA}.safetensors", "strength_model": 1.0}}
    _stage2(second, ["30", 0], "siso_sd3_loader", ("31", "32", "33"))
    second["40"] = {"class_type": "LoadSISOLoRA", "inputs": {"model": ["1", 0], "lora_name": f"{RANDOM_LORA}.safetensors"}}
    second["41"] = {"class_type": "ApplySISOLoRA", "inputs": {"model": ["1", 0], "subject_lora": ["40", 0], "strength": 1.0}}
    _stage2(second, ["41", 0], "siso_sd3_random_apply", ("42", "43", "44"))
    second["50"] = {"class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": ["1", 0], "lora_name": f"{RANDOM_LORA}.safetensors", "strength_model": 1.0}}
    _stage2(second, ["50", 0], "siso_sd3_random_loader", ("51", "52", "53"))
    _stage2(second, ["1", 0], "siso_sd3_base", ("61", "62", "63"))
    entry = run_prompt(server, second)

    # Both paths hand the same float32 tensors (safetensors stores them bit for bit) to the same
    # ComfyUI function (comfy.sd.load_lora_for_models: SISO Apply LoRA calls it as
    # LoraLoaderModelOnly does), so the patched weights, and with the same seed on the CPU the
    # sampled latents, decoded images and 8-bit PNGs, are bitwise the same: no tolerance.
    apply_image, loader_image = _pixels(server, first, "12"), _pixels(server, entry, "33")
    np.testing.assert_array_equal(loader_image, apply_image)
    random_apply, random_loader = _pixels(server, entry, "44"), _pixels(server, entry, "53")
    np.testing.assert_array_equal(random_loader, random_apply)
    base = _pixels(server, entry, "63")
    assert np.abs(random_apply.astype(int) - base.astype(int)).max() > 0, "the random-up LoRA changed no pixel"

    # every LoRA key reached a layer (ComfyUI logs the ones it cannot map and goes on without them)
    log = server.log_path.read_bytes()[log_start:].decode(errors="replace")
    assert "lora key not loaded" not in log and "ERROR lora" not in log, log[-4000:]
    assert server.alive(), server.log_tail()
    assert "SISOOptimize" in server.get("/object_info/SISOOptimize")
    print(f"\nSD3 through the server: {time.monotonic() - started:.1f} s; {report[0]}; learned LoRA "
          f"{'non-zero' if any(float(v.abs().max()) > 0 for v in ups.values()) else 'zero (best = iteration 0)'}")
