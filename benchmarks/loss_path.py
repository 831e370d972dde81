"""The part of a SISO iteration after the denoiser, at full size: the SD VAE decoder (random
weights, the real architecture, through the pack's DifferentiableDecoder), DINOv2 ViT-L/14 at
518 px and the IR ViT-H/14 at 290 px (random weights, real architectures), similarity loss and
backward into the latent. Compares gradient checkpointing off (the authors' setting) and on, or
with --compile all of it eager against the similarity networks and the decoder copy compiled
(siso_ops/compiled.py, checkpointing off), with the compile time apart.

Each configuration runs in its own fresh process so its peak memory (ru_maxrss) is its own; the
two alternate. CPU only here; a GPU run would use torch.cuda.max_memory_allocated instead.

    python benchmarks/loss_path.py [image size] [iterations] [--compile]    (default 256, 2)
"""
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import conftest
import torch
import tiny
from conftest import siso
size, iterations, checkpointing, compile = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1"
host, fn, sim = siso("siso_ops.host"), siso("siso_ops.feature_networks"), siso("siso_ops.similarity")
pre = siso("siso_ops.preprocess")
import timm
from comfy.ldm.models.autoencoder import AutoencoderKL
import comfy.sd
torch.manual_seed(0)
with torch.inference_mode():
    cfg = {"params": {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
           "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}}
    module = AutoencoderKL(**cfg["params"])
    tiny.init_random(module, 1, std=0.02)
    vae = comfy.sd.VAE(sd=module.state_dict(), config=cfg)
    model = tiny.build_model("sd15")      # only its latent format is used by the decoder
with torch.inference_mode(False):
    dino = fn.FeatureNetwork(timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
                             .eval().requires_grad_(False), 518, pre.IMAGENET_MEAN, pre.IMAGENET_STD, "DINOv2 random")
    ir = fn.FeatureNetwork(fn.IRNetwork(fn._build_ir_backbone(1280, 32, 1024), torch.nn.Linear(1024, 64))
                           .eval().requires_grad_(False), 290, pre.OPENAI_CLIP_MEAN, pre.OPENAI_CLIP_STD, "IR random")
    for net in (dino, ir):
        net.set_checkpointing(checkpointing)
    decoder = host.DifferentiableDecoder(vae, model, torch.device("cpu"), checkpointing=checkpointing)
    score = sim.SimilarityLoss(dino, ir, torch.rand(1, 3, 512, 512))
    start = time.perf_counter()
    if compile:   # as a run does it: after the reference embeddings, before iteration 0
        compiled = siso("siso_ops.compiled")
        compiled.prepare_networks([dino, ir], "on", torch.device("cpu"), torch.float32, checkpointing)
        decoder.use_compiled(compiled.decoder_forward("on", torch.device("cpu"), torch.float32, checkpointing,
                                                      type(decoder.module).__name__))
        # the decoder compiles at its first call (a run's iteration 0): made here, outside the timing
        decoder(torch.randn(1, 4, size // 8, size // 8, requires_grad=True)).sum().backward()
    compile_seconds = time.perf_counter() - start
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for i in range(iterations + 1):
        latent = torch.randn(1, 4, size // 8, size // 8, requires_grad=True)
        start = time.perf_counter()
        loss = score(decoder(latent))["loss"]
        loss.backward()
        times.append(time.perf_counter() - start)
        del loss, latent
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": times[1:], "peak_mb": peak, "before_mb": before, "compile_s": compile_seconds}))
"""


def run(size: int, iterations: int, checkpointing: bool, compile: bool = False) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", CHILD, repo, str(size), str(iterations), "1" if checkpointing else "0",
                          "1" if compile else "0"], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(size=256, iterations=2):
    results = {False: [], True: []}
    for checkpointing in (False, True, False, True):      # alternate, fresh process each
        results[checkpointing].append(run(size, iterations, checkpointing))
    rows = {}
    for checkpointing, runs in results.items():
        seconds = statistics.median(s for r in runs for s in r["seconds"])
        peak = statistics.median(r["peak_mb"] for r in runs)
        extra = statistics.median(r["peak_mb"] - r["before_mb"] for r in runs)
        rows[checkpointing] = (seconds, peak, extra)
        print(f"checkpointing {'on ' if checkpointing else 'off'}: {seconds:.2f} s/iteration, peak RSS {peak:.0f} MB "
              f"(+{extra:.0f} MB over the loaded weights)")
    off, on = rows[False], rows[True]
    print(f"ratios on/off at {size} px: time {on[0] / off[0]:.2f}, peak RSS {on[1] / off[1]:.2f}, "
          f"activation memory {on[2] / max(off[2], 1):.2f}")


def main_compile(size=256, iterations=2):
    """Eager, then compiled, one fresh process each (a compile on 2 CPU cores takes minutes)."""
    rows = {}
    for compile in (False, True):
        result = run(size, iterations, False, compile)
        rows[compile] = result
        print(f"{'compiled' if compile else 'eager   '}: {statistics.median(result['seconds']):.2f} s/iteration "
              f"(forward + backward, {iterations} timed iterations after one untimed: {result['seconds']}), "
              f"peak RSS {result['peak_mb']:.0f} MB" + (f", compile {result['compile_s']:.1f} s" if compile else ""),
              flush=True)
    eager, compiled = (statistics.median(rows[c]["seconds"]) for c in (False, True))
    print(f"compiled / eager at {size} px: {compiled / eager:.2f}; compile time {rows[True]['compile_s']:.1f} s pays back "
          f"after {rows[True]['compile_s'] / max(eager - compiled, 1e-9):.0f} iterations" if compiled < eager else
          f"compiled / eager at {size} px: {compiled / eager:.2f} (compiled is not faster)")


if __name__ == "__main__":
    numbers = [int(a) for a in sys.argv[1:] if not a.startswith("--")]
    (main_compile if "--compile" in sys.argv else main)(*numbers[:2])
