"""SISO subject-driven generation: optimise a LoRA on the host model until its image from a
fixed seed matches the subject photo. The node calls ``optimize_subject``; everything
ComfyUI-specific goes through ``host`` (the interface of runtime.py).

``optimize_subject`` runs its phases in order, one function each: the checks of every input,
the memory plan, the similarity networks, the loss, the trainable clone, the decoder copy, and
the loop. Cancel is checked between every two phases (``_between_phases``), inside the
networks' blocks, before every denoiser call and after every iteration."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import torch

from .runtime import host
from .targets import ATTENTION
from . import auto_settings, compiled, loaded_networks, memory
from .editing import EditScore, PhotoInversion, check_edit, check_refine_mask
from .loaded_networks import networks, release_freed_memory  # noqa: F401  (generation.networks: tests, benchmarks)
from .optimize import OptimizationResult, OptimizationSettings, optimize
from .precision import autocast, check_precision, compute_dtype
from .sampler import sample
from .similarity import SimilarityLoss, check_weights
from .lora import SubjectLoRA, check_warm_start_rank
from .subject import SubjectPhoto

log = logging.getLogger("siso")


@dataclass
class GenerationSettings:
    # width, height, steps, grad_steps and optimization.learning_rate: 0 (auto_settings.AUTO)
    # takes the model's family row when the run starts (auto_settings.resolve)
    width: int = 512
    height: int = 512
    seed: int = 0
    steps: int = 1
    grad_steps: int = 1
    scheduler: str = "simple"
    rank: int = 4
    alpha: float = 0.0          # 0 -> alpha = rank (scale 1)
    target: str = ATTENTION
    dino_weight: float = 1.0
    ir_weight: float = 1.0
    background_weight: float = 10.0    # c of c * L_bg (editing, or a mask without an inversion)
    # Recompute denoiser, decoder and feature-network activations in backward: True, False, or
    # "auto": only when the memory estimate says the run would not fit without it (memory.py).
    gradient_checkpointing: bool | str = "auto"
    precision: str = "auto"                # compute precision of the forward passes, see precision.py
    compile: str = "auto"                  # torch.compile the similarity networks and the decoder copy: auto / on / off (compiled.py)
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
        check_weights(self.dino_weight, self.ir_weight, "judge the subject")
        check_precision(self.precision)
        compiled.check_compile(self.compile)
        memory.check_mode(self.gradient_checkpointing)
        self.optimization.check()


@dataclass
class GenerationResult(OptimizationResult):
    """What a run found (OptimizationResult) and how it ran, for the node's report."""
    memory: memory.MemoryPlan | None = None   # the estimate and the low_memory choice
    loading: str = ""                         # fully loaded, or streamed per layer by ComfyUI
    compiled: str = ""                        # what was compiled or reused, and a TorchCompileModel input
    settings: str = ""                        # the size, steps, grad_steps, rate and precision used, and where each came from


def _between_phases():
    # Cancel between the phases before the loop too (the memory probe, each network read, the
    # clone, the decoder copy), not only once the iterations run: each can take seconds to minutes.
    host.throw_if_interrupted()


def optimize_subject(model, vae, positive, subject: SubjectPhoto, dino_path: str | None, ir_path: str | None,
                     settings: GenerationSettings, on_iteration=None, feature_networks=None, inversion=None, mask=None,
                     initial_lora=None):
    """Returns (SubjectLoRA, best image BHWC, GenerationResult).

    With ``inversion`` (a PhotoInversion) it edits: every iteration denoises the inverted photo
    with its stored noises, and the loss adds ``background_weight`` * L_bg outside ``mask``
    (MASK, 1 = the subject to replace). Size, steps and sampler then come from the inversion.
    With ``mask`` but no inversion (the refine route) it generates from the seed as usual, and
    the loss adds ``background_weight`` * L_bg outside ``mask`` (width x height) against iteration
    0's image: the picture the model makes before the LoRA moves it (the zero-shot picture, or
    ``initial_lora``'s picture on a warm start); its background term is 0 at iteration 0.
    ``feature_networks`` = (dino, ir) overrides the files (tests, benchmarks). ``initial_lora`` (a
    SubjectLoRA of this model, rank and lora target) is where the LoRA starts instead of zero."""
    settings, keep, settings_used = _check_inputs(model, vae, positive, settings, inversion, mask, initial_lora)
    log.info("SISO Optimize on %s: %s", host.describe_model(model), settings_used)
    device = host.compute_device()
    dtype = compute_dtype(device, settings.precision)
    # the report names the precision that ran (auto's choice depends on the device)
    settings_used += f"; compute {str(dtype).removeprefix('torch.')} (precision {settings.precision})"
    compiled.compiles(device, settings.compile)   # compile on with nothing to build code: refused before any work
    memory_plan = _plan_memory(model, vae, positive, settings, device, dtype, dino_path, ir_path, feature_networks)
    checkpointing = memory_plan.checkpointing
    _between_phases()
    with host.training_mode():
        if feature_networks is None:
            dino, ir = loaded_networks.load(dino_path, ir_path, settings.dino_weight, settings.ir_weight, dtype,
                                            between=_between_phases)
        else:
            dino, ir = feature_networks
        _between_phases()
        host.make_room_for_training(device)
        with loaded_networks.on_device((dino, ir), device, checkpointing) as used:
            trainable = None
            decoder = None
            try:
                score = _loss(dino, ir, subject, settings, device, dtype, inversion, keep)
                compiling = compiled.prepare_networks(used, settings.compile, device, dtype, checkpointing)
                _between_phases()
                trainable = _trainable_clone(model, settings, checkpointing, initial_lora)
                _between_phases()
                decoder = host.DifferentiableDecoder(vae, model, device, dtype=dtype, checkpointing=checkpointing)
                decoder.use_compiled(compiled.decoder_forward(settings.compile, device, dtype, checkpointing,
                                                              type(decoder.module).__name__))
                _between_phases()
                found = _loop(trainable, decoder, score, model, vae, positive, settings, dtype, inversion,
                              on_iteration)
                result = GenerationResult(**{f.name: getattr(found, f.name) for f in fields(found)},
                                          memory=memory_plan, loading=trainable.loading, settings=settings_used,
                                          compiled="; ".join(filter(None, (compiling, compiled.decoder_note(decoder),
                                                                                  host.user_compile_note(model)))))
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
                compiled.finish_networks(used)   # eager again; the compiled code stays for the next run


def _check_inputs(model, vae, positive, settings: GenerationSettings, inversion, mask, initial_lora):
    """Every check before any work; returns (the settings the run uses, the background weights
    or None, the report's words for the settings used). Auto values (0) take the model's family
    row; when editing, size and steps come from the inversion."""
    host.check_supported(model)
    host.check_reference_path(model, positive)   # before any work, as the family check
    keep = None
    if inversion is not None and not isinstance(inversion, PhotoInversion):
        raise TypeError(f"'inversion' must come from SISO ReNoise Invert, got {type(inversion).__name__}")
    settings, used = auto_settings.resolve(settings, host.model_family(model), inversion)
    if inversion is not None:
        keep = check_edit(inversion, model, mask, settings.background_weight, settings.grad_steps)
    settings.check()
    if inversion is None:
        host.check_size(vae, settings.width, settings.height)
        if mask is not None:    # keep iteration 0's background: the mask must be the picture's size
            keep = check_refine_mask(mask, settings.width, settings.height, settings.background_weight)
    if initial_lora is not None:   # the layers are checked on the clone
        check_warm_start_rank(initial_lora.rank, settings.rank)
    return settings, keep, used


def _plan_memory(model, vae, positive, settings: GenerationSettings, device, dtype, dino_path, ir_path,
                 feature_networks) -> memory.MemoryPlan:
    """Before any work (networks read, clone and decoder copy built): will one iteration fit, and
    does it need gradient checkpointing to? Refuses with the estimate when nothing fits."""
    uses = []
    for kind, weight, path, given in (("dino", settings.dino_weight, dino_path, 0), ("ir", settings.ir_weight, ir_path, 1)):
        if weight <= 0:
            continue
        if feature_networks is not None:
            uses.append(memory.NetworkUse(kind, feature_networks[given], in_ram=True))
        else:
            cached = networks.peek(kind, path, dtype)
            uses.append(memory.NetworkUse(kind, cached, path, in_ram=cached is not None))
    return memory.plan(settings.gradient_checkpointing, model, vae, positive, settings.width, settings.height,
                       device, dtype, settings.grad_steps, settings.rank, settings.alpha, settings.target, uses)


def _loss(dino, ir, subject: SubjectPhoto, settings: GenerationSettings, device, dtype, inversion, keep):
    """The similarity to the subject's photos, plus the background term when editing or refining."""
    with autocast(device, dtype):    # the subject's embeddings in the loop's precision
        score = SimilarityLoss(dino, ir, [p.detach().clone().float().to(device) for p in subject.images],
                               settings.dino_weight, settings.ir_weight)
    if inversion is not None:
        # clones: tensors made under the executor's inference_mode cannot enter autograd
        score = EditScore(score, inversion.photo.to(device).clone(),
                          None if keep is None else keep.to(device).clone(), settings.background_weight)
    elif keep is not None:   # against iteration 0's image, kept by EditScore when it scores it
        score = EditScore(score, None, keep.to(device).clone(), settings.background_weight)
    return score


def _trainable_clone(model, settings: GenerationSettings, checkpointing: bool, initial_lora):
    """The host model's clone with the LoRA to train (the host's model is never changed)."""
    trainable = host.TrainableModel(model, settings.rank, settings.alpha or settings.rank, settings.target,
                                    seed=settings.seed, checkpointing=checkpointing)
    if initial_lora is not None:   # warm start: iteration 0 is the model with that LoRA
        try:
            trainable.start_from(initial_lora.tensors)
        except BaseException:
            trainable.unload()
            raise
    return trainable


def _loop(trainable, decoder, score, model, vae, positive, settings: GenerationSettings, dtype, inversion,
          on_iteration) -> OptimizationResult:
    """The iterations, inside the host's own sampling loop: generate, score, step, stop early."""
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

    return host.run_with_denoiser(trainable, positive, latent, noise, sigmas, settings.seed, body)
