"""Queue-time checks: each prompt as it arrives at POST /prompt, before ComfyUI validates (and
casts) it; the schema checks themselves are in checks.py.

One refusal, under the input it is about, once: ComfyUI reports whatever ``validate_inputs``
returns under EVERY input the function receives (with ``**kwargs``, all of them). So the pack
checks each prompt in an on-prompt handler (``PromptServer.add_on_prompt_handler``, which runs
before validation) and puts a ``RefusedValue`` in place of each refused value: ComfyUI's own
per-input unwrapping of a widget value (``"__value__" in value``, both 0.3.75 and 0.33) raises
our message, which ComfyUI reports once, under that input ("Failed to convert an input value").
A value from a stock Primitive node is a constant and is checked there too.

What the queue cannot see, because a node computes it while the prompt runs, is checked when the
first expensive SISO node that knows it starts: its own run-time value against what the prompt fixes
further down (``later_warm_start_problem`` at SISO Optimize, ``later_mask_problem`` at SISO
ReNoise Invert), so a refusal that would come after that node's work comes before it.
"""
from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from ..siso_ops import host
from .checks import LINKED, InputError, schema_inputs, schema_problems


# Stock nodes whose output is their own widget ``value``: a constant, known at queue time.
PRIMITIVES = {"PrimitiveInt", "PrimitiveFloat", "PrimitiveString", "PrimitiveStringMultiline", "PrimitiveBoolean"}


def _as_comfyui_casts(spec, value):
    """The widget value as ComfyUI's validation hands it on (int(), float(), str()); booleans
    are kept as sent, to be checked strictly. Raises what ComfyUI's own cast would."""
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    if isinstance(spec, io.Int.Input):
        return int(value)
    if isinstance(spec, io.Float.Input):
        return float(value)
    if isinstance(spec, io.String.Input):
        return str(value)
    return value


def _constant(prompt: dict, value):
    """(True, value) for a widget value or a link from a stock Primitive node; (False, None) else."""
    if not isinstance(value, list):
        return True, value
    source = prompt.get(value[0]) if len(value) == 2 and isinstance(value[0], str) else None
    if isinstance(source, dict) and source.get("class_type") in PRIMITIVES:
        inner = source.get("inputs", {}).get("value")
        if inner is not None and not isinstance(inner, list):
            return True, inner
    return False, None


def _input_named_by(message: str, names) -> str | None:
    """The input a ``check_values`` message is about: the one it starts with, else the first it names."""
    starting = [n for n in names if message.startswith(n)]
    if starting:
        return max(starting, key=len)
    return next((n for n in names if f"{n} " in message or f"{n}:" in message), None)


def node_refusals(node, prompt: dict, inputs: dict) -> dict:
    """{input: message} for the constant inputs of one node of a prompt that the pack refuses."""
    specs = schema_inputs(node)
    values, sent, linked = {}, {}, []
    for name, raw in inputs.items():
        if name not in specs:
            continue
        known, value = _constant(prompt, raw)
        if not known:
            linked.append(name)
            continue
        try:
            values[name] = _as_comfyui_casts(specs[name], value)
        except Exception:
            continue   # ComfyUI refuses it itself ("Failed to convert an input value")
        sent[name] = value
    refusals = dict(schema_problems(node, values, linked))
    remaining = {k: v for k, v in values.items() if k not in refusals}
    problem = node.check_values(**dict(remaining, **{name: LINKED for name in linked}))
    if problem:
        name = _input_named_by(problem, list(remaining)) or next(iter(remaining), None)
        if name is not None:
            refusals[name] = problem
    return {name: (message, sent[name]) for name, message in refusals.items()}


def _source(prompt: dict, link) -> tuple:
    """(node, its inputs, output index) a link comes from; (None, {}, None) for no link."""
    if not (isinstance(link, list) and len(link) == 2 and isinstance(prompt.get(link[0]), dict)):
        return None, {}, None
    source = prompt[link[0]]
    inputs = source.get("inputs", {})
    return source.get("class_type"), inputs if isinstance(inputs, dict) else {}, link[1]


def constant_int(prompt: dict, value) -> int | None:
    """A whole number the prompt fixes: a widget value or a stock Primitive node's; else None."""
    known, value = _constant(prompt, value)
    return value if known and isinstance(value, int) and not isinstance(value, bool) else None


# Nodes whose first output has the size of one of their inputs, whatever their other values: SISO
# Subject Mask (its photo's), and stock nodes read in ComfyUI's comfy_extras (0.3.75 and 0.33):
# ImageToMask slices a channel, InvertMask / ThresholdMask / GrowMask / FeatherMask work on a copy
# of their mask, MaskComposite pastes the source into a copy of the destination, and SAM3_Detect
# (0.33) interpolates its masks to its image's height and width. tests/test_input_checks.py runs
# each stock mask node; tests/test_subject_mask_sam3.py runs SAM3_Detect.
SAME_SIZE_AS = {"SubjectMask": "image", "ImageToMask": "image", "InvertMask": "mask", "ThresholdMask": "mask",
                "GrowMask": "mask", "FeatherMask": "mask", "MaskComposite": "destination", "SAM3_Detect": "image"}


def linked_image_size(prompt: dict, link, size_of_file) -> tuple | None:
    """(width, height) of the IMAGE or MASK a link carries, where the prompt tells it before it runs:
    LoadImage's image or mask and LoadImageMask's mask (their file's size), a stock SolidMask's
    (its width and height) or ImageScale's (both sides set), and the nodes of SAME_SIZE_AS fed by
    one of these; else None."""
    kind, inputs, output = _source(prompt, link)
    if kind in ("LoadImage", "LoadImageMask") and output in ((0, 1) if kind == "LoadImage" else (0,)) \
            and isinstance(inputs.get("image"), str):
        return size_of_file(inputs["image"])
    if kind == "SolidMask" and output == 0:
        width, height = constant_int(prompt, inputs.get("width")), constant_int(prompt, inputs.get("height"))
        return (width, height) if width is not None and height is not None else None
    if output == 0 and kind in SAME_SIZE_AS:
        return linked_image_size(prompt, inputs.get(SAME_SIZE_AS[kind]), size_of_file)
    if kind == "ImageScale" and output == 0:   # both sides given: exactly that size (0 keeps the aspect)
        width, height = constant_int(prompt, inputs.get("width")), constant_int(prompt, inputs.get("height"))
        return (width, height) if width and height else None
    return None


def linked_batch_size(prompt: dict, link) -> int | None:
    """How many images a link carries where the prompt tells it before it runs (a stock EmptyImage's
    batch_size, RepeatImageBatch's amount: constants, or values of stock Primitive nodes); else None."""
    kind, inputs, output = _source(prompt, link)
    if kind == "EmptyImage" and output == 0:
        return constant_int(prompt, inputs.get("batch_size"))
    if kind == "RepeatImageBatch" and output == 0:
        amount = constant_int(prompt, inputs.get("amount"))
        return 0 if amount == 0 else None   # else: amount times a batch of unknown size
    return None


def linked_lora_rank(prompt: dict, link, rank_of_file) -> tuple | None:
    """(rank, where it comes from) of the SISO_LORA a link carries, where the prompt tells it before
    it runs: SISO Load LoRA's file (its header, ``rank_of_file(name)``; None where it cannot be
    read: that node refuses the file itself) or SISO Optimize's lora_rank; else None."""
    kind, inputs, output = _source(prompt, link)
    if kind == "LoadSISOLoRA" and output == 0 and isinstance(inputs.get("lora_name"), str):
        try:
            return rank_of_file(inputs["lora_name"]), f"the file {inputs['lora_name']} (SISO Load LoRA)"
        except ValueError:
            return None
    if kind == "SISOOptimize" and output == 0:
        rank = constant_int(prompt, inputs.get("lora_rank"))
        return (rank, f"the SISO Optimize before it (node {link[0]}, lora_rank {rank})") if rank is not None else None
    return None


def linked_vae_block(prompt: dict, link, block_of_file) -> tuple | None:
    """(pixels per latent cell, the file in the user's words) of the VAE a link carries, where the
    prompt names its file and the file's header says it (``block_of_file(folder, name, prefix)``,
    host.vae_file_block): a stock VAELoader's file, or the VAE inside CheckpointLoaderSimple's
    checkpoint; else None."""
    kind, inputs, output = _source(prompt, link)
    if kind == "VAELoader" and output == 0 and isinstance(inputs.get("vae_name"), str):
        folder, name, prefix = "vae", inputs["vae_name"], ""
    elif kind == "CheckpointLoaderSimple" and output == 2 and isinstance(inputs.get("ckpt_name"), str):
        folder, name, prefix = "checkpoints", inputs["ckpt_name"], "first_stage_model."
    else:
        return None
    block = block_of_file(folder, name, prefix)
    return (block, f"{name} ({kind}, node {link[0]})") if block else None


def _fed_by(prompt: dict, node_id: str, output: int, class_type: str, input_name: str) -> list:
    """Ids of the ``class_type`` nodes whose ``input_name`` is output ``output`` of ``node_id``."""
    return sorted(key for key, entry in prompt.items()
                  if isinstance(entry, dict) and entry.get("class_type") == class_type
                  and isinstance(entry.get("inputs"), dict)
                  and entry["inputs"].get(input_name) in ([node_id, output], (node_id, output)))


def later_warm_start_problem(prompt: dict, node_id: str, lora_rank: int, lora_target: str, model_link,
                             target_layers) -> str | None:
    """At a SISO Optimize's start: why a later SISO Optimize that goes on from this node's LoRA
    (its initial_lora) will refuse it after this run, where the prompt fixes that node's lora_rank
    (the queue checked the pair if both were constants; here this node's is a run-time value), or
    where it trains another lora_target of the same model (``target_layers(target)``: the layers
    a target picks on the loaded model; two choices may pick the same ones); else None."""
    if not isinstance(prompt, dict) or node_id is None:
        return None
    for later in _fed_by(prompt, str(node_id), 0, "SISOOptimize", "initial_lora"):
        inputs = prompt[later]["inputs"]
        rank = constant_int(prompt, inputs.get("lora_rank"))
        if rank is not None and rank != lora_rank:
            return (f"lora_rank: SISO Optimize node {later} goes on from this node's LoRA (its initial_lora) at "
                    f"lora_rank {rank}, but this node's lora_rank is {lora_rank}: it would refuse the LoRA after this "
                    f"optimisation. Set this node's lora_rank to {rank}, or node {later}'s to {lora_rank}")
        known, target = _constant(prompt, inputs.get("lora_target"))
        if known and isinstance(target, str) and target != lora_target and inputs.get("model") == model_link \
                and target_layers(target) != target_layers(lora_target):
            return (f"lora_target: SISO Optimize node {later} goes on from this node's LoRA (its initial_lora) with "
                    f"lora_target '{target}', which trains other layers of this model than this node's "
                    f"'{lora_target}': it would refuse the LoRA after this optimisation. Set both lora_target inputs "
                    "to the same choice")
    return None


def later_mask_problem(prompt: dict, node_id: str, photo_size: tuple, size_of_file) -> str | None:
    """At SISO ReNoise Invert's start: why a SISO Optimize that edits with this inversion will refuse
    its mask after the inversion, where the prompt tells the mask's size (linked_image_size) and the
    photo's (width, height) is known only now (the queue checked the pair where it knew both)."""
    if not isinstance(prompt, dict) or node_id is None:
        return None
    for later in _fed_by(prompt, str(node_id), 0, "SISOOptimize", "inversion"):
        mask = linked_image_size(prompt, prompt[later]["inputs"].get("mask"), size_of_file)
        if mask and tuple(mask) != tuple(photo_size):
            return (f"image: SISO Optimize node {later} edits with this inversion under a {mask[0]}x{mask[1]} mask, "
                    f"but the photo here is {photo_size[0]}x{photo_size[1]}: it would refuse the mask after the "
                    "inversion. Make the mask from the same photo that goes into this node's image, or scale this "
                    f"photo to {mask[0]}x{mask[1]}")
    return None


def queue_check(pack_nodes):
    """An on-prompt handler: marks each refused constant input of the pack's nodes (see the module
    docstring). Never raises: ComfyUI would only log it and queue the prompt unchecked."""
    by_id = {node.define_schema().node_id: node for node in pack_nodes}

    def check(json_data):
        try:
            prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
            if not isinstance(prompt, dict):
                return json_data
            # "Queue selected output nodes": ComfyUI validates and runs only what those outputs need;
            # a node outside is neither, and a mark left on it would stay in the queued prompt (the
            # history, the PNG's metadata) in place of the value sent
            validated = _upstream(prompt, json_data.get("partial_execution_targets"))
            for key, entry in prompt.items():
                if validated is not None and key not in validated:
                    continue
                node = by_id.get(entry.get("class_type")) if isinstance(entry, dict) else None
                if node is None or not isinstance(entry.get("inputs"), dict):
                    continue
                refusals = node_refusals(node, prompt, entry["inputs"])
                for name, message in node.check_prompt(prompt, key).items():
                    refusals.setdefault(name, (message, entry["inputs"].get(name)))
                for name, (message, value) in refusals.items():
                    entry["inputs"][name] = host.RefusedValue(value, message, InputError)
        except Exception:   # a check that fails must not stop the prompt: execute checks again
            logging.getLogger(__name__).exception("SISO: the queue-time input check failed")
        return json_data
    return check


def _upstream(prompt: dict, targets) -> set | None:
    """The ids of ``targets`` and every node they take an input from, or None (no targets: all)."""
    if not isinstance(targets, list):
        return None
    seen, todo = set(), [str(t) for t in targets]
    while todo:
        key = todo.pop()
        if key in seen or not isinstance(prompt.get(key), dict):
            continue
        seen.add(key)
        inputs = prompt[key].get("inputs")
        for value in (inputs.values() if isinstance(inputs, dict) else ()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                todo.append(str(value[0]))
    return seen


def register_queue_check(pack_nodes):
    """Adds ``queue_check`` to the running server once (no server: in-process tests)."""
    host.add_prompt_check(queue_check(pack_nodes))
