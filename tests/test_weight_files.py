"""Broken weight files (cut short, random bytes, empty, text, pickles holding objects, NaN or
infinite values) are refused through the real loaders with the pack's own message: the file, its
folder and role, what is wrong in plain words and what to do; never a loader's raw error, never
torch's advice to switch its safety check off."""
import os
import random

import pytest
import safetensors.torch
import torch

import tiny
from conftest import siso

fn = siso("siso_ops.feature_networks")
seg = siso("siso_ops.segmentation")


class TrainingState:
    """A class a training script might pickle beside the weights (not a tensor, not plain data)."""

    def __init__(self):
        self.step = 3


def write(path, sd):
    if str(path).endswith(".safetensors"):
        safetensors.torch.save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return str(path)


def cut(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[:int(len(data) * keep)])
    return path


def random_bytes(path, n=4096):
    data = bytearray(random.Random(7).randbytes(n))
    data[0] = 0x17   # neither a zip ('PK') nor a pickle (0x80) nor text
    open(path, "wb").write(bytes(data))
    return str(path)


def assert_pack_message(message, path, role, *fragments):
    """The pack's own message: file name and folder, role, the given fragments, whole sentences,
    no advice to load without the weights-only check, no raw loader error."""
    assert os.path.basename(path) in message and os.path.dirname(os.path.abspath(path)) in message
    assert role in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert message.endswith(".")
    lowered = message.lower()
    assert "weights_only=false" not in lowered and "set to `false`" not in lowered and "set to false" not in lowered
    assert "SafetensorError" not in message and "Error while deserializing" not in message
    assert "PytorchStreamReader" not in message


DINO = ("DINOv2 ViT-L/14", fn.load_dino, "dinov2_vitl14_pretrain.pth")
IR = ("IR ViT-H/14 + fc1", fn.load_ir, "ir_features.pth")


def _dino_safetensors(tmp_path, name="dinov2_vitl14.safetensors"):
    path = write(tmp_path / "written.safetensors", tiny.dino_state_dict(meta_format=False))
    os.rename(path, tmp_path / name)
    return str(tmp_path / name)


CASES = {
    # name: (network, writer(tmp_path) -> path, fragments the message must hold)
    "safetensors cut short": (DINO, lambda t: cut(_dino_safetensors(t)),
                              ["is a safetensors file cut short", "bytes its header announces",
                               "Download the published file again"]),
    "safetensors cut inside its header": (DINO, lambda t: cut(_dino_safetensors(t), keep=0.001),
                                          ["is a safetensors file cut short", "fewer than its header alone"]),
    "random bytes named .safetensors": (IR, lambda t: random_bytes(t / "ir_features.safetensors"),
                                        ["is not a safetensors file", "4,096 bytes",
                                         "Download the published file again"]),
    "empty .safetensors": (DINO, lambda t: write_bytes(t / "dinov2_vitl14.safetensors", b""),
                           ["is empty (0 bytes)", "Download the published file again"]),
    "zip .pth cut short": (IR, lambda t: cut(write(t / "ir_features.pth", tiny.ir_state_dict())),
                           ["is a PyTorch checkpoint cut short", "did not finish",
                            "Download the published file again"]),
    "old-format .pth cut short": (DINO, lambda t: cut(write_legacy(t / "dinov2_vitl14_pretrain.pth")),
                                  ["older non-zip format", "cut short"]),
    "random bytes named .pth": (DINO, lambda t: random_bytes(t / "dinov2_vitl14_pretrain.pth"),
                                ["is not a PyTorch checkpoint", "4,096 bytes", "Download the published file again"]),
    "empty .pth": (IR, lambda t: write_bytes(t / "ir_features.pth", b""), ["is empty (0 bytes)"]),
    "text renamed .pth": (IR, lambda t: write_bytes(t / "ir_features.pth", b"Access denied.\nPlease sign in.\n"),
                          ["is a text file, not weights", "Access denied.", "Download the published file again"]),
    "Git LFS pointer": (DINO, lambda t: write_bytes(t / "dinov2_vitl14_pretrain.pth",
                                                    b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n"),
                        ["Git LFS pointer", "git lfs pull"]),
    "HTML page": (DINO, lambda t: write_bytes(t / "model.safetensors", b"<!DOCTYPE html>\n<html><body>404</body>"),
                  ["web page (HTML)"]),
    "pickle holding a custom class": (DINO, lambda t: write(t / "dinov2_vitl14_pretrain.pth",
                                                            {**tiny.dino_state_dict(), "state": TrainingState()}),
                                      ["holds Python objects that a weights-only load refuses",
                                       f"{__name__}.TrainingState", "torch.load(weights_only=True) only",
                                       ".safetensors"]),
    "safetensors under a .pth name": (DINO, lambda t: _dino_safetensors(t, "dinov2_vitl14_pretrain.pth"),
                                      ["is a safetensors file, but its name ends in '.pth'",
                                       "Rename it to 'dinov2_vitl14_pretrain.safetensors'"]),
}


def write_bytes(path, data):
    open(path, "wb").write(data)
    return str(path)


def write_legacy(path):
    torch.save(tiny.dino_state_dict(), str(path), _use_new_zipfile_serialization=False)
    return str(path)


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_similarity_network_file_is_refused_with_what_is_wrong_and_what_to_do(tmp_path, case):
    (role, load, published), writer, fragments = CASES[case]
    path = writer(tmp_path)
    with pytest.raises(fn.WeightFileError) as error, torch.inference_mode(False):
        load(path)
    message = str(error.value)
    assert_pack_message(message, path, role, *fragments)
    if "Rename" not in message and "weights-only" not in message:
        assert published in message   # the file name to download again


def test_a_refused_pickle_hides_torchs_advice_from_the_traceback_too(tmp_path):
    """ComfyUI shows the chained exceptions of a failed node; none may suggest weights_only=False."""
    path = write(tmp_path / "dinov2_vitl14_pretrain.pth", {**tiny.dino_state_dict(), "state": TrainingState()})
    with pytest.raises(fn.WeightFileError) as error, torch.inference_mode(False):
        fn.load_dino(path)
    chain, seen = error.value, []
    while chain is not None:
        seen.append(str(chain))
        chain = chain.__cause__ or (None if chain.__suppress_context__ else chain.__context__)
    assert not any("weights_only` set to `False`" in text or "weights_only=False" in text for text in seen)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_nan_and_infinite_values_are_refused_once_at_load_naming_the_first_tensor(tmp_path, suffix):
    sd = tiny.dino_state_dict(meta_format=False)
    sd["blocks.0.attn.qkv.weight"][3, 5] = float("nan")
    sd["blocks.1.mlp.fc2.bias"][0] = float("-inf")
    floating = sum(v.is_floating_point() for v in sd.values())
    path = write(tmp_path / f"dinov2_vitl14{suffix}", sd)
    with pytest.raises(fn.WeightFileError) as error, torch.inference_mode(False):
        fn.load_dino(path)
    assert_pack_message(str(error.value), path, "DINOv2 ViT-L/14", "NaN or infinite values",
                        f"in 2 of its {floating} floating-point tensors", "(the first: 'blocks.0.attn.qkv.weight')",
                        "broken download or conversion", "Download the published file again")


def test_one_infinite_value_in_the_ir_file_is_refused(tmp_path):
    sd = tiny.ir_state_dict()
    sd["fc1.bias"][1] = float("inf")
    path = write(tmp_path / "ir_features.pth", sd)
    with pytest.raises(fn.WeightFileError) as error, torch.inference_mode(False):
        fn.load_ir(path)
    assert_pack_message(str(error.value), path, "IR ViT-H/14 + fc1", "in 1 of its", "(the first: 'fc1.bias')",
                        "ir_features.pth")


def test_finite_files_and_integer_tensors_pass_the_check(tmp_path):
    sd = tiny.dino_state_dict(meta_format=False)
    sd["step"] = torch.tensor([2 ** 62])     # an integer buffer: not checked for NaN
    state = fn.read_state_dict(write(tmp_path / "d.safetensors", sd))
    assert torch.equal(state["step"], sd["step"]) and set(state) == set(sd)


def test_a_file_of_other_things_than_tensors_says_what_it_holds(tmp_path):
    path = write(tmp_path / "ir_features.pth", {"fc1.weight": torch.zeros(2), "epoch": 12})
    with pytest.raises(fn.WeightFileError) as error, torch.inference_mode(False):
        fn.load_ir(path)
    assert_pack_message(str(error.value), path, "IR ViT-H/14 + fc1", "1 of them no tensor", "'epoch', of type int")


# ----------------------------------------------------------------------------- SubjectMask's models
def test_a_sam_checkpoint_cut_short_is_refused_through_the_sam_loader(tmp_path):
    path = cut(write(tmp_path / "sam_vit_b_01ec64.pth", {"image_encoder.pos_embed": torch.zeros(1, 4, 4, 8)}))
    with pytest.raises(seg.WeightFileError) as error:
        seg.load_sam(path)
    assert_pack_message(str(error.value), path, "SAM", "cut short", seg.SAM_SOURCE)


def test_a_sam_checkpoint_with_nan_is_refused_before_sam_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(seg, "build_sam", lambda *a: pytest.fail("SAM was built from a broken file"))
    sd = {"image_encoder.pos_embed": torch.zeros(1, 4, 4, 8), "mask_decoder.w": torch.full((2,), float("nan"))}
    path = write(tmp_path / "sam_vit_b_01ec64.pth", {"model": sd})
    with pytest.raises(seg.WeightFileError) as error:
        seg.load_sam(path)
    assert_pack_message(str(error.value), path, "SAM", "(the first: 'mask_decoder.w')")


def test_an_empty_grounding_dino_file_is_refused_through_its_loader(tmp_path):
    path = write_bytes(tmp_path / "groundingdino_swint_ogc.pth", b"")
    with pytest.raises(seg.WeightFileError) as error:
        seg.load_grounding_dino(path, str(tmp_path / "bert-base-uncased"))
    assert_pack_message(str(error.value), path, "Grounding DINO", "is empty (0 bytes)", seg.GROUNDING_DINO_SOURCE)


# ----------------------------------------------------------------------------- a missing file names the way out
@pytest.mark.parametrize("kind,files_input,weight,other,alone", [
    ("ir", "ir_weights", "ir_weight", "dino_weight", "by DINOv2 alone"),
    ("dino", "dino_weights", "dino_weight", "ir_weight", "by the IR network alone")])
@pytest.mark.parametrize("node_id", ["SISOOptimize", "SISOSubjectScore"])
def test_a_missing_similarity_file_names_its_folder_and_the_weight_0_way_out(kind, files_input, weight, other, alone,
                                                                            node_id, feature_files):
    """Without the file: its folder and name, where it comes from, and that the weight at 0 runs on the
    other network, with the paper's ablation figures (Table 5). The way out is real: at weight 0 the
    same missing file passes the node's queue-time check."""
    import folder_paths
    import nodes as comfy_nodes
    host = siso("siso_ops.host")
    with pytest.raises(fn.WeightFileError) as error:
        host.weight_file_path(kind, "missing.pth")
    message = str(error.value)
    expected_name = {"ir": "ir_features.pth", "dino": "dinov2_vitl14.safetensors"}[kind]
    for needed in ("'missing.pth' not found", expected_name, str(folder_paths.get_folder_paths("siso")),
                   f"Set {weight} to 0", alone, "paper's ablation (Table 5, image editing)", "LPIPS 0.12 against 0.14"):
        assert needed in message, (needed, message)
    node = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
    refused = node.validate_inputs(**{files_input: "missing.pth", weight: 1.0, other: 1.0})
    assert refused is not True and f"Set {weight} to 0" in refused, refused
    assert node.validate_inputs(**{files_input: "missing.pth", weight: 0.0, other: 1.0}) is True


@pytest.mark.parametrize("node_id", ["SISOOptimize", "SISOSubjectScore"])
def test_without_timm_the_queue_names_the_file_that_installs_it(node_id, feature_files, monkeypatch):
    """timm builds both networks. A user whose requirements did not install (a failed pip run)
    is told at queue time which file installs it, with its full path, instead of a bare "No module
    named 'timm'" from the loader after the memory estimate; the loaders say the same before they
    read the file."""
    import sys
    import nodes as comfy_nodes
    node = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
    dino, ir = feature_files
    values = dict(dino_weights=dino, ir_weights=ir, dino_weight=1.0, ir_weight=1.0)
    assert node.validate_inputs(**values) is True
    monkeypatch.setitem(sys.modules, "timm", None)     # what importlib sees where timm is not installed
    refused = node.validate_inputs(**values)
    requirements = os.path.join(os.path.dirname(os.path.dirname(fn.__file__)), "requirements.txt")
    assert os.path.isfile(requirements)
    assert refused is not True and refused.startswith("dino_weights:"), refused
    for needed in ("built with timm", "not installed in ComfyUI's Python", f'pip install -r "{requirements}"',
                   "restart ComfyUI"):
        assert needed in refused, (needed, refused)
    for load in (fn.load_dino, fn.load_ir):
        with pytest.raises(fn.WeightFileError, match="built with timm"):
            load("not-read.pth")


def test_missing_mask_files_name_the_download_and_the_hand_drawn_mask(tmp_path):
    """SISO Subject Mask's SAM, Grounding DINO and BERT refusals: what to download, where, and that a
    mask drawn in Load Image's mask editor does without them."""
    host = siso("siso_ops.host")
    for find, source in ((host.sam_model_path, seg.SAM_SOURCE), (host.grounding_dino_path, seg.GROUNDING_DINO_SOURCE)):
        with pytest.raises(seg.WeightFileError) as error:
            find("missing.pth")
        assert source in str(error.value) and "Open in MaskEditor" in str(error.value), str(error.value)
    for refuse in (lambda: seg.check_bert_folder(str(tmp_path / "bert-base-uncased")),
                   lambda: (tmp_path / "empty" / "bert-base-uncased").mkdir(parents=True)
                   or seg.check_bert_folder(str(tmp_path / "empty" / "bert-base-uncased"))):
        with pytest.raises(seg.WeightFileError) as error:
            refuse()
        assert seg.BERT_SOURCE in str(error.value) and "siso_subject_swap_drawn_mask" in str(error.value), str(error.value)


# ----------------------------------------------------------------------------- the dropdowns' start
def test_a_new_node_starts_each_weight_dropdown_at_its_networks_file(object_info):
    """Without a default both dropdowns started at the folder's first file, and DINOv2's
    (dinov2_...) sorts before ir_features: a node dragged in fresh judged with DINOv2's file as
    the image-retrieval network. Each now starts at the file named for its network."""
    for node in ("SISOOptimize", "SISOSubjectScore"):
        inputs = object_info[node]["input"]["required"]
        files = inputs["dino_weights"][1].get("options") or inputs["dino_weights"][0]
        assert sorted(files).index("dinov2_vitl14.safetensors") < sorted(files).index("ir_features.pth"), files
        assert inputs["dino_weights"][1]["default"] == "dinov2_vitl14.safetensors", (node, inputs["dino_weights"])
        assert inputs["ir_weights"][1]["default"] == "ir_features.pth", (node, inputs["ir_weights"])


@pytest.mark.parametrize("files, dino, ir", [
    (["dinov2_vitl14.safetensors", "ir_features.pth"], "dinov2_vitl14.safetensors", "ir_features.pth"),
    (["a_notes.pth", "dinov2_vitl14_pretrain.pth", "ir_features.safetensors"], "dinov2_vitl14_pretrain.pth",
     "ir_features.safetensors"),
    (["sub/DINOv2_ViTL14.safetensors", "sub/ir_vith14.pth"], "sub/DINOv2_ViTL14.safetensors", "sub/ir_vith14.pth"),
    (["dinov2_vitl14.safetensors"], "dinov2_vitl14.safetensors", None),     # no IR file: the first file, as before
    ([], None, None),
])
def test_the_file_a_weight_dropdown_starts_at_is_chosen_by_its_name(files, dino, ir):
    host = siso("siso_ops.host")
    assert (host.likely_weight_file("dino", files), host.likely_weight_file("ir", files)) == (dino, ir)
