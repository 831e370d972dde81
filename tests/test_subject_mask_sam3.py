"""SubjectMask with ComfyUI's own SAM3 (optional sam3_model + sam3_clip from the stock Load
Checkpoint; the stock SAM3_Detect node runs it). Random weights say nothing about mask quality:
these tests check the wiring, the rules SubjectMask keeps on every route and the refusals.

- On every ComfyUI: the prompt SAM3 gets from the text, the keep rule / grow / refusals on found
  and segmented detections, and the refusals of the inputs (at queue time, in ComfyUI's
  validation and when the node runs); where ComfyUI has no SAM3 (0.3.75) connecting it is refused
  with the version that has it.
- Where ComfyUI has SAM3 (0.33): a tiny SAM3 built by ComfyUI's own classes (comfy.supported_models
  .SAM3's config, comfy.model_base.SAM3, SAM3's CLIP wrapper) runs through SubjectMask and through
  the stock SAM3_Detect, and SubjectMask's 'union' mask is the stock node's mask.

Why the tiny SAM3 is built in-process and not read by the stock loader: ComfyUI reads no size from
a SAM3 file. comfy/model_detection.py (detect_unet_config, the 'SAM3 / SAM3.1' branch) returns only
{"image_model": "SAM3"} (or "SAM31"), so comfy/ldm/sam3/detector.py builds the published sizes
(SAM3Detector: d_model=256, embed_dim=1024, num_queries=200; ViTDet in sam.py: depth 32), and
comfy/text_encoders/sam3_clip.py fixes the text encoder (SAM3_CLIP_CONFIG: 24 layers of 1024). A
file at tiny shapes fails load_state_dict's size check; the full size is about 850 M parameters.
The classes themselves take the sizes as arguments (the model_config's unet_config is passed on to
SAM3Model), which is what this test uses; the text encoder's config is a module constant, set
tiny for the test. SAM3 sees every image at 1008 x 1008 (SAM3_Detect resizes to it), so attention
runs over 72 x 72 tokens: the test uses ComfyUI's own PyTorch attention (attention_pytorch)
in SAM3's modules, as ComfyUI does on a GPU, instead of the CPU's sub-quadratic one (3x slower)."""
from __future__ import annotations

import pytest
import torch

from conftest import COMFYUI, siso

seg = siso("siso_ops.segmentation")
M = siso("siso_ops.masks")
host = siso("siso_ops.host")
checks = siso("nodes.checks")
queue_checks = siso("nodes.queue_checks")
mask_node = siso("nodes.mask")
SubjectMask = mask_node.SubjectMask
# The stock SAM3 nodes are one of ComfyUI's built-in extras, which a started server loads and the
# in-process ComfyUI of these tests does not: the module fixture below loads them where they exist.
SAM3_EXTRA = COMFYUI / "comfy_extras" / "nodes_sam3.py"
HAS_SAM3 = SAM3_EXTRA.exists()
NEEDS_SAM3 = pytest.mark.skipif(
    not HAS_SAM3, reason=f"SAM3 needs ComfyUI >= {host.SAM3_SINCE} (its stock SAM3_Detect node); this ComfyUI is "
                         f"{siso('siso_ops.host.sam3').comfyui_version()}")
UNUSED = mask_node.UNUSED_WITH_SAM3
WIDGETS = dict(text="dog", sam_model=UNUSED, grounding_dino_model=UNUSED, box_threshold=0.0, text_threshold=0.0,
               keep="union", grow_pixels=0, when_nothing_found="error")


@pytest.fixture(scope="module", autouse=True)
def stock_sam3_nodes():
    """ComfyUI's SAM3 nodes in its node registry for this module (where this ComfyUI has them)."""
    import asyncio

    import nodes
    before = set(nodes.NODE_CLASS_MAPPINGS)
    if HAS_SAM3:
        assert asyncio.run(nodes.load_custom_node(str(SAM3_EXTRA), module_parent="comfy_extras"))
    assert host.sam3_available() == HAS_SAM3
    yield
    for name in set(nodes.NODE_CLASS_MAPPINGS) - before:
        del nodes.NODE_CLASS_MAPPINGS[name]
        nodes.NODE_DISPLAY_NAME_MAPPINGS.pop(name, None)


def photos(batch=1, height=40, width=56, seed=0):
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- on every ComfyUI
def test_the_text_becomes_one_sam3_prompt_per_phrase_asking_for_several_detections():
    n = M.MAX_CANDIDATES
    assert seg.sam3_prompt("Dog") == f"dog:{n}"
    assert seg.sam3_prompt("  red   Mug. ") == f"red mug:{n}"
    # Grounding DINO's phrases (split at '.') are SAM3's prompts (split at ','); commas and colons
    # inside a phrase would split it or read as a count, so they become spaces
    assert seg.sam3_prompt("dog. cat") == f"dog:{n}, cat:{n}"
    assert seg.sam3_prompt("red, fluffy dog: 3") == f"red fluffy dog 3:{n}"
    with pytest.raises(ValueError, match="empty"):
        seg.sam3_prompt(" . ")


def _scripted(per_image):
    """find(rgb) answering from a list: (scores, K x H x W masks) per image, in call order."""
    calls = iter(per_image)

    def find(rgb):
        scores, masks = next(calls)
        boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * len(scores)).reshape(-1, 4)
        return M.Detections(boxes, torch.as_tensor(scores, dtype=torch.float32).reshape(-1)), masks
    return find


def _blocks(height=12, width=12):
    small = torch.zeros(height, width, dtype=torch.bool)
    small[1:3, 1:3] = True      # 4 pixels, the most confident
    large = torch.zeros(height, width, dtype=torch.bool)
    large[5:11, 5:11] = True    # 36 pixels
    return torch.stack([small, large])


@pytest.mark.parametrize("keep,expected", [("most confident", 4), ("largest", 36), ("union", 40)])
def test_found_and_segmented_detections_keep_the_same_rule_and_grow(keep, expected):
    settings = seg.MaskSettings(text="dog", keep=keep)
    result = seg.subject_masks_found_and_segmented(photos(1, 12, 12), settings, _scripted([([0.9, 0.6], _blocks())]))
    assert result.masks.shape == (1, 12, 12) and int(result.masks.sum()) == expected
    grown = seg.subject_masks_found_and_segmented(photos(1, 12, 12), seg.MaskSettings(text="dog", keep=keep, grow_pixels=1),
                                                  _scripted([([0.9, 0.6], _blocks())]))
    assert torch.equal(grown.masks[0], M.grow_mask(result.masks[0], 1))
    # the preview tints the mask: pixels inside differ from the photo, outside they do not
    inside = result.masks[0] > 0
    assert not torch.allclose(result.previews[0][inside], photos(1, 12, 12)[0][inside])


def test_nothing_found_by_sam3_is_refused_naming_the_image_and_the_threshold_or_warned():
    nothing = (torch.zeros(0), torch.zeros(0, 12, 12, dtype=torch.bool))
    settings = seg.MaskSettings(text="dog", box_threshold=0.5)
    with pytest.raises(M.NothingFound, match=r"no 'dog' \(SAM3 prompt 'dog:8'\) in image 2 of 2 .*box_threshold 0.5 "
                                             r"\(SAM3's score threshold\). Lower box_threshold"):
        seg.subject_masks_found_and_segmented(photos(2, 12, 12), settings, _scripted([([0.9], _blocks()[:1]), nothing]))
    warned = seg.subject_masks_found_and_segmented(
        photos(2, 12, 12), seg.MaskSettings(text="dog", when_nothing_found="empty mask (warn)"),
        _scripted([([0.9], _blocks()[:1]), nothing]))
    assert int(warned.masks[0].sum()) == 4 and int(warned.masks[1].sum()) == 0
    assert len(warned.warnings) == 1 and "image 2 of 2" in warned.warnings[0]
    with pytest.raises(M.NothingFound, match="grow_pixels -3 shrank its mask to nothing: use a grow_pixels closer to 0"):
        seg.subject_masks_found_and_segmented(photos(1, 12, 12), seg.MaskSettings(text="dog", grow_pixels=-3),
                                              _scripted([([0.9], _blocks()[:1])]))


def test_the_node_offers_sam3_as_two_optional_inputs_after_every_widget():
    schema = SubjectMask.define_schema()
    ids = [i.id for i in schema.inputs]
    assert ids[-2:] == ["sam3_model", "sam3_clip"]
    model, clip = schema.inputs[-2:]
    assert model.optional and clip.optional and model.get_io_type() == "MODEL" and clip.get_io_type() == "CLIP"
    assert host.SAM3_FILE in model.tooltip and "Load Checkpoint" in model.tooltip
    assert "sam3_model" in schema.description and host.SAM3_FILE in schema.description


def test_with_sam3_connected_the_sam_and_grounding_dino_files_are_not_asked_for():
    """ComfyUI's validation hands a connected input on as None (an unconnected optional one is
    absent): with sam3_model and sam3_clip connected, missing SAM / Grounding DINO files are not
    refused; without them they are, naming the folder."""
    values = dict(WIDGETS, sam_model="missing.pth", grounding_dino_model="missing.pth")
    assert "models/sams" in str(SubjectMask.validate_inputs(**values)) or "sams" in str(SubjectMask.validate_inputs(**values))
    connected = SubjectMask.validate_inputs(**values, sam3_model=None, sam3_clip=None)
    if HAS_SAM3:
        assert connected is True
    else:
        assert f"SAM3 needs ComfyUI >= {host.SAM3_SINCE}" in connected and "sam_model" not in connected.split(":")[0]
    half = SubjectMask.validate_inputs(**values, sam3_model=None)
    assert "sam3_clip: SAM3 needs both sam3_model and sam3_clip" in half and host.SAM3_FILE in half


def test_queue_time_sees_the_connected_sam3_inputs():
    """The on-prompt check (before ComfyUI validates): links to sam3_model / sam3_clip count as
    connected, so the unused file dropdowns are not refused there either."""
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": host.SAM3_FILE}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
              "3": {"class_type": "SubjectMask", "inputs": dict(WIDGETS, image=["2", 0], sam3_model=["1", 0],
                                                                  sam3_clip=["1", 1])}}
    refusals = queue_checks.node_refusals(SubjectMask, prompt, prompt["3"]["inputs"])
    if HAS_SAM3:
        assert refusals == {}
    else:
        assert len(refusals) == 1 and f"SAM3 needs ComfyUI >= {host.SAM3_SINCE}" in next(iter(refusals.values()))[0]
    del prompt["3"]["inputs"]["sam3_model"], prompt["3"]["inputs"]["sam3_clip"]
    refusals = queue_checks.node_refusals(SubjectMask, prompt, prompt["3"]["inputs"])
    assert set(refusals) == {"sam_model", "grounding_dino_model"}, refusals


def test_a_model_that_is_not_sam3_is_refused_before_any_work():
    import tiny
    sd15 = tiny.build_model("sd15")
    with pytest.raises(checks.InputError) as refused:
        SubjectMask.execute(photos(), **WIDGETS, sam3_model=sd15, sam3_clip=object())
    if HAS_SAM3:
        assert "sam3_model: the connected MODEL is BaseModel, not SAM3" in str(refused.value)
    else:
        assert f"SAM3 needs ComfyUI >= {host.SAM3_SINCE}" in str(refused.value)
    with pytest.raises(checks.InputError, match="sam3_clip: SAM3 needs both"):
        SubjectMask.execute(photos(), **WIDGETS, sam3_model=sd15)


# ----------------------------------------------------------------------------- a tiny SAM3, where ComfyUI has it
TINY_SAM3 = dict(image_model="SAM3", embed_dim=64, depth=1, num_heads=2, d_model=32, num_queries=2)
TINY_SAM3_CLIP = {"num_hidden_layers": 1, "hidden_size": TINY_SAM3["embed_dim"], "intermediate_size": 64,
                  "num_attention_heads": 2}


@pytest.fixture(scope="module")
def tiny_sam3():
    """(MODEL, CLIP) as the stock Load Checkpoint gives them for a SAM3 file, built by ComfyUI's own
    classes at tiny sizes with random weights."""
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.sam3.detector
    import comfy.ldm.sam3.sam
    import comfy.ldm.sam3.tracker
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.text_encoders.sam3_clip as sam3_clip

    import tiny
    patch = pytest.MonkeyPatch()
    for module in (comfy.ldm.sam3.detector, comfy.ldm.sam3.sam, comfy.ldm.sam3.tracker):
        patch.setattr(module, "optimized_attention", attention.attention_pytorch)
    patch.setattr(sam3_clip, "SAM3_CLIP_CONFIG", dict(sam3_clip.SAM3_CLIP_CONFIG, **TINY_SAM3_CLIP))
    config = comfy.supported_models.SAM3(dict(TINY_SAM3))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    tiny.init_random(base.diffusion_model, seed=3, std=0.05)
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(target=config.clip_target())
    tiny.init_random(clip.cond_stage_model, seed=4, std=0.05)
    yield model, clip
    patch.undo()


@NEEDS_SAM3
def test_a_tiny_sam3_from_comfyuis_classes_is_the_sam3_subjectmask_accepts(tiny_sam3):
    model, clip = tiny_sam3
    assert host.sam3_problem(model, clip) is None
    assert "not SAM3's text encoder" in host.sam3_problem(model, object.__new__(type("FakeClip", (), {
        "cond_stage_model": torch.nn.Linear(1, 1)})))


@NEEDS_SAM3
def test_sam3_masks_equal_the_stock_sam3_detect_node_and_keep_the_rules(tiny_sam3):
    """SubjectMask's 'union' is the stock SAM3_Detect's union mask for the same prompt and threshold
    (threshold 0: random weights score low, every query counts); 'most confident' grown by 2 pixels
    lies inside the union grown by 2. (One image per run: a run takes 15 to 40 s on a 2-core CPU.)"""
    import nodes
    model, clip = tiny_sam3
    image = photos(1, 40, 56)
    union, preview = SubjectMask.execute(image, **WIDGETS, sam3_model=model, sam3_clip=clip).result
    assert union.shape == (1, 40, 56) and preview.shape == (1, 40, 56, 3)
    assert bool(((union == 0) | (union == 1)).all())
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(seg.sam3_prompt("dog")))
    stock = nodes.NODE_CLASS_MAPPINGS["SAM3_Detect"].execute(
        model=model, image=image, conditioning=conditioning, threshold=0.0, refine_iterations=2,
        individual_masks=False).result[0]
    assert stock.shape == (1, 40, 56) and torch.equal(union, stock.float().cpu())
    # the queue's rule for SAM3_Detect (its masks have its image's size) is the stock node's
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
              "2": {"class_type": "SAM3_Detect", "inputs": {"model": ["0", 0], "image": ["1", 0]}}}
    assert queue_checks.linked_image_size(prompt, ["2", 0], lambda file: (56, 40)) == (stock.shape[-1], stock.shape[-2])
    assert bool(union.any()), "threshold 0 must find something"
    # without refinement passes (faster): a detection's mask is its coarse mask, which the refined
    # one contains (SAM3_Detect's _refine_mask keeps refined | coarse)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(siso("siso_ops.host.sam3"), "REFINE_ITERATIONS", 0)
        grown = SubjectMask.execute(image, **dict(WIDGETS, keep="most confident", grow_pixels=2),
                                    sam3_model=model, sam3_clip=clip).result[0]
    assert bool(grown.any()) and bool((grown <= M.grow_mask(union, 2)).all())


@NEEDS_SAM3
def test_sam3_finding_nothing_is_refused_naming_the_image(tiny_sam3):
    """SAM3's scores are sigmoids: above threshold 1.0 nothing is ever found."""
    model, clip = tiny_sam3
    with pytest.raises(M.NothingFound, match=r"found no 'dog' \(SAM3 prompt"):
        SubjectMask.execute(photos(), **dict(WIDGETS, box_threshold=1.0), sam3_model=model, sam3_clip=clip)
