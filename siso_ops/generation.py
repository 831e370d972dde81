"""SISO subject-driven generation: optimise a LoRA on the host model until its image from a
fixed seed matches the subject photo. The node calls ``optimize_subject``; everything
ComfyUI-specific goes through ``host``."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
from dataclasses import dataclass, field, replace

import torch

from . import host
from . import memory
from . import compiled
from .editing import EditScore, check_edit, check_refine_mask
from .feature_networks import load_dino, load_ir
from .optimize import OptimizationSettings, optimize
from .precision import autocast, check_precision, compute_dtype
from .sampler import sample
from .similarity import SimilarityLoss
from .lora import SubjectLoRA
from .subject import SubjectPhoto


@dataclass
class GenerationSettings:
    width: int = 512
    height: int = 512
    seed: int = 0
    steps: int = 1
    grad_steps: int = 1
    scheduler: str = "simple"
    rank: int = 4
    alpha: float = 0.0          # 0 -> alpha = rank (scale 1)
    target: str = host.TARGETS[0]
    dino_weight: float = 1.0
    ir_weight: float = 1.0
    background_weight: float = 10.0    # c of c * L_bg (editing, or a mask without an inversion)
    # Recompute denoiser, decoder and feature-network activations in backward: True, False, or
    # "auto": only when the memory estimate says the run would not fit without it (memory.py).
    gradient_checkpointing: bool | str = "auto"
    precision: str = "auto"                # compute precision of the forward passes, see precision.py
    compile: str = "auto"                  # torch.compile the similarity networks: auto / on / off, see compiled.py
    optimization: OptimizationSettings = field(default_factory=OptimizationSettings)

    def check(self):
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 64 or value % 8:
                raise ValueError(f"{name} must be a multiple of 8 and at least 64, got {value}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 1 <= self.grad_steps <= self.steps:
            raise ValueError(f"grad_steps must be between 1 and steps ({self.steps}), got {self.grad_steps}")
        if self.dino_weight < 0 or self.ir_weight < 0 or self.dino_weight + self.ir_weight == 0:
            raise ValueError("dino_weight and ir_weight must be >= 0 and not both 0")
        check_precision(self.precision)
        compiled.check_compile(self.compile)
        memory.check_mode(self.gradient_checkpointing)
        self.optimization.check()


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory():
    """Hand memory that was freed back to the operating system. glibc keeps freed heap memory
    for reuse, so after the similarity networks are loaded in float32 and converted to bfloat16
    the process would go on holding the float32 copies' gigabytes of RAM, and after a CPU run its
    activations'. Linux with glibc; elsewhere nothing to do."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class _NetworkCache:
    """Similarity networks stay loaded (on the CPU between runs) so a second run in the same
    session skips the file read; keyed by path, modification time and the weights' dtype
    (stored in the compute precision: bfloat16 halves their memory)."""

    def __init__(self):
        self.entries = {}

    def get(self, kind: str, path: str, dtype: torch.dtype = torch.float32):
        key = (kind, os.path.abspath(path), os.path.getmtime(path), dtype)
        entry = self.entries.get(kind)
        if entry is None or entry[0] != key:
            self.entries.pop(kind, None)
            gc.collect()
            with torch.inference_mode(False):
                network = (load_dino if kind == "dino" else load_ir)(path).to(dtype=dtype)
            self.entries[kind] = (key, network)
            release_freed_memory()
        return self.entries[kind][1]

    def peek(self, kind: str, path: str | None, dtype: torch.dtype = torch.float32):
        """The cached network ``get`` would return without reading the file, or None."""
        try:
            key = (kind, os.path.abspath(path), os.path.getmtime(path), dtype)
        except (OSError, TypeError):
            return None
        entry = self.entries.get(kind)
        return entry[1] if entry is not None and entry[0] == key else None

    def clear(self):
        self.entries.clear()
        release_freed_memory()


networks = _NetworkCache()


def optimize_subject(model, vae, positive, subject: SubjectPhoto, dino_path: str | None, ir_path: str | None,
                     settings: GenerationSettings, on_iteration=None, feature_networks=None, inversion=None, mask=None,
                     initial_lora=None):
    """Returns (SubjectLoRA, best image BHWC, OptimizationResult).

    With ``inversion`` (a PhotoInversion) it edits: every iteration denoises the inverted photo
    with its stored noises, and the loss adds ``background_weight`` * L_bg outside ``mask``
    (MASK, 1 = the subject to replace). Size, steps and sampler then come from the inversion.
    With ``mask`` but no inversion (the refine route) it generates from the seed as usual, and
    the loss adds ``background_weight`` * L_bg outside ``mask`` (width x height) against iteration
    0's image: the picture the model makes before the LoRA moves it (the zero-shot picture, or
    ``initial_lora``'s picture on a warm start); its background term is 0 at iteration 0.
    ``feature_networks`` = (dino, ir) overrides the files (tests, benchmarks). ``initial_lora`` (a
    SubjectLoRA of this model, rank and lora target) is where the LoRA starts instead of zero."""
    host.check_supported(model)
    host.check_reference_path(model, positive)   # before any work, as the family check
    keep = None
    if inversion is not None:
        keep = check_edit(inversion, model, mask, settings.background_weight, settings.grad_steps)
        height, width = inversion.size
        settings = replace(settings, steps=len(inversion.sigmas) - 1, width=width, height=height)
    settings.check()
    if inversion is None:
        host.check_size(vae, settings.width, settings.height)
        if mask is not None:    # keep iteration 0's background: the mask must be the picture's size
            keep = check_refine_mask(mask, settings.width, settings.height, settings.background_weight)
    if initial_lora is not None and initial_lora.rank != settings.rank:   # the layers are checked on the clone
        raise ValueError(f"initial_lora has rank {initial_lora.rank} but lora_rank is {settings.rank}: set lora_rank "
                         f"to {initial_lora.rank}")
    device = host.compute_device()
    dtype = compute_dtype(device, settings.precision)
    # Before any work (networks read, clone and decoder copy built): will one iteration fit, and
    # does it need gradient checkpointing to? Refuses with the estimate when nothing fits.
    uses = []
    for kind, weight, path, given in (("dino", settings.dino_weight, dino_path, 0), ("ir", settings.ir_weight, ir_path, 1)):
        if weight <= 0:
            continue
        if feature_networks is not None:
            uses.append(memory.NetworkUse(kind, feature_networks[given], in_ram=True))
        else:
            cached = networks.peek(kind, path, dtype)
            uses.append(memory.NetworkUse(kind, cached, path, in_ram=cached is not None))
    memory_plan = memory.plan(settings.gradient_checkpointing, model, vae, positive, settings.width, settings.height,
                              device, dtype, settings.grad_steps, settings.rank, settings.alpha, settings.target, uses)
    checkpointing = memory_plan.checkpointing
    # Cancel between the phases before the loop too (the memory probe, each network read, the
    # clone, the decoder copy), not only once the iterations run: each can take seconds to minutes.
    host.throw_if_interrupted()
    with host.training_mode():
        if feature_networks is None:
            dino = networks.get("dino", dino_path, dtype) if settings.dino_weight > 0 else None
            host.throw_if_interrupted()
            ir = networks.get("ir", ir_path, dtype) if settings.ir_weight > 0 else None
        else:
            dino, ir = feature_networks
        used = [n for n in (dino, ir) if n is not None]
        host.throw_if_interrupted()
        host.make_room_for_training(device)
        trainable = None
        decoder = None
        try:
            for net in used:
                net.to(device)
                net.set_checkpointing(checkpointing)
                net.set_interrupt_check(host.throw_if_interrupted)   # Cancel within one block
            with autocast(device, dtype):    # the subject's embeddings in the loop's precision
                score = SimilarityLoss(dino, ir, [p.detach().clone().float().to(device) for p in subject.images],
                                       settings.dino_weight, settings.ir_weight)
            if inversion is not None:
                # clones: tensors made under the executor's inference_mode cannot enter autograd
                score = EditScore(score, inversion.photo.to(device).clone(),
                                  None if keep is None else keep.to(device).clone(), settings.background_weight)
            elif keep is not None:   # against iteration 0's image, kept by EditScore when it scores it
                score = EditScore(score, None, keep.to(device).clone(), settings.background_weight)
            compiling = compiled.prepare_networks(used, settings.compile, device, dtype, checkpointing)
            host.throw_if_interrupted()
            trainable = host.TrainableModel(model, settings.rank, settings.alpha or settings.rank, settings.target,
                                            seed=settings.seed, checkpointing=checkpointing)
            if initial_lora is not None:   # warm start: iteration 0 is the model with that LoRA
                trainable.start_from(initial_lora.tensors)
            host.throw_if_interrupted()
            decoder = host.DifferentiableDecoder(vae, model, device, dtype=dtype,
                                                 checkpointing=checkpointing)
            host.throw_if_interrupted()
            latent = host.empty_latent(model, settings.width, settings.height, vae)
            if inversion is None:
                noise = host.seed_noise(latent, settings.seed)
                sigmas = host.sigma_schedule(model, settings.scheduler, settings.steps)
            else:
                noise = torch.zeros_like(latent)
                sigmas = inversion.sigmas

            def body(denoise, start, sigmas_on_device, clean):
                noises, flow = None, False
                if inversion is not None:   # editing: the inverted photo and its stored noises
                    start = inversion.latent.to(start).clone()
                    noises = None if inversion.noises is None else [n.to(start).clone() for n in inversion.noises]
                    flow = inversion.flow

                def each_step(*args, **kwargs):   # Cancel before every denoiser call, the first one too
                    host.throw_if_interrupted()
                    return denoise(*args, **kwargs)

                # a model class no table row names: its path is checked on this run's first call
                with autocast(start.device, dtype):
                    path = trainable.self_check(each_step, start, sigmas_on_device[0], dtype)
                if path:
                    trainable.loading += f"; {path}"

                first = []

                def generate():
                    with autocast(start.device, dtype):
                        image = decoder(sample(each_step, start, sigmas_on_device, settings.grad_steps, noises, flow))
                    if not first:    # before any step: every LoRA layer is on the model's path
                        trainable.check_lora_reached()
                        first.append(True)
                    return image

                def scored(image):
                    with autocast(image.device, dtype):
                        return score(image)

                return optimize(trainable.parameters(), generate, scored, settings.optimization, on_iteration)

            result = host.run_with_denoiser(trainable, positive, latent, noise, sigmas, settings.seed, body)
            result.memory = memory_plan     # the estimate and the low_memory choice, for the report
            result.loading = trainable.loading   # fully loaded, or streamed per layer by ComfyUI
            result.compiled = "; ".join(filter(None, (compiling, host.user_compile_note(model))))
            lora = SubjectLoRA(
                tensors=trainable.export(result.best_state), rank=trainable.rank, alpha=trainable.alpha,
                model=host.describe_model(model), best_iteration=result.best_iteration,
                iterations=result.iterations, best_loss=result.best_loss, stop_reason=result.stop_reason,
                history=result.history, **host.subject_lora_layouts(model))
            return lora, result.best_image.permute(0, 2, 3, 1).contiguous(), result
        finally:
            if trainable is not None:
                trainable.unload()
            if decoder is not None:
                decoder.release()
            for net in used:
                net.to("cpu")
                net.set_checkpointing(False)
                net.set_interrupt_check(None)
            compiled.finish_networks(used)
            release_freed_memory()
            host.free_cached_memory()
