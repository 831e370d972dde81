"""The two similarity networks SISO scores against, built with timm and loaded from the
published checkpoint formats, strictly.

- DINOv2 ViT-L/14 (timm ``vit_large_patch14_dinov2``), CLS token after the final norm, input
  518 px. Accepted files: timm's own ``model.safetensors`` (hub repo
  ``timm/vit_large_patch14_dinov2.lvd142m``) and Meta's ``dinov2_vitl14_pretrain.pth``.
- IR: the image-retrieval tower of the 1st-place Google Universal Image Embedding solution:
  OpenCLIP ViT-H/14 vision tower at 290 px whose patch convolution has stride 12 (24 x 24
  overlapping patches + CLS = 577 tokens), ``ln_post(CLS) @ proj`` (1024-d), then the
  ``fc1`` head 1024 -> 64. Accepted file: the authors' ``ir_features.pth``, the state dict of
  their wrapper module (``add_layer_model`` in SISO's ``utils/ir_features_utils.py``: fields
  ``backbone`` = the OpenCLIP visual tower, ``fc1``, ``fc2``), which their code loads strictly
  after cutting each key up to its last ``module.``. So its keys are ``backbone.conv1.weight``,
  ``backbone.transformer.resblocks.N...``, ``backbone.proj``, ``fc1.*``, ``fc2.weight``
  (``fc2`` is the unused margin head and is ignored). The same tensors under OpenCLIP's
  ``visual.`` prefix, and either as ``.safetensors``, are accepted too.

Widths and depths are read from the file (so small test networks in the same format load
through the same code); everything that defines the published geometry (patch size, stride,
token count, head size) is checked and a mismatch is reported with the file name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from .packages import install_command, installed
from .weights import WeightFileError, block_count, load_exactly, read_checkpoint  # noqa: F401  (WeightFileError: re-exported)

DINO_IMAGE_SIZE = 518
DINO_PATCH = 14
DINO_HEAD_DIM = 64
IR_IMAGE_SIZE = 290
IR_PATCH = 14
IR_STRIDE = 12
IR_HEAD_DIM = 80
IR_EMBED_DIM = 64

DINO_SOURCE = ("https://huggingface.co/timm/vit_large_patch14_dinov2.lvd142m (model.safetensors) "
               "or Meta's dinov2_vitl14_pretrain.pth from https://github.com/facebookresearch/dinov2")
IR_SOURCE = ("the ir_features.pth file of the SISO authors' setup (Kaggle dataset of the 1st-place "
             "Google Universal Image Embedding solution, linked from https://github.com/yairshp/SISO); "
             "it must be downloaded and placed by hand")
# The way out without one of the two files: its weight at 0 skips that network, and the other one
# judges alone. What that costs, from the paper's ablation (arXiv 2503.16025, Table 5, "Ablation for
# image editing"; the figures its text gives): the DINO + IR ensemble "enhances identity preservation
# with only slightly reduced background consistency (LPIPS: 0.12 vs. 0.14)", SISO's own editing
# LPIPS being 0.14 (Table 3). No figure for IR alone or for generation is given.
ABLATION_COST = ("what it costs, per the paper's ablation (Table 5, image editing): DINO and IR together preserve "
                 "the subject's identity better than one network alone, whose background is slightly better kept "
                 "(LPIPS 0.12 against 0.14, lower is better)")
IR_WAY_OUT = f"No IR file? Set ir_weight to 0 and SISO judges the subject by DINOv2 alone; {ABLATION_COST}."
DINO_WAY_OUT = f"No DINOv2 file? Set dino_weight to 0 and SISO judges the subject by the IR network alone; {ABLATION_COST}."


DINO_ROLE = "DINOv2 ViT-L/14"
IR_ROLE = "IR ViT-H/14 + fc1"


def read_state_dict(path: str, what: str = "similarity network", source: str | None = None) -> dict:
    """Tensors of a .safetensors or .pth/.pt/.bin file; pickles only with weights_only=True.
    ``what`` and ``source`` name the file's role and the published file in messages."""
    return read_checkpoint(path, what, source=source)


def _strip_prefix(state_dict: dict, prefix: str) -> dict:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _holds_layers(module: torch.nn.Module) -> bool:
    return any(next(child.parameters(recurse=False), None) is not None for child in module.children())


def check_before_blocks(module: torch.nn.Module, check: Callable[[], None]) -> list:
    """Call ``check()`` before each block of ``module`` runs; ``check`` raises to cancel. A block
    is any submodule that holds weighted layers itself (a transformer block, its attention and
    MLP, a ResNet block, an upsampler), found from the structure, so no class names are listed.
    Returns the hook handles: ``handle.remove()`` each to take the checks off again."""
    def before(_module, _args):
        check()
    return [block.register_forward_pre_hook(before) for block in module.modules() if _holds_layers(block)]


@dataclass
class FeatureNetwork:
    """A frozen embedding network with its input geometry."""
    module: torch.nn.Module
    image_size: int
    mean: tuple
    std: tuple
    name: str
    interrupt_hooks: list = field(default_factory=list, repr=False, compare=False)
    interrupt_check: Callable | None = field(default=None, repr=False, compare=False)
    # compiled forwards kept across runs (compiled.py): key -> torch.compile'd module, and the one in use
    compiled: dict = field(default_factory=dict, repr=False, compare=False)
    active: Callable | None = field(default=None, repr=False, compare=False)

    @property
    def role(self) -> str:
        return self.name.split(" ")[0]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        from .preprocess import prepare_for_network
        x = prepare_for_network(images, self.image_size, self.mean, self.std)
        x = x.to(next(self.module.parameters()).dtype)
        if self.active is None:
            return self.module(x)
        if self.interrupt_check is not None:   # once per call: the compiled blocks cannot check
            self.interrupt_check()
        # the reference photos' embeddings (no gradient, once per run) stay eager: a no-grad call
        # would compile a second graph for one use
        return self.active(x) if torch.is_grad_enabled() else self.module(x)

    def use_compiled(self, key):
        """Run the compiled forward stored under ``key`` from now on (None: the eager module). The
        per-block Cancel hooks come off while compiled (torch.compile cannot trace the check)."""
        self.active = None if key is None else self.compiled[key]
        self._hook_blocks()

    def to(self, *args, **kwargs):
        self.module.to(*args, **kwargs)
        return self

    def set_checkpointing(self, enable: bool):
        """Recompute each transformer block in backward instead of keeping its activations."""
        self.module.set_grad_checkpointing(enable)

    def set_interrupt_check(self, check: Callable[[], None] | None):
        """From now on call ``check()`` (which raises to cancel: ComfyUI's Cancel) before every
        transformer block, its attention and its MLP run, in forward passes and in the
        recomputation of gradient checkpointing; ``None`` takes the checks off (at the end of a
        run, so a cached network keeps no hook of a finished run). A compiled network checks once
        per call instead (use_compiled)."""
        self.interrupt_check = check
        self._hook_blocks()

    def _hook_blocks(self):
        for handle in self.interrupt_hooks:
            handle.remove()
        eager = self.active is None
        self.interrupt_hooks = check_before_blocks(self.module, self.interrupt_check) \
            if eager and self.interrupt_check is not None else []

    def __repr__(self):
        return f"FeatureNetwork({self.name}, {self.image_size}px)"


def timm_missing() -> str | None:
    """What to do where timm, which builds both networks, is not installed (None where it is)."""
    if installed("timm"):
        return None
    return ("SISO's similarity networks (DINOv2 and the image-retrieval network) are built with timm, which is not "
            f"installed in ComfyUI's Python. Run {install_command('requirements.txt')} with ComfyUI's own "
            "Python (the one that starts ComfyUI), then restart ComfyUI.")


def require_timm() -> None:
    missing = timm_missing()
    if missing:
        raise WeightFileError(missing)


def load_dino(path: str) -> FeatureNetwork:
    require_timm()
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD

    sd = _strip_prefix(read_state_dict(path, DINO_ROLE, DINO_SOURCE), "module.")
    name = os.path.basename(path)
    if "cls_token" not in sd or "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        raise WeightFileError(f"{name} is not a DINOv2 ViT checkpoint (no cls_token / pos_embed / "
                              f"patch_embed.proj.weight). Expected {DINO_SOURCE}.")
    width = sd["cls_token"].shape[-1]
    depth = block_count(sd, r"blocks\.(\d+)\.")
    tokens = (DINO_IMAGE_SIZE // DINO_PATCH) ** 2 + 1
    if sd["patch_embed.proj.weight"].shape[-1] != DINO_PATCH or sd["pos_embed"].shape[-2] != tokens:
        raise WeightFileError(
            f"{name}: patch size {sd['patch_embed.proj.weight'].shape[-1]} and "
            f"{sd['pos_embed'].shape[-2]} position entries do not match DINOv2 ViT-/14 at 518 px "
            f"({DINO_PATCH}, {tokens}). Expected {DINO_SOURCE}.")
    if width % DINO_HEAD_DIM:
        raise WeightFileError(f"{name}: width {width} is not a multiple of DINOv2's head size 64")
    model = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=DINO_IMAGE_SIZE,
                              embed_dim=width, depth=depth, num_heads=width // DINO_HEAD_DIM,
                              num_classes=0)
    converted = checkpoint_filter_fn(dict(sd), model)
    load_exactly(model, converted, os.path.basename(path), "DINOv2 ViT/14", DINO_SOURCE)
    model.eval().requires_grad_(False)
    return FeatureNetwork(model, DINO_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, f"DINOv2 {name}")


class IRNetwork(torch.nn.Module):
    """OpenCLIP ViT-H/14 tower with stride-12 patches and the 1024 -> 64 ``fc1`` head."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.fc1 = head

    def forward(self, x):
        return self.fc1(self.backbone(x))

    def set_grad_checkpointing(self, enable: bool = True):
        self.backbone.set_grad_checkpointing(enable)

    @property
    def grad_checkpointing(self) -> bool:
        return self.backbone.grad_checkpointing


def _build_ir_backbone(width: int, depth: int, proj_dim: int):
    import timm
    model = timm.create_model("vit_huge_patch14_clip_224", pretrained=False, img_size=IR_IMAGE_SIZE,
                              embed_dim=width, depth=depth, num_heads=width // IR_HEAD_DIM,
                              num_classes=proj_dim)
    grid = (IR_IMAGE_SIZE - IR_PATCH) // IR_STRIDE + 1
    # Overlapping patches: same 14 px kernel, stride 12 -> a 24 x 24 grid (577 tokens with CLS).
    model.patch_embed.proj.stride = (IR_STRIDE, IR_STRIDE)
    model.patch_embed.grid_size = (grid, grid)
    model.patch_embed.num_patches = grid * grid
    model.pos_embed = torch.nn.Parameter(torch.zeros(1, grid * grid + 1, width))
    return model


def ir_canonical_keys(state_dict: dict, name: str) -> dict:
    """The IR tensors under one naming: each key cut up to its last ``module.`` (as the authors'
    loader does, so DataParallel and DDP wrappers at any depth go), and the tower's keys under
    OpenCLIP's ``visual.`` whether the file says ``backbone.`` (the authors' wrapper) or
    ``visual.`` (an OpenCLIP model's own state dict)."""
    cut = {}
    for key, value in state_dict.items():
        key = key.split("module.")[-1]
        if key.startswith("backbone."):
            key = "visual." + key[len("backbone."):]
        if key in cut:
            raise WeightFileError(f"{name} holds the IR tensor '{key}' twice (under backbone. and visual., or with and "
                                  f"without module.); expected {IR_SOURCE}")
        cut[key] = value
    return cut


def load_ir(path: str) -> FeatureNetwork:
    require_timm()
    from timm.models.vision_transformer import _convert_openai_clip
    from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    name = os.path.basename(path)
    sd = ir_canonical_keys(read_state_dict(path, IR_ROLE, IR_SOURCE), name)
    required = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                "visual.proj", "fc1.weight", "fc1.bias")
    absent = [k for k in required if k not in sd]
    if absent:
        found = sorted({k.split(".")[0] + "." for k in sd})
        raise WeightFileError(f"{name} is not an IR (OpenCLIP ViT-H/14 + fc1) checkpoint: missing "
                              f"{[k.replace('visual.', 'backbone.', 1) for k in absent]}; its keys start with "
                              f"{found[:6]}. Expected {IR_SOURCE}.")
    width = sd["visual.class_embedding"].shape[-1]
    depth = block_count(sd, r"visual\.transformer\.resblocks\.(\d+)\.")
    proj_dim = sd["visual.proj"].shape[-1]
    grid = (IR_IMAGE_SIZE - IR_PATCH) // IR_STRIDE + 1
    if sd["visual.conv1.weight"].shape[-1] != IR_PATCH or sd["visual.positional_embedding"].shape[0] != grid * grid + 1:
        raise WeightFileError(
            f"{name}: patch size {sd['visual.conv1.weight'].shape[-1]} and "
            f"{sd['visual.positional_embedding'].shape[0]} position entries do not match the IR "
            f"tower (14 px patches, stride 12 at 290 px: {grid * grid + 1} positions). Expected {IR_SOURCE}.")
    if sd["fc1.weight"].shape != (IR_EMBED_DIM, proj_dim):
        raise WeightFileError(f"{name}: fc1 has shape {tuple(sd['fc1.weight'].shape)}, expected "
                              f"({IR_EMBED_DIM}, {proj_dim}). Expected {IR_SOURCE}.")
    if width % IR_HEAD_DIM:
        raise WeightFileError(f"{name}: width {width} is not a multiple of ViT-H's head size 80")
    backbone = _build_ir_backbone(width, depth, proj_dim)
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    leftovers = [k for k in sd if not k.startswith(("visual.", "fc1.", "fc2."))]
    if leftovers:
        raise WeightFileError(f"{name} has keys the IR network does not use: {leftovers[:4]} (expected only "
                              "backbone.* or visual.*, fc1.* and fc2.*). "
                              f"Expected {IR_SOURCE}.")
    load_exactly(backbone, _convert_openai_clip(visual, backbone), os.path.basename(path), "IR ViT-H/14",
                 IR_SOURCE)
    head = torch.nn.Linear(proj_dim, IR_EMBED_DIM)
    head.load_state_dict({"weight": sd["fc1.weight"], "bias": sd["fc1.bias"]}, strict=True)
    model = IRNetwork(backbone, head).eval().requires_grad_(False)
    return FeatureNetwork(model, IR_IMAGE_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, f"IR {name}")
