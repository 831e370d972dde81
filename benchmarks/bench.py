"""Seconds per SISO iteration on tiny random-weight models (a smoke benchmark, not a quality
measure). Run with `make bench`. The full-size benchmark of the performance issue will extend it."""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import conftest  # noqa: E402  (sets up ComfyUI in-process and loads the pack)
import torch  # noqa: E402

import tiny  # noqa: E402
from conftest import siso  # noqa: E402

gen, subject, opt, fn = (siso(f"siso_ops.{m}") for m in ("generation", "subject", "optimize", "feature_networks"))


def main(iterations=5, size=64):
    import folder_paths
    folder = os.path.join(folder_paths.models_dir, "siso")
    names = tiny.write_feature_files(folder)
    with torch.inference_mode(False):
        nets = fn.load_dino(os.path.join(folder, names[0])), fn.load_ir(os.path.join(folder, names[1]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {size}x{size} px, {iterations} iterations")
    for family in tiny.FAMILIES:
        model = tiny.build_model(family)
        vae = tiny.build_vae(16 if family.startswith("flux") else 4)
        stamps = []
        settings = gen.GenerationSettings(width=size, height=size, optimization=opt.OptimizationSettings(
            max_iterations=iterations, early_stop_patience=iterations))
        with torch.inference_mode():
            photo = subject.prepare_subject(torch.rand(1, 64, 64, 3))
            gen.optimize_subject(model, vae, tiny.conditioning(family), photo, None, None, settings,
                                 feature_networks=nets, on_iteration=lambda r: stamps.append(time.perf_counter()))
        per_iteration = [b - a for a, b in zip(stamps, stamps[1:])]
        print(f"{family:13s} median {statistics.median(per_iteration):.3f} s/iteration")


if __name__ == "__main__":
    main()
