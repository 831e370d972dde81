"""The self-checked path (siso_ops/self_check.py): a model class no row of the family table names
trains after two checks on the run's own inputs, or is refused before the loop naming the class
and the check that failed. Tiny random-weight models built through ComfyUI's own classes."""
import pytest
import torch

import comfy.model_base
import tiny_families as tf
from conftest import siso

host = siso("siso_ops.host")
gen = siso("siso_ops.generation")
optim = siso("siso_ops.optimize")
families = siso("siso_ops.families")
self_check = siso("siso_ops.self_check")


def optimise(model, vae, positive, subject, networks, iterations=2, size=64, images=None):
    settings = gen.GenerationSettings(width=size, height=size, seed=42, precision="fp32", gradient_checkpointing=False,
                                      optimization=optim.OptimizationSettings(max_iterations=iterations,
                                                                              learning_rate=5e-2, early_stop_patience=10))
    with torch.inference_mode():
        return gen.optimize_subject(model, vae, positive, subject, None, None, settings, feature_networks=networks,
                                    on_iteration=None if images is None else (lambda r: images.append(r.image)))


def _stock_image(model, vae, positive, name, size, seed=42):
    import nodes as comfy_nodes
    with torch.inference_mode():
        latent = tf.empty_latent(name, size, size)
        samples = comfy_nodes.common_ksampler(model, seed, 1, 1.0, "euler", "simple", positive, positive, latent)[0]
        image = vae.decode(samples["samples"])
    return image.reshape(-1, *image.shape[-3:])[:1].float()


def _trains_on_the_self_checked_path(model, name, subject, networks, class_name, why):
    """An optimisation of a class no row names: the report says which path and why; iteration 0
    is the stock KSampler + VAEDecode image; the loss goes down; only the LoRA got gradients;
    the host and a stock sample are bitwise unchanged; ComfyUI's stock LoRA loader maps every key."""
    import comfy.lora
    vae, positive = tf.build_vae(name), tf.conditioning(name)
    size = tf.MIN_SIZE.get(name, 64)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    stock = _stock_image(model, vae, positive, name, size)
    images = []
    lora, _, result = optimise(model, vae, positive, subject, networks, iterations=3, size=size, images=images)
    assert f"no table row: self-checked path ({class_name}: {why}" in result.loading, result.loading
    assert "training forward = stock forward" in result.loading
    losses = [h["loss"] for h in result.history]
    assert result.iterations == 3 and min(losses[1:]) < losses[0], losses
    assert all(p.grad is None for p in model.model.parameters())
    # as every row's test: the same float32 model run by the same sampler (VAEDecode clamps)
    torch.testing.assert_close(images[0].permute(0, 2, 3, 1).clamp(0, 1), stock, atol=2e-5, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    assert torch.equal(_stock_image(model, vae, positive, name, size), stock)
    ups = [k for k in lora.tensors if k.endswith(".lora_up.weight")]
    assert ups and {k[len("diffusion_model."):-len(".lora_up.weight")] for k in ups} == host.lora_target_names(model)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert len(comfy.lora.load_lora(lora.tensors, key_map, log_missing=False)) == len(ups)
    assert host.check_lora_fits(model, lora.tensors, "subject_lora") == lora.rank   # Load / Apply LoRA's check
    return result


class TinySubclassOfLumina2(comfy.model_base.Lumina2):
    """A model class a ComfyUI release might add: a subclass of a row's class, nothing changed."""


def _as_class(model, cls):
    model.model.__class__ = cls
    return model


def test_a_subclass_of_a_rows_class_takes_its_row_and_trains_self_checked(subject, tiny_networks):
    model = _as_class(tf.build_model("lumina2"), TinySubclassOfLumina2)
    family = host.model_family(model)
    row = families.family_of("Lumina2")
    assert family.checked and (family.lora, family.blocks, family.in_place) == (row.lora, row.blocks, row.in_place)
    _trains_on_the_self_checked_path(model, "lumina2", subject, tiny_networks, "TinySubclassOfLumina2",
                                     "a subclass of Lumina2")


def test_a_class_no_row_names_trains_by_the_structural_rules_self_checked(subject, tiny_networks, monkeypatch):
    """A new class (HiDream with its row taken out of the table stands in for one): LoRA on the
    linear layers of the repeated blocks, checked on the run's inputs, trains."""
    monkeypatch.setattr(families, "FAMILIES", tuple(f for f in families.FAMILIES if "HiDream" not in f.model_classes))
    model = tf.build_model("hidream")
    assert host.model_family(model).checked == "no table row, structural rules"
    _trains_on_the_self_checked_path(model, "hidream", subject, tiny_networks, "HiDream", "no table row")


# tiny models of ComfyUI classes no row names (tests/tiny_families.py: SELF_CHECKED_CONFIGS): the
# class and the report's reason; HunyuanDiT is in both ComfyUIs, the others are 0.33 classes
TINY_SELF_CHECKED = {"longcat_image": ("LongCatImage", "a subclass of Flux"),
                     "zimage_pixel": ("ZImagePixelSpace", "a subclass of Lumina2"),
                     "mage_flow": ("MageFlow", "a subclass of QwenImage"),
                     "hunyuan_dit": ("HunyuanDiT", "no table row, structural rules"),
                     "krea2": ("Krea2", "no table row, structural rules"),
                     "anima": ("Anima", "no table row, structural rules"),
                     "ernie_image": ("ErnieImage", "no table row, structural rules"),
                     "lens": ("Lens", "no table row, structural rules"),
                     "ideogram4": ("Ideogram4", "no table row, structural rules"),
                     "kandinsky5_image": ("Kandinsky5Image", "no table row, structural rules"),
                     "omnigen2": ("Omnigen2", "no table row, structural rules"),
                     "boogu": ("Boogu", "no table row, structural rules"),
                     "joyimage": ("JoyImage", "no table row, structural rules")}
# classes whose LoRA layers include blocks text-to-image inputs do not run (OmniGen2's reference-image
# refiner): those layers stay zero, and the report says so
OFF_PATH = {"omnigen2": "ref_image_refiner", "boogu": "ref_image_refiner"}


@pytest.mark.parametrize("name", sorted(TINY_SELF_CHECKED))
def test_comfyui_classes_no_row_names_train_self_checked(name, subject, tiny_networks):
    class_name, why = TINY_SELF_CHECKED[name]
    if name not in tf.SELF_CHECKED_CONFIGS:
        pytest.skip(f"{class_name} is a ComfyUI 0.33 class; this ComfyUI has none")
    model = tf.build_model(name)
    assert type(model.model).__name__ == class_name and class_name in families.SELF_CHECKED
    # docs/models.md's row says what low_memory recomputes for the family the host finds
    found = host.model_family(model)
    assert families.recompute_words(families.self_checked_family(class_name)) == families.recompute_words(found)
    row = next(r for r in families.supported_models_markdown().splitlines() if f"| {class_name} |" in r)
    assert f"| {families.recompute_words(found)} |" in row, row
    result = _trains_on_the_self_checked_path(model, name, subject, tiny_networks, class_name, why)
    if name in OFF_PATH:
        assert f"LoRA layers are in modules these inputs do not run, e.g. diffusion_model.{OFF_PATH[name]}" \
            in result.loading, result.loading


# ------------------------------------------------------------------ refusals before the loop
def test_a_class_whose_backward_fails_is_refused_by_the_check_naming_why(subject, tiny_networks):
    """PixelDiT (ComfyUI 0.33): its pixel blocks modulate a norm's output in place
    (comfy/ldm/pixeldit: apply_adaln_, x.addcmul_), which backward needs: the self-check refuses it
    before the loop with torch's reason, not a raw error from the loop. When ComfyUI changes those
    blocks this test fails, and the class can be given a tiny-model test that trains."""
    if "pixeldit" not in tf.SELF_CHECKED_CONFIGS:
        pytest.skip("PixelDiTT2I is a ComfyUI 0.33 class; this ComfyUI has none")
    model = tf.build_model("pixeldit")
    assert type(model.model).__name__ == "PixelDiTT2I" and "PixelDiTT2I" in families.SELF_CHECKED
    _refused_before_the_loop(model, "pixeldit", subject, tiny_networks,
                             r"cannot optimise PixelDiTT2I on the self-checked path .*check 2 \(the LoRA gets a "
                             r"gradient\) failed: backward through the model fails: RuntimeError: one of the variables "
                             r"needed for gradient computation has been modified by an inplace operation")


def _refused_before_the_loop(model, name, subject, networks, match):
    iterations = []
    with pytest.raises(self_check.SelfCheckFailed, match=match):
        optimise(model, tf.build_vae(name), tf.conditioning(name), subject, networks, iterations=2, images=iterations)
    assert not iterations, "an iteration ran before the refusal"
    assert all(p.grad is None for p in model.model.parameters())


def _first_lora_layer(model):
    name = sorted(host.lora_target_names(model))[0]
    return name, dict(model.model.diffusion_model.named_modules())[name]


def test_a_layer_class_that_ignores_object_patches_is_refused_naming_the_check(subject, tiny_networks):
    """A layer computing past ``forward`` (its class's __call__ never reads the patched forward):
    the LoRA would never act; the per-layer check refuses, naming the class and the check."""
    model = _as_class(tf.build_model("lumina2"), TinySubclassOfLumina2)
    _, layer = _first_lora_layer(model)

    class IgnoresObjectPatches(type(layer)):
        def __call__(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    layer.__class__ = IgnoresObjectPatches
    _refused_before_the_loop(model, "lumina2", subject, tiny_networks,
                             r"cannot optimise TinySubclassOfLumina2 on the self-checked path .*check 0 \(each LoRA "
                             r"layer computes as its stock layer plus the LoRA\) failed")


def test_a_model_reading_a_layers_weight_itself_is_refused_by_the_gradient_check(subject, tiny_networks):
    """A block that computes one of its linear layers from the layer's weight directly (the layer
    itself works, so the per-layer check passes): no gradient reaches that layer's LoRA."""
    model = _as_class(tf.build_model("lumina2"), TinySubclassOfLumina2)
    name, layer = _first_lora_layer(model)
    parent_name, attribute = name.rsplit(".", 1)
    parent = dict(model.model.diffusion_model.named_modules())[parent_name]

    class ReadsTheWeight(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):    # a copy, as model code casting a weight makes (the stored one is an inference tensor)
            return torch.nn.functional.linear(x, self.inner.weight.detach().clone(), self.inner.bias)

    # the model object's own module tree is the host's: this test's model is built for it alone
    setattr(parent, attribute, ReadsTheWeight(layer))
    assert host.lora_target_names(model) >= {f"{name}.inner"}
    _refused_before_the_loop(model, "lumina2", subject, tiny_networks,
                             rf"cannot optimise TinySubclassOfLumina2 on the self-checked path .*check 2 \(every LoRA "
                             rf"layer gets a gradient\) failed: LoRA layer diffusion_model.{name}.inner gets none")


def test_a_model_whose_training_forward_differs_from_its_stock_forward_is_refused(subject, tiny_networks):
    """A block that takes another branch while gradients are on (as model code that checks
    ``torch.is_grad_enabled()`` or a training flag): the training clone would learn on a model
    that is not the one the stock sampler runs."""
    model = _as_class(tf.build_model("lumina2"), TinySubclassOfLumina2)
    block = model.model.diffusion_model.layers[0]

    class OtherBranchInTraining(type(block)):
        def forward(self, x, *args, **kwargs):
            out = super().forward(x, *args, **kwargs)
            return out * 1.05 if torch.is_grad_enabled() else out

    block.__class__ = OtherBranchInTraining
    _refused_before_the_loop(model, "lumina2", subject, tiny_networks,
                             r"cannot optimise TinySubclassOfLumina2 on the self-checked path .*check 1 \(training "
                             r"forward = stock forward\) failed: the training clone's denoiser output differs")


def test_the_forward_tolerance_comes_from_the_compute_dtype():
    # 2**10 unit roundoffs in float32; an eighth of the output's scale in half precision
    assert self_check.forward_tolerance(torch.float32) == 2.0 ** -14
    assert self_check.forward_tolerance(torch.bfloat16) == self_check.forward_tolerance(torch.float16) == 2.0 ** -3
