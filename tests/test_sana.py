"""SISO on Sana loaded by the ComfyUI_ExtraModels pack (issue 29, item 3), in-process on the CPU.

ComfyUI has no Sana class; users load it through Efficient-Large-Model/ComfyUI_ExtraModels, whose
SanaCheckpointLoader gives a MODEL around its own BaseModel subclass (EXM_Sana_Model) with a network
of plain torch.nn layers, and whose ExtraVAELoader gives its own VAE class (EXVAE, a DC-AE). The
pack is loaded by ComfyUI's custom-node loader, as a user's install is. A tiny SanaMS (2 blocks,
width 64) and a tiny DC-AE are built from the pack's own classes, written in the file layouts its
loaders read (models/checkpoints, models/vae), and loaded by its loader nodes with a model / VAE
config the test adds to the loaders' dropdowns (Sana/conf.py's sana_conf, VAE/conf.py's vae_conf).

Pinned: iteration 0 is the stock KSampler + the pack's VAE decode; the loss goes down; every LoRA
layer (the Sana row's: self-attention qkv, cross-attention q and kv) learns and nothing of the host
gets a gradient; SISO Apply LoRA + the stock KSampler gives the best image again; the saved LoRA
loads in LoraLoaderModelOnly with the same pixels; the host's weights and a stock sample are
bitwise unchanged."""
from __future__ import annotations

import importlib
import pathlib
import sys

import pytest
import torch

import folder_paths
import nodes as comfy_nodes
import test_memory
import tiny
import third_party
from conftest import BASE, COMFYUI, siso
from siso_runs import host_state

host = siso("siso_ops.host")
gen = siso("siso_ops.generation")
optim = siso("siso_ops.optimize")
memory = siso("siso_ops.memory")
NODE = comfy_nodes.NODE_CLASS_MAPPINGS

SIZE = 64                      # DC-AE: 32 pixels a latent cell, so a 2 x 2 latent
MODEL_CONFIG = "SISO test: tiny SanaMS"
VAE_CONFIG = "SISO test: tiny DC-AE f32c32"
LORA_LAYERS = ("attn.qkv", "cross_attn.q_linear", "cross_attn.kv_linear")

# Sana/conf.py's SanaMS_600M_P1_D28 entry, shrunk (the tiny configuration)
TINY_SANA = {"target": "SanaMS",
             "unet_config": {"in_channels": 32, "depth": 2, "hidden_size": 64, "patch_size": 1, "num_heads": 2,
                             "linear_head_dim": 32, "caption_channels": 16, "model_max_length": 8, "y_norm": True,
                             "attn_type": "linear", "ffn_type": "glumbconv", "mlp_ratio": 2.5,
                             "mlp_acts": ["silu", "silu", None], "use_pe": False, "pred_sigma": False,
                             "learn_sigma": False, "fp32_attention": True},
             "sampling_settings": {"shift": 3.0}}
# VAE/conf.py's dcae-f32c32-sana-1.1-diffusers entry, narrow and one layer a block (still 6 stages: 32x; the
# last stage as wide as the latent, for the decoder's channel shortcut)
_STAGES = ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3
TINY_DCAE = {"type": "AutoencoderDC", "embed_scale": 32, "embed_dim": 32, "attention_head_dim": 8,
             "decoder_act_fns": "silu", "decoder_block_out_channels": [8, 8, 8, 16, 32, 32],
             "decoder_block_types": _STAGES, "decoder_layers_per_block": [1] * 6, "decoder_norm_types": "rms_norm",
             "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]], "downsample_block_type": "Conv",
             "encoder_block_out_channels": [8, 8, 8, 16, 32, 32], "encoder_block_types": _STAGES,
             "encoder_layers_per_block": [1] * 6, "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
             "in_channels": 3, "latent_channels": 32, "scaling_factor": 0.41407, "upsample_block_type": "interpolate"}


def load_pack():
    """ComfyUI_ExtraModels, found and loaded as tests/third_party.py says (the test ComfyUI's
    custom_nodes, then ../shared, else a skip saying how to enable it; a failure under CI). Where
    the pack itself does not import on this ComfyUI, the tests skip on this version only, with its
    error."""
    try:
        return third_party.require(third_party.EXTRA_MODELS, BASE / "custom_nodes", COMFYUI)
    except RuntimeError as failed:
        pytest.skip(f"ComfyUI_ExtraModels does not import on this ComfyUI: {failed}")


def _pack_module(node: str, name: str):
    """A module of the pack as ComfyUI's loader imported it (its package is named by its path)."""
    package = sys.modules[NODE[node].__module__].__package__
    return importlib.import_module(f"{package}.{name}")


def _write_checkpoint(path: pathlib.Path):
    """A tiny SanaMS built by the pack's own class from the tiny config, saved as the bare state
    dict load_sana reads (random weights; the pack's initialisation leaves some layers at zero)."""
    from safetensors.torch import save_file
    sana = _pack_module("SanaCheckpointLoader", "models.sana_multi_scale")
    with torch.inference_mode(False):
        torch.manual_seed(0)
        network = sana.SanaMS(**dict(TINY_SANA["unet_config"]))
        tiny.init_random(network, seed=1, std=0.1)
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))


def _write_vae(path: pathlib.Path):
    from safetensors.torch import save_file
    dcae = _pack_module("ExtraVAELoader", "models.dcae")
    with torch.inference_mode(False):
        torch.manual_seed(0)
        network = dcae.AutoencoderDC(**TINY_DCAE)
        tiny.init_random(network, seed=2, std=0.1)
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))


def sana_conditioning(seed: int = 0, tokens: int = 5):
    """CONDITIONING as SanaTextEncode makes it: ``[[embs, {}]]``, embs ``(1, 1, model_max_length,
    caption_channels)`` with the padding rows zeroed (``embs * emb_masks``), so the model counts the
    prompt's length from the non-zero rows. A stand-in for the text encoder: SanaTextEncode needs
    GemmaLoader's Gemma-2 2B and its tokenizer files, which no test can have (weights, no network);
    what it hands on is only this tensor in this list."""
    config = TINY_SANA["unet_config"]
    g = torch.Generator().manual_seed(seed)
    embs = torch.randn(1, 1, config["model_max_length"], config["caption_channels"], generator=g)
    mask = (torch.arange(config["model_max_length"]) < tokens).float()
    return [[embs * mask[None, None, :, None], {}]]


@pytest.fixture(scope="module")
def sana(request):
    """(MODEL, VAE, positive) from the pack's SanaCheckpointLoader and ExtraVAELoader."""
    load_pack()
    sana_conf = _pack_module("SanaCheckpointLoader", "conf").sana_conf
    vae_conf = _pack_module("ExtraVAELoader", "conf").vae_conf
    checkpoint = pathlib.Path(folder_paths.get_folder_paths("checkpoints")[0]) / "siso_tiny_sana.safetensors"
    vae_file = pathlib.Path(folder_paths.get_folder_paths("vae")[0]) / "siso_tiny_dcae.safetensors"
    for folder in (checkpoint.parent, vae_file.parent):
        folder.mkdir(parents=True, exist_ok=True)
    _write_checkpoint(checkpoint)
    _write_vae(vae_file)
    with pytest.MonkeyPatch.context() as patch:
        # the loaders' `model` / `vae_type` dropdowns list these dicts: a config of the test's own.
        # load_sana writes into the entry's unet_config: it gets a copy.
        patch.setitem(sana_conf, MODEL_CONFIG, {**TINY_SANA, "unet_config": dict(TINY_SANA["unet_config"])})
        patch.setitem(vae_conf, VAE_CONFIG, dict(TINY_DCAE))
        assert MODEL_CONFIG in NODE["SanaCheckpointLoader"].INPUT_TYPES()["required"]["model"][0]
        with torch.inference_mode():
            # FP32: iteration 0 is compared with the stock decode, which runs in the VAE's dtype (the
            # loader's default BF16 would differ from SISO's float32 decoder copy by bf16 rounding).
            # cfg passthrough on, as the loader's default: it wraps the model's apply_model.
            model = NODE["SanaCheckpointLoader"]().load_checkpoint(checkpoint.name, MODEL_CONFIG, "FP32", True)[0]
            vae = NODE["ExtraVAELoader"]().load_vae(vae_file.name, VAE_CONFIG, "FP32")[0]
    try:
        yield model, vae, sana_conditioning()
    finally:
        # the passthrough replaced comfy.samplers.sampling_function and KSampler.sample process-wide;
        # the pack's own cleanup puts ComfyUI's back for the tests after this file
        _pack_module("SanaCheckpointLoader", "sana_cfg_passthrough").cleanup_sana_cfg()


def stock_image(model, vae, positive, steps: int, seed: int = 42):
    """The stock graph: EmptyDCAELatentImage -> KSampler (euler, simple, cfg 1) -> the VAE's decode.
    (The pack's EmptySanaLatentImage makes the same zeros, but on ComfyUI 0.33 it fails: it reads
    ``self.device`` from EmptyLatentImage's __init__, which 0.33's V3 EmptyLatentImage no longer has.)"""
    with torch.inference_mode():
        latent = NODE["EmptyDCAELatentImage"]().generate(SIZE, SIZE)[0]
        samples = comfy_nodes.common_ksampler(model, seed, steps, 1.0, "euler", "simple", positive, positive, latent)[0]
        return vae.decode(samples["samples"]).float()


def test_the_pack_gives_the_classes_siso_meets(sana):
    """What the rest of this file relies on, read from the loaded objects: the pack's own BaseModel
    subclass with plain torch layers, its VAE class without ComfyUI's VAE.__init__ attributes, and
    SISO's answers for them (the Sana row, the row's LoRA layers, DC-AE's 32-pixel cells)."""
    model, vae, _ = sana
    assert type(model.model).__name__ == "EXM_Sana_Model" and type(model.model).__bases__[0].__name__ == "BaseModel"
    modules = dict(model.model.diffusion_model.named_modules())
    assert type(modules["blocks.0.attn.qkv"]) is torch.nn.Linear and not hasattr(modules["blocks.0.attn.qkv"],
                                                                                 "weight_function")
    assert type(vae).__name__ == "EXVAE" and not hasattr(vae, "downscale_ratio")
    family = host.model_family(model)
    assert family.name.startswith("Sana") and not family.checked
    assert host.lora_target_names(model) == {f"blocks.{i}.{name}" for i in range(2) for name in LORA_LAYERS}
    assert host.latent_scale(vae) == 32
    host.check_vae(vae, model)


def test_siso_trains_sana_from_the_stock_image_and_the_saved_lora_gives_the_best_image(sana, subject, tiny_networks):
    model, vae, positive = sana
    steps, grad_steps = 3, 2          # a few steps, backpropagating through the last two (the row: 20 and 3)
    before = host_state(model)
    stock = stock_image(model, vae, positive, steps)
    assert stock.shape == (1, SIZE, SIZE, 3)
    images = []
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=42, steps=steps, grad_steps=grad_steps,
                                      precision="fp32", gradient_checkpointing=False,
                                      optimization=optim.OptimizationSettings(max_iterations=3, learning_rate=5e-2,
                                                                              early_stop_patience=10))
    with torch.inference_mode():
        lora, best, result = gen.optimize_subject(model, vae, positive, subject, None, None, settings,
                                                  feature_networks=tiny_networks,
                                                  on_iteration=lambda r: images.append(r.image))
    # iteration 0 (LoRA zero) is the stock graph's image: the same float32 model and sampler; the
    # pack's decode clamps to [0, 1] and SISO's private decoder copy may order float sums otherwise
    torch.testing.assert_close(images[0].permute(0, 2, 3, 1).clamp(0, 1), stock, atol=2e-5, rtol=0)
    losses = [h["loss"] for h in result.history]
    assert result.iterations == 3 and min(losses[1:]) < losses[0], losses
    # every LoRA layer of the row learned (its up matrix starts at zero: only a gradient moves it),
    # and no weight of the host got a gradient
    ups = {k[len("diffusion_model."):-len(".lora_up.weight")]: t for k, t in lora.tensors.items()
           if k.endswith(".lora_up.weight")}
    assert set(ups) == host.lora_target_names(model)
    assert all(bool(t.abs().sum() > 0) for t in ups.values()), [k for k, t in ups.items() if not t.abs().sum() > 0]
    assert all(p.grad is None for p in model.model.parameters())
    assert float((images[result.best_iteration] - images[0]).abs().max()) > 1e-3, "the LoRA changed nothing"
    # SISO Optimize left the host as it was: the same bytes in every weight
    _assert_unchanged(model, before)
    # stage 2: the stock KSampler on SISO Apply LoRA's model makes the best iteration's image again
    # (float32 reassociation between the loop's sampler and KSampler)
    with torch.inference_mode():
        applied = NODE["ApplySISOLoRA"].execute(model, lora, 1.0).args[0]
    reused = stock_image(applied, vae, positive, steps)
    torch.testing.assert_close(reused, best, atol=1e-4, rtol=0)
    # the saved file loads in the stock LoraLoaderModelOnly with the same pixels as SISO Apply LoRA
    with torch.inference_mode():
        NODE["SaveSISOLoRA"].execute(lora, "siso_tiny_sana", True)
        loaded = NODE["LoraLoaderModelOnly"]().load_lora_model_only(model, "siso_tiny_sana.safetensors", 1.0)[0]
    assert "siso_tiny_sana.safetensors" in folder_paths.get_filename_list("loras")
    torch.testing.assert_close(stock_image(loaded, vae, positive, steps), reused, atol=1e-6, rtol=0)
    # the host after the stock graph ran it again (ComfyUI patches a LoRA into the shared weights
    # while a LoRA'd clone is loaded, and takes it out when the host loads): the same stock image
    assert torch.equal(stock_image(model, vae, positive, steps), stock)
    _assert_unchanged(model, before)


def _assert_unchanged(model, before):
    after = host_state(model)
    assert before.keys() == after.keys(), set(before) ^ set(after)
    assert all(torch.equal(before[k], after[k]) for k in after), [k for k in after if not torch.equal(before[k], after[k])]


def _optimise(model, vae, positive, subject, networks, iterations=2, steps=1, grad_steps=1, checkpointing=False):
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=7, steps=steps, grad_steps=grad_steps,
                                      precision="fp32", gradient_checkpointing=checkpointing,
                                      optimization=optim.OptimizationSettings(max_iterations=iterations,
                                                                              learning_rate=5e-2, early_stop_patience=10))
    with torch.inference_mode():
        return gen.optimize_subject(model, vae, positive, subject, None, None, settings, feature_networks=networks)


def test_low_memory_recomputes_sanas_blocks_and_gives_the_same_iterations(sana, subject, tiny_networks):
    """low_memory on wraps the row's repeated blocks (SanaMSBlock, called by the pack's own
    auto_grad_checkpoint) and DC-AE's decoder blocks in checkpointing: the same losses as without,
    to float32 rounding. Sana has a memory estimate (its caption's length is read from the real
    conditioning: memory_shapes._ShapeRun's real_inputs), so low_memory auto decides by it."""
    model, vae, positive = sana
    checkpointed = host.TrainableModel(model, checkpointing=True)
    try:
        assert {type(m).__name__ for m in checkpointed.forward_patched} >= {"SanaMSBlock"}
    finally:
        checkpointed.unload()
    with torch.inference_mode(False):
        decoder = host.DifferentiableDecoder(vae, model, "cpu", checkpointing=True)
        assert {type(m).__name__ for m in decoder.module.modules() if "forward" in vars(m)} == \
            {"ResBlock", "EfficientViTBlock"}
        decoder.release()
    results = [_optimise(model, vae, positive, subject, tiny_networks, checkpointing=c)[2] for c in (False, True)]
    # the estimate is made (before, Sana's .item() of its caption length stopped it and auto took
    # low_memory on without one); a 64 px tiny Sana fits in any CPU's memory: auto turns it off
    plan = results[1].memory
    assert plan.estimate is not None and plan.checkpointing is True and "no memory estimate" not in plan.describe()
    assert memory.resolve_checkpointing("auto", plan.estimate, plan.available, torch.float32) is False
    runs = [[h["loss"] for h in result.history] for result in results]
    assert len(runs[0]) == len(runs[1]) == 2
    assert runs[0] == pytest.approx(runs[1], abs=1e-5), runs


def test_sanas_memory_estimate_counts_what_a_real_iteration_keeps(sana, tiny_networks):
    """Sana's forward reads its conditioning's values: the caption's length by .item() of its
    non-zero rows, then masked_select of the caption by a mask built from it, which no meta tensor
    can run. The shape-only pass runs it again with the conditioning real (memory_shapes._ShapeRun's
    real_inputs: what comes from real tensors alone stays real, a real tensor that meets a meta one
    becomes meta). Held as test_memory holds the other families: the decoder and both networks to
    1 %, the denoiser to 10 %."""
    model, vae, positive = sana
    real, counted = test_memory.kept_and_counted(model, vae, positive, SIZE, tiny_networks)
    print(f"\nSana: real kept bytes {real}, estimated {counted}")
    for part in ("decoder", "dino", "ir"):
        assert counted[part] == pytest.approx(real[part], rel=0.01), part
    assert counted["denoiser"] == pytest.approx(real["denoiser"], rel=0.10)


def test_a_class_that_only_derives_from_basemodel_takes_the_structural_self_checked_path(sana, subject, tiny_networks,
                                                                                         monkeypatch):
    """Without its row, EXM_Sana_Model (a direct BaseModel subclass, as any third-party pack's model
    class) is not handed SD1.x's row (BaseModel is SD1.x's class, but every model class derives from
    it): it takes the structural rules, checked before the loop on the run's inputs, and trains."""
    model, vae, positive = sana
    families = siso("siso_ops.families")
    monkeypatch.setattr(families, "FAMILIES", tuple(f for f in families.FAMILIES
                                                    if "EXM_Sana_Model" not in f.model_classes))
    assert host.model_family(model).checked == "no table row, structural rules"
    targets = host.lora_target_names(model)
    # every linear layer of the blocks: the row's three and the attention output projections
    assert {f"blocks.{i}.{n}" for i in range(2) for n in LORA_LAYERS + ("attn.proj", "cross_attn.proj")} == targets
    before = host_state(model)
    lora, _, result = _optimise(model, vae, positive, subject, tiny_networks)
    assert "no table row: self-checked path (EXM_Sana_Model: no table row, structural rules)" in result.loading
    assert "training forward = stock forward" in result.loading, result.loading
    losses = [h["loss"] for h in result.history]
    assert min(losses[1:]) < losses[0], losses
    ups = [t for k, t in lora.tensors.items() if k.endswith(".lora_up.weight")]
    assert len(ups) == len(targets) and all(bool(t.abs().sum() > 0) for t in ups)
    # the pack's caption embedder asserts and drops captions in train mode: SISO leaves the model in eval
    assert not any(m.training for m in model.model.diffusion_model.modules())
    _assert_unchanged(model, before)


def test_sana_inverts_with_renoise_and_edits_keeping_the_background(sana, subject, feature_files):
    """Subject swap on Sana: ReNoise Invert through the pack's VAE encode lands closer to the
    photo's latent than plain DDIM inversion, and an edit from it runs with the background term
    and keeps its background no further from the photo than the reconstruction's (the same bounds
    as every row's test in test_families.py, which says what they show and what test_editing
    adds); the host stays unchanged."""
    from test_editing import DDIM, background_error, edit, invert
    model, vae, positive = sana
    g = torch.Generator().manual_seed(5)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(SIZE, SIZE),
                                            mode="bilinear").permute(0, 2, 3, 1).contiguous()
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4] = 1.0
    renoise, reconstruction = invert(model, vae, positive, image, renoise_iterations=2, first_step_iterations=2,
                                     average_start=1, average_end=3)
    ddim, _ = invert(model, vae, positive, image, **DDIM)
    assert renoise.flow and renoise.latent_error < 0.8 * ddim.latent_error, (renoise.latent_error, ddim.latent_error)
    before = host_state(model)
    lora, edited, _, report = edit(model, vae, positive, subject, feature_files, renoise, mask, max_iterations=2,
                                   width=SIZE, height=SIZE, learning_rate=3e-4)
    assert edited.shape == (1, SIZE, SIZE, 3) and torch.isfinite(edited).all() and "2 iterations" in report
    assert "background error" in report, report        # the mask's term was in the loss
    start, kept = background_error(reconstruction, image, mask), background_error(edited, image, mask)
    assert kept <= 1.01 * start, (kept, start)
    _assert_unchanged(model, before)
