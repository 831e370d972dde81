"""SISO Optimize's auto settings (siso_ops/auto_settings.py): width, height, steps, grad_steps and
learning_rate at 0 take the loaded model's family row; numbers that are set (a saved workflow,
an API prompt) are used as they are; the report says which values ran and where each came from.
Tiny random Z-Image (ComfyUI's own ZImage class, the Lumina 2 row), in-process on the CPU."""
from dataclasses import replace

import pytest
import torch

import nodes as comfy_nodes
import tiny_families as tf
from conftest import siso

host = siso("siso_ops.host")
families = siso("siso_ops.families")
auto_settings = siso("siso_ops.auto_settings")
NODE = comfy_nodes.NODE_CLASS_MAPPINGS["SISOOptimize"]
ZIMAGE = "zimage"


def schema_defaults() -> dict:
    """Every SISO Optimize widget at the default its schema declares (what a node dropped into a
    graph holds), read from define_schema, not written down here."""
    return {spec.id: spec.default for spec in NODE.define_schema().inputs
            if getattr(spec, "default", None) is not None}


class DenoiserCalls:
    """Counts the calls of a MODEL's diffusion model (forward hook on the test's own tiny model)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.model.diffusion_model.register_forward_hook(self._seen)

    def _seen(self, *_):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


def run(model, vae, positive, subject, feature_files, monkeypatch, **values):
    """(best image, report, denoiser calls of each iteration): the calls between two iteration
    reports (the node's progress), so the memory estimate's probe call before the loop is not
    counted as a step."""
    args = dict(schema_defaults(), dino_weights=feature_files[0], ir_weights=feature_files[1])
    args.update(values)
    progress = siso("nodes.progress").IterationProgress
    seen = []
    original = progress.__call__

    def counted(self, report):
        seen.append(calls.count)
        original(self, report)

    monkeypatch.setattr(progress, "__call__", counted)
    with torch.inference_mode(), DenoiserCalls(model) as calls:
        lora, best, _, report = NODE.execute(model, vae, positive, subject, **args).args
    return best, report, [b - a for a, b in zip(seen, seen[1:])]


@pytest.fixture(scope="module")
def zimage():
    return tf.build_model(ZIMAGE), tf.build_vae(ZIMAGE), tf.conditioning(ZIMAGE)


def test_the_auto_inputs_default_to_0_and_the_advanced_ones_carry_the_flag_where_comfyui_has_it():
    defaults = schema_defaults()
    assert {k: defaults[k] for k in ("width", "height", "steps", "grad_steps", "learning_rate")} == \
        dict.fromkeys(("width", "height", "steps", "grad_steps", "learning_rate"), auto_settings.AUTO)
    specs = {spec.id: spec for spec in NODE.define_schema().inputs}
    import inspect
    has_flag = "advanced" in inspect.signature(type(specs["seed"]).__init__).parameters
    advanced = {"lora_rank", "lora_alpha", "lora_target", "dino_weight", "ir_weight", "early_stop_percent",
                "early_stop_patience", "low_memory", "precision", "scheduler", "compile"}
    marked = {name for name, spec in specs.items() if getattr(spec, "advanced", None)}
    assert marked == (advanced if has_flag else set())
    for name in advanced:   # what /object_info sends the frontend
        assert specs[name].as_dict().get("advanced") is (True if has_flag else None), name


def test_a_tiny_z_image_at_the_node_defaults_optimises_at_its_family_8_steps(zimage, subject, feature_files,
                                                                              monkeypatch):
    """No template values: every input at its schema default (0 = auto), only the weight files
    and the iteration cap given. The Z-Image row says 8 steps, grad_steps 1 at 768 px: the
    denoiser runs 8 times per iteration and the image is 768 px."""
    model, vae, positive = zimage
    row = families.family_of("Lumina2")
    assert (row.steps, row.grad_steps, row.size) == (8, 1, 768)
    best, report, calls = run(model, vae, positive, subject, feature_files, monkeypatch, max_iterations=2)
    assert "after 2 iterations" in report and calls == [row.steps], (calls, report)
    assert best.shape == (1, row.size, row.size, 3)
    z_image = next(v for v in row.variants if v.key == "z_image_modulation" and v.value is True)
    source = f"(auto: the {row.name} family row, {z_image.name})"   # the variant the model's config shows
    assert f"768x768 px, steps 8, grad_steps 1, learning_rate 0.0002 {source}" in report, report


def test_numbers_that_are_set_run_as_set_as_an_api_prompt_sends_them(zimage, subject, feature_files, monkeypatch):
    model, vae, positive = zimage
    best, report, calls = run(model, vae, positive, subject, feature_files, monkeypatch, width=64, height=96,
                              steps=3, grad_steps=2, learning_rate=1e-2, max_iterations=3, early_stop_patience=10)
    assert calls == [3, 3] and best.shape == (1, 96, 64, 3), (calls, report)
    assert "width 64, height 96, steps 3, grad_steps 2, learning_rate 0.01 (set)" in report, report


def test_a_mix_says_per_value_where_it_came_from_and_auto_grad_steps_stays_within_steps(subject, feature_files,
                                                                                          monkeypatch):
    model, vae, positive = tf.build_model("chroma"), tf.build_vae("chroma"), tf.conditioning("chroma")
    row = families.family_of("Chroma")
    assert row.grad_steps == 2
    best, report, calls = run(model, vae, positive, subject, feature_files, monkeypatch, width=64, height=64,
                              steps=1, max_iterations=2)
    assert calls == [1], report
    assert (f"width 64, height 64, steps 1 (set); grad_steps 1 (auto: the {row.name} family row, capped at the 1 "
            f"steps); learning_rate 0.0002 (auto: the {row.name} family row)") in report, report


def test_the_auto_size_is_checked_against_the_vae_block_before_any_work(subject, feature_files, monkeypatch):
    """Every row's size is a multiple of 32 (the largest VAE block); a row that were not is refused
    by the run's check against the VAE's block before any denoiser call (here the Flux.2 row at
    776 px: a multiple of 8, not of its VAE's 16-pixel block)."""
    model, vae, positive = tf.build_model("flux2"), tf.build_vae("flux2"), tf.conditioning("flux2")
    row = families.family_of("Flux2")
    monkeypatch.setattr(host, "model_family", lambda m: replace(row, size=776))
    with DenoiserCalls(model) as calls:
        with pytest.raises(ValueError, match=r"width 776 is not a multiple of 16.*use 768 or 784"):
            run(model, vae, positive, subject, feature_files, monkeypatch, max_iterations=1)
        assert calls.count == 0


def test_queue_time_checks_accept_auto_and_refuse_sizes_below_64():
    assert NODE.check_values(width=0, height=0, learning_rate=0.0) is None
    assert "width 32 is below 64: use 0 (auto" in NODE.check_values(width=32, height=0)
    assert "height 100 is not a multiple of 8" in NODE.check_values(width=0, height=100)
    assert "learning_rate 1e-07 is below 1e-6" in NODE.check_values(learning_rate=1e-7)
    # the refine route's mask-size check: auto's size is known when the model is, at run time
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
              "2": {"class_type": "SISOOptimize", "inputs": {"width": 0, "height": 0, "mask": ["1", 1]}}}
    assert NODE.check_prompt(prompt, "2") == {}


def test_every_row_numbers_agree_with_its_advice_and_self_checked_classes_take_parent_or_generic():
    for row in families.FAMILIES:
        assert f"{row.steps} step" in row.optimise and f"grad_steps {row.grad_steps}" in row.optimise, row.name
        assert 1 <= row.grad_steps <= row.steps and row.size % 32 == 0 and row.learning_rate > 0, row.name
    parent = families.family_of("Lumina2")
    inherited = families.unlisted_family(["ZImagePixelSpace", "Lumina2"], 2, "ZImagePixelSpace")
    assert (inherited.steps, inherited.grad_steps, inherited.size) == (parent.steps, parent.grad_steps, parent.size)
    structural = families.unlisted_family(["ErnieImage"], 2, "ErnieImage")
    assert {k: getattr(structural, k) for k in families.GENERIC_SETTINGS} == families.GENERIC_SETTINGS
    gen = siso("siso_ops.generation")
    auto = gen.GenerationSettings(width=0, height=0, steps=0, grad_steps=0,
                                  optimization=gen.OptimizationSettings(learning_rate=0))
    _, said = auto_settings.resolve(auto, inherited)
    assert said.endswith(f"(auto: a subclass of Lumina2, on {parent.name}'s row)"), said
    settings, said = auto_settings.resolve(auto, structural)
    assert (settings.steps, settings.grad_steps, settings.width) == (8, 2, 768)
    assert "generic default for a class with no table row (ErnieImage)" in said


def test_editing_takes_size_and_steps_from_the_inversion_and_the_paper_editing_rate():
    from types import SimpleNamespace
    gen = siso("siso_ops.generation")
    row = families.family_of("Chroma")   # grad_steps 2: capped at a 1-step inversion
    inversion = SimpleNamespace(size=(96, 64), sigmas=torch.tensor([1.0, 0.0]))
    auto = gen.GenerationSettings(width=0, height=0, steps=0, grad_steps=0,
                                  optimization=gen.OptimizationSettings(learning_rate=0))
    settings, said = auto_settings.resolve(auto, row, inversion)
    assert (settings.width, settings.height, settings.steps, settings.grad_steps) == (64, 96, 1, 1)
    assert settings.optimization.learning_rate == families.EDIT_LEARNING_RATE
    assert said == (f"64x96 px, steps 1 (from the inversion); grad_steps 1 (auto: the {row.name} family row, capped "
                    f"at the 1 steps); learning_rate 0.0003 (auto: the paper's editing rate)")
    # steps and size set on the node are not used when editing (as before auto existed)
    settings, _ = auto_settings.resolve(replace(auto, width=512, steps=4), row, inversion)
    assert (settings.width, settings.steps) == (64, 1)


# ----------------------------------------------------------------------------- variants a file shows
def _variant_row(class_name: str):
    row = families.family_of(class_name)
    assert row.variants, class_name
    return row


@pytest.mark.parametrize("class_name", [f.model_classes[0] for f in families.FAMILIES if f.variants])
def test_each_variant_of_a_row_gives_its_own_advice_and_a_config_that_shows_none_keeps_the_row(class_name):
    row = _variant_row(class_name)
    for variant in row.variants:
        assert f"{variant.steps} step" in row.optimise and f"grad_steps {variant.grad_steps}" in row.optimise, variant
        taken = families.for_config(row, {variant.key: variant.value, "image_model": "x"})
        assert (taken.steps, taken.grad_steps, taken.variant) == (variant.steps, variant.grad_steps, variant.name)
        assert (taken.name, taken.size, taken.lora) == (row.name, row.size, row.lora)   # only the advice changes
    assert len({(v.key, v.value) for v in row.variants}) == len(row.variants)   # no two variants on one value
    for nothing in (None, {"image_model": "x"}):
        kept = families.for_config(row, nothing)
        absent = next((v for v in row.variants if v.absent is not None and v.absent == v.value), None)
        if nothing is None or absent is None:
            assert kept == row
        else:   # a key ComfyUI leaves out at the network's default: that default's variant
            assert (kept.steps, kept.grad_steps, kept.variant) == (absent.steps, absent.grad_steps, absent.name)


# tiny model -> (row class, the variant's words, steps, grad_steps): what each tiny config is
VARIANT_MODELS = {
    "flux_dev": ("Flux", "dev (the file has a guidance embedding)", 8, 2),
    "flux_schnell": ("Flux", "schnell (the file has no guidance embedding)", 1, 1),
    "flux2": ("Flux2", "dev (the file has a guidance embedding)", 8, 2),
    "zimage": ("Lumina2", "Z-Image (the file has Z-Image's modulation; Z-Image base: set steps by hand)", 8, 1),
    "lumina2": ("Lumina2", "Lumina 2 (the file has no Z-Image modulation)", 8, 2),
    "hunyuan_image21": ("HunyuanImage21", "base (the file has no guidance embedding)", 8, 2),
    # a 1-block MMDiT is neither Medium (24) nor Large (38): the row's own numbers, no variant named
    "sd3": ("SD3", "", 4, 1),
}


def _tiny(name):
    import tiny
    return tiny.build_model(name) if name in tiny.FAMILIES else tf.build_model(name)


@pytest.mark.parametrize("name", list(VARIANT_MODELS))
def test_the_loaded_model_s_config_picks_the_variant(name):
    """Through the host, on models built by ComfyUI's own classes: the variant comes from the
    MODEL's detected config. For the guidance embedding and SD3's depth the value is the one
    ComfyUI's detection reads from the file's weights (``guidance_in.*``; the MMDiT's width / 64):
    detect_unet_config on the tiny network's own state dict gives it back. (Z-Image is detected by its 3840-wide layers, which no tiny model
    has; its config value is checked as the class holds it.)"""
    row_class, words, steps, grad_steps = VARIANT_MODELS[name]
    model = _tiny(name)
    family = host.model_family(model)
    assert (family.name, family.variant, family.steps, family.grad_steps) == \
        (families.family_of(row_class).name, words, steps, grad_steps)
    config = model.model.model_config.unet_config
    read_from_weights = {"guidance_embed", "depth"} & {v.key for v in families.family_of(row_class).variants} & set(config)
    if read_from_weights:
        import comfy.model_detection
        detected = comfy.model_detection.detect_unet_config(model.model.diffusion_model.state_dict(), "")
        assert {k: detected[k] for k in read_from_weights} == {k: config[k] for k in read_from_weights}, name


def test_a_tiny_flux_dev_at_the_node_defaults_optimises_at_dev_s_8_steps_and_says_why(subject, feature_files,
                                                                                       monkeypatch):
    """Flux.1 dev at auto takes the dev advice (8 steps, grad_steps 2), not schnell's 1 step, and
    the report says which variant and what showed it. 64 px set to keep the test small."""
    import tiny
    model, vae, positive = tiny.build_model("flux_dev"), tiny.build_vae(16), tiny.conditioning("flux_dev")
    row = families.family_of("Flux")
    best, report, calls = run(model, vae, positive, subject, feature_files, monkeypatch, width=64, height=64,
                              max_iterations=2)
    assert calls == [8] and best.shape == (1, 64, 64, 3), (calls, report)
    assert (f"steps 8, grad_steps 2, learning_rate 0.0002 (auto: the {row.name} family row, dev (the file has a "
            "guidance embedding))") in report, report
