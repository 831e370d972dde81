"""SISO on every image model family of the table (siso_ops/families.py), on tiny random-weight
models built through ComfyUI's own classes (tests/tiny_families.py), in-process on the CPU, on
whichever ComfyUI the suite runs against.

Per family: an optimisation runs; its iteration 0 is the stock KSampler + VAEDecode image (same
seed, euler, 1 step, cfg 1); the LoRA is on the family's layers and learns; the host MODEL and a
stock sampler's output are bitwise unchanged afterwards; the saved LoRA loads through ComfyUI's
stock LoRA path with every key mapped; ReNoise inverts and an edit keeps the background. The suite's
first tiny models (tests/tiny.py: SD1.x, SD2, SDXL, Flux) run an iteration and checkpoint here too.
What is refused (classes the table refuses, video models, ...) is in test_refusals.py; classes no
row names in test_self_checked.py; the census of this ComfyUI's classes in test_model_classes.py."""
import numpy as np
import pytest
import torch

import comfy.lora
import comfy.model_management
import nodes as comfy_nodes
import tiny
import tiny_families as tf
from conftest import siso
from siso_runs import SIZE, assert_shared_modules_are_stock, host_state

host = siso("siso_ops.host")
gen = siso("siso_ops.generation")
optim = siso("siso_ops.optimize")
families = siso("siso_ops.families")

SUPPORTED = list(tf.FAMILIES)


def _size(name):
    return tf.MIN_SIZE.get(name, 64)


def _stock_image(model, vae, positive, name, size, seed=42):
    with torch.inference_mode():
        latent = tf.empty_latent(name, size, size)
        samples = comfy_nodes.common_ksampler(model, seed, 1, 1.0, "euler", "simple", positive, positive, latent)[0]
        image = vae.decode(samples["samples"])
    return image.reshape(-1, *image.shape[-3:])[:1].float()     # one frame of a video VAE: BHWC


@pytest.mark.parametrize("name", SUPPORTED)
def test_family_optimises_from_the_stock_image_and_leaves_the_host_unchanged(name, subject, tiny_networks):
    model, vae, positive = tf.build_model(name), tf.build_vae(name), tf.conditioning(name)
    size = _size(name)
    before = host_state(model)
    stock = _stock_image(model, vae, positive, name, size)
    images = []
    settings = gen.GenerationSettings(width=size, height=size, seed=42, precision="fp32", gradient_checkpointing=False,
                                      optimization=optim.OptimizationSettings(max_iterations=3, learning_rate=5e-2,
                                                                              early_stop_patience=10))
    with torch.inference_mode():
        lora, _, result = gen.optimize_subject(model, vae, positive, subject, None, None, settings,
                                               feature_networks=tiny_networks, on_iteration=lambda r: images.append(r.image))
    assert result.iterations == 3 and all(np.isfinite(h["loss"]) for h in result.history)
    # the similarity loss (random feature networks) goes down: the LoRA's gradient is the loss's
    losses = [h["loss"] for h in result.history]
    assert min(losses[1:]) < losses[0], losses
    # gradients reached the LoRA and nothing else: no weight of the host model has a .grad
    assert all(p.grad is None for p in model.model.parameters())
    # iteration 0 (the LoRA is zero) is what ComfyUI's stock KSampler + VAEDecode make of the same
    # seed: the same float32 model run by the same sampler; only VAEDecode's clamp to [0, 1] and
    # the order of float operations in the private decoder copy differ
    ours = images[0].permute(0, 2, 3, 1)
    assert ours.shape == stock.shape, (ours.shape, stock.shape)
    torch.testing.assert_close(ours.clamp(0, 1), stock, atol=2e-5, rtol=0)
    # the LoRA sits on the family's layers and learned (the images move after steps)
    family = host.model_family(model)
    targets = host.lora_target_names(model, host.TARGETS[0])
    ups = {k[len("diffusion_model."):-len(".lora_up.weight")]: v for k, v in lora.tensors.items() if k.endswith(".lora_up.weight")}
    assert set(ups) == targets and targets
    assert any(float((images[i] - images[0]).abs().max()) > 0 for i in (1, 2)), "the LoRA changed nothing"
    if family.lora == "blocks":
        assert not any(families._MODULATION.search(k) for k in ups), "modulation layers got a LoRA"
    after = host_state(model)
    assert all(torch.equal(before[k], after[k]) for k in after)
    assert torch.equal(_stock_image(model, vae, positive, name, size), stock)
    # the file loads through ComfyUI's stock LoRA path (LoraLoaderModelOnly) with every key mapped
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora.tensors, key_map, log_missing=False)
    assert len(patches) == len(ups), f"ComfyUI's loader mapped {len(patches)} of {len(ups)} layers"
    # and SISO Load LoRA / Apply LoRA's check finds every layer of it in this model
    assert host.check_lora_fits(model, lora.tensors, "subject_lora") == lora.rank


def checkpointing_histories(model, vae, positive, size, subject, networks) -> list:
    """Two iterations of SISO Optimize with low_memory off, then on (fp32): each run's history."""
    runs = []
    for checkpointing in (False, True):
        settings = gen.GenerationSettings(width=size, height=size, seed=1, precision="fp32",
                                          gradient_checkpointing=checkpointing,
                                          optimization=optim.OptimizationSettings(max_iterations=2, learning_rate=5e-2,
                                                                                  early_stop_patience=10))
        with torch.inference_mode():
            runs.append(gen.optimize_subject(model, vae, positive, subject, None, None, settings,
                                             feature_networks=networks)[2].history)
    return runs

@pytest.mark.parametrize("name", SUPPORTED)
def test_family_gradient_checkpointing_gives_the_same_iterations(name, subject, tiny_networks):
    """low_memory on recomputes the family's blocks (and the decoder's where it may) in backward:
    the same losses as without, up to float32 reassociation. Two iterations: the second one's loss
    depends on the first one's backward through the recomputed blocks."""
    runs = checkpointing_histories(tf.build_model(name), tf.build_vae(name), tf.conditioning(name), _size(name),
                                   subject, tiny_networks)
    # recomputation repeats the same float32 operations: equal to rounding of the loss's magnitude
    assert len(runs[0]) == len(runs[1]) == 2
    for a, b in zip(*runs):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)


@pytest.mark.parametrize("name", SUPPORTED)
def test_family_memory_estimate_runs_and_checkpointing_lowers_it(name):
    """low_memory = auto decides from a shape-only pass of the family's denoiser and decoder (memory.py).
    It must run for every family (a failure would fall back to checkpointing without an estimate),
    and recomputing blocks must keep fewer activations than keeping them."""
    memory = siso("siso_ops.memory")
    model, vae, positive = tf.build_model(name), tf.build_vae(name), tf.conditioning(name)
    size = _size(name)
    with torch.inference_mode():
        estimate = memory.estimate_iteration(model, vae, positive, size, size, "cpu", torch.float32)
    denoiser = estimate.activations["denoiser"]
    assert estimate.peak(False) > estimate.peak(True) > estimate.weight_bytes > 0
    assert denoiser.peak(True, 1.0) < denoiser.peak(False, 1.0)


def test_the_family_table_covers_every_family_the_tests_build():
    built = {type(tf.build_model(name).model).__name__ for name in tf.FAMILIES}
    listed = {c for f in families.FAMILIES for c in f.model_classes} | set(families.REFUSED)
    assert built <= listed, built - listed


def test_docs_models_shows_the_family_table_as_generated():
    from conftest import REPO
    page = (REPO / "docs" / "models.md").read_text()
    start = page.index("<!-- generated from siso_ops/families.py: supported_models_markdown() -->\n")
    end = page.index("\n<!-- end of generated table -->")
    shown = page[start:end].split("\n", 1)[1]
    assert shown == families.supported_models_markdown(), \
        "docs/models.md's table is stale: paste siso_ops.families.supported_models_markdown() between its markers"


# The families of tests/tiny.py (SD1.x, SD2, SDXL, Flux), the suite's first tiny models
@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_every_model_family_runs_an_optimisation_iteration(family, subject, tiny_networks):
    model = tiny.build_model(family)
    vae = tiny.build_vae(16 if family.startswith("flux") else 4)
    before = host_state(model)
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, optimization=optim.OptimizationSettings(max_iterations=2, learning_rate=1e-2))
    with torch.inference_mode():
        lora, image, result = gen.optimize_subject(model, vae, tiny.conditioning(family), subject, None, None, settings,
                                                   feature_networks=tiny_networks)
    assert result.iterations == 2 and np.isfinite(result.best_loss)
    assert image.shape == (1, SIZE, SIZE, 3)
    keys = [k for k in lora.tensors if k.endswith(".lora_up.weight")]
    if family.startswith("flux"):
        assert any("txt_attn.qkv" in k for k in keys) and any("img_mlp.0" in k for k in keys) and any("linear1" in k for k in keys)
    else:
        assert keys and all(".attn" in k for k in keys)
    after = host_state(model)
    assert all(torch.equal(before[k], after[k]) for k in after)
    assert_shared_modules_are_stock(model)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux_schnell"])
def test_gradient_checkpointing_gives_the_same_optimisation(family, subject, tiny_networks):
    """Recomputing the denoiser's, the decoder's and the feature networks' activations in backward
    changes memory, not results: same losses and same LoRA after 3 iterations (to 1e-5)."""
    model = tiny.build_model(family)
    vae = tiny.build_vae(16 if family.startswith("flux") else 4)
    positive = tiny.conditioning(family)
    before = host_state(model)
    checkpointed = host.TrainableModel(model, checkpointing=True)
    blocks = {type(m).__name__ for m in checkpointed.forward_patched}
    checkpointed.unload()
    assert blocks >= ({"DoubleStreamBlock", "SingleStreamBlock"} if family.startswith("flux")
                      else {"ResBlock", "BasicTransformerBlock"})
    runs = []
    for checkpointing in (False, True):
        settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=3, gradient_checkpointing=checkpointing,
                                          precision="fp32",
                                          optimization=optim.OptimizationSettings(max_iterations=3, learning_rate=1e-2,
                                                                                  early_stop_patience=10))
        with torch.inference_mode():
            runs.append(gen.optimize_subject(model, vae, positive, subject, None, None, settings,
                                             feature_networks=tiny_networks))
    (lora_a, _, result_a), (lora_b, _, result_b) = runs
    assert [h["loss"] for h in result_a.history] == pytest.approx([h["loss"] for h in result_b.history], abs=1e-5)
    assert lora_a.tensors.keys() == lora_b.tensors.keys()
    for key in lora_a.tensors:
        torch.testing.assert_close(lora_a.tensors[key], lora_b.tensors[key], atol=1e-5, rtol=1e-4)
    assert any(t.abs().sum() > 0 for k, t in lora_b.tensors.items() if k.endswith("lora_up.weight"))
    dino, ir = tiny_networks
    assert not dino.module.grad_checkpointing and not ir.module.grad_checkpointing   # switched back off
    after = host_state(model)
    assert all(torch.equal(before[k], after[k]) for k in after)
    assert_shared_modules_are_stock(model)


EDITING = SUPPORTED


@pytest.mark.parametrize("name", EDITING)
def test_family_inverts_with_renoise_and_edits_keeping_the_background(name, subject, feature_files):
    """ReNoise inverts the photo closer to its latent than plain DDIM inversion; an edit then runs
    from the inversion with the background term (its report gives the term's error), and the edit's
    background is no further from the photo than the reconstruction's; the host stays unchanged.
    Two iterations at the paper's editing rate move these tiny models' images little (measured:
    5e-7 to 0.87 max |edited - reconstruction|), so this bound shows the path runs on every family;
    that the term is what holds the background, against a run without it that drifts, is
    test_editing's (SD1.5, longer runs)."""
    from test_editing import DDIM, background_error, edit, invert
    model, vae, positive = tf.build_model(name), tf.build_vae(name), tf.conditioning(name)
    size = max(_size(name), 64)
    g = torch.Generator().manual_seed(5)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(size, size),
                                            mode="bilinear").permute(0, 2, 3, 1).contiguous()
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    renoise, reconstruction = invert(model, vae, positive, image, renoise_iterations=2, first_step_iterations=2,
                                     average_start=1, average_end=3)
    ddim, _ = invert(model, vae, positive, image, **DDIM)
    assert renoise.flow == host.is_flow(model)
    # Mean |denoise(invert(z)) - z|. The noisy steps land exactly (noise correction); what is left
    # is the first step's fixed point, which 3 ReNoise predictions approach and DDIM's one does not.
    # Measured ratios ReNoise / DDIM on these tiny models: 0.015 (PixArt, EPS) to 0.63 (Flux.2);
    # 0.8 leaves room for other CPUs' rounding while a ReNoise no better than DDIM fails.
    bound = 0.5 if not renoise.flow else 0.8
    assert renoise.latent_error < bound * ddim.latent_error, (renoise.latent_error, ddim.latent_error)
    before = host_state(model)
    # the paper's editing learning rate (3e-4): at the 1e-2 of test_editing's longer runs, AdamW's
    # first full-size step moved PixArt's background before the term could hold it (two iterations)
    lora, edited, _, report = edit(model, vae, positive, subject, feature_files, renoise, mask, max_iterations=2,
                                   width=size, height=size, learning_rate=3e-4)
    assert edited.shape == (1, size, size, 3) and torch.isfinite(edited).all() and "2 iterations" in report
    assert "background error" in report, report        # the mask's term was in the loss
    # the background term only pulls toward the photo: the edit's background is no further from it
    # than the reconstruction's (the zero-LoRA image), as in test_editing's bound (which also shows
    # the drift without the term, on SD1.5)
    start, kept = background_error(reconstruction, image, mask), background_error(edited, image, mask)
    print(f"\n{name}: latent error ReNoise {renoise.latent_error:.4f}, DDIM {ddim.latent_error:.4f}; "
          f"background MSE reconstruction {start:.4f}, edited {kept:.4f}")
    assert kept <= 1.01 * start, (kept, start)
    after = host_state(model)
    assert all(torch.equal(before[k], after[k]) for k in after)


def test_training_mode_gives_differentiable_rope_and_puts_comfy_kitchen_back():
    """ComfyUI 0.33's Cosmos Predict2 calls comfy_kitchen's fused RMSNorm + RoPE operator, which has
    no backward: inside SISO's training block ``comfy.quant_ops.ck`` answers with the eager
    plain-torch functions; outside it is ComfyUI's own object again. 0.3.75 has no comfy_kitchen."""
    import sys
    quant_ops = sys.modules.get("comfy.quant_ops")
    before = getattr(quant_ops, "ck", None)
    with host.training_mode():
        inside = getattr(quant_ops, "ck", None)
    assert getattr(quant_ops, "ck", None) is before
    if before is None:
        assert inside is None
        return
    from comfy_kitchen.backends.eager import rope
    assert inside is not before and inside.rms_rope_split_half is rope.rms_rope_split_half
    assert inside.quantize_per_tensor_fp8 is before.quantize_per_tensor_fp8    # everything else is ComfyUI's
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    freqs = torch.randn(1, 4, 1, 4, 2, 2)
    with host.training_mode():
        out, _ = quant_ops.ck.rms_rope_split_half(q, q.detach(), freqs, torch.ones(8), torch.ones(8), 1e-6)
        out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
