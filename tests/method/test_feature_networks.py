"""The similarity-network loaders: published formats accepted (random values), wrong files
refused with a message that names the file; the IR tower equals an independent OpenCLIP-style
forward written here with torch.nn.MultiheadAttention."""
import argparse
import os

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import siso_ops.feature_networks as fn

from . import network_files as tiny


def save(tmp_path, name, sd):
    path = os.path.join(tmp_path, name)
    if name.endswith(".safetensors"):
        safetensors.torch.save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("meta_format,name", [(True, "dinov2_vitl14_pretrain.pth"), (False, "dinov2_vitl14.safetensors")])
def test_dino_loads_meta_and_timm_layouts_with_every_key_used(tmp_path, meta_format, name):
    sd = tiny.dino_state_dict(meta_format=meta_format)
    with torch.inference_mode(False):
        net = fn.load_dino(save(tmp_path, name, sd))
        own = net.module.state_dict()
        assert torch.equal(own["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
        assert torch.equal(own["blocks.0.ls1.gamma"], sd["blocks.0.ls1.gamma"])
        emb = net.embed(torch.rand(1, 3, 512, 384))
    assert emb.shape == (1, 128)  # CLS after the final norm, width of the file


def test_dino_module_prefix_is_accepted(tmp_path):
    sd = {f"module.{k}": v for k, v in tiny.dino_state_dict().items()}
    with torch.inference_mode(False):
        assert fn.load_dino(save(tmp_path, "d.pth", sd)).image_size == 518


@pytest.mark.parametrize("wrap", ["authors", "authors_module", "authors_nested_module", "openclip_visual"])
def test_ir_loads_the_published_layout_and_matches_an_openclip_style_reference(tmp_path, wrap):
    """The authors' file is their wrapper's state dict (backbone.*, fc1.*, fc2.*), saved from a
    DataParallel / DDP model or not (their loader cuts each key up to its last 'module.');
    OpenCLIP's own 'visual.' naming is accepted too."""
    tower = "visual." if wrap == "openclip_visual" else "backbone."
    sd = tiny.ir_state_dict(tower=tower)
    prefix = {"authors_module": "module.", "authors_nested_module": "module.module."}.get(wrap, "")
    with torch.inference_mode(False):
        net = fn.load_ir(save(tmp_path, "ir_features.pth", {prefix + k: v for k, v in sd.items()}))
        x = torch.randn(2, 3, 290, 290)
        ours = net.module(x)
    assert ours.shape == (2, 64)
    # The same float32 operations in another order (timm's fused qkv vs MultiheadAttention):
    # differences are a few float32 roundings of values of order 1.
    torch.testing.assert_close(ours, reference_ir_forward(sd, x, depth=2, heads=2, tower=tower), rtol=1e-4, atol=1e-5)


def reference_ir_forward(sd, x, depth, heads, tower="backbone."):
    """OpenCLIP VisionTransformer forward (pre-norm, no patch bias) with stride 12, then fc1."""
    t = lambda name: sd[tower + name]
    width = t("class_embedding").shape[0]
    tokens = F.conv2d(x, t("conv1.weight"), stride=12)             # B, W, 24, 24
    tokens = tokens.flatten(2).transpose(1, 2)
    cls = t("class_embedding").expand(x.shape[0], 1, width)
    h = torch.cat([cls, tokens], dim=1) + t("positional_embedding")
    h = F.layer_norm(h, (width,), t("ln_pre.weight"), t("ln_pre.bias"))
    for i in range(depth):
        p = f"transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({"in_proj_weight": t(p + "attn.in_proj_weight"), "in_proj_bias": t(p + "attn.in_proj_bias"),
                              "out_proj.weight": t(p + "attn.out_proj.weight"), "out_proj.bias": t(p + "attn.out_proj.bias")})
        y = F.layer_norm(h, (width,), t(p + "ln_1.weight"), t(p + "ln_1.bias"))
        h = h + attn(y, y, y, need_weights=False)[0]
        y = F.layer_norm(h, (width,), t(p + "ln_2.weight"), t(p + "ln_2.bias"))
        y = F.linear(F.gelu(F.linear(y, t(p + "mlp.c_fc.weight"), t(p + "mlp.c_fc.bias"))),
                     t(p + "mlp.c_proj.weight"), t(p + "mlp.c_proj.bias"))
        h = h + y
    pooled = F.layer_norm(h[:, 0], (width,), t("ln_post.weight"), t("ln_post.bias")) @ t("proj")
    return F.linear(pooled, sd["fc1.weight"], sd["fc1.bias"])


def test_ir_file_written_by_an_openclip_wrapper_loads_and_matches_its_forward(tmp_path):
    """The real writer: OpenCLIP's own VisionTransformer (small width, the IR geometry: stride-12
    patches, 577 positions) inside a wrapper with the authors' fields (backbone, fc1, fc2), its
    state_dict() saved as torch.save does, loaded by the pack and compared with OpenCLIP's forward."""
    import open_clip.model as open_clip_model  # tests/requirements.txt
    torch.manual_seed(0)
    with torch.inference_mode(False):
        cfg = open_clip_model.CLIPVisionCfg(layers=2, width=160, head_width=80, patch_size=14, image_size=290)
        tower = open_clip_model._build_vision_tower(32, cfg)
        tower.conv1.stride = (12, 12)
        tower.positional_embedding = torch.nn.Parameter(torch.randn(577, 160) * 0.02)
        tower.grid_size = (24, 24)
        wrapper = torch.nn.Module()
        wrapper.backbone, wrapper.fc1 = tower, torch.nn.Linear(32, 64)
        wrapper.fc2 = torch.nn.Module()
        wrapper.fc2.weight = torch.nn.Parameter(torch.randn(10, 64))  # the margin head's one tensor
        for p in wrapper.parameters():
            p.data.add_(torch.randn_like(p) * 0.02)  # nothing left at an init value of 0 or 1
        path = os.path.join(tmp_path, "ir_features.pth")
        torch.save({f"module.{k}": v for k, v in wrapper.state_dict().items()}, path)
        net = fn.load_ir(path)
        x = torch.randn(2, 3, 290, 290)
        with torch.no_grad():
            expected = wrapper.fc1(tower(x))
            ours = net.module(x)
    assert all(k.startswith(("backbone.", "fc1.", "fc2.")) for k in wrapper.state_dict())
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_ir_safetensors_without_fc2_is_accepted(tmp_path):
    with torch.inference_mode(False):
        net = fn.load_ir(save(tmp_path, "ir.safetensors", tiny.ir_state_dict(with_fc2=False)))
    assert net.image_size == 290


@pytest.mark.parametrize("mutate,message", [
    (lambda sd: sd.pop("fc1.weight"), "missing"),
    (lambda sd: sd.pop("backbone.transformer.resblocks.1.mlp.c_fc.bias"), "missing keys"),
    (lambda sd: sd.__setitem__("backbone.positional_embedding", torch.zeros(401, 160)), "position entries"),
    (lambda sd: sd.__setitem__("backbone.extra_head.weight", torch.zeros(3)), "unexpected"),
    (lambda sd: sd.__setitem__("classifier.weight", torch.zeros(3)), "does not use"),
    (lambda sd: sd.__setitem__("fc1.weight", torch.zeros(128, 32)), "fc1 has shape"),
    (lambda sd: sd.__setitem__("visual.proj", torch.zeros(160, 32)), "twice"),
])
def test_ir_rejects_wrong_files_with_the_file_name(tmp_path, mutate, message):
    sd = tiny.ir_state_dict()
    mutate(sd)
    with pytest.raises(fn.WeightFileError, match=message) as error, torch.inference_mode(False):
        fn.load_ir(save(tmp_path, "broken_ir.pth", sd))
    assert "broken_ir.pth" in str(error.value)


def test_a_dino_file_in_the_ir_slot_and_vice_versa_is_refused(tmp_path):
    dino = save(tmp_path, "dino.safetensors", tiny.dino_state_dict(meta_format=False))
    ir = save(tmp_path, "ir.pth", tiny.ir_state_dict())
    with torch.inference_mode(False):
        # The refusal names the keys it wanted in the authors' naming and what the file holds.
        with pytest.raises(fn.WeightFileError, match=r"not an IR .*backbone\.conv1\.weight.*'blocks\.'"):
            fn.load_ir(dino)
        with pytest.raises(fn.WeightFileError, match="not a DINOv2"):
            fn.load_dino(ir)


def test_dino_with_a_missing_block_key_is_refused(tmp_path):
    sd = tiny.dino_state_dict()
    sd.pop("blocks.0.ls2.gamma")
    with pytest.raises(fn.WeightFileError, match="missing keys"), torch.inference_mode(False):
        fn.load_dino(save(tmp_path, "dino.pth", sd))


def test_pickles_with_objects_are_refused_by_weights_only(tmp_path):
    path = os.path.join(tmp_path, "evil.pth")
    torch.save({"visual.conv1.weight": torch.zeros(1), "payload": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(fn.WeightFileError, match="weights_only=True"):
        fn.read_state_dict(path)


def test_a_missing_file_is_reported(tmp_path):
    with pytest.raises(fn.WeightFileError, match="not found"):
        fn.read_state_dict(os.path.join(tmp_path, "nope.pth"))
