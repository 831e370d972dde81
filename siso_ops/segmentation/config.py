"""Reading SubjectMask's files safely: the detector / segmenter checkpoints (tensors and plain
data only), Grounding DINO's ``.cfg.py`` parsed as data with ``ast`` and never executed, and the
local BERT folder its text encoder loads from (nothing is downloaded)."""
from __future__ import annotations

import ast
import importlib.util
import os

from ..packages import PACK_FOLDER, install_command, installed
from ..weights import WeightFileError, read_checkpoint as read_state

BERT_FOLDER = "bert-base-uncased"
BERT_SOURCE = "https://huggingface.co/google-bert/bert-base-uncased"
BERT_REQUIRED = ("config.json", "vocab.txt")
BERT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
BERT_TOKENIZER = ("tokenizer.json", "tokenizer_config.json")
GROUNDING_DINO_SOURCE = (
    "groundingdino_swint_ogc.pth from https://github.com/IDEA-Research/GroundingDINO/releases "
    "(or https://huggingface.co/ShilongLiu/GroundingDINO) with GroundingDINO_SwinT_OGC.cfg.py beside it")
SAM_SOURCE = ("sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or sam_vit_h_4b8939.pth from "
              "https://github.com/facebookresearch/segment-anything#model-checkpoints")
# The way out without SubjectMask's files: the mask it makes can be drawn by hand instead.
DRAWN_MASK_WAY_OUT = ("Without these files, draw the mask by hand instead of using SISO Subject Mask: open the photo "
                      "in Load Image's mask editor (right-click > Open in MaskEditor), paint the subject and connect "
                      "Load Image's MASK where SISO Subject Mask's mask went (template siso_subject_swap_drawn_mask).")
# The file that installs Grounding DINO's package, in the pack's folder.
SUBJECT_MASK_REQUIREMENTS = os.path.join(PACK_FOLDER, "requirements-subject-mask.txt")
# Community pairs of checkpoint and config file names (as other ComfyUI packs expect them).
KNOWN_CONFIGS = {"groundingdino_swint_ogc": "GroundingDINO_SwinT_OGC.cfg.py",
                 "groundingdino_swinb_cogcoor": "GroundingDINO_SwinB.cfg.py"}
# The configs inside the groundingdino package, by the Swin backbone's embedding width.
SHIPPED_CONFIGS = {96: "GroundingDINO_SwinT_OGC.py", 128: "GroundingDINO_SwinB_cfg.py"}
SWIN_PATCH_KEY = "backbone.0.patch_embed.proj.weight"


def read_checkpoint(path: str, what: str) -> dict:
    """A detector/segmenter checkpoint (``what``: "SAM" or "Grounding DINO"). Training scripts of
    the DETR family store their argparse.Namespace beside the weights: a plain attribute bag, the
    one class allowed."""
    import argparse
    source = {"SAM": SAM_SOURCE, "Grounding DINO": GROUNDING_DINO_SOURCE}.get(what)
    return read_state(path, what, allowed=(argparse.Namespace,), source=source)


def read_config(path: str) -> dict:
    """Values of a Python-syntax config file, read as DATA: only top-level ``name = value`` lines
    whose value is a literal (numbers, strings, lists, dicts, True/False/None) are accepted; the
    file is parsed, never executed. Anything else refuses the whole file."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), filename=name)
    except (OSError, SyntaxError, ValueError) as error:
        raise WeightFileError(f"config {path} could not be parsed: {error}") from error
    values, refused = {}, []
    for node in tree.body:
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target, value = node.target.id, node.value
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        if target is None:
            refused.append(f"line {node.lineno}: {_statement_kind(node)}")
            continue
        try:
            values[target] = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            refused.append(f"line {node.lineno}: '{target} = ...' is not a plain value")
    if refused:
        raise WeightFileError(
            f"config {name} is read as data and never run, so only lines of the form `name = value` with plain "
            f"values (numbers, strings, lists, True/False/None) are allowed; refused: {'; '.join(refused[:6])}. "
            f"Use the config published with the checkpoint, or delete {name} to use the values the "
            "groundingdino package ships.")
    return values


def _statement_kind(node) -> str:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return "an import"
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        return "a function call"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        return "a definition"
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        return "an assignment to something other than a plain name"
    return f"a {type(node).__name__} statement"


def grounding_dino_package_missing() -> str | None:
    """What to do where the groundingdino-py package is not installed (None where it is).
    requirements.txt leaves it out on purpose (requirements-subject-mask.txt says why), so a user
    who installed the pack meets this before their first found mask."""
    if installed("groundingdino"):
        return None
    return ("SISO Subject Mask finds the subject with Grounding DINO, and its package (groundingdino-py) is not "
            "installed in ComfyUI's Python: the pack's requirements.txt leaves it out because it changes packages "
            "other packs share (supervision, opencv-python, possibly numpy). To install it, run "
            f"{install_command(os.path.basename(SUBJECT_MASK_REQUIREMENTS))} with ComfyUI's own Python (on Windows "
            "with a Chinese, Japanese or Korean locale, set PYTHONUTF8=1 first), then restart ComfyUI. Or connect "
            "ComfyUI's own SAM3 to sam3_model and sam3_clip (no package needed). " + DRAWN_MASK_WAY_OUT)


def shipped_config_path(file_name: str) -> str:
    """A config inside the installed groundingdino package, found without importing it."""
    missing = grounding_dino_package_missing()
    if missing:
        raise WeightFileError(missing)
    spec = importlib.util.find_spec("groundingdino")
    return os.path.join(list(spec.submodule_search_locations)[0], "config", file_name)


def config_path_for(checkpoint_path: str) -> str | None:
    """The config file beside a checkpoint: '<name>.cfg.py', or the community name of its pair."""
    folder = os.path.dirname(checkpoint_path)
    stem = os.path.splitext(os.path.basename(checkpoint_path))[0]
    for name in (f"{stem}.cfg.py", KNOWN_CONFIGS.get(stem.lower())):
        if name and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def grounding_dino_config(checkpoint_path: str, state_dict: dict) -> tuple:
    """(config values, where they came from) for a checkpoint: its own config file over the
    keys of the shipped SwinT config, or the shipped config matching its backbone width."""
    base = read_config(shipped_config_path(SHIPPED_CONFIGS[96]))
    path = config_path_for(checkpoint_path)
    if path is not None:
        return {**base, **read_config(path)}, os.path.basename(path)
    width = int(state_dict[SWIN_PATCH_KEY].shape[0]) if SWIN_PATCH_KEY in state_dict else None
    if width not in SHIPPED_CONFIGS:
        raise WeightFileError(
            f"no config found for {os.path.basename(checkpoint_path)}: put its .cfg.py beside it "
            f"({' or '.join(KNOWN_CONFIGS.values())}, or {os.path.splitext(os.path.basename(checkpoint_path))[0]}.cfg.py)")
    shipped = shipped_config_path(SHIPPED_CONFIGS[width])
    return {**base, **read_config(shipped)}, f"{SHIPPED_CONFIGS[width]} (shipped with groundingdino)"


def check_bert_folder(folder: str):
    """A local copy of BERT for Grounding DINO's text encoder: raise naming what is missing."""
    if not os.path.isdir(folder):
        raise WeightFileError(missing_bert_message([folder]))
    missing = [f for f in BERT_REQUIRED if not os.path.isfile(os.path.join(folder, f))]
    if not any(os.path.isfile(os.path.join(folder, f)) for f in BERT_WEIGHTS):
        missing.append(" or ".join(BERT_WEIGHTS))
    if missing:
        raise WeightFileError(
            f"the BERT folder {folder} lacks {', '.join(missing)}. Put the files of {BERT_SOURCE} there "
            f"({', '.join(BERT_REQUIRED + BERT_TOKENIZER + BERT_WEIGHTS[:1])}); nothing is downloaded. {DRAWN_MASK_WAY_OUT}")


def missing_bert_message(looked_in: list) -> str:
    return (f"Grounding DINO needs its BERT text encoder in a local folder named '{BERT_FOLDER}' and none was found "
            f"(looked for {', '.join(looked_in)}). Create one, e.g. {looked_in[0]}, with the files of {BERT_SOURCE}: "
            f"{', '.join(BERT_REQUIRED + BERT_TOKENIZER + BERT_WEIGHTS[:1])}. Nothing is downloaded. {DRAWN_MASK_WAY_OUT}")
