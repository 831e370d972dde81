"""The memory estimate on Sana's real architecture: what it counts against what a real iteration
keeps for backward, part by part (denoiser, DC-AE decoder), on this CPU in float32.

Sana reads its conditioning's values (the caption's length by .item(), masked_select), which the
shape-only pass cannot do; the estimate counts it again with the conditioning real
(siso_ops/memory_shapes.py, _ShapeRun's real_inputs). tests/test_sana.py pins this on a tiny Sana;
this script measures it at full size, with random weights (counts depend on shapes only):

    python benchmarks/sana_estimate.py [--size 512] [--model SanaMS_600M_P1_D28]
        [--vae dcae-f32c32-sana-1.1-diffusers] [--tokens 20]

The model and VAE are built by ComfyUI_ExtraModels' own classes from the pack's own config entries
(Sana/conf.py, VAE/conf.py), written as the files its loaders read and loaded by
SanaCheckpointLoader / ExtraVAELoader at FP32. The pack is found as the tests find it (the test
ComfyUI's custom_nodes, then ../shared/comfyui-extramodels). The similarity networks are the tests'
tiny ones: their counts are held to the byte by tests/test_memory.py and are not what this measures.
Needs about 3 GB of disk for the files and, at 512 px, about 12 GB of RAM.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", default="SanaMS_600M_P1_D28")
    parser.add_argument("--vae", default="dcae-f32c32-sana-1.1-diffusers")
    parser.add_argument("--tokens", type=int, default=20, help="non-zero caption rows (the prompt's length)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import conftest  # noqa: F401  (ComfyUI in-process with the pack loaded)
    import folder_paths
    import torch
    from safetensors.torch import save_file

    import test_memory
    import test_sana
    import tiny
    from conftest import siso
    fn = siso("siso_ops.feature_networks")

    test_sana.load_pack()
    sana_conf = test_sana._pack_module("SanaCheckpointLoader", "conf").sana_conf
    vae_conf = test_sana._pack_module("ExtraVAELoader", "conf").vae_conf
    config = sana_conf[args.model]["unet_config"]
    checkpoints = pathlib.Path(folder_paths.get_folder_paths("checkpoints")[0])
    vaes = pathlib.Path(folder_paths.get_folder_paths("vae")[0])
    checkpoints.mkdir(parents=True, exist_ok=True)
    vaes.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with torch.inference_mode(False):
        sana = test_sana._pack_module("SanaCheckpointLoader", "models.sana_multi_scale")
        network = getattr(sana, sana_conf[args.model]["target"])(**dict(config))
        tiny.init_random(network, seed=1, std=0.02)
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(checkpoints / "bench_sana.safetensors"))
        del network
        dcae = test_sana._pack_module("ExtraVAELoader", "models.dcae")
        vae_config = {k: v for k, v in vae_conf[args.vae].items()}
        autoencoder = dcae.AutoencoderDC(**vae_config)
        tiny.init_random(autoencoder, seed=2, std=0.02)
        save_file({k: v.contiguous() for k, v in autoencoder.state_dict().items()}, str(vaes / "bench_dcae.safetensors"))
        del autoencoder
    print(f"files written in {time.time() - started:.0f} s")
    with torch.inference_mode():
        model = test_sana.NODE["SanaCheckpointLoader"]().load_checkpoint(
            "bench_sana.safetensors", args.model, "FP32", True)[0]
        vae = test_sana.NODE["ExtraVAELoader"]().load_vae("bench_dcae.safetensors", args.vae, "FP32")[0]
    # SanaTextEncode's CONDITIONING: (1, 1, model_max_length, caption_channels), padding rows zero
    length, channels = config.get("model_max_length", 300), config.get("caption_channels", 2304)
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(length) < args.tokens).float()
    positive = [[torch.randn(1, 1, length, channels, generator=g) * mask[None, None, :, None], {}]]
    folder = pathlib.Path(folder_paths.models_dir) / "siso"
    files = tiny.write_feature_files(str(folder))
    with torch.inference_mode(False):
        networks = fn.load_dino(str(folder / files[0])), fn.load_ir(str(folder / files[1]))
    started = time.time()
    real, counted = test_memory.kept_and_counted(model, vae, positive, args.size, networks)
    print(f"measured in {time.time() - started:.0f} s")
    mib = 2 ** 20
    print(f"\n{args.model} + {args.vae}, {args.size} px, {args.tokens} caption tokens, float32, CPU")
    print("| part | a real iteration keeps | the estimate counts | difference |")
    print("|---|---|---|---|")
    for part in ("denoiser", "decoder"):
        print(f"| {part} | {real[part] / mib:.1f} MiB | {counted[part] / mib:.1f} MiB | "
              f"{(counted[part] - real[part]) / real[part] * 100:+.2f} % ({counted[part] - real[part]:+d} bytes) |")
    for path in (checkpoints / "bench_sana.safetensors", vaes / "bench_dcae.safetensors"):
        path.unlink()


if __name__ == "__main__":
    main()
