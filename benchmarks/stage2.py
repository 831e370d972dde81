"""Stage-2 cost of a SISO LoRA: a stock KSampler run (4 steps, euler, cfg 1) with SISO Apply LoRA
against the same model without it, on the REAL SD-Turbo UNet architecture (SD 2.1, random
weights, built with ComfyUI's classes). ComfyUI merges a LoRA into the weights when it loads the
patched model, so the target is a ratio <= 1.05. Runs interleaved: base, LoRA, base, LoRA, ...

    python benchmarks/stage2.py [size] [repeats]      (make bench runs it at 256 px, 3 repeats)
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import conftest  # noqa: E402  (sets up ComfyUI in-process and loads the pack)
import torch  # noqa: E402

import nodes as comfy_nodes  # noqa: E402
import tiny  # noqa: E402
from conftest import siso  # noqa: E402

host, lora_mod = siso("siso_ops.host"), siso("siso_ops.lora")


def random_siso_lora(model, rank=4, seed=0):
    """A LoRA on the default SISO targets with non-zero up matrices, in the exported key format."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    targets = host.lora_target_names(model)
    for name, module in model.model.diffusion_model.named_modules():
        key = f"diffusion_model.{name}.weight"
        if name in targets:
            delta = lora_mod.LoRADelta(module.weight.shape[0], module.weight.shape[1], rank, rank)
            with torch.no_grad():
                delta.up.copy_(torch.randn(delta.up.shape, generator=g) * 0.01)
            deltas[key] = delta
    return lora_mod.export_lora(deltas)


def sample(model, positive, negative, size, seed=0):
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    with torch.inference_mode():
        start = time.perf_counter()
        comfy_nodes.common_ksampler(model, seed, 4, 1.0, "euler", "simple", positive, negative, latent)
        return time.perf_counter() - start


def main(size=256, repeats=3):
    model = tiny.build_model("sd_turbo")
    params = sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6
    positive, negative = tiny.conditioning("sd_turbo", 0, tokens=77), tiny.conditioning("sd_turbo", 1, tokens=77)
    with torch.inference_mode(False):
        tensors = random_siso_lora(model)
    with torch.inference_mode():
        patched = host.apply_lora(model, tensors, 1.0)
    results = {}
    # steady state: several prompts in a row on the same model (the first run of each loads it)
    for name, m in (("base", model), ("lora", patched)):
        sample(m, positive, negative, size)
        results[name] = statistics.median(sample(m, positive, negative, size) for _ in range(repeats))
    # alternating: each run switches models, so ComfyUI re-applies or removes the LoRA every time
    alternating = {"base": [], "lora": []}
    for _ in range(repeats):
        alternating["base"].append(sample(model, positive, negative, size))
        alternating["lora"].append(sample(patched, positive, negative, size))
    b, l = results["base"], results["lora"]
    ab, al = statistics.median(alternating["base"]), statistics.median(alternating["lora"])
    print(f"stage 2, SD-Turbo UNet ({params:.0f} M parameters, random), {size}x{size}, 4 steps euler, "
          f"{torch.get_num_threads()} threads, median of {repeats}:\n"
          f"  consecutive runs: base {b:.2f} s, with SISO LoRA {l:.2f} s, ratio {l / b:.3f}\n"
          f"  alternating base/LoRA runs (LoRA patched in and out each time): base {ab:.2f} s, "
          f"with LoRA {al:.2f} s, ratio {al / ab:.3f}")
    return b, l


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
