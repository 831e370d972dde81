"""SubjectMask: Grounding DINO finds the text, SAM segments it. Tiny random-weight models in the
community file layouts (tests/tiny_segmentation.py), the packages' own builders and predictors,
a real ComfyUI 0.3.75 in-process. Random weights say nothing about mask quality; these tests
check the plumbing, the rules, the safety of file loading and the memory life cycle.

The detector's test-time resize is shrunk (short side 128 instead of 800) where a test does not
depend on it: Swin-T at 800 px takes about 8 s per image on a 2-core CPU."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import uuid
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import comfy.model_management
import folder_paths
import nodes as comfy_nodes
import tiny_segmentation
from conftest import COMFYUI, REPO, siso

seg = siso("siso_ops.segmentation")
M = siso("siso_ops.masks")
host = siso("siso_ops.host")
WeightFileError = siso("siso_ops.feature_networks").WeightFileError
SubjectMask = siso("nodes.mask").SubjectMask
FAST_DETECTOR = (128, 256)
# The oldest transformers the pack supports: the floor both ComfyUI 0.3.75 and 0.33 ask for.
OLDEST_TRANSFORMERS = "4.50.3"
OVERLAY_PACKAGES = [f"transformers=={OLDEST_TRANSFORMERS}", "huggingface-hub<1"]
# One overlay per test venv (.venv, or the venv of another ComfyUI: see the Makefile).
OVERLAY = REPO / ".cache" / f"overlay-transformers-{OLDEST_TRANSFORMERS}-{pathlib.Path(sys.prefix).name}"


@pytest.fixture(scope="module")
def files():
    return tiny_segmentation.write_segmentation_files(folder_paths.models_dir)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(seg.grounding_dino, "DETECTOR_SIZE", FAST_DETECTOR)


@pytest.fixture
def models(files):
    dino = host.grounding_dino_path(files["grounding_dino_model"])
    return seg.cached_models(dino, host.bert_folder_for(dino), host.sam_model_path(files["sam_model"]))


def photos(batch=2, height=48, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, height, width, 3, generator=g)


def run_node(files, image, **overrides):
    inputs = dict(text="dog", sam_model=files["sam_model"], grounding_dino_model=files["grounding_dino_model"],
                  box_threshold=0.0, text_threshold=0.0, keep="most confident", grow_pixels=0,
                  when_nothing_found="error")
    inputs.update(overrides)
    return SubjectMask.execute(image, **inputs)


# ----------------------------------------------------------------------------- pure rules
def test_the_text_becomes_a_lower_case_phrase_ending_with_a_dot():
    assert M.caption_for("Dog") == "dog."
    assert M.caption_for("  red   Mug. ") == "red mug."
    assert M.caption_for("dog.") == "dog."
    with pytest.raises(ValueError, match="empty"):
        M.caption_for(" . ")


def test_normalised_centre_boxes_become_pixel_corners_inside_the_image():
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.05, 0.9, 0.3, 0.4]])
    xyxy = M.boxes_to_pixels(boxes, width=200, height=100)
    assert torch.allclose(xyxy[0], torch.tensor([50.0, 37.5, 150.0, 62.5]))
    assert torch.allclose(xyxy[1], torch.tensor([0.0, 70.0, 40.0, 100.0]))  # clamped at the borders


def test_a_detection_needs_its_box_score_and_a_word_of_the_text_above_the_thresholds():
    # Tokens: [CLS] red mug . [SEP]  -> words at positions 1 and 2
    scores = torch.tensor([[0.9, 0.1, 0.1, 0.9, 0.0],    # only special tokens score: no word above 0.25
                           [0.2, 0.5, 0.4, 0.2, 0.0],    # box 0.5 > 0.3, word 0.5 > 0.25
                           [0.1, 0.29, 0.3, 0.1, 0.0],   # box 0.3 is not above 0.3
                           [0.1, 0.8, 0.1, 0.1, 0.0]])   # the best
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 4)
    found = M.select_detections(scores, boxes, [1, 2], 0.3, 0.25, 100, 100)
    assert found.scores.tolist() == pytest.approx([0.8, 0.5])
    assert len(M.select_detections(scores, boxes, [1, 2], 1.0, 0.0, 100, 100)) == 0
    assert len(M.select_detections(scores, boxes, [1, 2], 0.0, 0.0, 100, 100)) == 4


def test_overlapping_duplicates_are_suppressed_and_the_best_kept():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    found = M.non_max_suppression(M.Detections(boxes.float(), torch.tensor([0.5, 0.9, 0.7, 0.6])))
    assert found.scores.tolist() == pytest.approx([0.9, 0.7])
    many = M.Detections(torch.tensor([[i * 20.0, 0, i * 20 + 10, 10] for i in range(20)]), torch.rand(20))
    assert len(M.non_max_suppression(many)) == M.MAX_CANDIDATES


def test_keep_rules_pick_the_largest_the_most_confident_or_all():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :2, :2] = True      # 4 px, most confident
    masks[1, 2:8, 2:8] = True    # 36 px, the largest
    masks[2, 0, 7] = True        # 1 px
    scores = torch.tensor([0.9, 0.4, 0.5])
    largest, chosen = M.choose_mask(masks, scores, "largest")
    assert chosen == [1] and largest.sum() == 36 and largest.dtype == torch.float32
    confident, chosen = M.choose_mask(masks, scores, "most confident")
    assert chosen == [0] and confident.sum() == 4
    union, chosen = M.choose_mask(masks, scores, "union")
    assert chosen == [0, 1, 2] and union.sum() == 41
    with pytest.raises(ValueError, match="keep rule"):
        M.choose_mask(masks, scores, "smallest")


def test_grow_and_shrink_move_the_mask_border_by_whole_pixels():
    mask = torch.zeros(20, 20)
    mask[8:13, 8:13] = 1  # a 5 x 5 square
    grown = M.grow_mask(mask, 2)
    assert grown.sum() == 81 and grown[6:15, 6:15].all()
    shrunk = M.grow_mask(mask, -1)
    assert shrunk.sum() == 9 and shrunk[9:12, 9:12].all()
    assert M.grow_mask(mask, -3).sum() == 0
    assert torch.equal(M.grow_mask(mask, 0), mask)
    # The image border neither eats a subject touching it nor grows past it; batches keep their shape.
    edge = torch.zeros(2, 10, 10)
    edge[:, :, :4] = 1
    assert torch.equal(M.grow_mask(edge, -1)[:, 1:-1, :3], torch.ones(2, 8, 3))
    assert M.grow_mask(edge, 3).shape == (2, 10, 10) and M.grow_mask(edge, 3)[0, :, :7].all()


def test_the_preview_tints_the_mask_and_draws_kept_and_other_boxes():
    image = torch.zeros(40, 40, 3)
    mask = torch.zeros(40, 40)
    mask[10:20, 10:20] = 1
    out = M.preview(image, mask, torch.tensor([[5.0, 5, 30, 30], [0, 0, 40, 40]]), chosen=[0])
    assert out.shape == (40, 40, 3)
    assert out[15, 15].tolist() == pytest.approx([0.5 * c for c in M.PREVIEW_TINT])
    assert out[5, 20].tolist() == pytest.approx(list(M.CHOSEN_BOX))
    assert out[0, 20].tolist() == pytest.approx(list(M.OTHER_BOX))
    assert out[35, 35].tolist() == [0, 0, 0]


def test_the_detector_input_size_follows_grounding_dinos_own_resize():
    from groundingdino.datasets.transforms import resize
    for width, height in [(640, 480), (480, 640), (64, 48), (3000, 400), (800, 800), (1333, 800), (801, 1)]:
        resized, _ = resize(Image.new("RGB", (width, height)), None, 800, max_size=1333)
        assert seg.detector_input_size(width, height, 800, 1333) == (resized.height, resized.width), (width, height)


# ----------------------------------------------------------------------------- safe files
def test_a_config_file_is_parsed_as_data_and_never_run(tmp_path):
    shipped = seg.read_config(seg.shipped_config_path("GroundingDINO_SwinT_OGC.py"))
    assert shipped["backbone"] == "swin_T_224_1k" and shipped["enc_layers"] == 6 and shipped["num_queries"] == 900
    assert shipped["return_interm_indices"] == [1, 2, 3] and shipped["backbone_freeze_keywords"] is None
    marker = tmp_path / "ran"
    evil = [f"import os\nos.system('touch {marker}')\nbackbone = 'swin_T_224_1k'\n",
            f"backbone = __import__('os').system('touch {marker}')\n",
            f"def f():\n    open('{marker}', 'w')\nx = f()\n"]
    expected = ["line 1: an import", "line 1: 'backbone = ...' is not a plain value", "line 1: a definition"]
    for text, message in zip(evil, expected):
        path = tmp_path / "GroundingDINO_SwinT_OGC.cfg.py"
        path.write_text(text)
        with pytest.raises(WeightFileError) as error:
            seg.read_config(str(path))
        assert message in str(error.value) and "never run" in str(error.value)
    assert not marker.exists()
    (tmp_path / "ok.cfg.py").write_text('"""doc"""\n# comment\nnum_queries = 30\nsizes: list = [1, (2, 3)]\nneg = -1.5\n')
    assert seg.read_config(str(tmp_path / "ok.cfg.py")) == {"num_queries": 30, "sizes": [1, (2, 3)], "neg": -1.5}


def test_a_refused_config_beside_a_checkpoint_stops_the_load_before_anything_is_built(tmp_path, files):
    marker = tmp_path / "ran"
    checkpoint = tmp_path / files["grounding_dino_model"]
    checkpoint.symlink_to(pathlib.Path(folder_paths.models_dir) / "grounding-dino" / files["grounding_dino_model"])
    (tmp_path / files["grounding_dino_config"]).write_text(f"import os\nos.system('touch {marker}')\n")
    with pytest.raises(WeightFileError, match="import"):
        seg.load_grounding_dino(str(checkpoint), str(tmp_path / "bert-base-uncased"))
    assert not marker.exists()


def test_the_config_beside_a_checkpoint_is_found_or_the_shipped_one_used(tmp_path, files):
    checkpoint = tmp_path / "groundingdino_swint_ogc.pth"
    checkpoint.symlink_to(pathlib.Path(folder_paths.models_dir) / "grounding-dino" / files["grounding_dino_model"])
    state = seg.read_checkpoint(str(checkpoint), "Grounding DINO")
    assert not any(k.startswith("module.") for k in state)  # the release's prefix is stripped
    config, source = seg.grounding_dino_config(str(checkpoint), state)
    assert "shipped" in source and config["enc_layers"] == 6 and config["backbone"] == "swin_T_224_1k"
    (tmp_path / "GroundingDINO_SwinT_OGC.cfg.py").write_text("enc_layers = 1\n")
    config, source = seg.grounding_dino_config(str(checkpoint), state)
    assert source == "GroundingDINO_SwinT_OGC.cfg.py" and config["enc_layers"] == 1 and config["dec_layers"] == 6
    (tmp_path / "groundingdino_swint_ogc.cfg.py").write_text("enc_layers = 2\n")  # its own name wins
    assert seg.grounding_dino_config(str(checkpoint), state)[0]["enc_layers"] == 2


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_a_pickled_object_is_refused_naming_its_class(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _RunsCode(marker)}, path)
    with pytest.raises(WeightFileError) as error:
        seg.read_checkpoint(str(path), "SAM")
    assert f"{os.system.__module__}.system" in str(error.value) and "weights_only=True" in str(error.value)
    assert not marker.exists()
    # A training script's argparse.Namespace beside the weights is plain data and allowed.
    torch.save({"model": {"module.w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4)}, path)
    assert torch.equal(seg.read_checkpoint(str(path), "SAM")["w"], torch.ones(2))


def test_sam_size_is_read_from_the_tiny_checkpoint(files):
    state = seg.read_checkpoint(host.sam_model_path(files["sam_model"]), "SAM")
    assert seg.sam_architecture(state) == seg.SamArchitecture(32, 2, 2, (1,))


@pytest.mark.parametrize("name,expected", [("vit_b", (768, 12, 12, (2, 5, 8, 11))),
                                           ("vit_l", (1024, 24, 16, (5, 11, 17, 23))),
                                           ("vit_h", (1280, 32, 16, (7, 15, 23, 31)))])
def test_sam_size_is_read_from_the_published_shapes(name, expected):
    from segment_anything import sam_model_registry
    with torch.device("meta"):  # the published architectures' tensor shapes, without memory or time
        published = sam_model_registry[name]().state_dict()
    architecture = seg.sam_architecture(published)
    assert architecture == seg.SamArchitecture(*expected)
    with torch.device("meta"):
        ours = seg.build_sam(architecture).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in published.items()}


def test_a_file_that_is_no_sam_checkpoint_is_named_as_such():
    with pytest.raises(WeightFileError, match="not a segment-anything SAM"):
        seg.sam_architecture({"model.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------- folders and files
def test_the_model_folders_are_registered_and_listed(files):
    assert folder_paths.get_folder_paths("sams")[0] == os.path.join(folder_paths.models_dir, "sams")
    assert folder_paths.get_folder_paths("grounding-dino")[0] == os.path.join(folder_paths.models_dir, "grounding-dino")
    assert host.sam_model_choices() == [files["sam_model"]]
    # The BERT folder's weights lie inside models/grounding-dino but are no detector.
    assert "bert-base-uncased/model.safetensors" in folder_paths.get_filename_list("grounding-dino")
    assert host.grounding_dino_choices() == [files["grounding_dino_model"]]


def test_an_extra_model_paths_folder_is_kept_and_its_files_found(tmp_path, monkeypatch, files):
    # ComfyUI's own reader of extra_model_paths.yaml (loaded by path: another 'utils' may be imported).
    spec = importlib.util.spec_from_file_location("comfy_extra_config", COMFYUI / "utils" / "extra_config.py")
    extra_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extra_config)
    load_extra_path_config = extra_config.load_extra_path_config
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "my_sams").mkdir(parents=True)
    os.symlink(host.sam_model_path(files["sam_model"]), elsewhere / "my_sams" / "sam_from_yaml.pth")
    yaml = tmp_path / "extra_model_paths.yaml"
    yaml.write_text(f"mine:\n  base_path: {elsewhere}\n  sams: my_sams\n  grounding-dino: my_dino\n")
    # As at ComfyUI's start: extra_model_paths.yaml is read before the pack registers its folders.
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    for name in ("sams", "grounding-dino"):
        monkeypatch.delitem(folder_paths.folder_names_and_paths, name)
    (elsewhere / "my_sams" / "notes.txt").write_text("the user's")
    load_extra_path_config(str(yaml))
    host.register_model_folders()
    assert folder_paths.get_folder_paths("sams") == [str(elsewhere / "my_sams"), os.path.join(folder_paths.models_dir, "sams")]
    assert str(elsewhere / "my_dino") in folder_paths.get_folder_paths("grounding-dino")
    # the yaml's entries list every file (no extensions): other packs reading them still see every
    # file; SubjectMask's dropdown lists the weight files
    assert folder_paths.folder_names_and_paths["sams"][1] == set()
    assert "notes.txt" in folder_paths.get_filename_list("sams")
    assert sorted(host.sam_model_choices()) == sorted(["sam_from_yaml.pth", files["sam_model"]])
    assert host.sam_model_path("sam_from_yaml.pth") == str(elsewhere / "my_sams" / "sam_from_yaml.pth")


def test_a_folder_another_pack_registered_with_extensions_gets_the_weight_files_too(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sams", ([str(tmp_path)], {".pt"}))
    host.register_model_folders()
    paths, extensions = folder_paths.folder_names_and_paths["sams"]
    assert paths == [str(tmp_path), os.path.join(folder_paths.models_dir, "sams")]
    assert extensions == {".pt"} | set(folder_paths.supported_pt_extensions)


def test_missing_files_are_refused_at_queue_time_naming_the_folder(files):
    assert SubjectMask.validate_inputs(text="dog", sam_model=files["sam_model"],
                                       grounding_dino_model=files["grounding_dino_model"], keep="largest",
                                       when_nothing_found="error") is True
    message = SubjectMask.validate_inputs(sam_model="sam_vit_h_4b8939.pth")
    assert message.startswith("sam_model:") and os.path.join(folder_paths.models_dir, "sams") in message
    assert "sam_vit_h_4b8939.pth" in message
    message = SubjectMask.validate_inputs(grounding_dino_model="missing.pth")
    assert os.path.join(folder_paths.models_dir, "grounding-dino") in message and "groundingdino_swint_ogc.pth" in message
    assert "empty" in SubjectMask.validate_inputs(text=" ")
    assert "keep" in SubjectMask.validate_inputs(keep="smallest")


def test_without_groundingdino_the_queue_names_the_file_that_installs_it_and_the_ways_around_it(files, monkeypatch):
    """groundingdino-py is not in requirements.txt (it pins supervision, pulls opencv-python and
    with it numpy 2, and fails to install on Windows under a CJK locale, taking timm down with it).
    Without it the queue names requirements-subject-mask.txt by its full path, the CJK fix, SAM3 and
    the drawn mask; the config lookup and the import, reached at run time, say the same."""
    import sys
    values = dict(text="dog", sam_model=files["sam_model"], grounding_dino_model=files["grounding_dino_model"],
                  keep="largest", when_nothing_found="error")
    assert SubjectMask.validate_inputs(**values) is True
    for name in ["groundingdino"] + [m for m in sys.modules if m.startswith("groundingdino.")]:
        monkeypatch.setitem(sys.modules, name, None)     # what importlib sees where it is not installed
    refused = SubjectMask.validate_inputs(**values)
    requirements = seg.SUBJECT_MASK_REQUIREMENTS
    assert os.path.isfile(requirements) and "groundingdino-py" in open(requirements).read()
    assert refused is not True and refused.startswith("grounding_dino_model:"), refused
    for needed in ("groundingdino-py", f'pip install -r "{requirements}"', "PYTHONUTF8=1", "sam3_model",
                   "Open in MaskEditor"):
        assert needed in refused, (needed, refused)
    with pytest.raises(seg.WeightFileError, match="requirements-subject-mask.txt"):
        seg.shipped_config_path(seg.SHIPPED_CONFIGS[96])
    with pytest.raises(ImportError, match="requirements-subject-mask.txt"):
        seg.grounding_dino._import_groundingdino()


def test_a_missing_or_incomplete_bert_folder_is_named_with_what_to_put_there(tmp_path, monkeypatch, files):
    alone = tmp_path / "grounding-dino"
    alone.mkdir()
    os.symlink(host.grounding_dino_path(files["grounding_dino_model"]), alone / files["grounding_dino_model"])
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "grounding-dino", ([str(alone)], {".pth"}))
    message = SubjectMask.validate_inputs(grounding_dino_model=files["grounding_dino_model"])
    assert str(alone / "bert-base-uncased") in message
    for needed in ("config.json", "vocab.txt", "tokenizer.json", "model.safetensors", "google-bert/bert-base-uncased"):
        assert needed in message
    (alone / "bert-base-uncased").mkdir()
    (alone / "bert-base-uncased" / "config.json").write_text("{}")
    message = SubjectMask.validate_inputs(grounding_dino_model=files["grounding_dino_model"])
    assert str(alone / "bert-base-uncased") in message and "lacks vocab.txt, model.safetensors or pytorch_model.bin" in message


# ----------------------------------------------------------------------------- the node
def test_the_node_is_registered_and_documents_every_input_and_output():
    assert comfy_nodes.NODE_CLASS_MAPPINGS["SubjectMask"] is SubjectMask
    schema = SubjectMask.define_schema()
    assert schema.category == siso("nodes.graph_types").CATEGORY and "bert-base-uncased" in schema.description
    assert [i.id for i in schema.inputs] == ["image", "text", "sam_model", "grounding_dino_model", "box_threshold",
                                             "text_threshold", "keep", "grow_pixels", "when_nothing_found",
                                             "sam3_model", "sam3_clip"]   # SAM3: tests/test_subject_mask_sam3.py
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert [o.display_name for o in schema.outputs] == ["mask", "preview"]


def test_every_image_of_a_batch_gets_a_mask(files, fast):
    steps = []
    result = host.subject_masks(photos(batch=2), seg.MaskSettings(text="Dog", box_threshold=0.0, text_threshold=0.0,
                                                                  keep="most confident"), files["sam_model"],
                                files["grounding_dino_model"], on_step=lambda: steps.append(1))
    assert result.masks.shape == (2, 48, 64) and result.masks.dtype == torch.float32
    assert set(result.masks.unique().tolist()) <= {0.0, 1.0}
    assert all(m.sum() > 0 for m in result.masks), "threshold 0 detects and SAM segments something"
    assert all(len(d) > 0 for d in result.detections) and result.warnings == []
    assert result.previews.shape == (2, 48, 64, 3) and 0 <= result.previews.min() <= result.previews.max() <= 1
    assert len(steps) == 4


def test_gray_and_rgba_photos_are_read_as_rgb():
    gray = torch.rand(1, 5, 6, 1)
    assert torch.equal(seg.as_rgb(gray), gray.expand(-1, -1, -1, 3))
    rgba = torch.rand(2, 5, 6, 4)
    assert torch.equal(seg.as_rgb(rgba), rgba[..., :3])
    with pytest.raises(ValueError, match="IMAGE"):
        seg.as_rgb(torch.rand(1, 5, 6, 2))


class _Scripted:
    """Stand-ins for the two models with known answers: per image a list of (box, score);
    SAM's mask of a box is the box itself. Records how many boxes SAM was asked for."""

    def __init__(self, monkeypatch, per_image):
        self.per_image, self.segmented, self.calls = per_image, [], 0
        monkeypatch.setattr(seg, "detect", self.detect)
        monkeypatch.setattr(seg, "segment_boxes", self.segment)

    def detect(self, detector, image, caption, box_threshold, text_threshold):
        found = [(b, s) for b, s in self.per_image[self.calls] if s > box_threshold]
        self.calls += 1
        boxes = torch.tensor([b for b, _ in found], dtype=torch.float32).reshape(-1, 4)
        return M.Detections(boxes, torch.tensor([s for _, s in found], dtype=torch.float32))

    def segment(self, sam, image, boxes):
        self.segmented.append(len(boxes))
        masks = torch.zeros(len(boxes), *image.shape[:2], dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        return masks


def _pipeline(keep="largest", grow=0, threshold=0.3, nothing="error", per_image=None, monkeypatch=None):
    scripted = _Scripted(monkeypatch, per_image or [[([0, 0, 4, 4], 0.9), ([10, 10, 30, 30], 0.5), ([40, 0, 44, 2], 0.6)]])
    settings = seg.MaskSettings("dog", threshold, 0.25, keep=keep, grow_pixels=grow, when_nothing_found=nothing)
    images = torch.zeros(len(scripted.per_image), 40, 48, 3)
    return seg.subject_masks(images, settings, torch.nn.Identity(), torch.nn.Identity()), scripted


def test_keep_rules_and_growing_apply_to_the_segmented_detections(monkeypatch):
    largest, scripted = _pipeline("largest", monkeypatch=monkeypatch)
    assert largest.masks[0].sum() == 400 and largest.masks[0, 10:30, 10:30].all() and scripted.segmented == [3]
    assert largest.previews[0, 10, 20].tolist() == pytest.approx(list(M.CHOSEN_BOX))   # the kept box in green
    assert largest.previews[0, 0, 41].tolist() == pytest.approx(list(M.OTHER_BOX))     # the others in yellow
    confident, scripted = _pipeline("most confident", monkeypatch=monkeypatch)
    assert confident.masks[0].sum() == 16 and confident.masks[0, :4, :4].all()
    assert scripted.segmented == [1], "only the most confident box is segmented"
    union, _ = _pipeline("union", monkeypatch=monkeypatch)
    assert union.masks[0].sum() == 16 + 400 + 8
    grown, _ = _pipeline("largest", grow=3, monkeypatch=monkeypatch)
    assert torch.equal(grown.masks[0], M.grow_mask(largest.masks[0], 3)) and grown.masks[0].sum() == 26 * 26
    shrunk, _ = _pipeline("largest", grow=-2, monkeypatch=monkeypatch)
    assert shrunk.masks[0].sum() == 16 * 16


def test_an_image_where_nothing_is_found_is_named_or_gets_an_empty_mask(monkeypatch):
    per_image = [[([0, 0, 4, 4], 0.9)], [([0, 0, 8, 8], 0.2)], [([2, 2, 6, 6], 0.8)]]
    with pytest.raises(M.NothingFound, match=r"image 2 of 3 \(batch index 1\)"):
        _pipeline(per_image=per_image, monkeypatch=monkeypatch)
    result, scripted = _pipeline(per_image=per_image, nothing="empty mask (warn)", monkeypatch=monkeypatch)
    assert [float(m.sum()) for m in result.masks] == [16.0, 0.0, 16.0] and scripted.segmented == [1, 1]
    assert len(result.warnings) == 1 and "batch index 1" in result.warnings[0] and "'dog'" in result.warnings[0]


def test_cancel_stops_between_images(monkeypatch):
    scripted = _Scripted(monkeypatch, [[([0, 0, 4, 4], 0.9)]] * 3)
    runtime = host.segmentation_runtime()
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            seg.subject_masks(torch.zeros(3, 8, 8, 3), seg.MaskSettings("dog"), torch.nn.Identity(),
                              torch.nn.Identity(), runtime)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert scripted.calls == 0 and scripted.segmented == []


def test_a_model_sits_on_the_compute_device_only_while_predicting():
    class Recorder(torch.nn.Linear):
        moves = []

        def to(self, *args, **kwargs):
            self.moves.append(str(args[0]))
            return self

    model, room = Recorder(4, 4), []
    runtime = seg.Runtime(device=torch.device("cuda"), make_room=room.append)
    with seg.on_device(model, runtime):
        assert model.moves == ["cuda"]
    assert model.moves == ["cuda", "cpu"] and room == [(16 + 4) * 4]
    with pytest.raises(RuntimeError), seg.on_device(model, runtime):
        raise RuntimeError("a failing prediction still puts the model back")
    assert model.moves[-1] == "cpu"


def test_our_text_encoder_takes_the_place_of_groundingdinos_wrapper_and_nothing_is_patched(models):
    import transformers
    from groundingdino.models.GroundingDINO import bertwarper, groundingdino as architecture
    from groundingdino.util import get_tokenlizer
    detector, _ = models
    assert isinstance(detector.bert, seg.GroundingTextEncoder)
    assert architecture.BertModelWarper is bertwarper.BertModelWarper, "groundingdino's name is restored"
    assert get_tokenlizer.get_pretrained_language_model.__module__ == "groundingdino.util.get_tokenlizer"
    assert get_tokenlizer.get_tokenlizer.__module__ == "groundingdino.util.get_tokenlizer"
    assert not any(isinstance(v, seg.GroundingTextEncoder) for v in vars(transformers.BertModel).values())
    assert {k.split(".")[0] for k in detector.bert.state_dict()} == {"embeddings", "encoder", "pooler"}


def test_our_text_encoder_equals_transformers_own_bert_forward(models):
    """Against the installed transformers' public BertModel.forward on the same weights: a 2D
    padding mask gives the same hidden states at the attended tokens, and a 3D per-token mask
    (Grounding DINO's sub-sentence mask) equals running each sub-sentence on its own."""
    from transformers import BertModel
    detector, _ = models
    encoder = detector.bert
    bert = BertModel(encoder.config).eval()
    bert.load_state_dict(encoder.state_dict(), strict=False)  # the same embeddings, layers, pooler
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, encoder.config.vocab_size, (2, 7), generator=g)
    pad = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    with torch.inference_mode():
        ours = encoder(input_ids=ids, attention_mask=pad)["last_hidden_state"]
        theirs = bert(input_ids=ids, attention_mask=pad).last_hidden_state
        # Two sub-sentences of 3 and 4 tokens, positions restarting at 0 in each.
        block = torch.zeros(1, 7, 7, dtype=torch.bool)
        block[0, :3, :3] = block[0, 3:, 3:] = True
        positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
        joint = encoder(input_ids=ids[:1], attention_mask=block, position_ids=positions)["last_hidden_state"]
        first = bert(input_ids=ids[:1, :3]).last_hidden_state
        second = bert(input_ids=ids[:1, 3:]).last_hidden_state
    # The same float32 operations; a masked score adds exp(min - max) = 0 exactly, and the
    # kernels may sum in another order (SDPA vs eager): a few roundings of values of order 1.
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1, :5], theirs[1, :5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(joint[0], torch.cat([first[0], second[0]]), rtol=1e-5, atol=1e-5)


def test_nothing_found_is_an_error_naming_the_image_and_the_text(files, fast):
    with pytest.raises(M.NothingFound) as error:
        run_node(files, photos(batch=2), text="Red Mug", box_threshold=1.0)
    message = str(error.value)
    assert "'Red Mug'" in message and "image 1 of 2 (batch index 0)" in message and "empty mask (warn)" in message


def test_nothing_found_can_give_an_empty_mask_with_a_visible_warning(files, fast, caplog):
    out = run_node(files, photos(batch=2), text="cat", box_threshold=1.0, when_nothing_found="empty mask (warn)")
    mask, preview = out.args
    assert mask.shape == (2, 48, 64) and mask.sum() == 0 and preview.shape == (2, 48, 64, 3)
    warnings = out.ui["text"]
    assert len(warnings) == 2 and "batch index 0" in warnings[0] and "batch index 1" in warnings[1]
    assert all("'cat'" in w and "empty" in w for w in warnings)
    assert sum("batch index" in r.getMessage() for r in caplog.records if r.levelname == "WARNING") == 2


def test_masks_use_the_mask_editors_convention_and_work_where_its_masks_do(files, fast):
    # A photo whose left half was painted in ComfyUI's mask editor (saved as transparency).
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[..., :3] = (photos(batch=1)[0] * 255).numpy().astype(np.uint8)
    rgba[..., 3] = 255
    rgba[:, :32, 3] = 0
    name = f"painted-{uuid.uuid4().hex}.png"
    Image.fromarray(rgba, "RGBA").save(os.path.join(folder_paths.get_input_directory(), name))
    image, drawn = comfy_nodes.LoadImage().load_image(name)
    assert drawn.shape == (1, 48, 64) and drawn[0, :, :32].min() == 1 and drawn[0, :, 32:].max() == 0
    ours = run_node(files, image[..., :3]).args[0]
    assert ours.shape == drawn.shape and ours.dtype == drawn.dtype
    # Both kinds go into the same inputs: SISO Load Subject and the editing background loss.
    prepare_subject = siso("siso_ops.subject").prepare_subject
    background_weights = siso("siso_ops.editing").background_weights
    for mask in (drawn, ours, drawn[0], ours[0]):
        prepare_subject(image, mask, "subject", "white")
        assert background_weights(mask, (48, 64)).shape == (1, 1, 48, 64)
    same = drawn.clone()
    assert torch.equal(prepare_subject(image, same, "subject", "white").image,
                       prepare_subject(image, same[0], "subject", "white").image)


# ----------------------------------------------------------------------------- life cycle and safety
def test_the_models_load_and_predict_without_touching_the_network(files, fast, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    seg.MODELS.clear()
    result = host.subject_masks(photos(batch=1), seg.MaskSettings("dog", 0.0, 0.0, keep="most confident"),
                                files["sam_model"], files["grounding_dino_model"])
    assert result.masks[0].sum() > 0 and attempts == []
    assert set(seg.MODELS.loaded()) == {"grounding_dino", "sam"}


def test_free_model_and_node_cache_releases_the_models(files, fast):
    from siso_runs import free_model_and_node_cache, prompt_executor
    name = f"subject-{uuid.uuid4().hex}.png"
    Image.fromarray((photos(batch=1)[0] * 255).numpy().astype(np.uint8)).save(
        os.path.join(folder_paths.get_input_directory(), name))
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
              "2": {"class_type": "SubjectMask", "inputs": {
                  "image": ["1", 0], "text": "dog", "sam_model": files["sam_model"],
                  "grounding_dino_model": files["grounding_dino_model"], "box_threshold": 0.0, "text_threshold": 0.0,
                  "keep": "most confident", "grow_pixels": 0, "when_nothing_found": "error"}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}}}
    seg.MODELS.clear()
    executor = prompt_executor()
    executor.execute(prompt, "p1", {}, ["3"])
    assert executor.success, executor.status_messages
    loaded = seg.MODELS.loaded()
    assert set(loaded) == {"grounding_dino", "sam"}
    alive = [weakref.ref(model) for model in loaded.values()]
    # A second run (other text) reuses the loaded models: same objects, nothing read again.
    prompt["2"]["inputs"]["text"] = "cat"
    executor.execute(prompt, "p2", {}, ["3"])
    assert executor.success and all(a() is b for a, b in zip(alive, seg.MODELS.loaded().values()))
    del loaded
    free_model_and_node_cache(executor)
    assert seg.MODELS.loaded() == {}
    assert all(ref() is None for ref in alive), "the models' memory is released"


def test_importing_the_pack_imports_no_segmentation_package(tmp_path):
    code = f"""
import asyncio, os, sys
sys.path.insert(0, {str(COMFYUI)!r})
from comfy.cli_args import args
args.cpu = True
args.base_directory = {str(tmp_path)!r}
args.disable_api_nodes = True
import nodes
os.makedirs({str(tmp_path / 'custom_nodes')!r}, exist_ok=True)
os.symlink({str(REPO)!r}, {str(tmp_path / 'custom_nodes' / 'comfyui_siso')!r})
# What ComfyUI itself imported before the pack loads is not the pack's doing (ComfyUI 0.33
# imports cv2 for its own nodes; 0.3.75 does not).
before = set(sys.modules)
assert asyncio.run(nodes.load_custom_node({str(tmp_path / 'custom_nodes' / 'comfyui_siso')!r}))
assert "SubjectMask" in nodes.NODE_CLASS_MAPPINGS
heavy = ("groundingdino", "segment_anything", "cv2", "supervision", "pycocotools", "transformers.models.bert.modeling_bert")
print("HEAVY", [m for m in heavy if m in sys.modules and m not in before])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout, out.stdout


# ----------------------------------------------------------------------------- oldest transformers
def _overlay_python() -> pathlib.Path:
    """A venv whose own site-packages hold the oldest supported transformers and whose .pth puts this
    test venv's packages behind it, so it shares torch, groundingdino and segment_anything.
    (``venv --system-site-packages`` run from a venv's python would expose the base
    interpreter's packages, not .venv's.) Cached under .cache/; pip failing fails the test."""
    python = OVERLAY / "bin" / "python"
    ready = OVERLAY / "ready"
    if ready.exists() and python.exists():
        return python
    shutil.rmtree(OVERLAY, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(OVERLAY)], check=True)
    # Every site-packages this process sees, in its order (a layered ComfyUI venv has two).
    bases = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    pathlib.Path(own, "_siso_project_venv.pth").write_text("".join(f"{base}\n" for base in bases))
    pip = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *OVERLAY_PACKAGES],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, f"pip could not install {OVERLAY_PACKAGES}:\n{pip.stdout[-2000:]}\n{pip.stderr[-3000:]}"
    ready.write_text(" ".join(OVERLAY_PACKAGES))
    return python


OVERLAY_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, transformers
from groundingdino.models.GroundingDINO.bertwarper import BertModelWarper
from siso_ops import segmentation as seg
seg.grounding_dino.DETECTOR_SIZE = tuple(json.loads(sys.argv[4]))
image = torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(0))
detector = seg.load_grounding_dino(sys.argv[2], sys.argv[3])
with torch.inference_mode():
    logits, boxes = seg.detector_outputs(detector, image, "dog.")
    found = seg.detect(detector, image, "dog.", 0.0, 0.0)
# groundingdino-py's own BERT wrapper, as it ran before the pack replaced it (it works with
# transformers 4), on the same weights: the reference for 'outputs equal the old ones'.
stock = BertModelWarper(bert_model=transformers.BertModel(detector.bert.config).eval())
stock.load_state_dict(detector.bert.state_dict())
detector.bert = stock
with torch.inference_mode():
    stock_logits, stock_boxes = seg.detector_outputs(detector, image, "dog.")
print("RESULT", json.dumps({"transformers": transformers.__version__, "logits": logits.tolist(), "boxes": boxes.tolist(),
                            "stock_logits": stock_logits.tolist(), "stock_boxes": stock_boxes.tolist(),
                            "detections": len(found)}))
"""


def test_grounding_dino_predicts_as_groundingdinos_own_wrapper_under_the_oldest_and_newest_transformers(files, models, fast):
    python = _overlay_python()
    dino = host.grounding_dino_path(files["grounding_dino_model"])
    args = [str(REPO), dino, host.bert_folder_for(dino), json.dumps(FAST_DETECTOR)]
    out = subprocess.run([str(python), "-c", OVERLAY_CHILD, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    theirs = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])
    assert theirs["transformers"] == OLDEST_TRANSFORMERS
    import transformers
    assert transformers.__version__.split(".")[0] == "5"
    detector, _ = models
    image = torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits, boxes = seg.detector_outputs(detector, image, "dog.")
    # Under transformers 4, our text encoder and groundingdino's own wrapper run the same
    # operations in the same order: bitwise the same detector outputs.
    stock_logits, stock_boxes = torch.tensor(theirs["stock_logits"]), torch.tensor(theirs["stock_boxes"])
    assert torch.equal(torch.tensor(theirs["logits"]), stock_logits)
    assert torch.equal(torch.tensor(theirs["boxes"]), stock_boxes)
    # Under transformers 5 (this process) BERT's attention runs through other kernels (SDPA by
    # default), which may sum in another order: a few float32 roundings, carried through the
    # detector's layers. Logits are of order 1-10 and masked tokens are -inf in both.
    finite = torch.isfinite(logits)
    assert torch.equal(finite, torch.isfinite(stock_logits))
    assert torch.allclose(logits[finite], stock_logits[finite], atol=1e-4, rtol=1e-4)
    assert torch.allclose(boxes, stock_boxes, atol=1e-5)
    assert theirs["detections"] > 0
