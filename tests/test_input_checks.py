"""The pack's input checks in-process (issue 14), for what the server table cannot send: NaN
pixels (no stock loader makes them), the NaN-loss diagnosis, and the
schema check itself (every node's defaults pass it)."""
import math
import os
import types

import pytest
import torch

import comfy.model_management
import nodes as comfy_nodes
import tiny
from conftest import pack_node_ids, siso

checks = siso("nodes.checks")
optim = siso("siso_ops.optimize")
editing = siso("siso_ops.editing")
subject_mod = siso("siso_ops.subject")
host = siso("siso_ops.host")
NODE = comfy_nodes.NODE_CLASS_MAPPINGS
PACK = pack_node_ids()


def _defaults(name):
    return {spec.id: spec.default for spec in NODE[name].define_schema().inputs
            if getattr(spec, "default", None) is not None}


WITH_DEFAULTS = [name for name in PACK if _defaults(name)]


def test_the_nodes_with_widget_defaults_are_most_of_the_pack():
    # only SISO Load LoRA (a model and a file) has none: the test below is not vacuous
    assert set(PACK) - set(WITH_DEFAULTS) == {"LoadSISOLoRA"}


@pytest.mark.parametrize("name", WITH_DEFAULTS)
def test_every_default_of_every_node_passes_its_own_schema(name):
    """The widgets' defaults are what a new node queues: the check must accept them all."""
    assert checks.schema_problem(NODE[name], _defaults(name)) is None


def test_a_nan_subject_pixel_is_refused_naming_the_input():
    image = torch.rand(1, 64, 64, 3)
    image[0, 5, 5, 1] = float("nan")
    with pytest.raises(checks.InputError, match=r"SISO Load Subject: image holds 1 NaN or infinite value \(of 12288\)"):
        NODE["LoadSubject"].execute(image, "subject", "white")


def test_an_infinite_mask_value_is_refused_naming_the_input():
    mask = torch.zeros(1, 64, 64)
    mask[0, 0, :3] = float("inf")
    with pytest.raises(checks.InputError, match="mask holds 3 NaN or infinite values"):
        NODE["LoadSubject"].execute(torch.rand(1, 64, 64, 3), "subject", "white", mask=mask)


def test_a_linked_nan_strength_is_refused_before_patching():
    model = tiny.build_model("sd15")
    with pytest.raises(checks.InputError, match="SISO Apply LoRA: strength is nan, not a number: use a value between -4 and 4"):
        NODE["ApplySISOLoRA"].execute(model, None, float("nan"))


def _nan_run(nan_at: int, nan_image: bool, lr=2e-4):
    """optimize() on a toy problem whose score goes NaN at iteration ``nan_at``."""
    weight = torch.zeros(3, requires_grad=True)
    calls = {"n": 0}

    def generate():
        image = torch.ones(1, 3, 4, 4) * weight.view(1, 3, 1, 1) + 0.5
        if nan_image and calls["n"] == nan_at:
            image = image * float("nan")
        return image

    def score(image):
        i = calls["n"]
        calls["n"] += 1
        dino = ((image - 0.2) ** 2).mean()
        if i == nan_at and not nan_image:
            dino = dino * float("nan")
        return {"loss": dino, "dino": dino}

    settings = optim.OptimizationSettings(max_iterations=5, learning_rate=lr, early_stop_patience=100)
    with pytest.raises(FloatingPointError) as error:
        optim.optimize({"w": weight}, generate, score, settings)
    return str(error.value)


def test_nan_at_the_first_iteration_does_not_blame_the_learning_rate():
    message = _nan_run(0, nan_image=True)
    assert "iteration 1: the DINOv2 distance became NaN or infinite" in message
    assert "before any LoRA step" in message and "not the learning rate" in message and "precision fp32" in message
    message = _nan_run(0, nan_image=False)
    assert "on a normal image before any LoRA step" in message and "re-download the weight file" in message
    assert "Lower learning_rate" not in message


def test_nan_after_lora_steps_says_the_lora_diverged_and_names_the_learning_rate():
    message = _nan_run(2, nan_image=True, lr=0.05)
    assert "iteration 3: the DINOv2 distance became NaN or infinite after 2 LoRA steps: the LoRA diverged" in message
    assert "Lower learning_rate (now 0.05" in message


def test_an_empty_editing_mask_is_refused_naming_where_masks_come_from():
    with pytest.raises(ValueError, match="the mask is empty: it marks no subject to replace") as error:
        editing.background_weights(torch.zeros(1, 64, 64), (64, 64))
    assert "negative grow_pixels" in str(error.value) and "mask editor" in str(error.value)
    with pytest.raises(ValueError, match="covers the whole photo"):
        editing.background_weights(torch.ones(1, 64, 64), (64, 64))
    kept = editing.background_weights(torch.zeros(1, 64, 64).index_fill_(1, torch.tensor([3]), 1.0), (64, 64))
    assert math.isclose(float(kept.sum()), 64 * 63)


@pytest.mark.parametrize("side", [1, 31])
def test_a_subject_photo_too_small_to_see_is_refused(side):
    with pytest.raises(ValueError, match=rf"the subject photo is {side}x{side} pixels; SISO needs at least 32"):
        subject_mod.prepare_subject(torch.rand(1, side, side, 3))
    subject_mod.prepare_subject(torch.rand(1, 32, 40, 3))


def test_interrupt_flag_is_left_clear():
    # guard for the tests after this file: none of the checks above may leave Cancel set
    assert not comfy.model_management.processing_interrupted()


# ----------------------------------------------------------------------------- issue 23: saving, empty batches
lora_mod = siso("siso_ops.lora")


def _small_lora(value=0.5):
    tensors = {"diffusion_model.x.lora_up.weight": torch.full((4, 2), value),
               "diffusion_model.x.lora_down.weight": torch.full((2, 3), value),
               "diffusion_model.x.alpha": torch.tensor(2.0)}
    return lora_mod.SubjectLoRA(tensors=tensors, rank=2, alpha=2.0, model="tiny", best_iteration=0, iterations=1,
                                best_loss=-1.0, stop_reason="test")


def _leftovers(folder, name):
    return sorted(p for p in os.listdir(folder) if p.startswith(f".{name}.") or p.endswith(".tmp"))


def test_an_interrupted_save_leaves_the_earlier_file_intact_and_no_temporary_file(monkeypatch):
    weights = siso("siso_ops.weights")
    folder = host.lora_folder()
    with torch.inference_mode():
        NODE["SaveSISOLoRA"].execute(_small_lora(0.5), "atomic save", True)
    path = os.path.join(folder, "atomic save.safetensors")
    before = open(path, "rb").read()

    def cut_short(temporary, target):
        with open(temporary, "r+b") as f:     # half written, then the writer dies
            f.truncate(os.path.getsize(temporary) // 2)
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(weights.os, "replace", cut_short)
    with torch.inference_mode(), pytest.raises(KeyboardInterrupt):
        NODE["SaveSISOLoRA"].execute(_small_lora(9.0), "atomic save", True)
    assert open(path, "rb").read() == before
    assert _leftovers(folder, "atomic save.safetensors") == []


def test_a_full_disk_names_the_folder_and_keeps_the_earlier_file(monkeypatch):
    """safetensors reports a full disk as its own SafetensorError, not an OSError (issue 31)."""
    import safetensors.torch
    weights = siso("siso_ops.weights")
    folder = host.lora_folder()
    with torch.inference_mode():
        NODE["SaveSISOLoRA"].execute(_small_lora(0.5), "full disk", True)
    path = os.path.join(folder, "full disk.safetensors")
    before = open(path, "rb").read()

    def no_space(tensors, metadata=None):
        raise weights.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save", no_space)
    with torch.inference_mode(), pytest.raises(OSError) as refused:
        NODE["SaveSISOLoRA"].execute(_small_lora(9.0), "full disk", True)
    assert str(refused.value).startswith(f"could not write 'full disk.safetensors' in {os.path.abspath(folder)}: "
                                         "the disk is full (no space left on the device). The file needs ")
    assert f"on the disk that holds {os.path.abspath(folder)}" in str(refused.value)
    assert open(path, "rb").read() == before and _leftovers(folder, "full disk.safetensors") == []


def test_subject_score_with_no_images_is_refused_before_the_networks_load(monkeypatch):
    opened = []
    monkeypatch.setattr(siso("siso_ops.loaded_networks").networks, "get", lambda *a, **k: opened.append(a))
    with pytest.raises(checks.InputError, match=r"SISO Subject Score: images is an empty batch \(0 images or masks\)"):
        NODE["SISOSubjectScore"].execute(torch.zeros(0, 64, 64, 3), None, "dino.safetensors", "ir.pth", 1.0, 1.0)
    assert opened == []


def test_subject_score_warns_on_emulated_bf16_as_siso_optimize_does(monkeypatch, feature_files, subject, caplog):
    """A CPU without AVX-512 BF16 or AMX (this one may have them: its answer is replaced)."""
    precision = siso("siso_ops.precision")
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    warning = precision.precision_warnings(torch.device("cpu"), "bf16")
    assert warning and "emulated" in warning[0]
    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), caplog.at_level("WARNING"):
        out = NODE["SISOSubjectScore"].execute(images, subject, *feature_files, 1.0, 1.0, "bf16")
    assert out.ui["text"][0] == f"Warning: {warning[0]}.\n" + out.args[2]
    assert f"SISO Subject Score: {warning[0]}" in caplog.text
    with torch.inference_mode():
        plain = NODE["SISOSubjectScore"].execute(images, subject, *feature_files, 1.0, 1.0, "fp32")
    assert plain.ui["text"][0] == plain.args[2]


def test_subject_score_refuses_images_smaller_than_load_subject_accepts_before_the_networks_load(monkeypatch,
                                                                                                feature_files):
    opened = []
    monkeypatch.setattr(siso("siso_ops.loaded_networks").networks, "get", lambda *a, **k: opened.append(a))
    with pytest.raises(ValueError, match=r"SISO Subject Score: the images are 31x40 pixels; SISO Subject Score needs "
                                         r"at least 32 a side, as SISO Load Subject does"):
        NODE["SISOSubjectScore"].execute(torch.rand(2, 40, 31, 3), None, *feature_files, 1.0, 1.0)
    assert opened == []


def test_an_all_black_subject_is_warned_about_and_the_warning_reaches_the_report(caplog):
    """What LoadImage makes of a fully transparent PNG: a black RGB image (its alpha becomes the MASK)."""
    with caplog.at_level("WARNING"):
        subject = NODE["LoadSubject"].execute(torch.zeros(1, 64, 64, 3), "subject", "white").args[0]
    assert any("the subject photo is all black" in w for w in subject.warnings), subject.warnings
    assert "LoadImage drops the alpha" in caplog.text
    transparent = torch.rand(1, 64, 64, 4)
    transparent[..., 3] = 0
    kept = NODE["LoadSubject"].execute(transparent, "subject", "keep").args[0]
    assert any("fully transparent (alpha 0 everywhere)" in w for w in kept.warnings), kept.warnings
    assert NODE["LoadSubject"].execute(torch.rand(1, 64, 64, 3), "subject", "white").args[0].warnings == []


def test_bf16_on_a_cpu_without_fast_bfloat16_is_warned_about(monkeypatch):
    precision = siso("siso_ops.precision")
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    cpu = torch.device("cpu")
    assert "runs many times (about 20x) slower than fp32: choose auto or fp32" in precision.precision_warnings(cpu, "bf16")[0]
    assert precision.precision_warnings(cpu, "auto") == precision.precision_warnings(cpu, "fp32") == []


def test_cancel_before_the_loop_stops_before_the_networks_are_read(monkeypatch):
    """Cancel is checked between the phases before the first iteration (memory probe, network
    reads, clone, decoder copy), not only by the loop."""
    gen = siso("siso_ops.generation")
    opened = []
    monkeypatch.setattr(gen.networks, "get", lambda *a, **k: opened.append(a))
    model, clip, vae = tiny.build_model("sd15"), None, None
    settings = gen.GenerationSettings(width=64, height=64, optimization=optim.OptimizationSettings(max_iterations=1))
    monkeypatch.setattr(gen.memory, "plan", lambda *a, **k: types.SimpleNamespace(checkpointing=False))
    comfy.model_management.interrupt_current_processing(True)
    try:
        with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
            gen.optimize_subject(model, vae, None, subject_mod.SubjectPhoto([torch.rand(1, 3, 64, 64)]), "d", "i",
                                 settings)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert opened == []


def test_a_later_warm_start_is_compared_only_where_it_would_refuse():
    """At SISO Optimize's start (queue_checks.later_warm_start_problem): the later node's rank is
    compared where the prompt fixes it; its lora_target only on the same model link, and only where
    the two choices pick other layers of the loaded model (two may pick the same ones)."""
    queue = siso("nodes.queue_checks")
    attention, all_linear = "attention (DiT: + context and MLP)", "all linear layers"
    prompt = {"5": {"class_type": "SISOOptimize", "inputs": {"model": ["1", 0], "lora_rank": ["910", 0]}},
              "910": {"class_type": "StringLength", "inputs": {"string": "abcd"}},
              "960": {"class_type": "SISOOptimize", "inputs": {"model": ["1", 0], "initial_lora": ["5", 0],
                                                              "lora_rank": 4, "lora_target": all_linear}}}
    layers = {attention: {"a"}, all_linear: {"a", "b"}}
    problem = queue.later_warm_start_problem(prompt, "5", 4, attention, ["1", 0], layers.get)
    assert problem.startswith("lora_target: SISO Optimize node 960 ") and "Set both lora_target" in problem
    assert queue.later_warm_start_problem(prompt, "5", 4, attention, ["1", 0], lambda target: {"a"}) is None
    assert queue.later_warm_start_problem(prompt, "5", 4, attention, ["2", 0], layers.get) is None   # another model
    assert queue.later_warm_start_problem(prompt, "5", 4, all_linear, ["1", 0], layers.get) is None
    problem = queue.later_warm_start_problem(prompt, "5", 8, all_linear, ["1", 0], layers.get)
    assert problem.startswith("lora_rank: SISO Optimize node 960 ") and "Set this node's lora_rank to 4" in problem
    prompt["960"]["inputs"]["lora_rank"] = ["910", 0]   # computed there too: only that node can tell
    assert queue.later_warm_start_problem(prompt, "5", 8, all_linear, ["1", 0], layers.get) is None
    assert queue.later_warm_start_problem(None, "5", 8, all_linear, ["1", 0], layers.get) is None   # in-process


# The stock mask nodes queue_checks.SAME_SIZE_AS follows, with inputs that could change a size if
# any would (a border, a grown edge, a smaller source pasted at an offset).
STOCK_SAME_SIZE = {
    "ImageToMask": {"channel": "red"},
    "InvertMask": {},
    "ThresholdMask": {"value": 0.5},
    "GrowMask": {"expand": 3, "tapered_corners": True},
    "FeatherMask": {"left": 4, "top": 4, "right": 4, "bottom": 4},
    "MaskComposite": {"source": torch.ones(1, 24, 16), "x": 5, "y": 5, "operation": "add"},
}


@pytest.fixture(scope="module")
def stock_mask_nodes():
    """ComfyUI's own mask nodes (comfy_extras/nodes_mask.py, which a started server loads and this
    in-process ComfyUI does not), in its node registry for the test."""
    import asyncio
    extra = comfy_nodes.__file__.rsplit("/", 1)[0] + "/comfy_extras/nodes_mask.py"
    before = set(NODE)
    assert asyncio.run(comfy_nodes.load_custom_node(extra, module_parent="comfy_extras"))
    yield NODE
    for name in set(NODE) - before:
        del NODE[name]
        comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS.pop(name, None)


@pytest.mark.parametrize("name", sorted(STOCK_SAME_SIZE))
def test_the_queue_follows_a_stock_mask_node_only_where_it_keeps_its_inputs_size(stock_mask_nodes, name):
    """queue_checks.linked_image_size says the size this ComfyUI's own node gives: the node runs on a
    72x40 input (a SolidMask's, or a LoadImage's file for ImageToMask) and its mask has that size."""
    queue = siso("nodes.queue_checks")
    cls = stock_mask_nodes[name]
    follows = queue.SAME_SIZE_AS[name]
    source = torch.rand(1, 40, 72, 3) if follows == "image" else torch.rand(1, 40, 72)
    inputs = {follows: source, **STOCK_SAME_SIZE[name]}
    if hasattr(cls, "define_schema"):   # a V3 node (ComfyUI 0.33)
        out = cls.execute(**inputs).result[0]
    else:
        out = getattr(cls(), cls.FUNCTION)(**inputs)[0]
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
              "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 72, "height": 40}},
              "3": {"class_type": name, "inputs": {follows: ["1" if follows == "image" else "2", 0],
                                                   **{k: v for k, v in STOCK_SAME_SIZE[name].items()
                                                      if not isinstance(v, torch.Tensor)}}}}
    if name == "MaskComposite":
        prompt["3"]["inputs"]["source"] = ["1", 1]
    predicted = queue.linked_image_size(prompt, ["3", 0], lambda file: (72, 40))
    assert predicted == (72, 40) == (out.shape[-1], out.shape[-2])
    # a mask of a size the queue cannot tell (CropMask is not followed) stays unknown through it
    prompt["2"] = {"class_type": "CropMask", "inputs": {"mask": ["9", 0], "x": 0, "y": 0, "width": 8, "height": 8}}
    prompt["1"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["9", 0], "scale_by": 2.0}}
    assert queue.linked_image_size(prompt, ["3", 0], lambda file: (72, 40)) is None
