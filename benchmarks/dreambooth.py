"""What each route of "SISO or DreamBooth for this subject?" costs, on the REAL SD-Turbo
architecture with random weights (benchmarks/bench.py's builders: ComfyUI's own classes, no files).

  siso:        SISO Optimize with the pack's defaults, from start to its early stop (at most 50
               iterations, patience 7), on bench.py's fixed synthetic subject; the DINOv2 ViT-L/14
               and IR ViT-H/14 networks are built (random weights) and counted.
  dreambooth:  the template's DreamBooth route: the class images (KSampler, 1 step, cfg 1), VAE
               Encode of the photo, DreamBooth Training Set (prior weight 1) and ComfyUI's own
               Train LoRA (TrainLoraNode: batch size 1, 2 draws per step, rank 8, AdamW, bf16,
               gradient checkpointing, its defaults otherwise) for --steps optimiser steps. Both
               prompts are the one random-weight encoding of "a photo of a dog" (the cost of an
               encoding does not depend on its words).

Each route runs in its own fresh process. Reported: wall seconds and CPU seconds (process time, all
threads: on a shared machine wall time grows with the other processes' load, CPU time much less),
the load average, and the peak process RSS (VmHWM, reset before the route; on a GPU
max_memory_allocated). For DreamBooth the time of every draw is recorded (Train LoRA's forward and
backward), so the per-step time comes from the run itself; where --steps is below the recipe's 500,
the table says so and gives the steps it ran, never a silent projection.

    python benchmarks/dreambooth.py [--size 256] [--class-images 8] [--steps 500] [--siso-iterations 50]
                                    [--routes siso,dreambooth] [--json out.json]

Needs a ComfyUI with TrainLoraNode (0.3.75 and 0.33 both have it): SISO_COMFYUI_DIR as for the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RECIPE_STEPS = 500        # the template's Train LoRA steps (Diffusers' DreamBooth LoRA example)
ACCUMULATION = 2          # DreamBooth Training Set's advice at prior weight 1


def train_lora_inputs(node, latents: list, positive: list, **chosen) -> dict:
    """Every input of this ComfyUI's TrainLoraNode as a list (it takes lists: the samples' latents
    and prompts, a one-element list for each setting), its defaults except ``chosen``."""
    values = {"latents": latents, "positive": positive}
    for spec in node.define_schema().inputs:
        if spec.id in values:
            continue
        if spec.id in chosen:
            values[spec.id] = [chosen[spec.id]]
        elif getattr(spec, "default", None) is not None:
            values[spec.id] = [spec.default]
    return values


def child(route: str, size: int, class_images: int, steps: int, siso_iterations: int) -> dict:
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import bench
    import conftest  # noqa: F401  (ComfyUI in-process with the pack loaded)
    import torch
    from conftest import siso

    host, gen, opt, subject_mod, dreambooth = (siso(f"siso_ops.{m}") for m in (
        "host", "generation", "optimize", "subject", "dreambooth"))
    device = host.compute_device()
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    memory = bench.Memory(device, total_mb - 1536 if device.type == "cpu" else None)
    torch.manual_seed(0)
    fill_random = bench.random_filler(device)
    model, dtype, manual_cast, unet_params = bench.build_model("sd_turbo", device, False, False, False, None, False,
                                                               fill_random)
    vae, positive, _, _, _ = bench.build_vae_and_prompt("sd_turbo", device, False, False, False, fill_random,
                                                        unet_params, dtype, manual_cast)
    g = torch.Generator().manual_seed(1)
    photo = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(size, size),
                                            mode="bilinear").permute(0, 2, 3, 1)
    out = {"route": route, "size": size, "device": str(device), "unet_params_m": unet_params / 1e6,
           "unet_dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}

    if route == "siso":
        compute_dtype = siso("siso_ops.precision").compute_dtype(device, gen.GenerationSettings().precision)
        dino, ir, _ = bench.build_networks(False, fill_random, compute_dtype)
        subject = subject_mod.prepare_subject(photo)
        settings = gen.GenerationSettings(width=size, height=size, optimization=opt.OptimizationSettings(
            max_iterations=siso_iterations, early_stop_patience=7))
        out["resident_mb"] = memory.current_mb()
        memory.reset()
        stamps = []
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            _, _, result = gen.optimize_subject(model, vae, positive, subject, None, None, settings,
                                                feature_networks=(dino, ir),
                                                on_iteration=lambda r: stamps.append((time.perf_counter(), time.process_time())))
        walls = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]      # the first iteration warms up
        cpus = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
        out.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu, peak_mb=memory.peak_mb(),
                   iterations=result.iterations, stop_reason=result.stop_reason, load_average=os.getloadavg(),
                   first_iteration_wall_s=stamps[0][0] - wall if stamps else None,
                   first_iteration_cpu_s=stamps[0][1] - cpu if stamps else None,
                   iteration_wall_median_s=statistics.median(walls) if walls else None,
                   iteration_cpu_median_s=statistics.median(cpus) if cpus else None)
        return out

    import nodes as comfy_nodes
    import comfy_extras.nodes_train as nodes_train
    train = nodes_train.TrainLoraNode      # the in-process ComfyUI loads the pack only, not comfy_extras
    draws = []
    real_fwd_bwd = nodes_train.TrainSampler.fwd_bwd

    def timed_fwd_bwd(self, *args, **kwargs):
        loss = real_fwd_bwd(self, *args, **kwargs)
        draws.append((time.perf_counter(), time.process_time()))
        return loss

    nodes_train.TrainSampler.fwd_bwd = timed_fwd_bwd
    if hasattr(model, "cached_patcher_init"):
        # ComfyUI 0.33's Train LoRA trains on a separate copy (clone(force_deepcopy=True)) that it
        # rebuilds with the loader's own call, which ComfyUI's checkpoint loader records; here the
        # rebuild is bench.py's builder again (the same random weights: the same second copy)
        model.cached_patcher_init = (lambda disable_dynamic=True: bench.build_model(
            "sd_turbo", device, False, False, False, None, False, fill_random)[0], ())
    out["resident_mb"] = memory.current_mb()
    memory.reset()
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        negative = [[torch.zeros_like(positive[0][0]), {}]]
        classes = comfy_nodes.common_ksampler(model, 0, 1, 1.0, "euler", "simple", positive, negative,
                                              {"samples": torch.zeros(class_images, 4, size // 8, size // 8)})[0]
        class_wall, class_cpu = time.perf_counter() - wall, time.process_time() - cpu
        subject_latent = {"samples": vae.encode(photo)}
        dataset = dreambooth.training_set(subject_latent, positive, classes, positive, 1.0)
    train_wall, train_cpu = time.perf_counter(), time.process_time()
    result = train.execute(**train_lora_inputs(train, model=model, latents=dataset.latents,
                                               positive=dataset.conditionings, batch_size=1,
                                               grad_accumulation_steps=dataset.accumulation, steps=steps,
                                               learning_rate=1e-4, rank=8, seed=0))
    end_wall, end_cpu = time.perf_counter(), time.process_time()
    # the LoRA's tensors: 0.33's Train LoRA outputs them first, 0.3.75's after the trained MODEL
    outputs = result.args if hasattr(result, "args") else result
    lora = next(o for o in outputs if isinstance(o, dict) and o and all(torch.is_tensor(v) for v in o.values()))
    walls = [b[0] - a[0] for a, b in zip(draws, draws[1:])]
    cpus = [b[1] - a[1] for a, b in zip(draws, draws[1:])]
    out.update(wall_s=end_wall - wall, cpu_s=end_cpu - cpu, peak_mb=memory.peak_mb(), load_average=os.getloadavg(),
               class_images=class_images, class_images_wall_s=class_wall, class_images_cpu_s=class_cpu,
               training_samples=len(dataset.latents), accumulation=dataset.accumulation, steps=steps,
               draws=len(draws), train_wall_s=end_wall - train_wall, train_cpu_s=end_cpu - train_cpu,
               first_draw_s=draws[0][0] - train_wall if draws else None,
               draw_wall_median_s=statistics.median(walls) if walls else None,
               draw_cpu_median_s=statistics.median(cpus) if cpus else None,
               lora_tensors=len(lora), lora_mb=sum(t.numel() * t.element_size() for t in lora.values()) / 2**20)
    return out


def run_child(route, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", route, "--size", str(args.size),
               "--class-images", str(args.class_images), "--steps", str(args.steps),
               "--siso-iterations", str(args.siso_iterations)]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"route": route, "error": f"exit {proc.returncode}: {proc.stderr[-3000:]}"}
    result = json.loads(lines[-1])
    result["process_wall_s"] = time.perf_counter() - started
    return result


def summary(results: list, args) -> str:
    rows = ["| route | what ran | wall s | CPU s | peak RSS GiB | load average (1, 5, 15 min) |", "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['route']} | failed: {r['error'][-200:]} | | | | |")
            continue
        load = ", ".join(f"{v:.1f}" for v in r["load_average"])
        if r["route"] == "siso":
            what = f"SISO Optimize: {r['iterations']} iterations ({r['stop_reason']})"
            if r.get("iteration_wall_median_s") is not None:
                what += (f"; after the first, median {r['iteration_wall_median_s']:.1f} s wall, "
                         f"{r['iteration_cpu_median_s']:.1f} s CPU an iteration")
        else:
            what = (f"{r['class_images']} class images ({r['class_images_wall_s']:.1f} s wall, {r['class_images_cpu_s']:.1f} s CPU) "
                    f"+ Train LoRA {r['steps']} steps x {r['accumulation']} draws ({r['draws']} draws: median "
                    f"{r['draw_wall_median_s']:.2f} s wall, {r['draw_cpu_median_s']:.2f} s CPU a draw)")
            if r["steps"] < RECIPE_STEPS:
                what += f"; NOT the recipe's {RECIPE_STEPS} steps ({RECIPE_STEPS * r['accumulation']} draws), which did not run here"
        rows.append(f"| {r['route']} | {what} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_mb'] / 1024:.2f} | {load} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--class-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=RECIPE_STEPS)
    parser.add_argument("--siso-iterations", type=int, default=50)
    parser.add_argument("--routes", default="siso,dreambooth")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.size, args.class_images, args.steps, args.siso_iterations)), flush=True)
        return
    results = []
    for route in args.routes.split(","):
        results.append(run_child(route, args))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(summary(results, args))


if __name__ == "__main__":
    main()
