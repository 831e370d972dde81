"""The memory estimate SISO Optimize makes before any work (siso_ops/memory.py), held against
what real runs keep and peak at on the CPU, and the low_memory choice it drives: ``auto`` turns
gradient checkpointing off only where the run fits without it, and a run that cannot fit is
refused, with the estimate, the device's memory and what to change, before a network is read."""
import itertools
import os
import re

import pytest
import torch

import tiny
from conftest import siso

host = siso("siso_ops.host")
memory = siso("siso_ops.memory")
gen = siso("siso_ops.generation")
optim = siso("siso_ops.optimize")
sampler = siso("siso_ops.sampler")
fn = siso("siso_ops.feature_networks")
GiB = 2 ** 30


def _key(tensor):
    return tensor.untyped_storage()._cdata


def _kept_bytes(run, weights: set) -> int:
    """Bytes autograd keeps for backward while ``run()`` runs: each storage once, weights left out."""
    kept = {}

    def pack(tensor):
        if _key(tensor) not in weights:
            kept.setdefault(_key(tensor), tensor.untyped_storage().nbytes())
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(kept.values())


def _storages(*modules) -> set:
    return {_key(t) for m in modules for t in itertools.chain(m.parameters(), m.buffers())}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux_schnell", "sd15_fp8"])
def test_what_a_real_iteration_keeps_for_backward_is_what_the_estimate_counts(family, tiny_networks, monkeypatch):
    """The shape-only pass counts the tensors the real training path keeps. The decoder and both
    networks run the very same operations on shapes, so their counts must agree to the byte
    (allowed 1 %, for a kernel of another torch build keeping one small extra tensor). The
    denoiser's probe reproduces TrainableModel's training forward outside ComfyUI's guider and
    cast machinery; measured here it is within 2-6 % of the real count (a few rank-sized LoRA
    tensors and the model's input scaling are kept differently); allowed 10 %. ``sd15_fp8``: the
    file loaded by UNETLoader with weight_dtype fp8_e4m3fn, whose layers cast their weights at
    every call; the training path keeps no cast copy, and neither may the count (before the probe
    followed the training path there it counted 429 MB against 48 MB kept). Measured now: 40.0 MB
    counted against 48.1 MB kept (-17 %): the real pass keeps more activation tensors of its own
    (separate storages where the shape-only layers share one) and ComfyUI's manual-cast norms
    keep float32 copies of their fp8 weights, which the shape-only pass does not run; allowed
    25 % there, which still fails a count that keeps the cast weights (+790 %)."""
    tolerance = 0.25 if family == "sd15_fp8" else 0.10
    if family == "sd15_fp8":
        import test_quantised
        model = test_quantised.load_model("sd15", "fp8_e4m3fn", monkeypatch)
        family = "sd15"
    else:
        model = tiny.build_model(family)
    vae = tiny.build_vae(16 if family.startswith("flux") else 4)
    real, counted = kept_and_counted(model, vae, tiny.conditioning(family), 128, tiny_networks)
    print(f"\n{family}: real kept bytes {real}, estimated {counted}")
    for part in ("decoder", "dino", "ir"):
        assert counted[part] == pytest.approx(real[part], rel=0.01), part
    assert counted["denoiser"] == pytest.approx(real["denoiser"], rel=tolerance)


def kept_and_counted(model, vae, positive, size: int, networks) -> tuple:
    """({part: bytes a real iteration keeps for backward}, {part: bytes the estimate counts}) for the
    denoiser, the decoder and both networks, at size x size on the CPU in float32."""
    dino, ir = networks
    latent = host.empty_latent(model, size, size, vae)   # as the run makes it: the VAE's own scale
    with torch.inference_mode(), host.training_mode():
        estimate = memory.estimate_iteration(model, vae, positive, size, size, "cpu", torch.float32, networks=[
            memory.NetworkUse("dino", dino, in_ram=True), memory.NetworkUse("ir", ir, in_ram=True)])
        trainable = host.TrainableModel(model, 4)
        decoder = host.DifferentiableDecoder(vae, model, torch.device("cpu"))
        weights = _storages(model.model, decoder.module, dino.module, ir.module) | {
            _key(p) for p in trainable.parameters().values()}
        real = {}

        def body(denoise, start, sigmas, clean):
            out = []
            real["denoiser"] = _kept_bytes(lambda: out.append(sampler.sample(denoise, start, sigmas, 1)), weights)
            images = []
            real["decoder"] = _kept_bytes(lambda: images.append(decoder(out[0])), weights | {_key(out[0])})
            for kind, network in (("dino", dino), ("ir", ir)):
                real[kind] = _kept_bytes(lambda: network.embed(images[0]), weights)
        try:
            host.run_with_denoiser(trainable, positive, latent, host.seed_noise(latent, 0),
                                   host.sigma_schedule(model, "simple", 1), 0, body)
        finally:
            trainable.unload()
            decoder.release()
    return real, {part: estimate.activations[part].kept for part in real}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_estimate_holds_against_the_measured_peak_of_a_cpu_run(checkpointing, subject, tiny_networks):
    """The whole estimate against what a real run adds to this process at its peak (the kernel's
    RSS high-water mark, reset before the run; weights already in RAM are in neither). Tiny SD1.5
    at 384 px, where the decoder's activations (hundreds of MB) dominate the process's own noise.
    Bound, upward: auto turns checkpointing off only with SAFETY_FRACTION of headroom, so a run
    must never take more than the estimate plus that fraction; downward: the estimate may not
    be so high that auto refuses room it has, at most 1.5x the measurement. Measured on this
    machine (tiny SD1.5, 2 iterations, one backward): 256 px -7 % / +8 %, 512 px -2 % / -2 %
    (off / on). The printed figures are this run's."""
    model = tiny.build_model("sd15")
    vae = tiny.build_vae(4)
    positive = tiny.conditioning("sd15")
    settings = gen.GenerationSettings(width=384, height=384, gradient_checkpointing=checkpointing, precision="fp32",
                                      optimization=optim.OptimizationSettings(max_iterations=2))
    gen.release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")            # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("this kernel does not let a process reset its RSS high-water mark")
    start = _status_bytes("VmRSS")
    with torch.inference_mode():
        _, _, result = gen.optimize_subject(model, vae, positive, subject, None, None, settings,
                                            feature_networks=tiny_networks)
    measured = _status_bytes("VmHWM") - start
    estimate = result.memory.estimate.needed(checkpointing)
    print(f"\nlow_memory {checkpointing}: estimate {estimate / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB "
          f"({estimate / measured - 1:+.1%})")
    assert result.memory.checkpointing is checkpointing
    assert measured <= estimate * (1 + memory.SAFETY_FRACTION)
    assert estimate <= 1.5 * measured


def _estimate(needed_off: int, needed_on: int) -> "memory.MemoryEstimate":
    """A synthetic estimate: 1 GiB of weights plus activations making the given totals."""
    estimate = memory.MemoryEstimate("cpu", 512, 512, weights={"diffusion model": GiB})
    estimate.activations["all"] = memory.ActivationCount(kept=needed_off - GiB, kept_checkpointed=needed_on - GiB)
    return estimate


def test_auto_turns_checkpointing_off_only_where_the_run_fits_without_it():
    estimate = _estimate(needed_off=10 * GiB, needed_on=4 * GiB)
    reserve = GiB
    roomy = memory.DeviceMemory("cpu", free=int(10 * GiB * (1 + memory.SAFETY_FRACTION)) + reserve, reserve=reserve)
    tight = memory.DeviceMemory("cpu", free=10 * GiB, reserve=reserve)     # fits off only without the margin
    small = memory.DeviceMemory("cpu", free=5 * GiB, reserve=reserve)
    assert memory.resolve_checkpointing("auto", estimate, roomy) is False
    assert memory.resolve_checkpointing("auto", estimate, tight) is True
    assert memory.resolve_checkpointing("auto", estimate, small) is True
    # an explicit choice keeps its meaning (saved workflows with low_memory true / false)
    assert memory.resolve_checkpointing(True, estimate, roomy) is True
    assert memory.resolve_checkpointing(False, estimate, roomy) is False
    assert memory.resolve_checkpointing(False, estimate, tight) is False     # the bare estimate fits
    # no estimate (it could not be made): auto takes the safe choice, nothing is refused
    assert memory.resolve_checkpointing("auto", None, None) is True
    assert memory.resolve_checkpointing(False, None, None) is False
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="auto"):
            memory.resolve_checkpointing(bad, estimate, roomy)


def test_a_run_that_cannot_fit_is_refused_with_the_estimate_the_memory_and_what_to_change():
    estimate = _estimate(needed_off=10 * GiB, needed_on=4 * GiB)
    small = memory.DeviceMemory("cpu", free=3 * GiB, total=8 * GiB)
    with pytest.raises(ValueError) as refused:
        memory.resolve_checkpointing("auto", estimate, small, torch.float32)
    message = str(refused.value)
    assert "4.0 GiB" in message and "3.0 GiB" in message and "8.0 GiB" in message   # estimate, available, total
    assert "width and height" in message and "bf16" in message
    assert "turn low_memory on" not in message            # it is on already
    with pytest.raises(ValueError) as refused:
        memory.resolve_checkpointing(False, estimate, memory.DeviceMemory("cpu", free=6 * GiB, total=8 * GiB))
    assert "10.0 GiB" in str(refused.value) and "turn low_memory on (about 4.0 GiB)" in str(refused.value)
    # bf16 is not advised to a run that already computes in it
    with pytest.raises(ValueError) as refused:
        memory.resolve_checkpointing(True, estimate, small, torch.bfloat16)
    assert "bf16" not in str(refused.value)


def _device_with(free: int):
    return lambda device: {"free": int(free), "unloadable": 0, "total": int(free)}


@pytest.mark.parametrize("room", ["plenty", "little"])
def test_optimize_follows_the_estimate_and_uses_the_choice_everywhere(room, sd15, subject, tiny_networks, monkeypatch):
    model, vae, positive, _ = sd15
    # float32 whatever the CPU: precision auto picks bf16 on CPUs with AVX-512 BF16 or AMX, which
    # halves the networks' weights and the activations this test's figures are computed for
    settings = gen.GenerationSettings(width=64, height=64, precision="fp32",
                                      optimization=optim.OptimizationSettings(max_iterations=1))
    assert settings.gradient_checkpointing == "auto"          # the default
    with torch.inference_mode(), host.training_mode():
        estimate = memory.estimate_iteration(model, vae, positive, 64, 64, "cpu", torch.float32, networks=[
            memory.NetworkUse("dino", tiny_networks[0], in_ram=True), memory.NetworkUse("ir", tiny_networks[1], in_ram=True)])
    off, on = estimate.needed(False), estimate.needed(True)
    assert on < off
    reserve = host.memory_reserve("cpu")
    free = 4 * off + reserve if room == "plenty" else (on + off) / 2 + reserve   # between: only "on" fits the margin
    monkeypatch.setattr(host, "device_memory", _device_with(free))
    used = {}

    class Trainable(host.TrainableModel):
        def __init__(self, *args, checkpointing=False, **kwargs):
            used["denoiser"] = checkpointing
            super().__init__(*args, checkpointing=checkpointing, **kwargs)

    class Decoder(host.DifferentiableDecoder):
        def __init__(self, *args, checkpointing=False, **kwargs):
            used["decoder"] = checkpointing
            super().__init__(*args, checkpointing=checkpointing, **kwargs)
    monkeypatch.setattr(host, "TrainableModel", Trainable)
    monkeypatch.setattr(host, "DifferentiableDecoder", Decoder)

    def during_the_loop(report):
        for kind, net in zip(("dino", "ir"), tiny_networks):
            used[kind] = net.module.grad_checkpointing
    with torch.inference_mode():
        _, _, result = gen.optimize_subject(model, vae, positive, subject, None, None, settings,
                                            feature_networks=tiny_networks, on_iteration=during_the_loop)
    expected = room == "little"
    assert result.memory.checkpointing is expected and result.memory.mode == "auto"
    assert used == {"denoiser": expected, "decoder": expected, "dino": expected, "ir": expected}
    assert ("low_memory " + ("on" if expected else "off")) in result.memory.describe()


def test_the_refusal_comes_before_any_network_is_read(sd15, subject, monkeypatch, tmp_path):
    """The files need not even exist: the estimate assumes the published architectures then, and
    the memory error is what the user sees, before any file is opened or model is unloaded."""
    model, vae, positive, _ = sd15
    monkeypatch.setattr(host, "device_memory", _device_with(1 * 2**20))    # 1 MiB
    opened = []
    monkeypatch.setattr(gen.networks, "get", lambda *a, **k: opened.append(a))
    monkeypatch.setattr(host, "make_room_for_training", lambda device: opened.append(("room", device)))
    # float32 whatever the CPU: precision auto picks bf16 on CPUs with AVX-512 BF16 or AMX, which
    # halves the networks' weights and the activations this test's figures are computed for
    settings = gen.GenerationSettings(width=64, height=64, precision="fp32",
                                      optimization=optim.OptimizationSettings(max_iterations=1))
    with torch.inference_mode(), pytest.raises(ValueError, match="does not fit") as refused:
        gen.optimize_subject(model, vae, positive, subject, str(tmp_path / "missing_dino.safetensors"),
                             str(tmp_path / "missing_ir.pth"), settings)
    assert opened == []
    # the published DINOv2 ViT-L/14 and IR ViT-H/14 in float32 alone are 3.7 GB: too big for 1 MiB whatever the size
    message = str(refused.value)
    assert float(re.search(r"needs about ([0-9.]+) GiB", message).group(1)) > 3.4
    assert "weights alone take" in message and "bf16" in message


def test_network_sizes_come_from_the_files_shapes_or_the_published_architecture(feature_files, tiny_networks):
    import folder_paths
    folder = os.path.join(folder_paths.models_dir, "siso")
    for kind, name, loaded in zip(("dino", "ir"), feature_files, tiny_networks):
        shaped = memory.meta_network(kind, os.path.join(folder, name))
        assert all(p.device.type == "meta" for p in shaped.module.parameters())
        assert [tuple(p.shape) for p in shaped.module.parameters()] == [tuple(p.shape) for p in loaded.module.parameters()]
    # no readable file: the published networks (DINOv2 ViT-L/14 304 M, IR ViT-H/14 + fc1 about 631 M parameters)
    dino = memory.meta_network("dino", None, torch.bfloat16)
    ir = memory.meta_network("ir", "/nonexistent/ir_features.pth")
    assert sum(p.numel() for p in dino.module.parameters()) == pytest.approx(304e6, rel=0.01)
    assert sum(p.numel() for p in ir.module.parameters()) == pytest.approx(631e6, rel=0.02)
    assert {p.dtype for p in dino.module.parameters()} == {torch.bfloat16}


def test_an_estimate_that_cannot_be_made_leaves_checkpointing_on_and_refuses_nothing(sd15, subject, tiny_networks,
                                                                                     monkeypatch):
    model, vae, positive, _ = sd15

    def broken(*args, **kwargs):
        raise NotImplementedError("a layer without a shape-only forward")
    monkeypatch.setattr(memory, "estimate_iteration", broken)
    settings = gen.GenerationSettings(width=64, height=64, optimization=optim.OptimizationSettings(max_iterations=1))
    with torch.inference_mode():
        _, _, result = gen.optimize_subject(model, vae, positive, subject, None, None, settings,
                                            feature_networks=tiny_networks)
    assert result.memory.estimate is None and result.memory.checkpointing is True


def test_low_memory_accepts_auto_and_the_legacy_booleans_only():
    for mode in ("auto", True, False):
        gen.GenerationSettings(gradient_checkpointing=mode).check()
    for bad in ("true", "on", 0, None):
        with pytest.raises(ValueError, match="low_memory"):
            gen.GenerationSettings(gradient_checkpointing=bad).check()


def test_activations_grow_with_the_image_and_checkpointing_keeps_less(sd15):
    model, vae, positive, _ = sd15
    with torch.inference_mode(), host.training_mode():
        small, large = (memory.estimate_iteration(model, vae, positive, s, s, "cpu", torch.float32) for s in (128, 256))
    for part in ("denoiser", "decoder"):
        a, b = small.activations[part], large.activations[part]
        # 4x the pixels: activations scale with the pixel count (4x), attention maps faster, the
        # conditioning and the LoRA's rank-sized tensors slower; between 3x and 6x
        assert 3 * a.kept <= b.kept <= 6 * a.kept, part
        assert b.kept_checkpointed < b.kept
    assert large.peak(True) < large.peak(False)


def test_on_a_gpu_what_comfyui_holds_there_counts_as_available_and_nothing_is_in_ram(sd15, monkeypatch):
    """SISO unloads ComfyUI's models from the GPU before training, so their memory is the run's;
    models on other devices are not. No GPU here: ComfyUI's bookkeeping is stood in for."""
    import comfy.model_management as management

    class Loaded:
        def __init__(self, device, size):
            self.device, self.size = device, size

        def model_loaded_memory(self):
            return self.size
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(management, "current_loaded_models", [
        Loaded(gpu, 3 * GiB), Loaded(torch.device("cuda", 1), 5 * GiB), Loaded(torch.device("cpu"), 7 * GiB)])
    monkeypatch.setattr(management, "get_free_memory", lambda dev=None, torch_free_too=False: 2 * GiB)
    monkeypatch.setattr(management, "get_total_memory", lambda dev=None, torch_total_too=False: 24 * GiB)
    found = memory.available_memory(gpu)
    assert (found.free, found.unloadable, found.usable, found.total) == (2 * GiB, 3 * GiB, 5 * GiB, 24 * GiB)
    assert "after unloading other models" in found.describe()
    assert memory.available_memory("cpu").unloadable == 0
    # the estimate for a GPU: every weight must come to it, bfloat16 mixed precision keeps less than float32
    model, vae, positive, _ = sd15
    with torch.inference_mode(), host.training_mode():
        on_gpu = memory.estimate_iteration(model, vae, positive, 256, 256, gpu, torch.bfloat16)
        on_cpu = memory.estimate_iteration(model, vae, positive, 256, 256, "cpu", torch.float32)
    assert on_gpu.already_in_ram == 0 and on_gpu.needed(True) == on_gpu.peak(True)
    assert on_cpu.already_in_ram == host.model_weight_bytes(model) > 0
    for part in ("denoiser", "decoder"):
        assert on_gpu.activations[part].kept < on_cpu.activations[part].kept, part
    assert on_gpu.weights["decoder copy"] * 2 == on_cpu.weights["decoder copy"]


def _tiny_families():
    import tiny_families     # the table's rows and the classes of the self-checked path
    return list(tiny_families.FAMILIES) + sorted(tiny_families.SELF_CHECKED_CONFIGS)


@pytest.mark.parametrize("family", _tiny_families())
def test_the_estimate_is_made_for_every_model_family(family):
    """The shape-only pass runs each family's own ComfyUI forward, so a family that it could not
    run would silently lose its estimate (auto would then always recompute): every family SISO
    supports gets one, with the published similarity networks, and checkpointing keeps less
    (self-checked classes too: 0.33's Anima turns autocast off for its tensors' device, which the
    shape-only pass had to answer for the meta device)."""
    import tiny_families as tf
    model = tf.build_model(family)
    try:
        host.check_supported(model)
    except ValueError:
        pytest.skip(f"{family} is refused before any work on this ComfyUI")
    vae, positive = tf.build_vae(family), tf.conditioning(family)
    size = max(128, tf.MIN_SIZE.get(family, 64))
    with torch.inference_mode():
        estimate = memory.estimate_iteration(model, vae, positive, size, size, "cpu", torch.float32, networks=[
            memory.NetworkUse("dino", None, None), memory.NetworkUse("ir", None, None)])
    denoiser = estimate.activations["denoiser"]
    assert 0 < denoiser.kept_checkpointed < denoiser.kept
    assert estimate.activations["decoder"].kept >= 0 and estimate.activations["dino"].kept > 0
    assert estimate.peak(True) < estimate.peak(False)


def test_weights_comfyui_has_not_loaded_yet_are_not_counted_as_in_ram():
    """ComfyUI 0.33 leaves a GGUF model's weights on the meta device until its first sampler call
    (measured with Flux.2 klein Q8_0: 3.6 GiB entered RAM inside SISO's first iteration): such a
    model's weights must be asked for, not assumed resident."""
    model = tiny.build_model("sd15")     # built for this test alone
    assert host.model_weights_in_ram(model)
    layer = next(m for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear))
    layer.weight = torch.nn.Parameter(torch.empty(layer.weight.shape, device="meta"), requires_grad=False)
    assert not host.model_weights_in_ram(model)


class _ReadsItsConditioning(torch.nn.Module):
    """A forward that reads its conditioning's VALUES as Sana's does (ComfyUI_ExtraModels'
    sana_multi_scale.forward_raw): ComfyUI's cast_to moves it to the latent's device (empty_like
    there + copy_), a length comes from its non-zero rows by .item(), a mask made on the CPU is
    moved to the latent's device and filled up to that length, and masked_select cuts the
    embedded caption with it; the image tokens then attend to it."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(16, 32)
        self.out = torch.nn.Linear(32, 32)

    def forward(self, x, y):
        import comfy.model_management
        y = comfy.model_management.cast_to(y, dtype=torch.float32, device=x.device)
        length = int((y != 0).any(-1).sum().item())
        mask = torch.zeros(1, y.shape[1], dtype=torch.int).to(x.device)
        mask[0, :length] = 1
        y = self.embed(y).masked_select(mask.unsqueeze(-1).bool()).view(1, -1, 32)
        return (self.out(x) @ y.transpose(1, 2)).softmax(-1) @ y   # attention to the caption: kept at its length


def test_a_forward_that_reads_its_conditionings_values_is_counted_with_them_real():
    """memory_shapes._ShapeRun's real_inputs (the estimate's second try, memory.denoiser_activations):
    on shapes alone this forward stops at .item(); with the conditioning real it runs, what comes
    from the conditioning alone stays real (the length, the moved mask, the cast copy), and the
    count equals what the real pass keeps, byte for byte: the same operations on the same shapes,
    masked_select's output made at the mask's count. The conditioning given is left as it was."""
    shapes = siso("siso_ops.memory_shapes")
    torch.manual_seed(0)
    module = _ReadsItsConditioning()
    x = torch.randn(1, 4, 32)
    y = torch.cat([torch.randn(1, 5, 16), torch.zeros(1, 3, 16)], dim=1)   # 5 caption rows of 8
    before = y.clone()
    real = _kept_bytes(lambda: module(x, y), _storages(module))
    probe = shapes.meta_copy(module)
    for parameter in probe.parameters():   # the copy's are frozen (a denoiser's); these train, as the real ones
        parameter.requires_grad_(True)
    meta_x = x.to("meta")
    with pytest.raises(RuntimeError, match="meta"):
        shapes.count_kept(lambda: probe(meta_x, y.to("meta")), [probe], (), torch.float32, "cpu")
    counted = shapes.count_kept(lambda: probe(meta_x, y), [probe], (), torch.float32, "cpu", real_inputs=True)
    assert counted.kept == real > 0
    assert torch.equal(y, before)          # the probe ran on the conditioning itself and left it as it was
    # a caption of 2 rows keeps less: the length is read, not assumed
    short = torch.cat([torch.randn(1, 2, 16), torch.zeros(1, 6, 16)], dim=1)
    short_before = short.clone()
    assert shapes.count_kept(lambda: probe(meta_x, short), [probe], (), torch.float32, "cpu",
                             real_inputs=True).kept == _kept_bytes(lambda: module(x, short), _storages(module)) < real
    assert torch.equal(short, short_before)


# ----------------------------------------------------------------------------- releasing the networks
def test_free_model_and_node_cache_releases_the_similarity_networks(feature_files):
    """DINOv2 and IR stay loaded between runs (a second run reads no file) while a SISO node object
    lives in ComfyUI's node cache; "Free model and node cache" (POST /free with free_memory:
    unload_all_models, then PromptExecutor.reset, as main.py runs it) releases them: nothing of the
    pack keeps them, so their RAM is freed. Before, a module-level cache held them for the life of
    the process (1.75 GiB in bfloat16, 3.5 GiB in float32)."""
    import uuid
    import weakref

    import numpy as np
    from PIL import Image

    import folder_paths
    from siso_runs import free_model_and_node_cache, prompt_executor
    networks = siso("siso_ops.loaded_networks").networks
    name = f"subject-{uuid.uuid4().hex}.png"
    pixels = (torch.rand(48, 48, 3, generator=torch.Generator().manual_seed(0)) * 255).numpy().astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder_paths.get_input_directory(), name))
    dino, ir = feature_files
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
              "2": {"class_type": "LoadSubject", "inputs": {"image": ["1", 0], "mask_marks": "subject",
                                                            "background": "white"}},
              "3": {"class_type": "SISOSubjectScore", "inputs": {
                  "images": ["1", 0], "subject": ["2", 0], "dino_weights": dino, "ir_weights": ir,
                  "dino_weight": 1.0, "ir_weight": 1.0, "precision": "fp32"}},
              "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 3]}}}
    networks.clear()
    executor = prompt_executor()
    executor.execute(prompt, "p1", {}, ["4"])
    assert executor.success, executor.status_messages
    assert set(networks.entries) == {"dino", "ir"}
    alive = [weakref.ref(entry[1]) for entry in networks.entries.values()]
    prompt["3"]["inputs"]["dino_weight"] = 0.5      # a second run reuses them: the same objects
    executor.execute(prompt, "p2", {}, ["4"])
    assert executor.success and [a() for a in alive] == [e[1] for e in networks.entries.values()]
    free_model_and_node_cache(executor)
    assert networks.entries == {}
    assert all(ref() is None for ref in alive), "the networks' memory is released"


def test_subject_score_asks_comfyui_for_room_before_its_networks_go_to_the_device(feature_files, subject,
                                                                                   monkeypatch):
    """After a KSampler ComfyUI keeps the diffusion model loaded up to its reserve; SISO Subject
    Score's networks (1.75 GiB and more) then asked for nothing and could run a 12 GB card out of
    memory. It asks ComfyUI to offload their weights' bytes plus its inference reserve first, as
    ComfyUI's loaders do; on a CPU nothing is unloaded."""
    import comfy.model_management
    import nodes as comfy_nodes
    asked = []
    monkeypatch.setattr(comfy.model_management, "free_memory",
                        lambda required, device, keep_loaded=(): asked.append((required, device)) or [object()])
    assert host.make_room_for(1000, torch.device("cpu")) == 0 and asked == []
    assert host.make_room_for(1000, torch.device("cuda", 1)) == 1
    assert asked == [(1000 + comfy.model_management.minimum_inference_memory(), torch.device("cuda", 1))]
    loaded = siso("siso_ops.loaded_networks")
    events = []
    monkeypatch.setattr(host, "make_room_for", lambda nbytes, device: events.append(("room", nbytes, device)))
    real_on_device = loaded.on_device
    monkeypatch.setattr(loaded, "on_device", lambda networks, device, *a: events.append(("device",)) or
                        real_on_device(networks, device, *a))
    dino, ir = feature_files
    score = comfy_nodes.NODE_CLASS_MAPPINGS["SISOSubjectScore"]
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    score.execute(images, subject, dino, ir, 1.0, 1.0, precision="fp32")
    networks = [loaded.networks.peek(kind, host.weight_file_path(kind, name), torch.float32)
                for kind, name in (("dino", dino), ("ir", ir))]
    expected = sum(t.numel() * t.element_size() for n in networks for t in n.module.state_dict().values())
    assert expected > 0 and events == [("room", expected, host.compute_device()), ("device",)]


def test_a_holder_collected_while_a_network_is_read_leaves_the_read_network_to_its_caller(feature_files,
                                                                                          monkeypatch):
    """The last holder's collection can come in the garbage collection that follows a file read
    (release_freed_memory): the cache is then emptied, and the run that asked still gets the
    network it read, not a KeyError."""
    import gc
    loaded = siso("siso_ops.loaded_networks")
    cache = loaded._NetworkCache()

    class Node:
        pass

    holder = [Node()]
    cache.hold(holder[0])
    real = loaded.release_freed_memory

    def collect_the_holder():
        holder.clear()
        gc.collect()
        real()
    monkeypatch.setattr(loaded, "release_freed_memory", collect_the_holder)
    dino, _ = feature_files
    network = cache.get("dino", host.weight_file_path("dino", dino))
    assert isinstance(network, fn.FeatureNetwork) and cache.entries == {}
