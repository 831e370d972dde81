"""What SISO refuses before any work, and how the refusal reads: a model class the family table
refuses (and its subclasses), video / audio / 3D models, a sampling type the differentiable
sampler does not know, something that is not a MODEL, a VAE of another family, subject swap on a
refused class, a reference path that keeps state between denoiser calls (ComfyUI 0.33's Flux KV
Cache), and a size that is not a multiple of the VAE's block.

Refusals of the self-check (a class no row names whose training path turns out wrong) are tested
with that path in test_self_checked.py; refused input values in test_bad_inputs.py (through the
server) and test_input_checks.py (in-process). Tiny random-weight models built through ComfyUI's
own classes, in-process on the CPU, on whichever ComfyUI the suite runs against."""
import pytest
import torch

import comfy.model_base
import nodes as comfy_nodes
import tiny
import tiny_families as tf
from conftest import siso
from reference_conditioning import flux2_with_references, stock_node
from siso_runs import run_node

host = siso("siso_ops.host")
gen = siso("siso_ops.generation")
optim = siso("siso_ops.optimize")
families = siso("siso_ops.families")
subject_mod = siso("siso_ops.subject")
references = siso("siso_ops.host.references")
NODE = comfy_nodes.NODE_CLASS_MAPPINGS
SIZE = 64


# ----------------------------------------------------------------------------- model classes
def _tiny_wan21_video_model():
    """A tiny Wan 2.1 text-to-video MODEL (ComfyUI's WAN21_T2V config): a video model."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    with torch.inference_mode():
        config = sm.WAN21_T2V(dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16,
                                   dim=32, ffn_dim=64, freq_dim=16, text_dim=48, out_dim=16, num_heads=2, num_layers=1,
                                   dtype=torch.float32))
        config.set_inference_dtype(torch.float32, None)
        return comfy.model_patcher.ModelPatcher(config.get_model({}), load_device=torch.device("cpu"),
                                                offload_device=torch.device("cpu"))


def test_a_refused_image_family_and_a_video_model_are_named_before_any_work(subject, tiny_networks, monkeypatch):
    """A model class the table refuses is refused with the table's reason, a video model with its
    class named, both before the similarity networks load. (No image family is refused today but
    Stable Cascade, whose two-stage model is not built here: a Cosmos model stands in for a
    refused class, with the row taken out of the table.)"""
    loaded = []
    monkeypatch.setattr(gen.networks, "get", lambda *a, **k: loaded.append(a))
    settings = gen.GenerationSettings(width=64, height=64)
    monkeypatch.setattr(families, "FAMILIES", tuple(f for f in families.FAMILIES if "CosmosPredict2" not in f.model_classes))
    monkeypatch.setitem(families.REFUSED, "CosmosPredict2", "a reason given in the table")
    cosmos = tf.build_model("cosmos_predict2")
    with torch.inference_mode(), pytest.raises(ValueError, match="SISO cannot optimise CosmosPredict2 .*: a reason given "
                                                                 "in the table. Supported: "):
        gen.optimize_subject(cosmos, tf.build_vae("cosmos_predict2"), tf.conditioning("cosmos_predict2"), subject,
                             "d", "i", settings)
    video = _tiny_wan21_video_model()
    with torch.inference_mode(), pytest.raises(ValueError, match="SISO optimises image models; WAN21 .* is a video "
                                                                 "model. Supported: "):
        gen.optimize_subject(video, tf.build_vae("qwen_image"), tf.conditioning("cosmos_predict2"), subject,
                             "d", "i", settings)
    assert not loaded


class TinySubclassOfCosmosPredict2(comfy.model_base.CosmosPredict2):
    pass


def test_refusals_reach_subclasses_and_unlisted_classes_with_a_video_latent(subject, monkeypatch):
    """A subclass of a refused class is refused with its ancestor's reason; a class no list names
    whose latent is not an image's (Cosmos Predict2's one-frame Wan latent, its row taken out)
    is refused as video, both before any work."""
    monkeypatch.setattr(families, "FAMILIES", tuple(f for f in families.FAMILIES if "CosmosPredict2" not in f.model_classes))
    cosmos = tf.build_model("cosmos_predict2")
    with pytest.raises(ValueError, match=r"SISO optimises image models; CosmosPredict2 .* is a video or 3D model \(its "
                                         r"latent is not an image's\)"):
        host.model_family(cosmos)
    monkeypatch.setitem(families.REFUSED, "CosmosPredict2", "a reason given in the table")
    cosmos.model.__class__ = TinySubclassOfCosmosPredict2
    with pytest.raises(ValueError, match=r"SISO cannot optimise TinySubclassOfCosmosPredict2 .* \(a subclass of "
                                         r"CosmosPredict2\): a reason given in the table"):
        gen.optimize_subject(cosmos, tf.build_vae("cosmos_predict2"), tf.conditioning("cosmos_predict2"), subject,
                             None, None, gen.GenerationSettings(width=64, height=64))


def test_an_unsupported_model_is_refused_before_any_work(sd15, subject, feature_files):
    model, vae, positive, _ = sd15
    import comfy.model_sampling

    class OddPrediction:   # a prediction type the differentiable sampler does not know (x0 directly)
        def calculate_input(self, sigma, noise):
            return noise

        def calculate_denoised(self, sigma, model_output, model_input):
            return model_output

    class RFlowSampling(comfy.model_sampling.ModelSamplingDiscrete, OddPrediction):
        pass

    with torch.inference_mode():
        odd = model.clone()
        odd.add_object_patch("model_sampling", RFlowSampling(model.model.model_config))
    with pytest.raises(ValueError, match="SISO cannot optimise BaseModel .*RFlowSampling.*is not EPS, V-prediction, flow"):
        run_node(odd, vae, positive, subject, feature_files)
    with pytest.raises(TypeError, match="expected a ComfyUI MODEL"):
        run_node(vae, vae, positive, subject, feature_files)


def test_a_vae_of_another_family_is_refused_before_any_work(monkeypatch):
    """Flux's 16-channel VAE with an SD1.5 model: refused naming both, before the networks load."""
    model, vae = tiny.build_model("sd15"), tiny.build_vae(latent_channels=16)
    loaded = []
    monkeypatch.setattr(host, "weight_file_path", lambda kind, name: f"/nowhere/{name}")
    monkeypatch.setattr(siso("siso_ops.generation").networks, "get", lambda *a, **k: loaded.append(a))
    with pytest.raises(ValueError, match="the VAE makes 16-channel latents but .* works on 4 channels: the VAE "
                                         "belongs to another model family"):
        host.check_vae(vae, model)
    subject = subject_mod.prepare_subject(torch.rand(1, 64, 64, 3))
    with torch.inference_mode(), pytest.raises(ValueError, match="16-channel latents"):
        NODE["SISOOptimize"].execute(
            model, vae, tiny.conditioning("sd15"), subject, dino_weights="d", ir_weights="i", seed=0, width=64,
            height=64, steps=1, grad_steps=1, scheduler="simple", max_iterations=1, learning_rate=2e-4, lora_rank=4,
            lora_alpha=0.0, lora_target=host.TARGETS[0], dino_weight=1.0, ir_weight=1.0, early_stop_percent=3.0,
            early_stop_patience=7)
    assert not loaded
    host.check_vae(tiny.build_vae(latent_channels=4), model)   # the matching one passes


# ----------------------------------------------------------------------------- subject swap and references
def test_subject_swap_is_refused_for_a_refused_class_before_any_work(monkeypatch):
    """Every family of the table inverts today; a class the table refuses is refused by SISO
    ReNoise Invert before any work, with the table's reason (a Qwen-Image model stands in for a
    refused class, with its row taken out of the table)."""
    from test_editing import invert
    monkeypatch.setattr(families, "FAMILIES", tuple(f for f in families.FAMILIES if "QwenImage" not in f.model_classes))
    monkeypatch.setitem(families.REFUSED, "QwenImage", "a reason given in the table")
    model = tf.build_model("qwen_image")
    monkeypatch.setattr(host, "encode_photo", lambda *a: pytest.fail("work started"))
    with pytest.raises(ValueError, match="SISO cannot optimise QwenImage .*: a reason given in the table. Supported: "):
        invert(model, tf.build_vae("qwen_image"), tf.conditioning("qwen_image"), torch.rand(1, 64, 64, 3))


def test_a_reference_path_that_keeps_state_between_calls_is_refused_before_any_work(subject, tiny_networks,
                                                                                     monkeypatch):
    """ComfyUI 0.33's Flux KV Cache keeps the reference tokens' keys and values from the first
    denoiser call for every later one; SISO's iterations all run in one sampling run, so that state
    would outlive iteration 0. SISO Optimize refuses before the memory estimate, the networks or the
    clone (each would be work, and the estimate's pass would fill the cache)."""
    kv_cache = stock_node("nodes_flux", "FluxKVCache")
    model, vae, positive, _ = flux2_with_references(1)
    with torch.inference_mode():
        cached = kv_cache.execute(model).args[0]
    monkeypatch.setattr(gen.memory, "plan", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(gen.networks, "get", lambda *a, **k: pytest.fail("work started"))
    settings = gen.GenerationSettings(width=SIZE, height=SIZE)
    with torch.inference_mode(), pytest.raises(ValueError, match="SISO cannot optimise through Flux KV Cache: .*"
                                                                 "Connect SISO Optimize to the model before Flux KV Cache"):
        gen.optimize_subject(cached, vae, positive, subject, "d", "i", settings)
    # why: let through, the loop breaks at the backward of the first iteration that attends to the
    # cached keys and values: it reaches the graph of the call that cached them, already freed
    monkeypatch.undo()      # the memory estimate runs now; only the check is taken out
    monkeypatch.setattr(gen.host, "check_reference_path", lambda *a: None)
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=42, precision="fp32", gradient_checkpointing=False,
                                      optimization=optim.OptimizationSettings(max_iterations=3, learning_rate=5e-2,
                                                                              early_stop_patience=10))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="backward through the graph a second time"):
        gen.optimize_subject(cached, vae, positive, subject, None, None, settings, feature_networks=tiny_networks)
    # without references the patch does nothing (it only caches reference tokens): not refused there
    references.check_reference_path(cached, tf.conditioning("flux2", 0))
    # the model before Flux KV Cache (the node patches a clone) is not refused
    references.check_reference_path(model, positive)


# ----------------------------------------------------------------------------- sizes
def test_a_size_that_is_not_a_multiple_of_the_vaes_block_is_refused_before_any_work(subject, monkeypatch):
    """Where the queue cannot read the VAE's block (a VAE from a node other than a stock loader of a
    file, test below), it can only ask for a multiple of 8; Flux.2's VAE works on 16-pixel blocks,
    so the run refuses 72 px, naming 16, before the memory estimate or the networks; 80 px passes
    that check."""
    model, vae, positive = tf.build_model("flux2"), tf.build_vae("flux2"), tf.conditioning("flux2")
    assert host.latent_scale(vae) == 16
    monkeypatch.setattr(gen.memory, "plan", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(gen.networks, "get", lambda *a, **k: pytest.fail("work started"))
    with torch.inference_mode(), pytest.raises(ValueError, match="width 72 is not a multiple of 16: this model's VAE "
                                                                 "works on 16-pixel blocks; use 64 or 80"):
        gen.optimize_subject(model, vae, positive, subject, "d", "i", gen.GenerationSettings(width=72, height=64))
    host.check_size(vae, 80, 64)


def test_the_queue_reads_the_vae_block_from_the_file_a_stock_loader_names(tmp_path, monkeypatch):
    """A prompt whose SISO Optimize takes its VAE from a stock VAELoader: the file's header says
    its block before anything runs. Flux.2's VAE file, laid out as published (the SD autoencoder
    with 32 latent channels and a batch norm: tests/family_files.py), is read as 16 px, which is
    what ComfyUI's own VAE loader makes of the same file; width 776 (a multiple of 8, not of 16)
    is refused at queue time naming 16 and the file; 768 and auto pass. An SD-layout VAE file
    says nothing more than the 8-pixel rule. (The server's on-prompt handler calls this check_prompt;
    its other cases go through the server in test_bad_inputs.py.)"""
    import folder_paths
    import safetensors.torch
    import comfy.sd
    import comfy.utils
    import family_files
    folder = tmp_path / "vae"
    folder.mkdir()
    flux2 = folder / "flux2-vae.safetensors"
    safetensors.torch.save_file(family_files.tiny_flux2_vae_state_dict(), str(flux2))
    with torch.inference_mode():
        sd_vae = tiny.build_vae(4).first_stage_model.state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd_vae.items()}, str(folder / "sd-vae.safetensors"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "vae",
                        ([str(folder)], folder_paths.folder_names_and_paths["vae"][1]))
    assert host.vae_file_block("vae", "flux2-vae.safetensors") == 16
    with torch.inference_mode():   # what ComfyUI's loader makes of the same file
        assert comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(flux2))).spacial_compression_encode() == 16
    assert host.vae_file_block("vae", "sd-vae.safetensors") is None
    assert host.vae_file_block("vae", "no-such-file.safetensors") is None

    optimize = NODE["SISOOptimize"]

    def refusals(vae_name, width, height=768):
        prompt = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}},
                  "2": {"class_type": "SISOOptimize", "inputs": {"vae": ["1", 0], "width": width, "height": height}}}
        return optimize.check_prompt(prompt, "2")

    assert refusals("flux2-vae.safetensors", 776) == {
        "width": "width 776 is not a multiple of 16: the VAE flux2-vae.safetensors (VAELoader, node 1) works on "
                 "16-pixel blocks; use 768 or 784, or 0 (auto)"}
    assert set(refusals("flux2-vae.safetensors", 776, 40 * 16 + 8)) == {"width", "height"}
    assert refusals("flux2-vae.safetensors", 768) == {} and refusals("flux2-vae.safetensors", 0, 0) == {}
    assert refusals("sd-vae.safetensors", 776) == {}
