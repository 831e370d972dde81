"""Bad inputs, as a hostile user sends them through ComfyUI's HTTP API (issue 14): every case is
refused with the pack's own message naming what was wrong, at queue time (HTTP 400 with
``node_errors``) where ComfyUI hands the value to validation, else when the node starts and
before it does any work (no progress from it); the server lives on after each.

Two parts: a table of named cases (the issue's and more), and a walk over every numeric and
dropdown input of every pack node in the running server's /object_info (out of range, NaN,
infinite, unknown choice), so no input can be added without a limit that holds."""
from __future__ import annotations

import copy
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import pytest

from comfy_server import WebSocketListener, _execution_errors, wait_for_history
from conftest import REPO, pack_node_ids

WORKFLOWS = REPO / "tests" / "workflows"
PACK_NODES = pack_node_ids()


def two_stage() -> dict:
    return json.loads((WORKFLOWS / "siso_two_stage_api.json").read_text())


def swap() -> dict:
    """Subject swap with SubjectMask: LoadSubject 4, ReNoiseInvert 7, SubjectMask 6, SISOOptimize 8."""
    return json.loads((WORKFLOWS / "siso_subject_swap_api.json").read_text())


def swap_drawn() -> dict:
    return json.loads((WORKFLOWS / "siso_subject_swap_drawn_mask_api.json").read_text())


def warm_start() -> dict:
    """The two-stage workflow going on from a saved LoRA: SISO Load LoRA -> initial_lora."""
    prompt = two_stage()
    prompt["50"] = {"class_type": "LoadSISOLoRA", "inputs": {"model": ["1", 0], "lora_name": "siso_test_lora.safetensors"}}
    prompt[node_of(prompt, "SISOOptimize")]["inputs"]["initial_lora"] = ["50", 0]
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def _links(node: dict) -> list:
    return [v[0] for v in node["inputs"].values() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)]


def outputs_through(prompt: dict, target: str) -> dict:
    """The prompt with only the output nodes that depend on ``target`` (or are it): ComfyUI
    queues a prompt whose other outputs are valid (HTTP 200, the bad node skipped), and runs
    them; with none left, a refused input is HTTP 400 and nothing runs."""
    used = {source for node in prompt.values() for source in _links(node)}
    downstream, grew = {target}, True
    while grew:
        grew = False
        for key, node in prompt.items():
            if key not in downstream and downstream & set(_links(node)):
                downstream.add(key)
                grew = True
    return {k: v for k, v in prompt.items() if k in used or k in downstream}


@dataclass
class Case:
    id: str
    base: Callable            # which API workflow
    node: str                 # class_type of the node that must refuse
    inputs: dict = field(default_factory=dict)   # new widget values of that node
    expect: str = ""          # in the message
    at: str = "queue"         # "queue": HTTP 400; "run": an execution error before any work
    edit: Callable | None = None   # (prompt, server) -> None for changes beyond that node's widgets
    # the node must detect and segment before it can know (SubjectMask's grow): it may report
    # progress; the refusal still comes before the expensive editing run
    needs_work: bool = False
    about: str = ""           # the input a queue-time refusal is reported under (default: the first changed)
    target: str = ""          # the refusing node's id where the prompt has several of its class (after edit)

    def input_about(self) -> str:
        return self.about or next(iter(self.inputs), None) or self.expect.split()[0].rstrip(":")


def linked(class_type: str, value, field_name: str, target: str):
    """Feed ``field_name`` of node ``target`` from a stock primitive node: ComfyUI validates no
    linked value, so the node's own check at execute is all there is."""
    def edit(prompt, server):
        prompt["900"] = {"class_type": class_type, "inputs": {"value": value}}
        prompt[node_of(prompt, target)]["inputs"][field_name] = ["900", 0]
    return edit


def computed(value_a: str, value_b: str, field_name: str, target: str):
    """Feed ``field_name`` from stock StringConcatenate: a value computed when the prompt runs, so
    only the node's own check at execute can see it."""
    def edit(prompt, server):
        prompt["901"] = {"class_type": "StringConcatenate", "inputs": {"string_a": value_a, "string_b": value_b,
                                                                       "delimiter": ""}}
        prompt[node_of(prompt, target)]["inputs"][field_name] = ["901", 0]
    return edit


def computed_int(text: str, field_name: str, target: str):
    """Feed the INT ``field_name`` of node ``target`` (an id) from stock StringLength of ``text``: a
    number computed when the prompt runs, which no queue-time check can see."""
    def edit(prompt, server):
        prompt["910"] = {"class_type": "StringLength", "inputs": {"string": text}}
        prompt[target]["inputs"][field_name] = ["910", 0]
    return edit


def both(*edits):
    def edit(prompt, server):
        for one in edits:
            one(prompt, server)
    return edit


def photo_through(node: dict):
    """SISO ReNoise Invert's photo through a stock node (node 907) that takes the photo it had."""
    def edit(prompt, server):
        invert = prompt[node_of(prompt, "ReNoiseInvert")]["inputs"]
        prompt["907"] = dict(node, inputs=dict(node["inputs"], image=invert["image"]))
        invert["image"] = ["907", 0]
    return edit


def existing_lora(name: str):
    """A file of that name in the loras folder already."""
    def edit(prompt, server):
        folder = server.base / "models" / "loras"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.safetensors").write_bytes(b"an earlier LoRA")
        prompt[node_of(prompt, "SaveSISOLoRA")]["inputs"].update(name=name, overwrite=False)
    return edit


def mask_from(name: str, width: int, height: int):
    """SISO Optimize's editing mask from a second LoadImage (another photo's size)."""
    def edit(prompt, server):
        image_file(name, width, height, alpha=0)(server)
        prompt["902"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        prompt[node_of(prompt, "SISOOptimize")]["inputs"]["mask"] = ["902", 1]
    return edit


def _tiny_layers(server) -> tuple:
    """(a linear layer, a 3x3 convolution) of the server's tiny SD1.5: LoRA base name and weight shape."""
    import safetensors
    with safetensors.safe_open(str(server.base / "models" / "checkpoints" / "siso_tiny_sd15.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.diffusion_model.")}
    linear = next(k for k, s in shapes.items() if k.endswith(".attn1.to_q.weight"))
    conv = next(k for k, s in shapes.items() if k.endswith(".weight") and len(s) == 4 and s[2:] == (3, 3))
    return tuple((k[len("model."):-len(".weight")], shapes[k]) for k in (linear, conv))


def lora_file(name: str, change, header: dict | None = None):
    """SISO Load LoRA of the warm-start workflow reads ``name``: a rank-4 LoRA of two linear layers of
    the tiny model (small values, as SISO makes them), with ``change(tensors, layers)`` applied."""
    def edit(prompt, server):
        import safetensors.torch
        import torch
        (linear, shape), conv = _tiny_layers(server)
        g = torch.Generator().manual_seed(0)
        tensors = {f"{linear}.lora_up.weight": torch.randn(shape[0], 4, generator=g) * 0.01,
                   f"{linear}.lora_down.weight": torch.randn(4, shape[1], generator=g) * 0.1,
                   f"{linear}.alpha": torch.tensor(4.0)}
        change(tensors, (linear, shape), conv)
        folder = server.base / "models" / "loras"
        folder.mkdir(parents=True, exist_ok=True)
        metadata = {"siso.best_iteration": "2", "siso.iterations": "3", "siso.best_loss": "-0.5", **(header or {})}
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name), metadata=metadata)
        prompt[node_of(prompt, "LoadSISOLoRA")]["inputs"]["lora_name"] = name
    return edit


def _rank_8_up(t, linear, conv):
    t[f"{linear[0]}.lora_up.weight"] = t[f"{linear[0]}.lora_up.weight"].repeat(1, 2)


def _linear_on_conv(t, linear, conv):
    (base, shape) = conv
    t.update({f"{base}.lora_up.weight": t[f"{linear[0]}.lora_up.weight"][:1].repeat(shape[0], 1),
              f"{base}.lora_down.weight": t[f"{linear[0]}.lora_down.weight"][:, :1].repeat(1, shape[1]),
              f"{base}.alpha": t[f"{linear[0]}.alpha"].clone()})


def _as_int64(t, linear, conv):
    t[f"{linear[0]}.lora_down.weight"] = (t[f"{linear[0]}.lora_down.weight"] * 100).long()


def _scaled_1e4(t, linear, conv):
    for k in list(t):
        if not k.endswith(".alpha"):
            t[k] = torch_full_like(t[k], 1e4)


def torch_full_like(tensor, value):
    import torch
    return torch.full_like(tensor, value)


def _down_1d(t, linear, conv):
    t[f"{linear[0]}.lora_down.weight"] = t[f"{linear[0]}.lora_down.weight"][0]


def _no_down(t, linear, conv):
    del t[f"{linear[0]}.lora_down.weight"]


def _vector_alpha(t, linear, conv):
    t[f"{linear[0]}.alpha"] = t[f"{linear[0]}.alpha"].repeat(4)


def _mixed_ranks(t, linear, conv):
    import torch
    (base, shape) = conv
    t.update({f"{base}.lora_up.weight": torch.zeros(shape[0], 8, 1, 1),
              f"{base}.lora_down.weight": torch.full((8, *shape[1:]), 0.01), f"{base}.alpha": torch.tensor(8.0)})


def _nothing(t, linear, conv):
    pass


def image_file(name: str, width: int, height: int, alpha: int | None = None):
    """Feed the workflow's LoadImage of ``which`` with a generated PNG of that size."""
    def write(server):
        import numpy as np
        from PIL import Image
        pixels = (np.random.default_rng(3).random((height, width, 3)) * 255).astype("uint8")
        if alpha is not None:
            pixels = np.concatenate([pixels, np.full((height, width, 1), alpha, "uint8")], -1)
        Image.fromarray(pixels).save(server.base / "input" / name)
    return write


def load_image(name: str, width: int, height: int, loader: str, alpha: int | None = None):
    def edit(prompt, server):
        image_file(name, width, height, alpha)(server)
        prompt[loader]["inputs"]["image"] = name
    return edit


def stock_mask(node: dict):
    """SISO Optimize's mask from a stock node (``node``, id 903 unless taken)."""
    def edit(prompt, server):
        key = "910" if "903" in prompt else "903"
        prompt[key] = node
        prompt[node_of(prompt, "SISOOptimize")]["inputs"]["mask"] = [key, 0]
    return edit


def _rank_4096(t, linear, conv):
    import torch
    (base, shape) = linear
    t.update({f"{base}.lora_up.weight": torch.zeros(shape[0], 4096),
              f"{base}.lora_down.weight": torch.full((4096, shape[1]), 0.01), f"{base}.alpha": torch.tensor(4096.0)})


def chained(lora_rank: int):
    """A second SISO Optimize (node 960) going on from the first one's LoRA, with ``lora_rank``;
    SISO Save LoRA saves the second's."""
    def edit(prompt, server):
        first = node_of(prompt, "SISOOptimize")
        prompt["960"] = copy.deepcopy(prompt[first])
        prompt["960"]["inputs"].update(initial_lora=[first, 0], lora_rank=lora_rank)
        prompt[node_of(prompt, "SaveSISOLoRA")]["inputs"]["subject_lora"] = ["960", 0]
        prompt.pop(node_of(prompt, "ApplySISOLoRA"))
        for key in [k for k, v in prompt.items() if v["class_type"] in ("KSampler", "VAEDecode", "SaveImage")]:
            prompt.pop(key)
    return edit


def scoring() -> dict:
    """SISO Subject Score (node 12) of the subject photo against itself, previewed."""
    prompt = {k: v for k, v in several_photos().items() if k in ("3", "4", "12")}
    prompt["12"]["inputs"].update(images=["3", 0], subject=["4", 0])
    prompt["17"] = {"class_type": "PreviewImage", "inputs": {"images": ["12", 3]}}
    return prompt


NAN, INF = float("nan"), float("inf")
CASES = [
    # ---- SISO Optimize: limits the schema declares (ComfyUI 0.3.75 checks none of them for this node)
    Case("width 16384", two_stage, "SISOOptimize", {"width": 16384}, "width = 16384 is above its maximum 2048"),
    Case("height 16384", two_stage, "SISOOptimize", {"height": 16384}, "height = 16384 is above its maximum 2048"),
    Case("width 32", two_stage, "SISOOptimize", {"width": 32}, "width 32 is below 64: use 0 (auto: the model's family size) or at least 64"),
    Case("width -8", two_stage, "SISOOptimize", {"width": -8}, "width = -8 is below its minimum 0"),
    Case("width 100", two_stage, "SISOOptimize", {"width": 100}, "width 100 is not a multiple of 8: use 96 or 104"),
    Case("lora_rank 10000", two_stage, "SISOOptimize", {"lora_rank": 10000}, "lora_rank = 10000 is above its maximum 128"),
    Case("max_iterations 100000", two_stage, "SISOOptimize", {"max_iterations": 100000}, "max_iterations = 100000 is above its maximum 1000"),
    Case("max_iterations 0", two_stage, "SISOOptimize", {"max_iterations": 0}, "max_iterations = 0 is below its minimum 1"),
    Case("steps 100000", two_stage, "SISOOptimize", {"steps": 100000}, "steps = 100000 is above its maximum 50"),
    Case("steps 60", two_stage, "SISOOptimize", {"steps": 60}, "steps = 60 is above its maximum 50"),
    Case("grad_steps -1", two_stage, "SISOOptimize", {"grad_steps": -1}, "grad_steps = -1 is below its minimum 0"),
    Case("learning_rate 1e-7", two_stage, "SISOOptimize", {"learning_rate": 1e-7}, "learning_rate 1e-07 is below 1e-6: use 0 (auto"),
    Case("learning_rate 1e9", two_stage, "SISOOptimize", {"learning_rate": 1e9}, "learning_rate = 1000000000 is above its maximum 0.1"),
    Case("learning_rate inf", two_stage, "SISOOptimize", {"learning_rate": INF}, "learning_rate is inf, not a number"),
    Case("learning_rate -inf", two_stage, "SISOOptimize", {"learning_rate": -INF}, "learning_rate is -inf, not a number"),
    Case("early_stop_percent 1e6", two_stage, "SISOOptimize", {"early_stop_percent": 1e6}, "early_stop_percent = 1000000 is above its maximum 100"),
    Case("early_stop_patience 0", two_stage, "SISOOptimize", {"early_stop_patience": 0}, "early_stop_patience = 0 is below its minimum 1"),
    Case("dino_weight NaN", two_stage, "SISOOptimize", {"dino_weight": NAN}, "dino_weight is nan, not a number: use a value between 0 and 10"),
    Case("lora_alpha NaN", two_stage, "SISOOptimize", {"lora_alpha": NAN}, "lora_alpha is nan, not a number"),
    Case("background_weight NaN", two_stage, "SISOOptimize", {"background_weight": NAN}, "background_weight is nan"),
    Case("seed -1", two_stage, "SISOOptimize", {"seed": -1}, "seed = -1 is below its minimum 0"),
    Case("both weights 0", two_stage, "SISOOptimize", {"dino_weight": 0.0, "ir_weight": 0.0}, "dino_weight and ir_weight are both 0"),
    Case("scheduler unknown", two_stage, "SISOOptimize", {"scheduler": "bogus"}, "scheduler: 'bogus' is not one of its choices"),
    Case("lora_target unknown", two_stage, "SISOOptimize", {"lora_target": "everything"}, "lora_target: 'everything' is not one of its choices"),
    Case("precision unknown", two_stage, "SISOOptimize", {"precision": "fp8"}, "precision: 'fp8' is not one of its choices"),
    Case("low_memory unknown", two_stage, "SISOOptimize", {"low_memory": "maybe"}, "low_memory: 'maybe' is not one of its choices"),
    Case("ir_weights missing", two_stage, "SISOOptimize", {"ir_weights": "missing.pth"}, "ir_weights: IR ViT-H/14 + fc1 weights 'missing.pth' not found"),
    # both dropdowns left at the folder's first file: refused at the queue, not after loading DINOv2
    Case("ir_weights = dino_weights", two_stage, "SISOOptimize", {"ir_weights": "dinov2_vitl14.safetensors"},
         "ir_weights and dino_weights are the same file 'dinov2_vitl14.safetensors'. ir_weights needs the "
         "image-retrieval network, ir_features.pth (or ir_features.safetensors); dino_weights needs DINOv2"),
    Case("score ir_weights = dino_weights", scoring, "SISOSubjectScore", {"ir_weights": "dinov2_vitl14.safetensors"},
         "set ir_weight to 0 to judge with DINOv2 alone"),
    # ---- other nodes
    Case("subject background unknown", two_stage, "LoadSubject", {"background": "purple"}, "background: 'purple' is not one of its choices"),
    Case("subject mask_marks unknown", two_stage, "LoadSubject", {"mask_marks": "both"}, "mask_marks: 'both' is not one of its choices"),
    Case("apply strength NaN", two_stage, "ApplySISOLoRA", {"strength": NAN}, "strength is nan, not a number: use a value between -4 and 4"),
    Case("apply strength 100", two_stage, "ApplySISOLoRA", {"strength": 100.0}, "strength = 100 is above its maximum 4"),
    Case("lora name leaves folder", two_stage, "SaveSISOLoRA", {"name": "../escape"}, "LoRA name '../escape' is not allowed"),
    Case("lora name 300 letters", two_stage, "SaveSISOLoRA", {"name": "x" * 300}, "is too long: 300 bytes in UTF-8, at most 200"),
    Case("lora name CON", two_stage, "SaveSISOLoRA", {"name": "CON"}, "is a device name on Windows"),
    Case("lora format unknown", two_stage, "SaveSISOLoRA", {"format": "ckpt"}, "format: 'ckpt' is not one of its choices"),
    # ComfyUI casts a BOOLEAN with bool(): "false" and "yes" would both mean true and replace the file
    Case("overwrite 'false' text", two_stage, "SaveSISOLoRA", {"overwrite": "false"},
         "overwrite must be true or false (a JSON boolean), got 'false' (str)"),
    Case("overwrite 'yes' text", two_stage, "SaveSISOLoRA", {"overwrite": "yes"}, "overwrite must be true or false"),
    Case("overwrite 1", two_stage, "SaveSISOLoRA", {"overwrite": 1}, "overwrite must be true or false (a JSON boolean), got 1 (int)"),
    Case("lora name exists, overwrite false", two_stage, "SaveSISOLoRA",
         expect="'earlier.safetensors' already exists in", edit=existing_lora("earlier"), about="name"),
    Case("renoise steps 100000", swap, "ReNoiseInvert", {"steps": 100000}, "steps = 100000 is above its maximum 100"),
    Case("renoise strength 0", swap, "ReNoiseInvert", {"strength": 0.0}, "strength = 0 is below its minimum 0.01"),
    Case("renoise sampler unknown", swap, "ReNoiseInvert", {"sampler": "dpmpp_2m"}, "sampler: 'dpmpp_2m' is not one of its choices"),
    Case("renoise kl_weight NaN", swap, "ReNoiseInvert", {"kl_weight": NAN}, "kl_weight is nan, not a number"),
    Case("renoise average range empty", swap, "ReNoiseInvert", {"average_start": 5, "average_end": 3}, "average_start (5) must be below average_end (3)"),
    Case("mask box_threshold NaN", swap, "SubjectMask", {"box_threshold": NAN}, "box_threshold is nan, not a number"),
    Case("mask keep unknown", swap, "SubjectMask", {"keep": "smallest"}, "keep: 'smallest' is not one of its choices"),
    Case("mask grow_pixels -100000", swap, "SubjectMask", {"grow_pixels": -100000}, "grow_pixels = -100000 is below its minimum -512"),
    Case("mask sam file missing", swap, "SubjectMask", {"sam_model": "missing.pth"}, "sam_model: SAM checkpoint 'missing.pth' not found"),
    Case("mask text empty", swap, "SubjectMask", {"text": "  "}, "text: the text is empty"),
    Case("mask text 5000 characters", swap, "SubjectMask", {"text": "dog " * 1250},
         "text: the text is 5000 characters long; Grounding DINO reads at most 256 tokens"),
    # ---- values that arrive through links: ComfyUI validates none. A stock Primitive's value is a
    # constant: the pack checks it at queue time, before SISO Optimize runs
    Case("linked learning_rate 1e9", two_stage, "SISOOptimize", expect="learning_rate = 1000000000 is above its maximum 0.1",
         edit=linked("PrimitiveFloat", 1e9, "learning_rate", "SISOOptimize")),
    Case("linked width 16384", two_stage, "SISOOptimize", expect="width = 16384 is above its maximum 2048",
         edit=linked("PrimitiveInt", 16384, "width", "SISOOptimize")),
    Case("linked dino_weight NaN", two_stage, "SISOOptimize", expect="dino_weight is nan, not a number",
         edit=linked("PrimitiveFloat", NAN, "dino_weight", "SISOOptimize")),
    Case("linked apply strength NaN", two_stage, "ApplySISOLoRA", expect="strength is nan, not a number",
         edit=linked("PrimitiveFloat", NAN, "strength", "ApplySISOLoRA")),
    Case("linked lora name too long", two_stage, "SaveSISOLoRA", expect="is too long: 400 bytes", about="name",
         edit=linked("PrimitiveString", "ü" * 200, "name", "SaveSISOLoRA")),
    Case("linked lora name leaves folder", two_stage, "SaveSISOLoRA", expect="LoRA name '../escape' is not allowed", about="name",
         edit=linked("PrimitiveString", "../escape", "name", "SaveSISOLoRA")),
    Case("linked overwrite 'false' text", two_stage, "SaveSISOLoRA", expect="overwrite must be true or false", about="overwrite",
         edit=linked("PrimitiveString", "false", "overwrite", "SaveSISOLoRA")),
    # ... a value computed while the prompt runs: the node refuses it at its start
    Case("computed lora name leaves folder", two_stage, "SaveSISOLoRA", expect="LoRA name '../escape' is not allowed",
         at="run", edit=computed("../", "escape", "name", "SaveSISOLoRA")),
    # ---- LoRA files SISO Load LoRA cannot apply: ComfyUI's loader would skip the layer (logging
    # "mat1 and mat2 shapes cannot be multiplied") and the image would be made without it. What the
    # file's header shows (layout, ranks, dtypes, SISO's fields) is refused at queue time, before
    # any tensor is read (issue 31); what needs the model's weights when SISO Load LoRA runs.
    Case("load lora up rank 8, down rank 4", warm_start, "LoadSISOLoRA", about="lora_name",
         expect="has a lora_up of rank 8 and a lora_down of rank 4", edit=lora_file("ranks_differ.safetensors", _rank_8_up)),
    Case("load lora linear-shaped on a conv layer", warm_start, "LoadSISOLoRA", at="run",
         expect="convolution in", edit=lora_file("linear_on_conv.safetensors", _linear_on_conv)),
    Case("load lora int64", warm_start, "LoadSISOLoRA", about="lora_name",
         expect="holds int64 numbers, not floating point", edit=lora_file("int64.safetensors", _as_int64)),
    Case("load lora weights 1e4", warm_start, "LoadSISOLoRA", at="run",
         expect="times its own weight", edit=lora_file("huge.safetensors", _scaled_1e4)),
    Case("load lora 1-D lora_down", warm_start, "LoadSISOLoRA", about="lora_name",
         expect="a LoRA's are matrices", edit=lora_file("down_1d.safetensors", _down_1d)),
    Case("load lora up without down", warm_start, "LoadSISOLoRA", about="lora_name",
         expect="has a lora_up but no lora_down", edit=lora_file("no_down.safetensors", _no_down)),
    Case("load lora vector alpha", warm_start, "LoadSISOLoRA", about="lora_name",
         expect="holds 4 values (4); it must be one number", edit=lora_file("vector_alpha.safetensors", _vector_alpha)),
    Case("load lora mixed ranks", warm_start, "LoadSISOLoRA", about="lora_name",
         expect="mixes LoRA ranks: rank 4 (e.g. diffusion_model.", edit=lora_file("mixed_ranks.safetensors", _mixed_ranks)),
    Case("load lora best_iteration not a number", warm_start, "LoadSISOLoRA", about="lora_name",
         expect="its header field siso.best_iteration is 'third', not a whole number",
         edit=lora_file("header_iteration.safetensors", _nothing, {"siso.best_iteration": "third"})),
    Case("load lora best_loss not a number", warm_start, "LoadSISOLoRA", about="lora_name",
         expect="its header field siso.best_loss is 'low', not a number",
         edit=lora_file("header_loss.safetensors", _nothing, {"siso.best_loss": "low"})),
    # ---- images and masks
    Case("subject photo 1x1", two_stage, "LoadSubject", expect="the subject photo is 1x1 pixels; SISO needs at least 32",
         at="run", edit=load_image("one_pixel.png", 1, 1, "3")),
    Case("renoise photo 1x1", swap_drawn, "ReNoiseInvert", expect="Scale it up first, e.g. 'ImageScale' to 64x64",
         at="run", edit=load_image("one_pixel_photo.png", 1, 1, "5")),
    Case("renoise photo 100x72", swap_drawn, "ReNoiseInvert", expect="the photo is 100x72; both sides must be multiples of 8",
         at="run", edit=load_image("odd_photo.png", 100, 72, "5")),
    Case("subject mask shrunk to nothing", swap, "SubjectMask", {"grow_pixels": -512},
         expect="grow_pixels -512 shrank its mask to nothing: use a grow_pixels closer to 0", at="run", needs_work=True),
    Case("drawn mask empty", swap_drawn, "SISOOptimize", expect="the mask is empty: it marks no subject to replace",
         at="run", edit=load_image("nothing_painted.png", 64, 64, "5", alpha=255)),
    # the mask's and the inverted photo's files tell their sizes: refused before the inversion runs
    Case("drawn mask of another size", swap_drawn, "SISOOptimize", about="mask",
         expect="mask: the mask is 72x64 but the photo SISO ReNoise Invert inverts is 64x64",
         edit=mask_from("other_size_mask.png", 72, 64)),
    Case("drawn mask everything", swap_drawn, "SISOOptimize", expect="the mask covers the whole photo",
         at="run", edit=load_image("all_painted.png", 64, 64, "5", alpha=0)),
    # a mask without an inversion keeps iteration 0's background: it must be width x height (64 x 64)
    Case("mask without inversion of another size", two_stage, "SISOOptimize", about="mask",
         expect="mask: the mask is 72x64 but the picture SISO Optimize makes is 64x64 (width x height)",
         edit=mask_from("refine_mask_72x64.png", 72, 64)),
    # ... from stock nodes whose size is in the prompt (issue 31): SolidMask, LoadImageMask, ImageToMask
    # of a LoadImage, refused at queue time, before SISO ReNoise Invert or any sampling runs
    Case("mask from SolidMask of another size", two_stage, "SISOOptimize", about="mask",
         expect="mask: the mask is 72x64 but the picture SISO Optimize makes is 64x64 (width x height)",
         edit=stock_mask({"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 72, "height": 64}})),
    Case("editing mask from SolidMask of another size", swap_drawn, "SISOOptimize", about="mask",
         expect="mask: the mask is 32x32 but the photo SISO ReNoise Invert inverts is 64x64",
         edit=stock_mask({"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}})),
    Case("editing mask from SolidMask with sizes from Primitives", swap_drawn, "SISOOptimize", about="mask",
         expect="mask: the mask is 32x48 but the photo SISO ReNoise Invert inverts is 64x64",
         edit=lambda prompt, server: (
             prompt.update({"905": {"class_type": "PrimitiveInt", "inputs": {"value": 32}},
                            "906": {"class_type": "PrimitiveInt", "inputs": {"value": 48}}}),
             stock_mask({"class_type": "SolidMask", "inputs": {"value": 1.0, "width": ["905", 0],
                                                                "height": ["906", 0]}})(prompt, server))),
    Case("editing mask from LoadImageMask of another size", swap_drawn, "SISOOptimize", about="mask",
         expect="mask: the mask is 72x64 but the photo SISO ReNoise Invert inverts is 64x64",
         edit=lambda prompt, server: (
             image_file("mask_72x64.png", 72, 64, alpha=0)(server),
             stock_mask({"class_type": "LoadImageMask", "inputs": {"image": "mask_72x64.png", "channel": "red"}})(
                 prompt, server))),
    Case("editing mask from ImageToMask of a LoadImage of another size", swap_drawn, "SISOOptimize", about="mask",
         expect="mask: the mask is 80x56 but the photo SISO ReNoise Invert inverts is 64x64",
         edit=lambda prompt, server: (
             prompt.__setitem__("904", {"class_type": "LoadImage", "inputs": {"image": "subject_2.png"}}),
             stock_mask({"class_type": "ImageToMask", "inputs": {"image": ["904", 0], "channel": "red"}})(
                 prompt, server))),
    # ... and through stock nodes that keep their input's size (queue_checks.SAME_SIZE_AS): an
    # InvertMask of a GrowMask of a FeatherMask of a SolidMask here
    Case("editing mask from mask nodes that keep a SolidMask's size", swap_drawn, "SISOOptimize", about="mask",
         expect="mask: the mask is 72x64 but the photo SISO ReNoise Invert inverts is 64x64",
         edit=lambda prompt, server: (
             prompt.update({
                 "903": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 72, "height": 64}},
                 "904": {"class_type": "FeatherMask", "inputs": {"mask": ["903", 0], "left": 4, "top": 4, "right": 4,
                                                                  "bottom": 4}},
                 "905": {"class_type": "GrowMask", "inputs": {"mask": ["904", 0], "expand": 2,
                                                               "tapered_corners": True}}}),
             stock_mask({"class_type": "InvertMask", "inputs": {"mask": ["905", 0]}})(prompt, server))),
    # ... where only the run tells the mask's size (a stock CropMask of a SolidMask here, which the
    # queue does not follow; SISO Subject Mask on a VAE Decode in the refine templates): refused
    # when the node starts, before any sampling
    Case("mask made in the run of another size", two_stage, "SISOOptimize",
         expect="the mask is 72x64 but the picture SISO Optimize makes (width x height) is 64x64", at="run",
         edit=lambda prompt, server: (
             prompt.__setitem__("903", {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 96, "height": 64}}),
             stock_mask({"class_type": "CropMask", "inputs": {"mask": ["903", 0], "x": 0, "y": 0, "width": 72,
                                                               "height": 64}})(prompt, server))),
    # ---- warm starts whose rank the prompt shows (issue 31): refused at queue time, before the
    # file's tensors are read or an earlier optimisation runs
    Case("warm start rank 4 file, lora_rank 8", warm_start, "SISOOptimize", {"lora_rank": 8}, about="initial_lora",
         expect="initial_lora: the LoRA from the file rank_4.safetensors (SISO Load LoRA) has rank 4 but lora_rank is 8: "
                "set lora_rank to 4",
         edit=lora_file("rank_4.safetensors", _nothing)),
    Case("warm start rank 4096 file", warm_start, "SISOOptimize", about="initial_lora",
         expect="has rank 4096, but SISO Optimize trains ranks 1 to 128 (lora_rank): it cannot go on from this LoRA. "
                "Leave initial_lora empty to start from zero, or load a LoRA of rank 128 or less",
         edit=lora_file("rank_4096.safetensors", _rank_4096)),
    Case("chained SISO Optimize, rank 4 into lora_rank 8", two_stage, "SISOOptimize", about="initial_lora",
         expect="initial_lora: the LoRA from the SISO Optimize before it (node 5, lora_rank 4) has rank 4 but lora_rank "
                "is 8: set lora_rank to 4", edit=chained(8), target="960"),
    # ... where this node's rank or target is computed in the run (stock StringLength here), the
    # first SISO Optimize refuses at its start, before its optimisation, not the second after it
    Case("chained SISO Optimize, rank computed in the run 4 into lora_rank 8", two_stage, "SISOOptimize", at="run",
         expect="lora_rank: SISO Optimize node 960 goes on from this node's LoRA (its initial_lora) at lora_rank 8, but "
                "this node's lora_rank is 4: it would refuse the LoRA after this optimisation. Set this node's "
                "lora_rank to 8, or node 960's to 4",
         edit=both(chained(8), computed_int("abcd", "lora_rank", "5")), target="5"),
    Case("chained SISO Optimize, all linear layers after attention", two_stage, "SISOOptimize", at="run",
         expect="lora_target: SISO Optimize node 960 goes on from this node's LoRA (its initial_lora) with lora_target "
                "'all linear layers', which trains other layers of this model than this node's 'attention",
         edit=both(chained(4), lambda prompt, server: prompt["960"]["inputs"].update(lora_target="all linear layers")),
         target="5"),
    # ---- the photo SISO ReNoise Invert inverts, through a stock scaling node, against the mask
    Case("editing photo from ImageScale of another size than the mask", swap_drawn, "SISOOptimize", about="mask",
         expect="mask: the mask is 64x64 but the photo SISO ReNoise Invert inverts is 96x96",
         edit=photo_through({"class_type": "ImageScale", "inputs": {"upscale_method": "nearest-exact", "width": 96,
                                                                    "height": 96, "crop": "disabled"}})),
    # ... scaled by a factor, so only the run tells its size: SISO ReNoise Invert refuses at its
    # start, before the inversion, instead of SISO Optimize after it
    Case("editing photo scaled in the run, mask of the photo before", swap_drawn, "ReNoiseInvert", at="run",
         expect="image: SISO Optimize node 7 edits with this inversion under a 64x64 mask, but the photo here is "
                "96x96: it would refuse the mask after the inversion. Make the mask from the same photo that goes "
                "into this node's image, or scale this photo to 64x64",
         edit=photo_through({"class_type": "ImageScaleBy", "inputs": {"upscale_method": "nearest-exact",
                                                                      "scale_by": 1.5}})),
    # ---- SISO Subject Score (issue 31): images below SISO Load Subject's 32 px, an empty batch
    Case("score image 1x1", scoring, "SISOSubjectScore", about="images",
         expect="images: the images are 1x1 pixels; SISO Subject Score needs at least 32 a side, as SISO Load Subject",
         edit=load_image("score_1x1.png", 1, 1, "3")),
    Case("score image ImageScale to 16x16", scoring, "SISOSubjectScore", about="images",
         expect="images: the images are 16x16 pixels; SISO Subject Score needs at least 32 a side",
         edit=lambda prompt, server: (
             prompt.__setitem__("907", {"class_type": "ImageScale", "inputs": {
                 "image": ["3", 0], "upscale_method": "nearest-exact", "width": 16, "height": 16, "crop": "disabled"}}),
             prompt["12"]["inputs"].__setitem__("images", ["907", 0]))),
    Case("score image made 16x16 in the run", scoring, "SISOSubjectScore", at="run",
         expect="the images are 16x16 pixels; SISO Subject Score needs at least 32 a side",
         edit=lambda prompt, server: (
             prompt.__setitem__("907", {"class_type": "ImageScaleBy", "inputs": {
                 "image": ["3", 0], "upscale_method": "nearest-exact", "scale_by": 0.25}}),
             prompt["12"]["inputs"].__setitem__("images", ["907", 0]))),
    Case("score empty batch from EmptyImage", scoring, "SISOSubjectScore", about="images",
         expect="images is an empty batch (0 images): the node that makes it gives none",
         edit=lambda prompt, server: prompt.update({
             "908": {"class_type": "PrimitiveInt", "inputs": {"value": 0}},
             "909": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": ["908", 0],
                                                            "color": 0}},
             "12": dict(prompt["12"], inputs=dict(prompt["12"]["inputs"], images=["909", 0]))})),
    Case("score empty batch from RepeatImageBatch 0", scoring, "SISOSubjectScore", about="images",
         expect="images is an empty batch (0 images)",
         edit=lambda prompt, server: prompt.update({
             "908": {"class_type": "PrimitiveInt", "inputs": {"value": 0}},
             "909": {"class_type": "RepeatImageBatch", "inputs": {"image": ["3", 0], "amount": ["908", 0]}},
             "12": dict(prompt["12"], inputs=dict(prompt["12"]["inputs"], images=["909", 0]))})),
]


def _queue(server, prompt):
    return server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_a_message_naming_it(case, server):
    prompt = case.base()
    prompt[node_of(prompt, case.node)]["inputs"].update(case.inputs)
    if case.edit is not None:
        case.edit(prompt, server)
    target = case.target or node_of(prompt, case.node)
    if case.at == "queue":
        code, body = _queue(server, outputs_through(prompt, target))
        assert code == 400, f"{case.id}: accepted at queue time (HTTP {code}): {body}"
        errors = body.get("node_errors", {}).get(target, {})
        assert errors.get("class_type") == case.node, body
        details = " | ".join(f"{e.get('message')}: {e.get('details')}" for e in errors["errors"])
        assert case.expect in details, f"{case.id}: {details}"
        # one refusal, once, under the input it is about (not repeated under every input)
        assert len(errors["errors"]) == 1, f"{case.id}: reported {len(errors['errors'])} times: {details}"
        about = errors["errors"][0].get("extra_info", {}).get("input_name")
        assert about == case.input_about(), f"{case.id}: reported under {about!r}: {details}"
    else:
        client_id = uuid.uuid4().hex
        listener = WebSocketListener(server.port, client_id)
        listener.start()
        try:
            code, body = server.post("/prompt", {"prompt": prompt, "client_id": client_id})
            assert code == 200, f"{case.id}: refused at queue time, expected at execution: {body}"
            entry = wait_for_history(server, body["prompt_id"], timeout=300)
        finally:
            listener.close()
        errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
        assert entry["status"]["status_str"] == "error" and errors, f"{case.id}: ran to {entry['status']}"
        assert errors[0]["node_type"] == case.node, _execution_errors(entry)
        assert case.expect in errors[0]["exception_message"], _execution_errors(entry)
        # before any work: the refusing node reported no progress and SISO's loop never started
        progressed = [m for m in listener.messages if m.get("type") in ("progress", "siso.progress")
                      and str(m["data"].get("node")) == target and m["data"].get("state", "running") == "running"]
        assert case.needs_work or not progressed, f"{case.id}: the node worked before refusing: {progressed[:3]}"
        if case.node not in ("ApplySISOLoRA", "SaveSISOLoRA"):   # these run after SISO Optimize
            started = [m for m in listener.messages if m.get("type") == "siso.progress" and m["data"]["state"] == "running"]
            assert not started, f"{case.id}: SISO's optimisation started: {started[:1]}"
    assert server.alive() and "SISOOptimize" in server.get("/object_info/SISOOptimize")


def test_a_lora_name_in_any_alphabet_is_saved_and_listed(server):
    """Letters of any alphabet are letters (the message says so): the file is written and
    the stock loaders list it."""
    prompt = two_stage()
    save = node_of(prompt, "SaveSISOLoRA")
    prompt[save]["inputs"]["name"] = "Мой пёс 小狗"
    code, body = _queue(server, prompt)
    assert code == 200, body
    entry = wait_for_history(server, body["prompt_id"])
    assert entry["status"]["status_str"] == "success", _execution_errors(entry)
    assert entry["outputs"][save]["text"] == ["Мой пёс 小狗.safetensors"]
    listed = server.get("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0]
    assert "Мой пёс 小狗.safetensors" in listed


def test_a_workflow_saved_with_low_memory_true_or_false_keeps_its_meaning(server):
    """low_memory became a dropdown (auto / on / off); prompts saved with the old switch's
    true / false still queue and run."""
    for legacy in (True, False):
        prompt = two_stage()
        prompt[node_of(prompt, "SISOOptimize")]["inputs"].update(low_memory=legacy, max_iterations=1)
        code, body = _queue(server, prompt)
        assert code == 200, body
        entry = wait_for_history(server, body["prompt_id"])
        assert entry["status"]["status_str"] == "success", _execution_errors(entry)


# The API twins of the templates as the 0.2.0 release (d7c740d, the version the Comfy registry
# published) wrote them, kept verbatim: the prompts users' scripts and API clients hold.
RELEASED = sorted((WORKFLOWS / "release-0.2.0").glob("*_api.json"))


def test_every_pack_input_added_since_the_0_2_0_release_is_optional(object_info):
    """ComfyUI refuses a prompt that lacks a required input ("Required input is missing") before the
    node runs, so an input added after a release must be optional with the old behaviour as its
    default: low_memory (added after 0.2.0, was required) refused every 0.2.0 API prompt of SISO
    Optimize. Every pack node of every released API twin has every input the server requires."""
    assert len(RELEASED) == 5
    checked = set()
    for path in RELEASED:
        for node_id, node in json.loads(path.read_text()).items():
            if node["class_type"] not in PACK_NODES:
                continue
            required = set(object_info[node["class_type"]]["input"]["required"])
            missing = required - set(node["inputs"])
            assert not missing, f"{path.name} node {node_id} {node['class_type']}: {sorted(missing)} now required"
            checked.add(node["class_type"])
    assert {"SISOOptimize", "LoadSubject", "ApplySISOLoRA", "ReNoiseInvert", "SubjectMask"} <= checked, checked


def test_the_0_2_0_two_stage_api_prompt_queues_and_runs_as_it_did(server):
    """The released two-stage API prompt, as saved, through the real server: accepted, run, and
    run as it ran then (float32: precision's default for a prompt without it)."""
    prompt = json.loads((WORKFLOWS / "release-0.2.0" / "siso_two_stage_api.json").read_text())
    optimize = node_of(prompt, "SISOOptimize")
    assert not {"low_memory", "precision", "compile"} & set(prompt[optimize]["inputs"])
    code, body = _queue(server, prompt)
    assert code == 200, body
    entry = wait_for_history(server, body["prompt_id"], timeout=600)
    assert entry["status"]["status_str"] == "success", _execution_errors(entry)
    report = entry["outputs"][optimize]["text"][0]
    assert "compute float32 (precision fp32)" in report, report


# ----------------------------------------------------------------------------- issue 31: saving, quiet accepts
def _lora_only(file_name: str, save_as: str) -> dict:
    """SISO Load LoRA of ``file_name`` saved again as ``save_as``: a save without an optimisation."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "siso_tiny_sd15.safetensors"}},
            "50": {"class_type": "LoadSISOLoRA", "inputs": {"model": ["1", 0], "lora_name": file_name}},
            "13": {"class_type": "SaveSISOLoRA", "inputs": {"subject_lora": ["50", 0], "name": save_as,
                                                            "overwrite": True, "format": "comfyui"}}}


def test_queueing_selected_outputs_leaves_the_values_of_nodes_outside_them_as_sent(server):
    """"Queue selected output nodes" (partial_execution_targets): ComfyUI validates and runs only
    what those outputs need. A pack node outside them with a value the pack would refuse is not
    marked: the queued prompt (history, an image's metadata) keeps the value as sent. The same
    node inside the targets is still refused."""
    prompt = two_stage()
    prompt["5"]["inputs"]["width"] = 16384                 # refused where SISO Optimize runs
    prompt["90"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    code, body = server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex,
                                         "partial_execution_targets": ["90"]})
    assert code == 200, body
    entry = wait_for_history(server, body["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", _execution_errors(entry)
    queued = entry["prompt"][2]
    assert queued["5"]["inputs"]["width"] == 16384, queued["5"]["inputs"]
    code, body = server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex,
                                         "partial_execution_targets": ["14"]})     # SISO Optimize's preview
    assert code == 400 and "width = 16384 is above its maximum 2048" in json.dumps(body), body


def _run(server, prompt) -> dict:
    code, body = _queue(server, prompt)
    assert code == 200, body
    entry = wait_for_history(server, body["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", _execution_errors(entry)
    return entry


# A process saving a large LoRA over an earlier file with the pack's writer, stopped just before the
# file is complete (its data written, not yet flushed and renamed): the test kills it there.
_KILLED_SAVE = """
import importlib.util, os, sys, time
package = os.path.join(sys.argv[1], "siso_ops")
spec = importlib.util.spec_from_file_location("siso_ops", os.path.join(package, "__init__.py"),
                                              submodule_search_locations=[package])
module = importlib.util.module_from_spec(spec); sys.modules["siso_ops"] = module; spec.loader.exec_module(module)
import torch
import siso_ops.lora as lora
def stop_here(fd):
    print("writing", flush=True)
    time.sleep(600)
os.fsync = stop_here
lora.write_lora_file({"diffusion_model.x.lora_up.weight": torch.full((2048, 128), 9.0),
                      "diffusion_model.x.lora_down.weight": torch.full((128, 2048), 9.0),
                      "diffusion_model.x.alpha": torch.tensor(128.0)}, sys.argv[2], {})
"""


def kill_mid_write(path) -> str:
    """Saves over ``path`` in a child process and kills it (SIGKILL) mid-write; the name it left."""
    import signal
    import subprocess
    import sys
    folder = os.path.dirname(path)
    before = set(os.listdir(folder))
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(REPO), str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    left = sorted(set(os.listdir(folder)) - before)
    assert len(left) == 1 and os.path.getsize(os.path.join(folder, left[0])) > 1_000_000, left
    then = time.time() - 3600      # killed an hour ago: past the wait for a save another container may be writing
    os.utime(os.path.join(folder, left[0]), (then, then))
    return left[0]


# not the pack's pattern, kept: safetensors' own, a user's, tempfile.mkstemp's for another tool
FOREIGN = (".tmpab12cd", "notes.tmp", ".other.safetensors.partial", ".other.safetensors.k3x_9abc.tmp")


def test_a_save_killed_mid_write_leaves_only_the_earlier_file_once_the_next_save_has_run(server):
    folder = server.base / "models" / "loras"
    prompt = _lora_only("killed_source.safetensors", "killed_save")
    lora_file("killed_source.safetensors", _nothing)(prompt, server)
    _run(server, prompt)
    earlier = (folder / "killed_save.safetensors").read_bytes()
    left = kill_mid_write(folder / "killed_save.safetensors")
    assert left.startswith(".killed_save.safetensors.") and left.endswith(".tmp")
    for name in FOREIGN:
        (folder / name).write_bytes(b"not the pack's")
    assert (folder / "killed_save.safetensors").read_bytes() == earlier
    _run(server, _lora_only("killed_source.safetensors", "next_save"))
    assert not (folder / left).exists(), sorted(os.listdir(folder))
    assert (folder / "killed_save.safetensors").read_bytes() == earlier
    assert all((folder / name).exists() for name in FOREIGN)
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp") and n not in FOREIGN]


def test_start_up_removes_what_a_save_killed_mid_write_left(tmp_path):
    """A real ComfyUI start (main.py --quick-test-for-ci: it loads the custom nodes, then exits)."""
    import subprocess
    import sys
    import safetensors.torch
    import torch
    from comfy_server import PACK_NAME
    from conftest import COMFYUI
    (tmp_path / "custom_nodes").mkdir()
    (tmp_path / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    folder = tmp_path / "models" / "loras"
    folder.mkdir(parents=True)
    path = folder / "earlier.safetensors"
    safetensors.torch.save_file({"diffusion_model.x.alpha": torch.tensor(4.0)}, str(path))
    earlier = path.read_bytes()
    left = kill_mid_write(path)
    for name in FOREIGN:
        (folder / name).write_bytes(b"not the pack's")
    (tmp_path / "user").mkdir()
    started = subprocess.run([sys.executable, str(COMFYUI / "main.py"), "--cpu", "--quick-test-for-ci",
                              "--disable-api-nodes", "--base-directory", str(tmp_path),
                              "--database-url", f"sqlite:///{tmp_path / 'user' / 'comfyui.db'}"],
                             cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    assert sorted(os.listdir(folder)) == sorted(("earlier.safetensors",) + FOREIGN), left
    assert path.read_bytes() == earlier


def test_a_full_disk_reads_in_the_packs_words(server):
    """The loras folder on a file system too small for the save (a tmpfs: needs the right to mount)."""
    import subprocess
    folder = server.base / "models" / "loras"
    source = "disk_full_source.safetensors"
    prompt = _lora_only(source, "does_not_fit")
    lora_file(source, _nothing)(prompt, server)
    data = (folder / source).read_bytes()
    assert len(data) > 2 * 4096
    pages = -(-len(data) // 4096)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={(pages + 1) * 4096}", "siso-full", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.strip()}")
    try:
        (folder / source).write_bytes(data)     # the source fits; a second file of its size does not
        code, body = _queue(server, prompt)
        assert code == 200, body
        entry = wait_for_history(server, body["prompt_id"], timeout=300)
        errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
        assert errors and errors[0]["node_type"] == "SaveSISOLoRA", _execution_errors(entry)
        message = errors[0]["exception_message"]
        assert message.startswith(f"could not write 'does_not_fit.safetensors' in {folder}: the disk is full"), message
        assert "The file needs " in message and "are free there: free at least" in message, message
        assert f"on the disk that holds {folder} (delete LoRAs or other files you no longer use there)" in message
        assert "os error" not in message and "SafetensorError" not in message, message
        assert sorted(os.listdir(folder)) == [source]   # nothing half written, no temporary file
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    assert server.alive()


def _zero_alphas(t, linear, conv):
    t[f"{linear[0]}.alpha"] = t[f"{linear[0]}.alpha"] * 0


def _zero_ups(t, linear, conv):
    t[f"{linear[0]}.lora_up.weight"] = t[f"{linear[0]}.lora_up.weight"] * 0


def _applied(prompt: dict) -> dict:
    """SISO Apply LoRA of the loaded LoRA (node 6), sampled and previewed."""
    prompt.update({
        "6": {"class_type": "ApplySISOLoRA", "inputs": {"model": ["1", 0], "subject_lora": ["50", 0], "strength": 1.0}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog", "clip": ["1", 1]}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {"seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                                                    "scheduler": "simple", "denoise": 1.0, "model": ["6", 0],
                                                    "positive": ["7", 0], "negative": ["7", 0], "latent_image": ["9", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}}})
    return prompt


@pytest.mark.parametrize("change, why", [(_zero_alphas, "the alpha of every one of its 1 layers is 0"),
                                         (_zero_ups, "the lora_up of every one of its 1 layers is all zeros"),
                                         (_nothing, None)], ids=["alphas 0", "ups 0", "a LoRA that changes"])
def test_a_lora_that_changes_nothing_is_warned_about_where_it_is_loaded_and_applied(server, change, why):
    name = f"changes_nothing_{change.__name__}.safetensors"
    prompt = _applied(_lora_only(name, f"copy_of_{change.__name__}"))
    lora_file(name, change)(prompt, server)
    outputs = _run(server, prompt)["outputs"]
    if why is None:
        assert "50" not in outputs and "6" not in outputs, outputs
        return
    loaded, applied = outputs["50"]["text"][0], outputs["6"]["text"][0]
    assert loaded.startswith(f"Warning: {name} changes nothing: {why}, so the model with it makes the same images "
                             "as without it"), loaded
    assert applied.startswith(f"Warning: the LoRA changes nothing: {why}"), applied


def test_subject_score_in_bf16_warns_where_bf16_is_emulated_as_siso_optimize_does(server):
    """The warning SISO Optimize gives for this machine's CPU (none where it has fast bf16)."""
    import torch
    from conftest import siso
    expected = siso("siso_ops.precision").precision_warnings(torch.device("cpu"), "bf16")
    prompt = scoring()
    prompt["12"]["inputs"]["precision"] = "bf16"
    shown = _run(server, prompt)["outputs"]["12"]["text"][0]
    assert shown.split("\n")[len(expected)] == "rank | image | DINO sim | IR sim | score | MSE to subject (diversity)", shown
    for warning in expected:
        assert f"Warning: {warning}." in shown, shown
    assert shown.count("Warning:") == len(expected), shown


# ----------------------------------------------------------------------------- every input of every node
def _widget_inputs(object_info: dict):
    """(class_type, input name, kind, options) of every numeric and dropdown input of the pack."""
    for class_type in PACK_NODES:
        info = object_info[class_type]
        for category in ("required", "optional"):
            for name, spec in info["input"].get(category, {}).items():
                kind = spec[0]
                options = spec[1] if len(spec) > 1 else {}
                if isinstance(kind, list):
                    kind, options = "COMBO", dict(options, options=kind)
                if kind in ("INT", "FLOAT", "COMBO"):
                    yield class_type, name, kind, options


def _bad_values(kind: str, options: dict) -> list:
    if kind == "COMBO":
        return ["no such choice"]
    values = [NAN, INF] if kind == "FLOAT" else []
    span = max(1.0, float(options["max"]) - float(options["min"]))
    low, high = options["min"] - span, options["max"] + span
    if kind == "INT":
        low, high = math.floor(low), math.ceil(high)
    return values + [low, high]


def several_photos() -> dict:
    return json.loads((WORKFLOWS / "siso_several_photos_best_of_four_api.json").read_text())


def siso_or_dreambooth() -> dict:
    import test_dreambooth
    return test_dreambooth.for_this_train_lora(json.loads((WORKFLOWS / "siso_or_dreambooth_api.json").read_text()))


def _prompt_with(class_type: str) -> dict:
    for make in (two_stage, swap, several_photos, warm_start, siso_or_dreambooth):
        prompt = make()
        if any(v["class_type"] == class_type for v in prompt.values()):
            return prompt
    raise AssertionError(f"no test workflow holds {class_type}")


def test_every_numeric_and_dropdown_input_of_every_node_refuses_what_its_schema_does_not_allow(server, object_info):
    checked, failures = 0, []
    for class_type, name, kind, options in _widget_inputs(object_info):
        for value in _bad_values(kind, options):
            prompt = _prompt_with(class_type)
            target = node_of(prompt, class_type)
            if name not in prompt[target]["inputs"] or isinstance(prompt[target]["inputs"][name], list):
                continue   # linked in the workflow: covered by the linked cases above
            prompt[target]["inputs"][name] = value
            code, body = _queue(server, outputs_through(prompt, target))
            errors = body.get("node_errors", {}).get(target, {}).get("errors", []) if code == 400 else []
            named = any(name in f"{e.get('message')} {e.get('details')}" for e in errors)
            if not named:
                failures.append(f"{class_type}.{name} = {value!r}: HTTP {code} {json.dumps(body)[:300]}")
            checked += 1
    assert server.alive()
    assert checked >= 60, f"only {checked} values were tried: the walk lost inputs"
    assert not failures, "\n".join(failures)
