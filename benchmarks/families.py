"""Seconds per SISO Optimize iteration for every model family of the table, on the tiny
random-weight models the tests build (tests/tiny_families.py) with the tiny similarity networks.

What this measures: the pack's per-family path (LoRA layers, sampling through ComfyUI, decoder
copy, loss, backward) at toy sizes, so that a family whose path is unusually slow stands out.
It says nothing about a real model's cost (see bench.py for the real architectures) and nothing
about image quality (random weights).

    python benchmarks/families.py [--iterations N] [--families a,b]

Each family: one untimed warm-up run, then one run of N iterations timed between the first and
the last iteration's callback (the setup before iteration 0 is left out); float32, 1 step,
gradient checkpointing off, at the test size (64 px; 384 px for PixArt, whose position grid needs it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--families", default="")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import conftest  # noqa: F401  (ComfyUI in-process with the pack loaded)
    import folder_paths
    import torch
    import nodes as comfy_nodes
    import tiny
    import tiny_families as tf
    from conftest import siso
    gen, optim, fn = siso("siso_ops.generation"), siso("siso_ops.optimize"), siso("siso_ops.feature_networks")
    folder = os.path.join(folder_paths.models_dir, "siso")
    names = tiny.write_feature_files(folder)
    with torch.inference_mode(False):
        networks = fn.load_dino(os.path.join(folder, names[0])), fn.load_ir(os.path.join(folder, names[1]))
    with torch.inference_mode():
        subject = comfy_nodes.NODE_CLASS_MAPPINGS["LoadSubject"].execute(
            torch.rand(1, 72, 96, 3, generator=torch.Generator().manual_seed(3)), "subject", "white").args[0]
    chosen = [f for f in (args.families.split(",") if args.families else tf.FAMILIES)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print("| family | size (px) | denoiser parameters | s / iteration |\n|---|---|---|---|")
    for name in chosen:
        model, vae, positive = tf.build_model(name), tf.build_vae(name), tf.conditioning(name)
        size = tf.MIN_SIZE.get(name, 64)
        params = sum(p.numel() for p in model.model.diffusion_model.parameters())
        stamps = []
        for iterations in (2, args.iterations):
            stamps.clear()
            settings = gen.GenerationSettings(
                width=size, height=size, seed=1, precision="fp32", gradient_checkpointing=False,
                optimization=optim.OptimizationSettings(max_iterations=iterations, learning_rate=1e-3,
                                                        early_stop_patience=1000))
            with torch.inference_mode():
                gen.optimize_subject(model, vae, positive, subject, None, None, settings, feature_networks=networks,
                                     on_iteration=lambda r: stamps.append(time.perf_counter()))
        per_iteration = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        print(f"| {name} | {size} | {params / 1e6:.2f} M | {per_iteration:.3f} |", flush=True)


if __name__ == "__main__":
    main()
