"""Tiny random-weight SubjectMask model files in the community layouts (nothing here is trained):
- models/grounding-dino/groundingdino_swint_ogc.pth: ``{"model": state dict}`` with ``module.``
  prefixes, as the release is; the real Swin-T backbone (swin_T_224_1k), 1 encoder and 1 decoder
  layer, 30 queries;
- models/grounding-dino/GroundingDINO_SwinT_OGC.cfg.py: the config the groundingdino package
  ships, in its own format, with those values shrunk;
- models/grounding-dino/bert-base-uncased/: a 1-layer, 32-wide BERT with a 30-word vocabulary,
  saved by transformers (config.json, model.safetensors, vocab.txt, tokenizer files);
- models/sams/sam_vit_b_01ec64.pth: a SAM built by segment-anything's own builder with a
  32-wide, 2-block image encoder (the real file name, so workflows need no change).

Usage: ``write_segmentation_files(folder_paths.models_dir)`` -> the file names by input name.
"""
from __future__ import annotations

import os
import re

import torch

from conftest import siso

GROUNDING_DINO_FILE = "groundingdino_swint_ogc.pth"
GROUNDING_DINO_CONFIG = "GroundingDINO_SwinT_OGC.cfg.py"
SAM_FILE = "sam_vit_b_01ec64.pth"
BERT_FOLDER = "bert-base-uncased"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", ",", "a", "an", "the", "of", "in", "on", "with",
         "photo", "dog", "cat", "mug", "toy", "person", "red", "blue", "small", "big", "plush", "cup", "car", "bird", "tree"]
TINY_DETECTOR = {"enc_layers": 1, "dec_layers": 1, "num_queries": 30, "dim_feedforward": 64}
TINY_SAM = dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])


def write_bert_folder(folder: str, seed: int = 0) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(VOCAB) + "\n")
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(folder)
    # transformers 5 ignores a vocab_file passed to a tokenizer's constructor (every word becomes
    # [UNK]); loading the folder (config.json + vocab.txt) works, and saving adds the tokenizer files.
    AutoTokenizer.from_pretrained(folder, local_files_only=True).save_pretrained(folder)
    return folder


def shrunken_config_text() -> str:
    """The shipped SwinT_OGC config, line for line, with the detector's depth and queries shrunk."""
    segmentation = siso("siso_ops.segmentation")
    with open(segmentation.shipped_config_path("GroundingDINO_SwinT_OGC.py"), encoding="utf-8") as handle:
        text = handle.read()
    for name, value in TINY_DETECTOR.items():
        text, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", text, flags=re.M)
        assert count == 1, name
    return text


def write_grounding_dino(folder: str, seed: int = 0) -> str:
    segmentation = siso("siso_ops.segmentation")
    os.makedirs(folder, exist_ok=True)
    bert = os.path.join(folder, BERT_FOLDER)
    if not os.path.isdir(bert):
        write_bert_folder(bert, seed)
    config_path = os.path.join(folder, GROUNDING_DINO_CONFIG)
    with open(config_path, "w", encoding="utf-8") as handle:
        handle.write(shrunken_config_text())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = segmentation.build_grounding_dino(segmentation.read_config(config_path), bert)
    state = {f"module.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"model": state}, os.path.join(folder, GROUNDING_DINO_FILE))
    return GROUNDING_DINO_FILE


def tiny_sam_state_dict(seed: int = 0) -> dict:
    from segment_anything.build_sam import _build_sam
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _build_sam(**TINY_SAM).state_dict()


def write_sam(folder: str, seed: int = 0) -> str:
    os.makedirs(folder, exist_ok=True)
    torch.save(tiny_sam_state_dict(seed), os.path.join(folder, SAM_FILE))
    return SAM_FILE


def write_segmentation_files(models_dir: str) -> dict:
    """Write the tiny files into models_dir/grounding-dino and models_dir/sams; returns
    {"sam_model", "grounding_dino_model", "grounding_dino_config", "bert_folder"} names."""
    with torch.inference_mode(False):
        dino = write_grounding_dino(os.path.join(models_dir, "grounding-dino"))
        sam = write_sam(os.path.join(models_dir, "sams"))
    return {"sam_model": sam, "grounding_dino_model": dino, "grounding_dino_config": GROUNDING_DINO_CONFIG,
            "bert_folder": BERT_FOLDER}
