"""Issue 15 in-process: several reference photos, SISO Subject Score, warm start with SISO Load
LoRA, and LoRA files in the diffusers layout (checked against diffusers itself)."""
import json
import os

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F

import comfy.model_management
import folder_paths
import nodes as comfy_nodes
import tiny
from conftest import siso

host = siso("siso_ops.host")
gen = siso("siso_ops.generation")
optim = siso("siso_ops.optimize")
similarity = siso("siso_ops.similarity")
score_mod = siso("siso_ops.score")
lora_mod = siso("siso_ops.lora")
NODE = comfy_nodes.NODE_CLASS_MAPPINGS
SIZE = 64


def photos(seed, *sizes):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, h, w, generator=g) for h, w in sizes]


# ----------------------------------------------------------------------------- 1. several reference photos
def test_one_reference_photo_gives_bitwise_the_loss_of_before(tiny_networks):
    """The single-photo loss is the expression SISO always used: -cos(emb, target).mean()."""
    dino, ir = tiny_networks
    subject, = photos(1, (72, 96))
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        terms = similarity.SimilarityLoss(dino, ir, subject)(image)
        as_list = similarity.SimilarityLoss(dino, ir, [subject])(image)
        before = {}
        for name, net in (("dino", dino), ("ir", ir)):
            emb = net.embed(image)
            before[name] = -F.cosine_similarity(emb.float(), net.embed(subject).float().expand_as(emb), dim=-1).mean()
    assert torch.equal(terms["dino"], before["dino"]) and torch.equal(terms["ir"], before["ir"])
    assert torch.equal(terms["loss"], 1.0 * before["dino"] + 1.0 * before["ir"])
    assert all(torch.equal(terms[k], as_list[k]) for k in terms) and not any("@" in k for k in terms)


def test_several_reference_photos_of_mixed_sizes_give_the_mean_and_each_one(tiny_networks):
    dino, ir = tiny_networks
    refs = photos(3, (72, 96), (64, 40), (128, 128))
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        terms = similarity.SimilarityLoss(dino, ir, refs)(image)
        singles = [similarity.SimilarityLoss(dino, ir, r)(image) for r in refs]
    for name in ("dino", "ir"):
        each = torch.stack([s[name] for s in singles])
        torch.testing.assert_close(terms[name], each.mean(), rtol=0, atol=1e-6)   # float32 mean of 3 values
        for i in range(3):
            assert torch.equal(terms[f"{name}@{i + 1}"], singles[i][name])
    # the report names each photo's similarity at the best iteration
    history = [{k: float(v) for k, v in terms.items()}]
    result = optim.OptimizationResult(0, history[0]["loss"], image, {}, history, "max_iterations")
    assert "similarity per reference photo: DINO " in result.describe() and result.describe().count(" / ") == 4


def test_load_subject_chains_photos_of_other_sizes_each_with_its_mask():
    first = torch.rand(2, 72, 96, 3)
    second = torch.rand(1, 50, 40, 4)
    second[..., 3] = 0
    second[:, 10:30, 10:30, 3] = 1
    with torch.inference_mode():
        a, preview_a = NODE["LoadSubject"].execute(first, "subject", "white").args
        both, preview_b = NODE["LoadSubject"].execute(second, "subject", "gray", add_to=a).args
    assert len(a) == 2 and len(both) == 3
    assert [tuple(p.shape) for p in both.images] == [(1, 3, 72, 96), (1, 3, 72, 96), (1, 3, 50, 40)]
    assert preview_a.shape == (2, 72, 96, 3) and preview_b.shape == (1, 50, 40, 3)
    assert float(both.images[2][0, 0, 0, 0]) == 0.5      # its own background setting
    assert "gray background" in repr(both)


# ----------------------------------------------------------------------------- 2. subject score
def test_subject_score_ranks_the_subject_itself_first_and_matches_the_loss(tiny_networks):
    dino, ir = tiny_networks
    refs = photos(5, (64, 64), (64, 64))
    others = photos(6, (64, 64), (64, 64), (64, 64))
    batch = torch.cat([others[0], refs[1], others[1], others[2]])
    with torch.no_grad():
        scores = score_mod.score_images(batch, refs, dino, ir)
        loss = similarity.SimilarityLoss(dino, ir, refs)(batch[1:2])
    assert scores.best == 1 and scores.order[0] == 1
    # the score is the similarity SISO's loss maximises (minus the distance), per network
    torch.testing.assert_close(torch.tensor(scores.dino[1]), -loss["dino"], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(scores.ir[1]), -loss["ir"], rtol=0, atol=1e-6)
    assert sorted(scores.combined, reverse=True) == [scores.combined[i] for i in scores.order]
    table = scores.table().splitlines()
    assert table[0].startswith("rank | image") and table[1].startswith("1 | 1 |") and len(table) == 5


def test_subject_score_node_sorts_the_batch_and_skips_a_network_at_weight_0(feature_files, tiny_networks, monkeypatch):
    loads = []
    real_get = gen.networks.get
    monkeypatch.setattr(gen.networks, "get", lambda *a, **k: loads.append(a[0]) or real_get(*a, **k))
    refs = torch.rand(1, 64, 64, 3)
    images = torch.cat([torch.rand(2, 64, 64, 3), refs, torch.rand(1, 64, 64, 3)])
    with torch.inference_mode():
        subject = NODE["LoadSubject"].execute(refs, "subject", "white").args[0]
        dino, ir, table, best_first, best = NODE["SISOSubjectScore"].execute(
            images, subject, feature_files[0], feature_files[1], 1.0, 0.0).args[:5]
    assert best == 2 and torch.equal(best_first[0], images[2]) and best_first.shape == images.shape
    assert len(dino) == 4 and all(v != v for v in ir)    # IR skipped: NaN, and never loaded
    assert loads == ["dino"] and "| - |" in table
    assert not comfy.model_management.processing_interrupted()


def test_subject_score_gives_the_papers_diversity_after_its_earlier_outputs(feature_files):
    """The diversity figure (MSE of each image to the subject photo) is the last output, so saved
    workflows keep their links to the five outputs before it; the table shows it per row."""
    outputs = [o.display_name for o in NODE["SISOSubjectScore"].define_schema().outputs]
    assert outputs == ["dino", "ir", "table", "best_first", "best_index", "diversity"]
    refs = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    images = torch.cat([torch.full((1, 64, 64, 3), 0.5), refs])
    with torch.inference_mode():
        subject = NODE["LoadSubject"].execute(refs, "subject", "white").args[0]
        *_, table, _, _, diversity = NODE["SISOSubjectScore"].execute(
            images, subject, feature_files[0], feature_files[1], 1.0, 1.0).args[1:]
    photo = subject.images[0].permute(0, 2, 3, 1)
    assert diversity[1] == pytest.approx(float(((refs - photo) ** 2).mean()), abs=1e-7) and diversity[1] < 1e-4
    assert diversity[0] == pytest.approx(float(((0.5 - photo) ** 2).mean()), rel=1e-5) and diversity[0] > 0.05
    assert "MSE to subject (diversity)" in table.splitlines()[0]
    assert f"{diversity[0]:.4f}" in table


# ----------------------------------------------------------------------------- 3. warm start
def _random_lora(model, rank=4, alpha=2.0, seed=9):
    trainable = host.TrainableModel(model, rank=rank, alpha=alpha, seed=seed)
    try:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for delta in trainable.deltas.values():
                delta.up.copy_(torch.randn(delta.up.shape, generator=g) * 0.05)
        return trainable.export()
    finally:
        trainable.unload()


def test_warm_start_iteration_0_is_the_stock_sampler_with_that_lora(sd15, subject, tiny_networks):
    model, vae, positive, negative = sd15
    tensors = _random_lora(model)
    initial = lora_mod.SubjectLoRA(tensors=tensors, rank=4, alpha=2.0, model=host.describe_model(model),
                                   best_iteration=0, iterations=1, best_loss=0.0, stop_reason="test")
    first = []
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=42, precision="fp32", alpha=4.0,
                                      optimization=optim.OptimizationSettings(max_iterations=1))
    with torch.inference_mode():
        gen.optimize_subject(model, vae, positive, subject, None, None, settings, feature_networks=tiny_networks,
                             on_iteration=lambda r: first.append(r.image), initial_lora=initial)
        with_lora = host.apply_lora(model, tensors, 1.0)
        latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
        stock = vae.decode(comfy_nodes.common_ksampler(with_lora, 42, 1, 1.0, "euler", "simple", positive, negative,
                                                       latent)[0]["samples"])
    # the run's alpha (4) differs from the file's (2): up is rescaled, the delta is the same
    torch.testing.assert_close(first[0].permute(0, 2, 3, 1), stock.float(), atol=2e-5, rtol=0)


def test_warm_start_refuses_another_rank_or_target(sd15, subject, tiny_networks):
    model, vae, positive, _ = sd15
    tensors = _random_lora(model, rank=4)
    initial = lora_mod.SubjectLoRA(tensors=tensors, rank=4, alpha=4.0, model="", best_iteration=0, iterations=1,
                                   best_loss=0.0, stop_reason="test")
    for overrides, message in (({"rank": 8}, "initial_lora has rank 4 but lora_rank is 8: set lora_rank to 4"),
                               ({"target": host.TARGETS[1]}, "initial_lora does not fit this run")):
        settings = gen.GenerationSettings(width=SIZE, height=SIZE, precision="fp32", **overrides,
                                          optimization=optim.OptimizationSettings(max_iterations=1))
        with torch.inference_mode(), pytest.raises(ValueError, match=message):
            gen.optimize_subject(model, vae, positive, subject, None, None, settings, feature_networks=tiny_networks,
                                 initial_lora=initial)


def _save(lora, name, file_format="comfyui"):
    with torch.inference_mode():
        return NODE["SaveSISOLoRA"].execute(lora, name, True, file_format).args[0]


def test_load_lora_round_trips_and_refuses_another_model_or_layout(sd15):
    model = sd15[0]
    tensors = _random_lora(model)
    lora = lora_mod.SubjectLoRA(tensors=tensors, rank=4, alpha=2.0, model=host.describe_model(model), best_iteration=3,
                                iterations=9, best_loss=-1.25, stop_reason="test", **host.subject_lora_layouts(model))
    name = _save(lora, "warm start test")
    with torch.inference_mode():
        loaded = NODE["LoadSISOLoRA"].execute(model, name).args[0]
    assert loaded.rank == 4 and loaded.alpha == 2.0 and loaded.best_iteration == 3 and loaded.best_loss == -1.25
    assert set(loaded.tensors) == set(tensors) and all(torch.equal(loaded.tensors[k], tensors[k]) for k in tensors)
    with torch.inference_mode(), pytest.raises(ValueError, match="does not fit .*SDXL.* layers are missing or shaped "
                                                               "differently .* made for another model"):
        NODE["LoadSISOLoRA"].execute(tiny.build_model("sdxl"), name)
    diffusers_name = _save(lora, "warm start test diffusers", "diffusers")
    with torch.inference_mode(), pytest.raises(ValueError, match=r"its layout is diffusers / PEFT"):
        NODE["LoadSISOLoRA"].execute(model, diffusers_name)


# ----------------------------------------------------------------------------- 4. file layouts
def _header(name):
    with safetensors.safe_open(os.path.join(host.lora_folder(), name), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_saved_files_carry_rank_alpha_model_and_best_iteration_in_the_header(sd15):
    model = sd15[0]
    lora = lora_mod.SubjectLoRA(tensors=_random_lora(model), rank=4, alpha=2.0, model=host.describe_model(model),
                                best_iteration=3, iterations=9, best_loss=-1.25, stop_reason="test",
                                **host.subject_lora_layouts(model))
    metadata, _ = _header(_save(lora, "header test"))
    assert metadata["siso.rank"] == "4" and metadata["siso.alpha"] == "2" and metadata["siso.best_iteration"] == "4"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora" and metadata["modelspec.title"] == "header test"
    assert "best iteration 4 of 9" in metadata["modelspec.description"]
    metadata, _ = _header(_save(lora, "header test d", "diffusers"))
    assert metadata["siso.format"] == "diffusers" and metadata["ss_network_alpha"] == "4"   # alpha / rank is in lora_B


def _diffusers_unet_like_tiny_sd15():
    diffusers = pytest.importorskip("diffusers")
    # the tiny SD1.5 of tests/tiny.py in diffusers' words: 32/64 channels, attention at both levels,
    # 4 heads, 768-wide context, convolutional proj_in/out
    return diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768, attention_head_dim=4,
        norm_num_groups=32, use_linear_projection=False)


def _comfy_patched_weight(model, tensors, key):
    """The weight ComfyUI's stock LoRA path (LoraLoaderModelOnly) gives a layer."""
    patched = host.apply_lora(model, tensors, 1.0)
    patched.patch_model()
    try:
        return patched.model.get_parameter(key).detach().clone()
    finally:
        patched.unpatch_model()


@pytest.mark.parametrize("target", [0, 1])
def test_diffusers_layout_of_an_sd15_lora_loads_in_diffusers_and_gives_comfyuis_layer_output(target):
    pytest.importorskip("peft")
    unet = _diffusers_unet_like_tiny_sd15()
    model = tiny.build_model("sd15", inference=False)
    tensors = _random_lora(model, rank=4, alpha=2.0) if target == 0 else None
    if tensors is None:
        trainable = host.TrainableModel(model, rank=4, alpha=2.0, target=host.TARGETS[1], seed=1)
        with torch.no_grad():
            for delta in trainable.deltas.values():
                delta.up.normal_(0, 0.05)
        tensors = trainable.export()
        trainable.unload()
    prefix, targets = host.diffusers_lora_targets(model)
    converted = lora_mod.to_diffusers(tensors, targets)   # every layer of both targets has a diffusers name
    assert len(converted) == 2 * len(lora_mod.lora_layers(tensors))
    modules = dict(unet.named_modules())
    for key, value in converted.items():
        module = modules[key[len(prefix):].rsplit(".lora_", 1)[0]]
        assert isinstance(module, torch.nn.Linear), key
        expected = (4, module.in_features) if ".lora_A." in key else (module.out_features, 4)
        assert tuple(value.shape) == expected, key
    unet.load_lora_adapter(converted, prefix=prefix.rstrip("."), adapter_name="siso")
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    comfy_key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    module = unet.get_submodule(layer)
    with torch.no_grad():
        module.base_layer.weight.copy_(model.model.get_parameter(comfy_key))
        x = torch.randn(2, 768, generator=torch.Generator().manual_seed(0))
        ours = F.linear(x, _comfy_patched_weight(model, tensors, comfy_key))
        theirs = module(x)
    # one 768-long dot product in float32 computed two ways (the delta added to the weight, or
    # run through A and B): rounding differences of a few ulp of the outputs' magnitude
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert (theirs - F.linear(x, module.base_layer.weight)).abs().max() > 1e-3   # the LoRA does act


def _flux_with_mlp_ratio_4():
    """diffusers' Flux has mlp ratio 4: a tiny ComfyUI Flux with the same (trainable tensors)."""
    cls, config, kind = tiny.FAMILIES["flux_schnell"]
    tiny.FAMILIES["flux_ratio4"] = (cls, dict(config, mlp_ratio=4.0), kind)
    try:
        return tiny.build_model("flux_ratio4", inference=False)
    finally:
        del tiny.FAMILIES["flux_ratio4"]


def test_diffusers_layout_of_a_flux_lora_splits_the_fused_layers_and_loads_in_diffusers():
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    model = _flux_with_mlp_ratio_4()
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
    tensors = _random_lora(model, rank=4, alpha=4.0)
    prefix, targets = host.diffusers_lora_targets(model)
    converted = lora_mod.to_diffusers(tensors, targets)
    assert prefix == "transformer."
    for part in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        assert f"transformer.transformer_blocks.0.attn.{part}.lora_B.weight" in converted
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in converted
    modules = dict(transformer.named_modules())
    for key, value in converted.items():
        module = modules[key[len(prefix):].rsplit(".lora_", 1)[0]]
        expected = (4, module.in_features) if ".lora_A." in key else (module.out_features, 4)
        assert tuple(value.shape) == expected, key
    transformer.load_lora_adapter(converted, prefix="transformer", adapter_name="siso")
    module = transformer.get_submodule("transformer_blocks.0.attn.to_k")
    comfy_key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    with torch.no_grad():
        weight = model.model.get_parameter(comfy_key)
        module.base_layer.weight.copy_(weight[64:128])
        module.base_layer.bias.zero_()
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
        ours = F.linear(x, _comfy_patched_weight(model, tensors, comfy_key)[64:128])
        theirs = module(x)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)   # as above: float32, 64-long sums


def test_comfyui_reads_the_diffusers_layout_of_a_flux_lora_like_its_own():
    """ComfyUI's LoRA loader maps diffusers' Flux keys (transformer.*): both files give one weight."""
    model = _flux_with_mlp_ratio_4()
    tensors = _random_lora(model, rank=4, alpha=2.0)
    converted = lora_mod.to_diffusers(tensors, host.diffusers_lora_targets(model)[1])
    for key in ("diffusion_model.double_blocks.0.img_attn.qkv.weight", "diffusion_model.single_blocks.0.linear1.weight"):
        torch.testing.assert_close(_comfy_patched_weight(model, converted, key), _comfy_patched_weight(model, tensors, key),
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sd3", "pixart_alpha", "auraflow"])
def test_diffusers_layout_of_a_new_family_is_read_by_comfyui_like_its_own(name):
    """SD3, PixArt and AuraFlow: the diffusers names come from ComfyUI's own key maps (mmdit_, pixart_,
    auraflow_to_diffusers), fused attention layers split by rows. Every LoRA layer gets a name, and
    ComfyUI's stock LoRA loader reads the diffusers file back to the same patched weight of every
    layer as the comfyui file (float32; the split rows are copies and alpha / rank is one factor, so
    only the product's rounding differs)."""
    import tiny_families as tf
    model = tf.build_model(name, inference=False)
    tensors = _random_lora(model, rank=4, alpha=2.0)
    prefix, targets = host.diffusers_lora_targets(model)
    converted = lora_mod.to_diffusers(tensors, targets)
    assert prefix == "transformer." and converted and all(k.startswith(prefix) for k in converted)
    layers = [k[: -len(".lora_up.weight")] for k in tensors if k.endswith(".lora_up.weight")]
    assert layers and all(layer in targets for layer in layers), [layer for layer in layers if layer not in targets][:3]
    for layer in layers:
        key = f"{layer}.weight"
        ours, theirs = _comfy_patched_weight(model, tensors, key), _comfy_patched_weight(model, converted, key)
        assert not torch.equal(ours, model.model.get_parameter(key)), key       # the LoRA does act
        torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-7)
