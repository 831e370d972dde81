"""``compile``: the similarity networks and the decoder copy through torch.compile (inductor on the
CPU here), and a MODEL from ComfyUI's TorchCompileModel upstream of SISO Optimize.

Cost: compiling both tiny networks' forward and backward takes about 60 s on this 2-core CPU
(measured 57 s with nothing else running), so it happens once in this file (module fixture) and
the other tests reuse it, as a second run in one ComfyUI session does; the file takes about
2 minutes in all."""

import pytest
import torch
from torch._dynamo.utils import counters

import comfy.patcher_extension
import comfy_api.torch_helpers
import nodes as comfy_nodes
from conftest import siso
from test_generation import SIZE, assert_shared_modules_are_stock, host_state, ksampler, run_node

compiled = siso("siso_ops.compiled")
decoding = siso("siso_ops.host.decoding")
host = siso("siso_ops.host")
gen = siso("siso_ops.generation")
optim = siso("siso_ops.optimize")
similarity = siso("siso_ops.similarity")
CPU = torch.device("cpu")

# Tolerance of compiled against eager, float32. Inductor computes the same operations but fuses
# them (layer norm, softmax, GELU in one kernel) and reorders the long reductions (matrix products
# in other blocks, sums vectorised 16 lanes wide), so each reduction of length n rounds
# differently: about sqrt(n) * u relative with u = 2**-24 = 6e-8. The longest here is DINOv2's
# attention over 1370 tokens: sqrt(1370) * 6e-8 = 2.2e-6 per reduction; a tiny network chains a
# few such reductions per block over 2 normalised blocks (errors add, layer norms keep them
# relative), and the loss sums two cosine similarities of |value| <= 1: 1e-5 absolute bounds the
# loss. The gradient chains the same reductions in backward, twice as many: 1e-4 relative to
# its largest entry. Measured: loss 2.4e-7 apart, gradient 3.5e-6 of its largest entry.
LOSS_ATOL = 1e-5
GRADIENT_RTOL = 1e-4


def graphs():
    """Graphs dynamo has compiled in this process so far, and graph breaks it hit."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def loss_and_gradient(networks, photo, image):
    image = image.clone().requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad():
        loss = similarity.SimilarityLoss(*networks, photo)(image)["loss"]
        loss.backward()
    return loss.detach(), image.grad


@pytest.fixture(scope="module")
def compiled_networks(tiny_networks):
    """Eager loss and gradient, then one run's compile (with its graph counts), then the compiled ones."""
    g = torch.Generator().manual_seed(5)
    photo, image = torch.rand(1, 3, 72, 96, generator=g), torch.rand(1, 3, SIZE, SIZE, generator=g)
    eager = loss_and_gradient(tiny_networks, photo, image)
    before = graphs()
    report = compiled.prepare_networks(list(tiny_networks), "on", CPU, torch.float32, False)
    after_warm_up = graphs()
    try:
        result = loss_and_gradient(tiny_networks, photo, image)
        yield dict(eager=eager, compiled=result, report=report, before=before, after_warm_up=after_warm_up,
                   after_run=graphs(), photo=photo, image=image)
    finally:
        compiled.finish_networks(list(tiny_networks))


def test_compiled_loss_and_gradient_equal_eager_within_float32_rounding(compiled_networks):
    (loss, gradient), (compiled_loss, compiled_gradient) = compiled_networks["eager"], compiled_networks["compiled"]
    print(f"\ncompiled - eager: loss {float((compiled_loss - loss).abs()):.2e}, gradient "
          f"{float((compiled_gradient - gradient).abs().max() / gradient.abs().max()):.2e} of its largest entry")
    assert abs(float(compiled_loss - loss)) <= LOSS_ATOL
    torch.testing.assert_close(compiled_gradient, gradient, rtol=0, atol=GRADIENT_RTOL * float(gradient.abs().max()))
    assert gradient.abs().max() > 0


def test_one_compile_per_network_per_run_and_a_second_run_reuses_it(compiled_networks, tiny_networks):
    (graphs_before, breaks_before) = compiled_networks["before"]
    assert compiled_networks["after_warm_up"] == (graphs_before + 2, breaks_before)   # one graph each, no break
    assert compiled_networks["after_run"] == compiled_networks["after_warm_up"]       # the run compiled nothing
    assert compiled_networks["report"].startswith("Similarity networks: compiled DINOv2 and IR in ")
    # a second run with the same device, dtype, checkpointing and shapes: nothing new compiled
    again = compiled.prepare_networks(list(tiny_networks), "on", CPU, torch.float32, False)
    assert again == "Similarity networks: reused the compiled DINOv2 and IR"
    loss_and_gradient(tiny_networks, compiled_networks["photo"], compiled_networks["image"])
    assert graphs() == compiled_networks["after_run"]


def test_off_compiles_nothing_and_a_bad_choice_is_refused(tiny_networks):
    compiled.finish_networks(list(tiny_networks))   # as after a run: eager
    before = graphs()
    assert compiled.prepare_networks(list(tiny_networks), "off", CPU, torch.float32, False) == ""
    assert compiled.prepare_networks(list(tiny_networks), "auto", CPU, torch.float32, False) == ""  # auto: off on a CPU
    assert all(n.active is None for n in tiny_networks)
    assert graphs() == before
    with pytest.raises(ValueError, match=r"compile must be one of \('auto', 'on', 'off'\), got 'yes'"):
        gen.GenerationSettings(compile="yes").check()


def test_compile_on_without_a_code_generator_is_refused_before_any_work(monkeypatch, sd15, subject, tiny_networks):
    """No Triton (a common Windows CUDA install) or no C++ compiler: compile on is refused before
    the memory estimate, the network reads and the clone, not after them."""
    model, vae, positive, _ = sd15
    monkeypatch.setattr(compiled, "can_compile", lambda device: False)
    monkeypatch.setattr(gen, "_plan_memory", lambda *a, **k: pytest.fail("the memory estimate ran"))
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=0, precision="fp32", compile="on",
                                      optimization=optim.OptimizationSettings(max_iterations=1))
    with pytest.raises(ValueError, match=r"compile on: torch.compile cannot build code on cpu here .*choose auto or off"):
        with torch.inference_mode():
            gen.optimize_subject(model, vae, positive, subject, None, None, settings, feature_networks=tiny_networks)


def test_a_compiled_network_checks_cancel_once_per_call(compiled_networks, tiny_networks):
    """The per-block hooks would cut the compiled graph; while compiled one check per call
    replaces them, and the eager network gets its per-block checks back after the run."""
    dino = tiny_networks[0]
    calls = []
    key = next(iter(dino.compiled))
    dino.set_interrupt_check(lambda: calls.append(1))
    try:
        blocks = len(dino.interrupt_hooks)
        assert blocks > 1
        dino.use_compiled(key)
        assert dino.interrupt_hooks == []
        with torch.inference_mode(False), torch.enable_grad():
            dino.embed(compiled_networks["image"].clone().requires_grad_(True))
        assert len(calls) == 1
        dino.use_compiled(None)
        assert len(dino.interrupt_hooks) == blocks
    finally:
        dino.set_interrupt_check(None)
        dino.use_compiled(None)


# The decoder copy, compiled against eager, float32: the same reordering of reductions as above
# (inductor's convolutions and group norms), here convolutions of 3 x 3 x C inputs (C up to 64 in
# the tiny VAE: n = 576, sqrt(n) * u = 1.4e-6 relative each) chained over about 12 layers between
# group norms: 1e-4 of the largest pixel value bounds the image, and the gradient w.r.t. the
# latent chains as many in backward: 1e-4 of its largest entry. Measured below; about 1e-5 and 5e-6.
PIXEL_RTOL = 1e-4


def decoded(decoder, latent):
    latent = latent.clone().requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad():
        image = decoder(latent)
        image.sum().backward()
    return image.detach(), latent.grad


def test_the_compiled_decoder_equals_eager_and_a_later_runs_copy_reuses_its_code(sd15, monkeypatch):
    """Each run decodes with a new private copy of the VAE's decoder: the copy is an argument of
    the compiled function, so the first run compiles and a later run's copy compiles nothing.
    While compiled the copy checks Cancel once per call, not before every block, and ComfyUI's
    split attention (this CPU's VAE attention) stays eager."""
    model, vae, _, _ = sd15
    latent = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode(False):
        eager, first, later = (host.DifferentiableDecoder(vae, model, CPU) for _ in range(3))
    image, gradient = decoded(eager, latent)
    decode = compiled.decoder_forward("on", CPU, torch.float32, False, type(first.module).__name__)
    assert compiled.decoder_forward("auto", CPU, torch.float32, False, type(first.module).__name__) is None  # CPU
    blocks = len(first.interrupt_hooks)
    attentions = lambda decoder: [b.optimized_attention for b in decoder.module.modules()
                                  if hasattr(b, "optimized_attention")]
    split = decoding.vae_blocks.normal_attention
    stock = attentions(later)
    assert stock   # the VAE's mid-block attention
    checks = []
    monkeypatch.setattr(decoding, "throw_if_interrupted", lambda: checks.append(1))
    first.use_compiled(decode)
    assert first.interrupt_hooks == [] and blocks > 1
    assert [a.__wrapped__ if a is not b else a for a, b in zip(attentions(first), stock)] == stock
    assert all(a is not split for a in attentions(first))   # split attention (if any) now runs eager
    compiled_image, compiled_gradient = decoded(first, latent)
    print(f"\ncompiled - eager: image {float((compiled_image - image).abs().max() / image.abs().max()):.2e}, gradient "
          f"{float((compiled_gradient - gradient).abs().max() / gradient.abs().max()):.2e} of their largest entries; "
          f"first call {first.compile_seconds:.1f} s, {first.compile_graphs} graphs")
    torch.testing.assert_close(compiled_image, image, rtol=0, atol=PIXEL_RTOL * float(image.abs().max()))
    torch.testing.assert_close(compiled_gradient, gradient, rtol=0, atol=PIXEL_RTOL * float(gradient.abs().max()))
    assert gradient.abs().max() > 0
    assert checks == [1]                      # one Cancel check for the call, none per block
    assert first.compile_graphs > 0 and compiled.decoder_note(first).startswith("Decoder: compiled in ")
    before = graphs()
    later.use_compiled(decode)
    decoded(later, latent)
    decoded(later, latent)
    assert graphs() == before                 # a new copy, the same code: nothing compiled again
    assert later.compile_graphs == 0 and compiled.decoder_note(later) == "Decoder: reused the compiled decoder"
    later.use_compiled(None)                  # eager again: the per-block checks come back
    assert len(later.interrupt_hooks) == blocks
    assert attentions(later) == stock
    for decoder in (eager, first, later):
        decoder.release()


def test_the_compiled_decoder_with_low_memory_recomputes_its_blocks_and_equals_eager(sd15):
    """low_memory on: the copy's blocks run under non-reentrant checkpointing, which torch.compile
    traces; the same image and gradient as eager within the same bounds."""
    model, vae, _, _ = sd15
    latent = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(10))
    with torch.inference_mode(False):
        eager, recomputing = (host.DifferentiableDecoder(vae, model, CPU, checkpointing=True) for _ in range(2))
    image, gradient = decoded(eager, latent)
    decode = compiled.decoder_forward("on", CPU, torch.float32, True, type(eager.module).__name__)
    other = compiled.decoder_forward("on", CPU, torch.float32, False, type(eager.module).__name__)
    # a code object of its own per key: dynamo's per-code recompile limit counts each key apart
    assert decode.__wrapped__.__code__ is not other.__wrapped__.__code__
    recomputing.use_compiled(decode)
    compiled_image, compiled_gradient = decoded(recomputing, latent)
    assert recomputing.compile_graphs > 0
    torch.testing.assert_close(compiled_image, image, rtol=0, atol=PIXEL_RTOL * float(image.abs().max()))
    torch.testing.assert_close(compiled_gradient, gradient, rtol=0, atol=PIXEL_RTOL * float(gradient.abs().max()))
    for decoder in (eager, recomputing):
        decoder.release()


def test_a_compiled_run_gives_the_eager_runs_losses_and_says_so(compiled_networks, sd15, subject, tiny_networks):
    """Two iterations of SISO compiled and eager: the same losses within the networks' tolerance
    grown by the LoRA steps: AdamW's first steps move each weight by about the learning rate
    whatever the gradient's size, so a difference of rounding size in a gradient entry near 0
    changes the LoRA by up to 2e-2 there; measured below 1e-6 apart, bounded at 1e-4."""
    model, vae, positive, _ = sd15
    runs, compiled_graphs = [], []
    for choice in ("on", "off", "on"):
        settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=3, precision="fp32", compile=choice,
                                          gradient_checkpointing=False, optimization=optim.OptimizationSettings(
                                              max_iterations=2, learning_rate=1e-2, early_stop_patience=10))
        before = graphs()
        with torch.inference_mode():
            runs.append(gen.optimize_subject(model, vae, positive, subject, None, None, settings,
                                             feature_networks=tiny_networks)[2])
        compiled_graphs.append(graphs()[0] - before[0])
    on, off, again = runs
    print(f"\nlosses compiled {[h['loss'] for h in on.history]}, eager {[h['loss'] for h in off.history]}")
    assert [h["loss"] for h in on.history] == pytest.approx([h["loss"] for h in off.history], abs=1e-4)
    assert [h["loss"] for h in again.history] == pytest.approx([h["loss"] for h in on.history], abs=1e-4)
    assert on.history[0]["loss"] != on.history[-1]["loss"]
    # the module fixture compiled the networks; the first run's decoder compiles unless a test
    # before it compiled the same decoder shapes; the eager run and a second run compile nothing
    assert on.compiled.startswith("Similarity networks: reused the compiled DINOv2 and IR; Decoder: ")
    assert compiled_graphs[1:] == [0, 0] and off.compiled == ""
    assert again.compiled == "Similarity networks: reused the compiled DINOv2 and IR; Decoder: reused the compiled decoder"
    assert all(n.active is None and not n.module.grad_checkpointing for n in tiny_networks)


def test_a_prompt_saved_before_the_compile_input_runs_uncompiled(monkeypatch, sd15, subject, feature_files):
    import sys
    node = comfy_nodes.NODE_CLASS_MAPPINGS["SISOOptimize"]
    seen = []

    def capture(model, vae, positive, subject, dino_path, ir_path, settings, **kwargs):
        seen.append(settings.compile)
        raise RuntimeError("captured")

    monkeypatch.setattr(sys.modules[node.__module__], "optimize_subject", capture)
    model, vae, positive, _ = sd15
    for overrides in ({}, {"compile": "auto"}):
        with pytest.raises(RuntimeError, match="captured"):
            run_node(model, vae, positive, subject, feature_files, **overrides)
    assert seen == ["off", "auto"]
    names = [i.id for i in node.define_schema().inputs]
    widget = next(i for i in node.define_schema().inputs if i.id == "compile")
    assert widget.default == "auto" and widget.optional
    assert names.index("compile") == names.index("precision") + 1   # saved widget values keep their order


def test_a_model_from_torch_compile_model_trains_uncompiled_and_stays_compiled(sd15, subject, tiny_networks):
    """Load -> TorchCompileModel -> SISO Optimize: the training clone drops ComfyUI's compile
    wrapper, so nothing is compiled during the run (the training forward runs the uncompiled
    module), iteration 0 is the uncompiled model's stock image, and the user's MODEL keeps its
    wrapper, its compile settings and its weights."""
    model, vae, positive, negative = sd15
    user = model.clone()
    comfy_api.torch_helpers.set_torch_compile_wrapper(user, backend="inductor")   # what TorchCompileModel does
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    wrappers = {k: list(v) for k, v in user.wrappers[apply_model].items()}
    options = dict(user.model_options["torch_compile_kwargs"])
    weights = host_state(user)
    first = []
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=42, precision="fp32", compile="off",
                                      optimization=optim.OptimizationSettings(max_iterations=2, learning_rate=1e-2))
    before = graphs()
    with torch.inference_mode():
        _, _, result = gen.optimize_subject(user, vae, positive, subject, None, None, settings,
                                            feature_networks=tiny_networks, on_iteration=lambda r: first.append(r.image))
        stock = vae.decode(ksampler(model, positive, negative, steps=1, seed=42))
    assert graphs() == before
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 2 and len(set(losses)) > 1          # it trained
    torch.testing.assert_close(first[0].permute(0, 2, 3, 1), stock.float(), atol=2e-5, rtol=0)   # fp32, as test_generation
    assert result.compiled.startswith("TorchCompileModel: SISO trained the uncompiled model")
    assert {k: list(v) for k, v in user.wrappers[apply_model].items()} == wrappers and "torch.compile" in wrappers
    assert user.model_options["torch_compile_kwargs"] == options
    after = host_state(user)
    assert all(torch.equal(weights[k], after[k]) for k in after)
    assert_shared_modules_are_stock(model)    # the stock sampler above loaded `model`; no clone stays loaded
