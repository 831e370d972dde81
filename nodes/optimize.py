import logging

import torch
from comfy_api.v0_0_2 import io

from ..siso_ops import host
from ..siso_ops.compiled import COMPILE_CHOICES
from ..siso_ops.auto_settings import AUTO, size_off_block
from ..siso_ops.families import FAMILIES
from ..siso_ops.feature_networks import require_timm
from ..siso_ops.generation import GenerationSettings, optimize_subject
from ..siso_ops.lora import MAX_RANK, warm_start_rank_problem
from ..siso_ops.optimize import OptimizationSettings
from ..siso_ops.precision import PRECISIONS, precision_warnings
from ..siso_ops.report import loss_curve
from ..siso_ops.similarity import weights_problem
from .checks import CheckedNode, checked, file_choice
from .lora import lora_file_header_rank
from .queue_checks import constant_int, later_warm_start_problem, linked_image_size, linked_lora_rank, linked_vae_block
from .progress import IterationProgress
from .graph_types import ADVANCED, CATEGORY, FIXED_SEED, Inversion, Subject, SubjectLoRA

log = logging.getLogger("siso")


# low_memory: "auto" decides from the memory estimate; workflows saved when it was a true/false
# switch keep their meaning.
LOW_MEMORY = {"auto": "auto", "on": True, "off": False}
LEGACY_LOW_MEMORY = {True: True, False: False, "true": True, "false": False}


def weight_unused(weight_input: str):
    def unused(values):   # weight 0: the network is skipped, its file does not matter
        weight = values.get(weight_input)
        return isinstance(weight, (int, float)) and weight == 0
    return unused


# The similarity networks' file dropdowns (SISO Optimize, SISO Subject Score). ComfyUI 0.3.75
# does not check V3 dropdown values itself: a missing file is refused at queue time, with the
# folder and the expected name, instead of mid-run; so is a missing timm, which builds both.
def _network_file(kind: str):
    def resolve(value):
        require_timm()
        return host.weight_file_path(kind, value)
    return resolve


def _ir_file_check():
    found = file_choice("ir_weights", _network_file("ir"), weight_unused("ir_weight"))

    def check(value, values):
        problem = found(value, values)
        if problem or weight_unused("ir_weight")(values) or weight_unused("dino_weight")(values):
            return problem
        if value == values.get("dino_weights"):   # both dropdowns left at one file: one network's file is wrong
            return (f"ir_weights and dino_weights are the same file '{value}'. ir_weights needs the image-retrieval "
                    f"network, {host.EXPECTED_FILES['ir'][1]}; dino_weights needs DINOv2, "
                    f"{host.EXPECTED_FILES['dino'][1]}. Choose each network's file, or set ir_weight to 0 to "
                    "judge with DINOv2 alone.")
        return None
    return check


WEIGHT_FILE_CHECKS = {
    "dino_weights": file_choice("dino_weights", _network_file("dino"), weight_unused("dino_weight")),
    "ir_weights": _ir_file_check()}


def weight_file_defaults(files: list) -> dict:
    """{input: {"default": file}} for the two weight dropdowns: a new node starts each at the file
    named for its network (host.likely_weight_file), not both at the folder's first file."""
    chosen = {f"{kind}_weights": host.likely_weight_file(kind, files) for kind in ("dino", "ir")}
    return {name: ({"default": file} if file else {}) for name, file in chosen.items()}


class SISOOptimize(CheckedNode):
    LEGACY_CHOICES = {"low_memory": LEGACY_LOW_MEMORY}
    CHOICE_CHECKS = WEIGHT_FILE_CHECKS

    def __init__(self):
        super().__init__()
        # ComfyUI keeps one object per node of the running workflow; the similarity networks stay
        # loaded while one lives, so "Free model and node cache" releases them.
        host.keep_similarity_networks_while(self)

    @classmethod
    def define_schema(cls):
        weight_files = host.weight_file_choices()
        defaults = weight_file_defaults(weight_files)
        return io.Schema(
            node_id="SISOOptimize",
            display_name="SISO Optimize Subject LoRA",
            category=CATEGORY,
            description=(
                "Single Image Subject Optimization: learns a small LoRA on YOUR loaded model until the image it "
                "generates from a fixed seed looks like the subject photo (judged by DINOv2 and an image-retrieval "
                "network). Use a simple prompt ('a photo of a dog'); size, steps, grad_steps and learning rate at 0 "
                "(auto) follow the loaded model's family (e.g. Z-Image-Turbo: 8 steps at 768 px; the report says "
                "which values ran and why). Then apply the LoRA with any prompt. Progress shows the current image every iteration; Cancel stops within one "
                "iteration. The input MODEL and VAE are not changed.\n\nSubject swap (editing): connect an 'inversion' "
                "from SISO ReNoise Invert and the 'mask' of the subject to replace in that photo (SISO Subject Mask or a "
                "hand-drawn mask). Each iteration then denoises the inverted photo and the loss adds background_weight x "
                "the squared error outside the mask, so the background stays. Size, steps and sampler come from the "
                "inversion; use the same prompt as the inversion (learning rate auto: 3e-4, the paper's).\n\nKeep the "
                "background of the picture it starts from (refining a Flux.2 / Kontext / Qwen-Image-Edit zero-shot "
                "result): connect only a 'mask' (SISO Subject Mask on that picture, width x height), no inversion. "
                "The loss then adds background_weight x the squared error outside the mask against iteration 0's "
                "image, the picture the model makes before the LoRA moves it (0 at iteration 0)."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to personalise: " + "; ".join(f.name for f in FAMILIES) + " (see docs/models.md)."),
                io.Vae.Input("vae", tooltip="The model's VAE; decoding is differentiated through a private copy."),
                io.Conditioning.Input("positive", tooltip="The SIMPLE prompt, e.g. 'a photo of a dog' (better prompt adherence later)."),
                Subject.Input("subject", tooltip="From SISO Load Subject."),
                io.Combo.Input("dino_weights", options=weight_files, **defaults["dino_weights"], tooltip="DINOv2 ViT-L/14 weights in models/siso (dinov2_vitl14.safetensors or dinov2_vitl14_pretrain.pth)."),
                io.Combo.Input("ir_weights", options=weight_files, **defaults["ir_weights"], tooltip="Image-retrieval network weights in models/siso (ir_features.pth); placed by hand, see README. Optional: with ir_weight 0 SISO runs on DINOv2 alone."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=FIXED_SEED, tooltip="The ONE noise seed reused at every iteration. Left at 'fixed', queueing again reuses the optimised LoRA while only later nodes change."),
                io.Int.Input("width", default=AUTO, min=0, max=2048, step=8, tooltip="Image width during optimisation. 0 = auto: the loaded model's family value (e.g. 768 for Z-Image-Turbo, 512 for SDXL-Turbo). Else at least 64 and a multiple of the VAE's block (8; 16 for Flux.2, 32 for HunyuanImage 2.1), checked before any work. Editing: taken from the inversion."),
                io.Int.Input("height", default=AUTO, min=0, max=2048, step=8, tooltip="Image height during optimisation. 0 = auto: the loaded model's family value (e.g. 768 for Z-Image-Turbo, 512 for SDXL-Turbo). Else at least 64 and a multiple of the VAE's block (8; 16 for Flux.2, 32 for HunyuanImage 2.1), checked before any work. Editing: taken from the inversion."),
                io.Int.Input("steps", default=AUTO, min=0, max=50, tooltip="Denoising steps per iteration. 0 = auto: the loaded model's family value, for the variant its file shows (e.g. Z-Image-Turbo 8 steps, Flux.2 klein 4, Flux.1 dev 8, SDXL-Turbo and Flux.1 schnell 1); the report names it. Editing: taken from the inversion."),
                io.Int.Input("grad_steps", default=AUTO, min=0, max=50, tooltip="Gradients flow through the last this-many steps only (1 for distilled models, about 3 for 20-step models). 0 = auto: the loaded model's family value, for the variant its file shows (e.g. Z-Image-Turbo 1, Flux.1 dev and Chroma 2), at most steps."),
                io.Combo.Input("scheduler", options=list(host.SCHEDULERS), default="simple", **ADVANCED, tooltip="Sigma schedule; 'simple' at 4 steps gives turbo's 999/749/499/249."),
                io.Int.Input("max_iterations", default=50, min=1, max=1000, tooltip="Iteration cap."),
                io.Float.Input("learning_rate", default=AUTO, min=0.0, max=1e-1, step=1e-5, tooltip="AdamW learning rate. 0 = auto: the loaded model's family value (the paper's 2e-4 to generate) or, editing, the paper's 3e-4."),
                io.Int.Input("lora_rank", default=4, min=1, max=MAX_RANK, **ADVANCED, tooltip="LoRA rank."),
                io.Float.Input("lora_alpha", default=0.0, min=0.0, max=128.0, step=0.5, **ADVANCED, tooltip="LoRA alpha; 0 means alpha = rank (scale 1)."),
                io.Combo.Input("lora_target", options=list(host.TARGETS), default=host.TARGETS[0], **ADVANCED, tooltip="Layers that get LoRA: attention q/k/v/out (for Flux also context projections and MLPs), or every linear layer."),
                io.Float.Input("dino_weight", default=1.0, min=0.0, max=10.0, step=0.05, **ADVANCED, tooltip="Weight a of the DINOv2 distance (0 skips the network)."),
                io.Float.Input("ir_weight", default=1.0, min=0.0, max=10.0, step=0.05, **ADVANCED, tooltip="Weight b of the image-retrieval distance (0 skips the network)."),
                io.Float.Input("early_stop_percent", default=3.0, min=0.0, max=100.0, step=0.5, **ADVANCED, tooltip="Stop when the loss has not improved by this many percent..."),
                io.Int.Input("early_stop_patience", default=7, min=1, max=1000, **ADVANCED, tooltip="...within this many iterations."),
                io.Float.Input("background_weight", default=10.0, min=0.0, max=1000.0, step=0.5, optional=True, tooltip="With a mask: weight c of the background loss, the mean squared error outside the mask against the inverted photo (editing; paper: 10) or, without an inversion, against iteration 0's image. 0: the mask is not used."),
                io.Combo.Input("low_memory", options=list(LOW_MEMORY), default="auto", optional=True, **ADVANCED, tooltip=(
                    "Gradient checkpointing of the denoiser, the decoder and both similarity networks: they keep only "
                    "block inputs and recompute the rest in backward (same results, slower). auto: only when the run "
                    "would not fit in the device's free memory without it (estimated before the run; the report says "
                    "which was chosen). on / off: always / never. Measured on an H100 at 512 px (SDXL-Turbo): 8.9 GiB "
                    "and 1.54 s per iteration with it, 18.8 GiB and 0.74 s without. Workflows saved with true / false "
                    "keep that meaning.")),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto", optional=True, **ADVANCED, tooltip=(
                    "Compute precision of the forward passes; the LoRA and its optimiser stay float32. auto: bfloat16 "
                    "mixed precision where the hardware is fast at it (NVIDIA GPUs from Ampere on, CPUs with AVX-512 "
                    "BF16 or AMX), else float32. fp32: the paper's setting (slower, more memory). API prompts saved "
                    "before this input existed (no precision in them) run in fp32, as they did; a workflow opened in "
                    "the editor shows this input at auto: set fp32 to keep the paper's setting.")),
                io.Combo.Input("compile", options=list(COMPILE_CHOICES), default="auto", optional=True, **ADVANCED, tooltip=(
                    "Compiles the two similarity networks (DINOv2 and the image-retrieval network) and SISO's copy of "
                    "the VAE decoder into fused code once per run, so each iteration spends less time launching small "
                    "GPU operations. Helps on NVIDIA GPUs; the first run pays a one-time compile (tens of seconds to minutes; the report says "
                    "how long), later runs with the same size and settings reuse it. Results equal the uncompiled run "
                    "within rounding. auto: on NVIDIA GPUs, off on the CPU (measured no faster there). on / off: "
                    "always / never. API prompts saved before this input existed (no compile in them) run uncompiled, "
                    "as they did; a workflow opened in the editor shows this input at auto.")),
                Inversion.Input("inversion", optional=True, tooltip="Editing: the photo inverted by SISO ReNoise Invert (with the same model). Leave empty to generate from the seed."),
                io.Mask.Input("mask", optional=True, tooltip=(
                    "The subject (1 = subject); everything outside it is kept by the background loss. Editing: the "
                    "subject to replace in the inverted photo, the photo's size. Without an inversion: the subject in "
                    "the picture iteration 0 makes, width x height (SISO Subject Mask on the zero-shot picture of the "
                    "same model, conditioning, seed and size); its background is kept as iteration 0 made it: the "
                    "zero-shot picture with the zero LoRA, initial_lora's picture on a warm start.")),
                SubjectLoRA.Input("initial_lora", optional=True, tooltip="Warm start: begin from this LoRA (an earlier run's, or SISO Load LoRA's) instead of zero; iteration 0 is then the model with it. Same model, lora_rank and lora_target."),
            ],
            outputs=[
                SubjectLoRA.Output(display_name="subject_lora", tooltip="The best iteration's LoRA: connect to SISO Apply LoRA or SISO Save LoRA."),
                io.Image.Output(display_name="best_image", tooltip="The image of the best iteration."),
                io.Image.Output(display_name="loss_curve", tooltip="Loss (white), DINO (blue) and IR (orange) distance per iteration; the best iteration is circled."),
                io.String.Output(display_name="report", tooltip="Why it stopped and the best loss."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def check_values(cls, width=None, height=None, dino_weight=None, ir_weight=None, **values):
        # 8 is the smallest VAE block; the VAE is a link here: its own block (16 for Flux.2) is
        # checked by check_prompt where the prompt names its file, and always when the run starts,
        # before any work (host.check_size)
        # 0 is auto: the family's size, checked against the VAE's block when the run starts
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, int) and value != AUTO and value < 64:
                return f"{name} {value} is below 64: use 0 (auto: the model's family size) or at least 64"
            problem = size_off_block(name, value, 8) if isinstance(value, int) else None
            if problem:
                return problem
        rate = values.get("learning_rate")
        if isinstance(rate, (int, float)) and 0 < rate < 1e-6:
            return f"learning_rate {rate:g} is below 1e-6: use 0 (auto: the model's family rate) or at least 1e-6"
        # grad_steps <= steps is checked when the node runs (before any work): when editing,
        # steps come from the linked inversion, which validation cannot see.
        if isinstance(dino_weight, (int, float)) and isinstance(ir_weight, (int, float)):
            return weights_problem(dino_weight, ir_weight, "judge the subject")
        return None

    @classmethod
    def check_prompt(cls, prompt, node_id):
        inputs = prompt[node_id].get("inputs", {})
        problems = {}
        # a warm start's rank, from SISO Load LoRA's file header or an earlier SISO Optimize's
        # lora_rank, against this node's lora_rank: before the earlier optimisation runs
        lora_rank = constant_int(prompt, inputs.get("lora_rank"))
        source = linked_lora_rank(prompt, inputs.get("initial_lora"), lora_file_header_rank)
        if source and lora_rank is not None:
            problem = warm_start_rank_problem(source[0], lora_rank, f"the LoRA from {source[1]}")
            if problem:
                problems["initial_lora"] = f"initial_lora: {problem}"
        mask = cls._mask_problem(prompt, inputs)
        if mask:
            problems["mask"] = mask
        # width and height against the block of the VAE the prompt names, where its file's header
        # says it (16 for Flux.2's VAE; check_values knows only the 8 every VAE divides)
        vae = linked_vae_block(prompt, inputs.get("vae"), host.vae_file_block)
        for name in ("width", "height") if vae and inputs.get("inversion") is None else ():
            value = constant_int(prompt, inputs.get(name))
            block, where = vae
            problem = value and size_off_block(name, value, block, f"the VAE {where} works on {block}-pixel blocks",
                                               auto=True)
            if problem:
                problems[name] = problem
        return problems

    @staticmethod
    def _mask_problem(prompt, inputs):
        # the editing mask against the photo SISO ReNoise Invert inverts, before the inversion runs;
        # without an inversion, the mask against width x height (where the mask's size is known:
        # queue_checks.linked_image_size; not a mask of a picture made in the run)
        inversion = inputs.get("inversion")
        if inversion is None:
            width, height, weight = inputs.get("width"), inputs.get("height"), inputs.get("background_weight", 10.0)
            if not (isinstance(width, int) and isinstance(height, int) and isinstance(weight, (int, float)) and weight > 0):
                return None
            if AUTO in (width, height):   # the family's size: the model is a link, checked when the run starts
                return None
            mask = linked_image_size(prompt, inputs.get("mask"), host.input_image_size)
            if mask and mask != (width, height):
                return (f"mask: the mask is {mask[0]}x{mask[1]} but the picture SISO Optimize makes is {width}x{height} "
                        "(width x height): make the mask from that picture, or set width and height to the mask's size")
            return None
        if not (isinstance(inversion, list) and len(inversion) == 2
                and prompt.get(inversion[0], {}).get("class_type") == "ReNoiseInvert"):
            return None
        photo = linked_image_size(prompt, prompt[inversion[0]].get("inputs", {}).get("image"), host.input_image_size)
        mask = linked_image_size(prompt, inputs.get("mask"), host.input_image_size)
        if photo and mask and photo != mask:
            return (f"mask: the mask is {mask[0]}x{mask[1]} but the photo SISO ReNoise Invert inverts is "
                    f"{photo[0]}x{photo[1]}: make the mask from the same photo that goes into SISO ReNoise Invert")
        return None

    @classmethod
    def _check_later_nodes(cls, model, lora_rank, lora_target):
        # a later SISO Optimize that goes on from this LoRA with a rank or target of its own would
        # refuse it only after this run: where this node's values were computed in the run, the
        # queue could not compare them
        prompt, node_id = getattr(cls.hidden, "prompt", None), getattr(cls.hidden, "unique_id", None)
        own = prompt.get(str(node_id), {}).get("inputs", {}) if isinstance(prompt, dict) else {}
        def target_layers(target):
            try:
                return host.lora_target_names(model, target)
            except Exception:   # a model SISO refuses: optimize_subject says why, before any work
                return None
        problem = later_warm_start_problem(prompt, node_id, lora_rank, lora_target, own.get("model"), target_layers)
        if problem:
            raise ValueError(problem)

    @classmethod
    @checked
    def execute(cls, model, vae, positive, subject, dino_weights, ir_weights, seed, width, height, steps, grad_steps,
                scheduler, max_iterations, learning_rate, lora_rank, lora_alpha, lora_target, dino_weight, ir_weight,
                early_stop_percent, early_stop_patience, background_weight=10.0, low_memory="auto", precision="fp32",
                inversion=None, mask=None, initial_lora=None, compile="off"):
        # precision, compile: a prompt saved before the input existed has none and keeps its float32,
        # uncompiled run.
        settings = GenerationSettings(
            width=width, height=height, seed=seed, steps=steps, grad_steps=grad_steps, scheduler=scheduler,
            rank=lora_rank, alpha=lora_alpha, target=lora_target, dino_weight=dino_weight, ir_weight=ir_weight,
            background_weight=background_weight, precision=precision, compile=compile,
            gradient_checkpointing=LEGACY_LOW_MEMORY[low_memory] if low_memory in LEGACY_LOW_MEMORY else LOW_MEMORY[low_memory],
            optimization=OptimizationSettings(max_iterations=max_iterations, learning_rate=learning_rate,
                                              early_stop_percent=early_stop_percent,
                                              early_stop_patience=early_stop_patience))
        # optimize_subject checks the model, the settings and the editing inputs before any work.
        # Resolve both files first so a missing one fails fast.
        host.check_vae(vae, model)
        cls._check_later_nodes(model, lora_rank, lora_target)
        dino_path = host.weight_file_path("dino", dino_weights) if dino_weight > 0 else None
        ir_path = host.weight_file_path("ir", ir_weights) if ir_weight > 0 else None
        warnings = precision_warnings(host.compute_device(), precision) + list(getattr(subject, "warnings", []))
        for warning in warnings:
            log.warning("SISO Optimize: %s", warning)
        # the live chart draws the background term whenever there is one (editing, or a mask alone)
        progress = IterationProgress(max_iterations, getattr(cls.hidden, "unique_id", None), early_stop_patience,
                                     editing=inversion is not None or (mask is not None and background_weight > 0))
        try:
            lora, best_image, result = optimize_subject(model, vae, positive, subject, dino_path, ir_path, settings,
                                                        on_iteration=progress, inversion=inversion, mask=mask,
                                                        initial_lora=initial_lora)
        except BaseException as error:
            progress.failed(error)   # the live chart says why it ended, then ComfyUI reports the error
            raise
        report = result.describe() + f". Settings: {result.settings}"
        if warnings:
            report = "Warning: " + "; ".join(warnings) + ". " + report
        if result.memory is not None:   # what the memory estimate said, and the low_memory it chose
            report += f". {result.memory.describe()}"
        if result.loading:   # whether ComfyUI held the whole model or streamed it
            report += f". Model {result.loading}"
        if result.compiled:   # what was compiled (or reused), and a TorchCompileModel input
            report += f". {result.compiled}"
        progress.finish(report)
        log.info("SISO: %s", report)
        curve = torch.from_numpy(loss_curve(result.history, result.best_iteration)).unsqueeze(0)
        return io.NodeOutput(lora, best_image, curve, report, ui={"text": [report]})
