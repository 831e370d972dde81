"""Where the pack finds files, in ComfyUI's model folders: the similarity networks
(models/siso), LoRAs (models/loras), and SubjectMask's models (the community's models/sams and
models/grounding-dino, with the local BERT folder). Every "not found" names the folder to use."""
from __future__ import annotations

import os

import folder_paths

from .. import segmentation
from ..feature_networks import DINO_SOURCE, DINO_WAY_OUT, IR_SOURCE, IR_WAY_OUT, WeightFileError
from ..weights import remove_stale_temporaries


WEIGHTS_FOLDER = "siso"


SAM_FOLDER = "sams"                   # the community's folders for SubjectMask's models


GROUNDING_DINO_FOLDER = "grounding-dino"


def _register_folder(name: str):
    """models/<name>, added after any entries extra_model_paths.yaml already made. The folder's
    file extensions: the weight files' where the pack makes the entry or another pack gave it a
    list; an entry made with none (extra_model_paths.yaml makes its entries so) means every file,
    and stays so for the other packs that read it (the pack's own dropdowns keep weight files:
    _weight_files)."""
    default = os.path.join(folder_paths.models_dir, name)
    known = folder_paths.folder_names_and_paths.get(name)
    if known is None or default not in known[0]:
        folder_paths.add_model_folder_path(name, default)
    paths, extensions = folder_paths.folder_names_and_paths[name]
    if known is None or extensions:
        folder_paths.folder_names_and_paths[name] = (paths, set(extensions) | set(folder_paths.supported_pt_extensions))


def _weight_files(names: list) -> list:
    """The weight files of a folder's list (a folder whose extensions are 'every file' lists notes,
    configs and images too)."""
    return [n for n in names if os.path.splitext(n)[1].lower() in folder_paths.supported_pt_extensions]


def register_model_folders():
    """models/siso (similarity networks), models/sams and models/grounding-dino (SubjectMask)."""
    for name in (WEIGHTS_FOLDER, SAM_FOLDER, GROUNDING_DINO_FOLDER):
        _register_folder(name)


def weight_file_choices() -> list:
    return _weight_files(folder_paths.get_filename_list(WEIGHTS_FOLDER))


# (what, the file to put, where it comes from, how to run without it)
EXPECTED_FILES = {
    "dino": ("DINOv2 ViT-L/14", "dinov2_vitl14.safetensors (or dinov2_vitl14_pretrain.pth)", DINO_SOURCE, DINO_WAY_OUT),
    "ir": ("IR ViT-H/14 + fc1", "ir_features.pth (or ir_features.safetensors)", IR_SOURCE, IR_WAY_OUT),
}


def likely_weight_file(kind: str, files: list) -> str | None:
    """The file of ``files`` (a models/siso dropdown) a new node should start at for ``kind``
    ("dino" or "ir"), from its name: the first whose name starts "dinov2" for DINOv2; for the
    image-retrieval network the first named "ir_features", else the first not named like DINOv2.
    None: nothing fits (the dropdown then starts at its first file, as ComfyUI's do)."""
    def dino(name):
        return os.path.basename(name).lower().startswith("dinov2")
    if kind == "dino":
        return next((f for f in files if dino(f)), None)
    return next((f for f in files if os.path.basename(f).lower().startswith("ir_features")),
                next((f for f in files if not dino(f)), None))


def weight_file_path(kind: str, name: str) -> str:
    what, expected, source, way_out = EXPECTED_FILES[kind]
    folders = folder_paths.get_folder_paths(WEIGHTS_FOLDER)
    path = folder_paths.get_full_path(WEIGHTS_FOLDER, name) if name else None
    if path is None:
        raise WeightFileError(
            f"{what} weights '{name}' not found. Put {expected} into one of the '{WEIGHTS_FOLDER}' "
            f"model folders {folders} (or add a '{WEIGHTS_FOLDER}:' entry to extra_model_paths.yaml) "
            f"and refresh. Source: {source}. {way_out}")
    return path


def lora_folder() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def remove_unfinished_saves() -> list:
    """At start-up: the temporary files of saves a killed process never finished, in every 'loras'
    folder (the pack's own pattern only, weights.remove_stale_temporaries). Returns their paths."""
    return [os.path.join(folder, name) for folder in dict.fromkeys(folder_paths.get_folder_paths("loras"))
            for name in remove_stale_temporaries(folder)]


def lora_choices() -> list:
    return folder_paths.get_filename_list("loras")


def lora_file(name: str) -> str:
    return _model_file("loras", name, "LoRA file", "a SISO LoRA saved by SISO Save LoRA")


def _model_file(folder: str, name: str, what: str, expected: str, way_out: str = "") -> str:
    path = folder_paths.get_full_path(folder, name) if name else None
    if path is None:
        raise WeightFileError(
            f"{what} '{name}' not found. Put {expected} into one of the '{folder}' model folders "
            f"{folder_paths.get_folder_paths(folder)} (or add a '{folder}:' entry to extra_model_paths.yaml) "
            "and refresh." + (f" {way_out}" if way_out else ""))
    return path


def sam_model_choices() -> list:
    return _weight_files(folder_paths.get_filename_list(SAM_FOLDER))


def grounding_dino_choices() -> list:
    # The BERT folder's weights sit inside a grounding-dino folder; they are no detector.
    return [name for name in _weight_files(folder_paths.get_filename_list(GROUNDING_DINO_FOLDER))
            if segmentation.BERT_FOLDER not in name.replace("\\", "/").split("/")[:-1]]


def sam_model_path(name: str) -> str:
    return _model_file(SAM_FOLDER, name, "SAM checkpoint", segmentation.SAM_SOURCE, segmentation.DRAWN_MASK_WAY_OUT)


def grounding_dino_path(name: str) -> str:
    return _model_file(GROUNDING_DINO_FOLDER, name, "Grounding DINO checkpoint", segmentation.GROUNDING_DINO_SOURCE,
                       segmentation.DRAWN_MASK_WAY_OUT)


def bert_folder_for(checkpoint_path: str) -> str:
    """The 'bert-base-uncased' folder beside the checkpoint, else in any grounding-dino folder,
    else models/bert-base-uncased (where other segmentation packs keep it)."""
    places = [os.path.dirname(checkpoint_path)] + folder_paths.get_folder_paths(GROUNDING_DINO_FOLDER) + [folder_paths.models_dir]
    candidates = list(dict.fromkeys(os.path.join(place, segmentation.BERT_FOLDER) for place in places))
    for folder in candidates:
        if os.path.isdir(folder):
            segmentation.check_bert_folder(folder)
            return folder
    raise WeightFileError(segmentation.missing_bert_message(candidates))


def input_image_size(name) -> tuple | None:
    """(width, height) of an image of ComfyUI's input folder as LoadImage will load it (EXIF rotation
    applied), read from its header only; None when it cannot be told (no such file, not an image)."""
    try:
        from PIL import Image
        path = folder_paths.get_annotated_filepath(str(name))
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception:   # LoadImage reports a file it cannot read itself
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
