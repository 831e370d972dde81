"""SISO generation inside a real ComfyUI (in-process, CPU), on tiny random models built with
ComfyUI's own classes. Nodes are called as ComfyUI's executor calls them: under
torch.inference_mode()."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import folder_paths
import nodes as comfy_nodes
import tiny
from conftest import siso
from siso_runs import SIZE, assert_shared_modules_are_stock, host_state, ksampler, random_lora, run_node

host = siso("siso_ops.host")
gen = siso("siso_ops.generation")
optim = siso("siso_ops.optimize")
subject_mod = siso("siso_ops.subject")
NODE = comfy_nodes.NODE_CLASS_MAPPINGS


def test_host_model_and_stock_ksampler_are_bitwise_unchanged_after_optimisation(sd15, subject, feature_files):
    model, vae, positive, negative = sd15
    before_weights = host_state(model)
    before_sample = ksampler(model, positive, negative)
    vae_before = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}
    lora, best, curve, report = run_node(model, vae, positive, subject, feature_files, learning_rate=1e-2)
    assert any(t.abs().sum() > 0 for k, t in lora.tensors.items() if k.endswith("lora_up.weight"))
    after = host_state(model)
    assert before_weights.keys() == after.keys()
    assert all(torch.equal(before_weights[k], after[k]) for k in after)
    assert torch.equal(ksampler(model, positive, negative), before_sample)
    assert all(torch.equal(v, vae.first_stage_model.state_dict()[k]) for k, v in vae_before.items())
    assert_shared_modules_are_stock(model)
    assert best.shape == (1, SIZE, SIZE, 3) and curve.ndim == 4 and "iteration" in report


def test_a_cancelled_run_stops_within_one_iteration_and_leaves_the_host_usable(sd15, subject, feature_files, monkeypatch):
    model, vae, positive, negative = sd15
    before_weights = host_state(model)
    before_sample = ksampler(model, positive, negative)
    seen = []
    progress = siso("nodes.progress").IterationProgress

    original = progress.__call__

    def cancel_after_first(self, report):
        seen.append(report.iteration)
        if report.iteration == 1:
            comfy.model_management.interrupt_current_processing(True)  # what POST /interrupt does
        original(self, report)

    monkeypatch.setattr(progress, "__call__", cancel_after_first)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(model, vae, positive, subject, feature_files, max_iterations=20, learning_rate=1e-2)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert seen == [0, 1]
    after = host_state(model)
    assert all(torch.equal(before_weights[k], after[k]) for k in after)
    assert torch.equal(ksampler(model, positive, negative), before_sample)
    assert_shared_modules_are_stock(model)


def test_gradients_reach_the_lora_and_nothing_else(sd15, subject, tiny_networks):
    model, vae, positive, _ = sd15
    dino, ir = tiny_networks
    with torch.inference_mode(), host.training_mode():
        trainable = host.TrainableModel(model, rank=4)
        decoder = host.DifferentiableDecoder(vae, model, torch.device("cpu"))
        score = siso("siso_ops.similarity").SimilarityLoss(dino, ir, subject.image.clone())
        latent = host.empty_latent(model, SIZE, SIZE)
        sampler = siso("siso_ops.sampler")

        def body(denoise, start, sigmas, clean):
            loss = score(decoder(sampler.sample(denoise, start, sigmas, 1)))["loss"]
            loss.backward()
            return loss

        try:
            host.run_with_denoiser(trainable, positive, latent, host.seed_noise(latent, 0),
                                   host.sigma_schedule(model, "simple", 1), 0, body)
        finally:
            trainable.unload()
        deltas = list(trainable.deltas.values())
        assert deltas and all(d.up.grad is not None and d.up.grad.abs().sum() > 0 for d in deltas)
        assert [n for n, p in model.model.named_parameters() if p.grad is not None] == []   # host weights get nothing
        assert all(p.grad is None for p in decoder.module.parameters())
        assert all(p.grad is None for net in (dino, ir) for p in net.module.parameters())
        # default targets: the UNet's attention projections only (q, k, v, out of attn1 / attn2)
        assert trainable.deltas and all(re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$", k)
                                        for k in trainable.deltas)
        assert {k[len("diffusion_model."):-len(".weight")] for k in trainable.deltas} == host.lora_target_names(model)


def test_training_first_asks_comfyui_to_unload_the_other_models_from_a_gpu(sd15, subject, tiny_networks, monkeypatch):
    model, vae, positive, negative = sd15
    before = ksampler(model, positive, negative)       # ComfyUI now holds the host model as loaded
    loaded = list(comfy.model_management.current_loaded_models)
    assert loaded
    # a CPU: the weights already live in RAM, nothing is unloaded
    assert host.make_room_for_training(torch.device("cpu")) == 0
    assert comfy.model_management.current_loaded_models == loaded
    # what a GPU gets: ComfyUI unloads every model it holds on that device, and they still work
    cpu = torch.device("cpu")
    assert host.unload_everything_from(cpu) == len(loaded)
    assert not [m for m in comfy.model_management.current_loaded_models if m.device == cpu]
    assert torch.equal(ksampler(model, positive, negative), before)
    # a GPU device goes to ComfyUI's free_memory for that device
    asked = []
    monkeypatch.setattr(comfy.model_management, "free_memory",
                        lambda required, device, keep_loaded=(): asked.append((required, device)) or [object()])
    assert host.make_room_for_training(torch.device("cuda", 1)) == 1
    assert asked == [(1e30, torch.device("cuda", 1))]
    # SISO Optimize makes room before its networks go to the device
    events = []
    monkeypatch.setattr(host, "make_room_for_training", lambda device: events.append(("room", device)))
    for net in tiny_networks:
        monkeypatch.setattr(net, "to", (lambda to: lambda *a, **k: events.append(("network", a)) or to(*a, **k))(net.to))
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, optimization=optim.OptimizationSettings(max_iterations=1))
    with torch.inference_mode():
        gen.optimize_subject(model, vae, positive, subject, None, None, settings, feature_networks=tiny_networks)
    assert events[0] == ("room", host.compute_device())
    assert [e[0] for e in events[1:3]] == ["network", "network"]


def test_similarity_loss_decreases_over_iterations_on_a_tiny_model(sd15, subject, tiny_networks):
    model, vae, positive, _ = sd15
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=1, optimization=optim.OptimizationSettings(
        max_iterations=8, learning_rate=5e-3, early_stop_patience=8))
    with torch.inference_mode():
        _, _, result = gen.optimize_subject(model, vae, positive, subject, None, None, settings, feature_networks=tiny_networks)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 8
    assert losses[-1] < losses[0] and result.best_loss < losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 5   # mostly downhill


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_iteration_zero_is_the_stock_ksampler_image(precision, sd15, subject, tiny_networks):
    """fp32: the stock image to 2e-5. bf16 mixed precision (the default where the hardware is fast
    at it): within a stated tolerance of it, mean |difference| <= 0.005 and max <= 0.05 in [0, 1]
    pixels (measured on this tiny random model: see the printed figures)."""
    model, vae, positive, negative = sd15
    first = []
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=42, precision=precision,
                                      optimization=optim.OptimizationSettings(max_iterations=1))
    with torch.inference_mode():
        gen.optimize_subject(model, vae, positive, subject, None, None, settings, feature_networks=tiny_networks,
                             on_iteration=lambda r: first.append(r.image))
        stock = vae.decode(ksampler(model, positive, negative, steps=1, seed=42))
    ours = first[0].permute(0, 2, 3, 1)
    if precision == "fp32":
        torch.testing.assert_close(ours, stock.float(), atol=2e-5, rtol=0)
    else:
        difference = (ours - stock.float()).abs()
        print(f"\nbf16 vs stock fp32 image: mean {difference.mean():.5f}, max {difference.max():.5f}")
        assert 0 < difference.mean() <= 0.005 and difference.max() <= 0.05


def test_a_missing_weight_file_names_the_folder_and_the_expected_file(sd15, subject, feature_files):
    model, vae, positive, _ = sd15
    with pytest.raises(ValueError) as error:
        run_node(model, vae, positive, subject, feature_files, ir_weights="nowhere.pth")
    text = str(error.value)
    assert "'siso' model folders" in text and "ir_features.pth" in text and "placed by hand" in text
    assert folder_paths.get_folder_paths("siso")[0] in text


def test_saved_lora_loaded_by_the_stock_loader_equals_apply_siso_lora(sd15, subject, feature_files):
    model, vae, positive, negative = sd15
    lora = run_node(model, vae, positive, subject, feature_files, learning_rate=2e-2)[0]
    with torch.inference_mode():
        name = NODE["SaveSISOLoRA"].execute(lora, "roundtrip test", True).args[0]
        assert name == "roundtrip test.safetensors" and name in folder_paths.get_filename_list("loras")
        stock = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 0.8)[0]
        ours = NODE["ApplySISOLoRA"].execute(model, lora, 0.8).args[0]
    complex_prompt = tiny.conditioning("sd15", 11)
    a = ksampler(stock, complex_prompt, negative, steps=4)
    b = ksampler(ours, complex_prompt, negative, steps=4)
    base = ksampler(model, complex_prompt, negative, steps=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, base)   # the LoRA changes the 4-step, other-prompt output (two-stage)
    assert torch.isfinite(a).all()


def test_apply_refuses_a_lora_of_another_model_naming_it(sd15):
    """ComfyUI's loader skips LoRA layers a model lacks, or shapes it cannot take, with a log line
    only: the picture would come out without the subject and nothing would say why. SISO Apply
    LoRA refuses such a LoRA as SISO Load LoRA does, before patching anything."""
    lora_mod = siso("siso_ops.lora")
    model = sd15[0]
    lora = lora_mod.SubjectLoRA(tensors=random_lora(model, 1e-3), rank=4, alpha=0.0, model="sd15", best_iteration=1, iterations=2,
                                best_loss=0.0, stop_reason="max_iterations")
    with torch.inference_mode():
        assert NODE["ApplySISOLoRA"].execute(model, lora, 1.0).args[0] is not model      # its own model: applied
        other = tiny.build_model("flux_dev")
        with pytest.raises(lora_mod.LoRAFileError, match=r"subject_lora does not fit Flux .*It was made for another "
                                                         r"model: load the checkpoint it was trained on"):
            NODE["ApplySISOLoRA"].execute(other, lora, 1.0)


@pytest.mark.parametrize("bad", ["../escape", "sub/dir", "..", ".hidden", "a\\b", ""])
def test_lora_file_names_cannot_leave_the_loras_folder(bad):
    assert NODE["SaveSISOLoRA"].validate_inputs(name=bad) is not True


def test_load_subject_handles_rgba_gray_masks_and_batches():
    with torch.inference_mode():
        rgba = torch.ones(1, 40, 48, 4) * 0.3
        rgba[..., 3] = 0
        rgba[:, 8:20, 12:24, 3] = 1
        s = subject_mod.prepare_subject(rgba, background="white")
        assert len(s) == 1 and s.image.shape == (1, 3, 40, 48)
        assert torch.allclose(s.image[0, :, 0, 0], torch.ones(3)) and torch.allclose(s.image[0, :, 12, 16], torch.full((3,), 0.3))
        gray = subject_mod.prepare_subject(torch.rand(1, 36, 32, 1))
        assert gray.image.shape == (1, 3, 36, 32)
        mask = torch.zeros(1, 20, 24)
        mask[:, :8] = 1  # LoadImage's MASK: 1 = transparent background
        s = subject_mod.prepare_subject(torch.full((1, 40, 48, 3), 0.5), mask, "background", "black")
        assert float(s.image[0, 0, 0, 0]) == 0.0 and float(s.image[0, 0, 39, 0]) == 0.5
        # a batch is several photos of the subject; one mask for all, or one each
        batch = torch.rand(3, 40, 48, 3)
        s = subject_mod.prepare_subject(batch)
        assert len(s) == 3 and all(torch.equal(s.images[i][0], batch[i].permute(2, 0, 1)) for i in range(3))
        masks = torch.zeros(3, 40, 48)
        masks[1, 10:20, 10:20] = 1
        with pytest.raises(ValueError, match=r"the subject mask \(photo 1 of 3\) is empty"):
            subject_mod.prepare_subject(batch, masks)
        with pytest.raises(ValueError, match="holds 2 masks for 3 photos"):
            subject_mod.prepare_subject(batch, torch.ones(2, 40, 48))
        with pytest.raises(ValueError, match="mask is empty"):
            subject_mod.prepare_subject(torch.rand(1, 40, 40, 3), torch.zeros(1, 40, 40))


def test_precision_choices():
    precision = siso("siso_ops.precision")
    cpu = torch.device("cpu")
    assert precision.compute_dtype(cpu, "fp32") == torch.float32
    assert precision.compute_dtype(cpu, "bf16") == torch.bfloat16
    assert precision.compute_dtype(cpu, "auto") == (torch.bfloat16 if precision.cpu_has_fast_bf16() else torch.float32)
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.compute_dtype(cpu, "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        gen.GenerationSettings(precision="half").check()


def test_a_prompt_saved_before_the_precision_input_keeps_float32(monkeypatch, sd15, subject, feature_files):
    """API prompts saved before `precision` existed have no such input: they run as before, in
    float32; a new node's widget says auto."""
    import sys
    node = NODE["SISOOptimize"]
    seen = []

    def capture(model, vae, positive, subject, dino_path, ir_path, settings, **kwargs):
        seen.append(settings)
        raise RuntimeError("captured")

    monkeypatch.setattr(sys.modules[node.__module__], "optimize_subject", capture)
    model, vae, positive, _ = sd15
    for overrides in ({}, {"precision": "auto"}):
        with pytest.raises(RuntimeError, match="captured"):
            run_node(model, vae, positive, subject, feature_files, **overrides)
    assert [s.precision for s in seen] == ["fp32", "auto"]
    schema = node.define_schema()
    widget = next(i for i in schema.inputs if i.id == "precision")
    assert widget.default == "auto" and widget.optional


def test_the_training_clone_unloads_host_copies_and_checks_its_lora_is_wired(sd15):
    """After a stock sampler ran the host MODEL, ComfyUI keeps its weights loaded; the training
    clone unloads that copy first (else ComfyUI may load the clone without installing its LoRA
    wrappers, seen on a GPU), and refuses to train if the LoRA is not in the layers."""
    model, _, positive, negative = sd15
    before = ksampler(model, positive, negative)
    assert any(lm.model is model for lm in comfy.model_management.current_loaded_models)
    with torch.inference_mode(False):
        trainable = host.TrainableModel(model)
        try:
            with pytest.raises(RuntimeError, match="without SISO's LoRA layers"):
                trainable.check_loaded()          # not loaded yet: no wrapper anywhere
            trainable.unload_host_copies()
            assert not any(lm.model is model for lm in comfy.model_management.current_loaded_models)
            comfy.model_management.load_models_gpu([trainable.patcher])
            trainable.check_loaded()
        finally:
            trainable.unload()
    assert_shared_modules_are_stock(model)
    assert torch.equal(ksampler(model, positive, negative), before)     # the host samples as before the clone


def test_unloading_the_clone_keeps_a_forward_another_pack_set_on_a_shared_module(sd15):
    """A pack that set ``module.forward = types.MethodType(...)`` on a layer or block before SISO
    ran: ComfyUI's object patch restores it when the clone unloads, and SISO's tidying (which drops
    the class's own forward ComfyUI leaves bound on the instance) must keep it."""
    import types
    model = sd15[0]
    with torch.inference_mode(False):
        trainable = host.TrainableModel(model, checkpointing=True)
        try:
            theirs = {}
            for module in trainable.forward_patched[:2]:
                theirs[module] = types.MethodType(lambda self, *a, **k: type(self).forward(self, *a, **k), module)
                module.forward = theirs[module]
            assert theirs
            trainable.unload_host_copies()
            comfy.model_management.load_models_gpu([trainable.patcher])
            trainable.check_loaded()
        finally:
            trainable.unload()
    try:
        assert all(vars(module).get("forward") is forward for module, forward in theirs.items())
        others = [m for m in model.model.diffusion_model.modules() if m not in theirs]
        assert not any("forward" in vars(m) for m in others)      # SISO's own patches gone, as before
    finally:
        for module in theirs:
            vars(module).pop("forward", None)
    assert_shared_modules_are_stock(model)


def test_the_training_forward_follows_comfyui_casts_and_patches(sd15):
    """The training clone's layers compute what ComfyUI's own layers compute, also when ComfyUI
    loads the clone partially (lowvram: weights cast per call, the user's own LoRA applied on the
    fly by ComfyUI's patch functions): the same output and LoRA gradients as a full load, and no
    gradient ever lands on the host's weights. A layer class of another pack (as GGUF's) computes
    with its own forward, its gradient taken through its own cast path, the LoRA on its input side."""
    model, _, positive, _ = sd15
    foreign_name, foreign = next((n, m) for n, m in model.model.diffusion_model.named_modules() if n.endswith("attn2.to_k"))
    stock_class = type(foreign)

    class PackLinear(stock_class):
        def forward_comfy_cast_weights(self, input):
            weight, bias = comfy.ops.cast_bias_weight(self, input)
            return torch.nn.functional.linear(input, weight, bias)

    foreign.__class__ = PackLinear
    try:
        runs = _forward_full_and_partial(model, positive, f"diffusion_model.{foreign_name}.weight")
    finally:
        foreign.__class__ = stock_class
    (full_cast, _, full_out, full_grads), (low_cast, low_patched, low_out, low_grads) = runs
    assert full_cast == 0 and low_cast > 0 and low_patched > 0     # the second load really was partial
    torch.testing.assert_close(low_out, full_out, atol=1e-5, rtol=1e-5)
    assert full_grads.keys() == low_grads.keys() and all(g.abs().sum() > 0 for g in full_grads.values())
    for key in full_grads:
        torch.testing.assert_close(low_grads[key], full_grads[key], atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in model.model.parameters())
    assert_shared_modules_are_stock(model)


def _forward_full_and_partial(model, positive, foreign_key):
    g = torch.Generator().manual_seed(5)
    user_lora = {}
    for name, module in model.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith("ff.net.2"):
            user_lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(module.weight.shape[0], 2, generator=g) * 0.1
            user_lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(2, module.weight.shape[1], generator=g)
    assert user_lora
    with torch.inference_mode():
        patched = host.apply_lora(model, user_lora, 1.0)
    x = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g)
    runs = []
    for lowvram in (0, patched.model_size() // 4):
        with torch.inference_mode(False), torch.enable_grad():
            trainable = host.TrainableModel(patched, seed=1)
            with torch.no_grad():
                for delta in trainable.deltas.values():
                    delta.up.copy_(torch.randn(delta.up.shape, generator=torch.Generator().manual_seed(9)) * 0.01)
            try:
                trainable.unload_host_copies()     # as run_with_denoiser does before ComfyUI loads the clone
                trainable.patcher.patch_model(torch.device("cpu"), lowvram_model_memory=lowvram)
                trainable.check_loaded()
                foreign = trainable.lora_layers[foreign_key]
                # its own forward, through the training forward that adds the LoRA on the input side
                forward = vars(foreign)["forward"]
                assert forward.op is None and forward.kind == "linear" and forward.lora is trainable.deltas[foreign_key]
                base = trainable.patcher.model
                cast = [m for m in base.diffusion_model.modules() if getattr(m, "comfy_cast_weights", False)]
                on_the_fly = [f for m in cast for f in m.weight_function if isinstance(f, comfy.model_patcher.LowVramPatch)]
                out = base.apply_model(x, torch.tensor([3.0]), c_crossattn=positive[0][0].clone())
                out.square().mean().backward()
                runs.append((len(cast), len(on_the_fly), out.detach(),
                             {k: p.grad.clone() for k, p in trainable.parameters().items()}))
            finally:
                trainable.unload()
    return runs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_memory_freed_by_the_bfloat16_conversion_goes_back_to_the_system():
    """Networks loaded in float32 and kept in bfloat16: glibc would keep the freed float32 heap
    for reuse, so the process would go on holding it; release_freed_memory hands it back. In a
    fresh process, whose RSS is not shared with other tests."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        from conftest import siso
        gen = siso("siso_ops.generation")
        def rss():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
        t = torch.empty(4_000_000); del t     # raises glibc's mmap threshold, as reading a file does
        net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(60)])   # 240 MB
        net.to(torch.bfloat16)
        held = rss()
        gen.release_freed_memory()
        print(held - rss())
    """)
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", script, tests], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) > 80     # MB of the 120 MB the float32 copies held


def test_weights_loaded_outside_inference_mode_get_no_gradient(subject, tiny_networks):
    """A custom loader may hand over normal parameters that require grad: the training clone still
    reads them without an autograd link, so the host's weights get no .grad and do not change."""
    model = tiny.build_model("sd15", inference=False)
    # ComfyUI 0.33's BaseModel freezes its diffusion model (requires_grad_(False)); 0.3.75 leaves
    # it trainable. A custom loader may hand over either: make the trainable case explicit.
    model.model.diffusion_model.requires_grad_(True)
    assert any(p.requires_grad and not p.is_inference() for p in model.model.parameters())
    before = host_state(model)
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=3, precision="fp32",
                                      optimization=optim.OptimizationSettings(max_iterations=3, learning_rate=1e-2))
    with torch.inference_mode():
        lora, _, _ = gen.optimize_subject(model, tiny.build_vae(4), tiny.conditioning("sd15"), subject, None, None,
                                          settings, feature_networks=tiny_networks)
    assert any(t.abs().sum() > 0 for k, t in lora.tensors.items() if k.endswith("lora_up.weight"))
    assert all(p.grad is None for p in model.model.parameters())
    after = host_state(model)
    assert all(torch.equal(before[k], after[k]) for k in after)


def _flux_ksampler(model, positive, seed=7):
    with torch.inference_mode():
        latent = {"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)}
        return comfy_nodes.common_ksampler(model, seed, 1, 1.0, "euler", "simple", positive, positive, latent)[0]["samples"]


def test_comfyuis_training_flag_is_set_for_the_loop_only_and_flux_sampling_is_unchanged(subject, tiny_networks):
    """ComfyUI 0.33 routes Flux's RoPE through comfy-kitchen's apply_rope (no autograd formula)
    unless model_management.in_training is set, as its own trainer does. Pinned per version:
    on 0.33 the flag is True during every iteration and False again afterwards; ComfyUI 0.3.75
    has no such flag and none is added. A stock Flux KSampler gives bitwise the same latent after."""
    management = comfy.model_management
    model, positive = tiny.build_model("flux_schnell"), tiny.conditioning("flux_schnell")
    before = _flux_ksampler(model, positive)
    had_flag = hasattr(management, "in_training")
    seen = []
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, precision="fp32",
                                      optimization=optim.OptimizationSettings(max_iterations=2, learning_rate=1e-2))
    with torch.inference_mode():
        lora, _, result = gen.optimize_subject(
            model, tiny.build_vae(16), positive, subject, None, None, settings, feature_networks=tiny_networks,
            on_iteration=lambda r: seen.append(getattr(management, "in_training", "absent")))
    assert result.iterations == 2 and any(t.abs().sum() > 0 for k, t in lora.tensors.items() if "lora_up" in k)
    if had_flag:
        assert seen == [True, True] and management.in_training is False
    else:
        assert seen == ["absent", "absent"] and not hasattr(management, "in_training")
    assert torch.equal(_flux_ksampler(model, positive), before)


def test_a_dynamic_vram_model_trains_on_a_regular_clone_as_comfyuis_trainer_makes(sd15, subject, tiny_networks):
    """ComfyUI's dynamic VRAM patcher (ModelPatcherDynamic; NVIDIA only, a CPU load reroutes to a
    regular ModelPatcher) is cloned for training as ComfyUI's Train LoRA node does it: a regular
    ModelPatcher over a copy reloaded through the stock loader's ``cached_patcher_init``. Here a
    ModelPatcher that reports itself dynamic stands in for it (what the dynamic loader itself
    does on a GPU is not exercised without one). ComfyUI 0.3.75 has no dynamic patcher: every
    MODEL is cloned as it is, sharing the host's weights."""
    import inspect
    base, vae, positive, negative = sd15
    if "disable_dynamic" not in inspect.signature(comfy.model_patcher.ModelPatcher.clone).parameters:
        clone = host.training_clone(base)
        assert not host.is_dynamic(base) and clone.model is base.model
        return

    class StandIn(comfy.model_patcher.ModelPatcher):
        def is_dynamic(self):
            return True

    reloads = []

    def reload(seed, disable_dynamic=False):   # what the stock loader's cached init does: read the file again
        reloads.append(disable_dynamic)
        return tiny.build_model("sd15", seed)

    fresh = tiny.build_model("sd15")   # the same weights as the fixture's model, not its object
    model = StandIn(fresh.model, fresh.load_device, fresh.offload_device)
    model.cached_patcher_init = (reload, (0,))
    before = host_state(model)
    clone = host.training_clone(model)
    assert type(clone) is comfy.model_patcher.ModelPatcher and reloads == [True] and clone.model is not model.model
    first = []
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=42, precision="fp32",
                                      optimization=optim.OptimizationSettings(max_iterations=2, learning_rate=1e-2))
    with torch.inference_mode():
        lora, _, result = gen.optimize_subject(model, vae, positive, subject, None, None, settings,
                                               feature_networks=tiny_networks, on_iteration=lambda r: first.append(r.image))
        stock = vae.decode(ksampler(base, positive, negative, steps=1, seed=42))
    assert result.iterations == 2 and any(t.abs().sum() > 0 for k, t in lora.tensors.items() if "lora_up" in k)
    # the reloaded copy computes what the host computes: iteration 0 is the stock image
    torch.testing.assert_close(first[0].permute(0, 2, 3, 1), stock.float(), atol=2e-5, rtol=0)
    after = host_state(model)
    assert all(torch.equal(before[k], after[k]) for k in after)
    assert_shared_modules_are_stock(model)
    with pytest.raises(ValueError, match="--disable-dynamic-vram"):
        model.cached_patcher_init = None
        host.training_clone(model)
