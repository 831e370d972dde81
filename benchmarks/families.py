"""Seconds per SISO Optimize iteration for every model family of the table, on the tiny
random-weight models the tests build (tests/tiny_families.py) with the tiny similarity networks.

What this measures: the pack's per-family path (LoRA layers, sampling through ComfyUI, decoder
copy, loss, backward) at toy sizes, so that a family whose path is unusually slow stands out.
It says nothing about a real model's cost (see bench.py for the real architectures) and nothing
about image quality (random weights).

    python benchmarks/families.py [--iterations N] [--families a,b] [--self-check]

``--self-check``: each family's model runs as a subclass made here of its class (no row names it:
the self-checked path on the row's rules), and the table adds the seconds of the check before the
loop (siso_ops/self_check.py: one stock denoiser call, one training call and its backward) and
that time as a fraction of one iteration, both in CPU time of this process (time.process_time:
on a CPU shared with other work, wall-clock times move with the other work's load, CPU seconds
much less).

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
    parser.add_argument("--self-check", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per family; the fastest is shown")
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
    host = siso("siso_ops.host")
    checks = []
    if args.self_check:
        timed = host.TrainableModel.self_check

        def self_check(trainable, *a, **k):
            start = time.process_time()
            try:
                return timed(trainable, *a, **k)
            finally:
                checks.append(time.process_time() - start)
        host.TrainableModel.self_check = self_check
    folder = os.path.join(folder_paths.models_dir, "siso")
    names = tiny.write_feature_files(folder)
    with torch.inference_mode(False):
        networks = fn.load_dino(os.path.join(folder, names[0])), fn.load_ir(os.path.join(folder, names[1]))
    with torch.inference_mode():
        subject = comfy_nodes.NODE_CLASS_MAPPINGS["LoadSubject"].execute(
            torch.rand(1, 72, 96, 3, generator=torch.Generator().manual_seed(3)), "subject", "white").args[0]
    chosen = [f for f in (args.families.split(",") if args.families else tf.FAMILY_CONFIGS)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if args.self_check:
        print("| family (class) | size (px) | denoiser parameters | CPU s / iteration | self-check CPU s | of one iteration |\n"
              "|---|---|---|---|---|---|")
    else:
        print("| family | size (px) | denoiser parameters | s / iteration |\n|---|---|---|---|")
    for name in chosen:
        model, vae, positive = tf.build_model(name), tf.build_vae(name), tf.conditioning(name)
        if args.self_check and not host.self_checked_path(model):
            cls = type(model.model)
            model.model.__class__ = type(f"{cls.__name__}Subclass", (cls,), {})
        checks.clear()
        size = tf.MIN_SIZE.get(name, 64)
        params = sum(p.numel() for p in model.model.diffusion_model.parameters())
        stamps = []
        timings = []
        clock = time.process_time if args.self_check else time.perf_counter
        for run, iterations in enumerate([2] + [args.iterations] * args.repeats):
            stamps.clear()
            settings = gen.GenerationSettings(
                width=size, height=size, seed=1, precision="fp32", gradient_checkpointing=False,
                optimization=optim.OptimizationSettings(max_iterations=iterations, learning_rate=1e-3,
                                                        early_stop_patience=1000))
            with torch.inference_mode():
                gen.optimize_subject(model, vae, positive, subject, None, None, settings, feature_networks=networks,
                                     on_iteration=lambda r: stamps.append(clock()))
            if run:     # not the warm-up
                timings.append(((stamps[-1] - stamps[0]) / (len(stamps) - 1), checks[-1] if checks else 0.0))
        # shared CPUs: the fastest run is the one least slowed by other work
        per_iteration = min(t for t, _ in timings)
        check = min(c for _, c in timings)
        if args.self_check:
            print(f"| {name} ({type(model.model).__name__}) | {size} | {params / 1e6:.2f} M | {per_iteration:.3f} | "
                  f"{check:.3f} | {check / per_iteration:.0%} |", flush=True)
        else:
            print(f"| {name} | {size} | {params / 1e6:.2f} M | {per_iteration:.3f} |", flush=True)


if __name__ == "__main__":
    main()
