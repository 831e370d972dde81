"""The similarity-network loaders: published formats accepted (random values), wrong files
refused with a message that names the file; the IR tower equals an independent OpenCLIP-style
forward written here with torch.nn.MultiheadAttention."""
import argparse
import os

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import tiny
from conftest import siso

fn = siso("siso_ops.feature_networks")


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


def test_ir_loads_the_published_layout_and_matches_an_openclip_style_reference(tmp_path):
    sd = tiny.ir_state_dict(module_prefix=True)
    with torch.inference_mode(False):
        net = fn.load_ir(save(tmp_path, "ir_features.pth", sd))
        x = torch.randn(2, 3, 290, 290)
        ours = net.module(x)
    sd = {k[len("module."):]: v for k, v in sd.items()}
    assert ours.shape == (2, 64)
    torch.testing.assert_close(ours, reference_ir_forward(sd, x, depth=2, heads=2), rtol=1e-4, atol=1e-5)


def reference_ir_forward(sd, x, depth, heads):
    """OpenCLIP VisionTransformer forward (pre-norm, no patch bias) with stride 12, then fc1."""
    width = sd["visual.class_embedding"].shape[0]
    tokens = F.conv2d(x, sd["visual.conv1.weight"], stride=12)             # B, W, 24, 24
    tokens = tokens.flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, width)
    h = torch.cat([cls, tokens], dim=1) + sd["visual.positional_embedding"]
    h = F.layer_norm(h, (width,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(depth):
        p = f"visual.transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({"in_proj_weight": sd[p + "attn.in_proj_weight"], "in_proj_bias": sd[p + "attn.in_proj_bias"],
                              "out_proj.weight": sd[p + "attn.out_proj.weight"], "out_proj.bias": sd[p + "attn.out_proj.bias"]})
        y = F.layer_norm(h, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        h = h + attn(y, y, y, need_weights=False)[0]
        y = F.layer_norm(h, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                     sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        h = h + y
    pooled = F.layer_norm(h[:, 0], (width,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    return F.linear(pooled, sd["fc1.weight"], sd["fc1.bias"])


def test_ir_safetensors_without_fc2_is_accepted(tmp_path):
    with torch.inference_mode(False):
        net = fn.load_ir(save(tmp_path, "ir.safetensors", tiny.ir_state_dict(with_fc2=False)))
    assert net.image_size == 290


@pytest.mark.parametrize("mutate,message", [
    (lambda sd: sd.pop("fc1.weight"), "missing"),
    (lambda sd: sd.pop("visual.transformer.resblocks.1.mlp.c_fc.bias"), "missing keys"),
    (lambda sd: sd.__setitem__("visual.positional_embedding", torch.zeros(401, 160)), "position entries"),
    (lambda sd: sd.__setitem__("visual.extra_head.weight", torch.zeros(3)), "unexpected"),
    (lambda sd: sd.__setitem__("classifier.weight", torch.zeros(3)), "does not use"),
    (lambda sd: sd.__setitem__("fc1.weight", torch.zeros(128, 32)), "fc1 has shape"),
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
        with pytest.raises(fn.WeightFileError, match="not an IR"):
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
