"""Reference-conditioned optimisation: SISO Optimize on a model whose CONDITIONING carries reference
images, as people use Flux.2 (ReferenceLatent, one and two references), Flux.1 Kontext
(ReferenceLatent on a Flux.1 [dev] model: ComfyUI's model_base.Flux appends ``ref_latents``' tokens),
Qwen-Image-Edit (TextEncodeQwenImageEdit / TextEncodeQwenImageEditPlus), and three classes SISO trains
on its self-checked path (tests/test_self_checked.py), one reference each: OmniGen2 (ReferenceLatent;
its reference-image refiner blocks run only with references; ComfyUI 0.3.75 and 0.33), Krea 2
(ReferenceLatent then Edit Model Reference Method "index": the model ignores references without a
method; 0.33) and JoyImage-Edit (ReferenceLatent in place of TextEncodeJoyImageEdit, whose Qwen3-VL
text encoder cannot be built tiny: the same ``reference_latents``, not its text-side image tokens;
0.33). A case whose class this ComfyUI lacks is skipped, saying so.

Tiny random-weight models built through ComfyUI's classes (tests/tiny_families.py; the Flux.1
builder is here), on the CPU, on whichever ComfyUI the suite runs against. The conditioning is made
by the stock nodes themselves: VAEEncode of the reference photo, then ReferenceLatent (and
FluxGuidance for Kontext, Edit Model Reference Method for Krea 2); the Qwen nodes get a stand-in
text encoder (see _StandInQwenEncoder).

Per case: the references reach the stock image; iteration 0 of SISO's loop is the stock KSampler +
VAEDecode image with the same conditioning; the loss goes down; no gradient reaches the reference
latents, the text conditioning, the host model or anything outside the LoRA; host and a stock sample
are bitwise unchanged afterwards; the LoRA reused by a stock KSampler (host.apply_lora, what SISO
Apply LoRA calls) with the references gives SISO's best image. A reference path that keeps state
between denoiser calls (ComfyUI 0.33's Flux KV Cache) is refused before any work."""
import contextlib
import inspect

import pytest
import torch

import comfy.model_patcher
import comfy.supported_models
import nodes as comfy_nodes
import tiny_families as tf
from conftest import siso
from reference_conditioning import encode, flux2_with_references, photo, reference, stock_node

gen = siso("siso_ops.generation")
optim = siso("siso_ops.optimize")
host = siso("siso_ops.host")
references = siso("siso_ops.host.references")

NODE = comfy_nodes.NODE_CLASS_MAPPINGS
SIZE = 64
ITERATIONS = 3


def _flux1_dev():
    """A tiny Flux.1 [dev] (guidance embedding; Kontext [dev] is this architecture) through ComfyUI's
    supported_models.Flux, as tiny_families builds its families."""
    params = tf._ldm("flux.model").FluxParams
    config = tf._with_optional(dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=64,
        mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=True, dtype=torch.float32), params, {"txt_ids_dims": []})  # 0.33 field
    with torch.inference_mode():
        model_config = comfy.supported_models.Flux(dict(config))
        model_config.set_inference_dtype(torch.float32, None)
        base = model_config.get_model({})
        tf.init_random(base.diffusion_model, 0)
        return comfy.model_patcher.ModelPatcher(base, load_device=tf.CPU, offload_device=tf.CPU)


class _StandInQwenEncoder:
    """The CLIP the Qwen-Image-Edit nodes call. ComfyUI's Qwen2.5-VL 7B text encoder has its widths
    hard-coded (comfy/text_encoders/llama.py), so it cannot be built tiny; this stand-in answers
    ``tokenize`` / ``encode_from_tokens_scheduled`` with Qwen-Image-shaped text conditioning. The
    reference latents are still made by the stock node's own code: resized to 1 megapixel, encoded by
    the (tiny, real-kind Wan 2.1) VAE and appended under ``reference_latents``."""

    def __init__(self):
        self.images = []

    def tokenize(self, text, images=(), **kwargs):
        self.images.append(len(images))
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens):
        return tf.conditioning("qwen_image", 0)


def _kontext():
    model, vae = _flux1_dev(), tf.build_vae("chroma")     # the 16-channel Flux.1 VAE kind
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():    # CLIPTextEncode's Flux.1 output: T5 context + CLIP-L pooled
        positive = [[torch.randn(1, 8, 48, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
        positive = stock_node("nodes_flux", "FluxGuidance").execute(positive, 2.5).args[0]   # Kontext's guidance
    return model, vae, reference(positive, encode(vae, photo(11))), "chroma"


def _qwen_edit(plus):
    model, vae = tf.build_model("qwen_image"), tf.build_vae("qwen_image")
    encoder = _StandInQwenEncoder()
    with torch.inference_mode():
        if plus:
            # two pictures: Qwen-Image places each reference at its own RoPE index
            node = stock_node("nodes_qwen", "TextEncodeQwenImageEditPlus")
            positive = node.execute(encoder, "the subject on a beach", vae, photo(11), photo(12)).args[0]
        else:
            node = stock_node("nodes_qwen", "TextEncodeQwenImageEdit")
            positive = node.execute(encoder, "the subject on a beach", vae, photo(11)).args[0]
    assert encoder.images == [2 if plus else 1]     # the node handed its pictures to the text encoder too
    return model, vae, positive, "qwen_image"


def _self_checked(name, class_name):
    """The tiny model, VAE and text conditioning of a class SISO trains on the self-checked path
    (tests/tiny_families.py: SELF_CHECKED_CONFIGS), or a skip on a ComfyUI without the class."""
    if name not in tf.SELF_CHECKED_CONFIGS:
        pytest.skip(f"this ComfyUI has no {class_name} (comfy.supported_models.{class_name}): no tiny model to build")
    return tf.build_model(name), tf.build_vae(name), tf.conditioning(name, 0)


def _omnigen2():
    """OmniGen2 (ComfyUI 0.3.75 and 0.33): VAEEncode -> ReferenceLatent; model_base.Omnigen2 turns
    ``reference_latents`` into ``ref_latents``, which its ``ref_image_refiner`` blocks run on (only
    with references: their LoRA layers train here, not text-to-image)."""
    model, vae, positive = _self_checked("omnigen2", "Omnigen2")
    return model, vae, reference(positive, encode(vae, photo(11))), "omnigen2"


def _krea2():
    """Krea 2 (ComfyUI 0.33): ReferenceLatent alone is ignored (SingleStreamDiT's default_ref_method
    is None); the stock Edit Model Reference Method node (FluxKontextMultiReferenceLatentMethod) after
    it sets the method, as a user chains them. Krea 2 appends the reference tokens at RoPE index 1
    for any method; "index_timestep_zero" also modulates them with timestep 0: "index" here."""
    model, vae, positive = _self_checked("krea2", "Krea2")
    positive = reference(positive, encode(vae, photo(11)))
    with torch.inference_mode():
        node = stock_node("nodes_flux", "FluxKontextMultiReferenceLatentMethod")
        return model, vae, node.execute(positive, "index").args[0], "krea2"


def _joyimage():
    """JoyImage-Edit (ComfyUI 0.33): its own TextEncodeJoyImageEdit needs a Qwen3-VL text encoder
    (not buildable tiny), so ReferenceLatent stands in for its VAE side: it sets the same
    ``reference_latents`` key, which model_base.JoyImage turns into ``ref_latents`` (one-frame Wan 2.1
    latents, appended to the image tokens). Not exercised: the stock node's bucket resize of the
    picture and the image tokens it hands its text encoder (the text side here is tiny random states)."""
    model, vae, positive = _self_checked("joyimage", "JoyImage")
    return model, vae, reference(positive, encode(vae, photo(11))), "joyimage"


CASES = {
    "flux2_one_reference": lambda: flux2_with_references(1),
    "flux2_two_references": lambda: flux2_with_references(2),
    "flux1_kontext": _kontext,
    "qwen_image_edit": lambda: _qwen_edit(False),
    "qwen_image_edit_plus": lambda: _qwen_edit(True),
    "omnigen2_reference": _omnigen2,
    "krea2_index_reference": _krea2,
    "joyimage_edit_reference": _joyimage,
}
REFERENCE_COUNT = {"flux2_two_references": 2, "qwen_image_edit_plus": 2}
REFERENCE_ONLY_BLOCKS = {"omnigen2": ("ref_image_refiner",)}     # blocks that run only with references


def _stock_image(model, vae, positive, family, seed=42):
    """KSampler (euler, simple, 1 step, cfg 1) + VAEDecode, as the stock nodes run them."""
    with torch.inference_mode():
        latent = tf.empty_latent(family, SIZE, SIZE)
        samples = comfy_nodes.common_ksampler(model, seed, 1, 1.0, "euler", "simple", positive, positive, latent)[0]
        image = vae.decode(samples["samples"])
    return image.reshape(-1, *image.shape[-3:])[:1].float()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


@contextlib.contextmanager
def _watching_the_denoiser(model, seen):
    """Records, at every call of the diffusion model's class forward, whether the reference latents
    and the text context it receives are tracked by autograd (a gradient could reach them). The
    arguments are bound to the class's own signature, which differs per class (Flux: ``y``,
    ``guidance`` before ``ref_latents``; OmniGen2: ``num_tokens``; Krea 2 and Qwen-Image:
    ``attention_mask``; JoyImage names its first argument ``hidden_states``), so ``ref_latents`` and
    ``context`` are found whether they come by position or by keyword."""
    cls = type(model.model.diffusion_model)
    original = cls.forward
    signature = inspect.signature(original)

    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs).arguments
        refs, context = bound.get("ref_latents"), bound.get("context")
        seen.append({"refs": None if refs is None else [(tuple(r.shape), r.requires_grad) for r in refs],
                     "context": context.requires_grad, "grad": torch.is_grad_enabled()})
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cls, "forward", forward)
        yield


def _without_references(positive):
    """The CONDITIONING without what ReferenceLatent and Edit Model Reference Method set."""
    return [[cross, {k: v for k, v in extras.items() if k not in ("reference_latents", "reference_latents_method")}]
            for cross, extras in positive]


@pytest.fixture(scope="module")
def subject():
    with torch.inference_mode():
        return NODE["LoadSubject"].execute(photo(11), "subject", "white").args[0]


@pytest.fixture(scope="module", params=list(CASES))
def run(request, subject, tiny_networks):
    """One optimisation per case (3 iterations), with everything the tests look at."""
    name = request.param
    model, vae, positive, family = CASES[name]()
    conditioning_before = [t.clone() for t in _tensors(positive)]
    host_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    stock = _stock_image(model, vae, positive, family)
    images, seen = [], []
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=42, precision="fp32", gradient_checkpointing=False,
                                      optimization=optim.OptimizationSettings(max_iterations=ITERATIONS,
                                                                              learning_rate=5e-2,
                                                                              early_stop_patience=10))
    with torch.inference_mode(), _watching_the_denoiser(model, seen):
        lora, best, result = gen.optimize_subject(model, vae, positive, subject, None, None, settings,
                                                  feature_networks=tiny_networks,
                                                  on_iteration=lambda r: images.append(r.image))
    return dict(name=name, model=model, vae=vae, positive=positive, family=family, stock=stock, images=images,
                seen=seen, lora=lora, best=best, result=result, conditioning_before=conditioning_before,
                host_before=host_before)


def test_the_conditioning_carries_the_references_the_stock_nodes_made(run):
    refs = references.reference_latents(run["positive"])
    assert len(refs) == REFERENCE_COUNT.get(run["name"], 1)
    # every denoiser call of the loop received them (every class here takes them as ref_latents)
    training = [s for s in run["seen"] if s["grad"]]
    assert training and all(s["refs"] is not None and len(s["refs"]) == len(refs) for s in training)


def test_the_references_reach_the_stock_image(run):
    """The model reads the references: the stock image with them is not the one without. On random
    tiny weights they move it little on the self-checked classes (measured 1.6e-5 on JoyImage, 2.8e-5
    on Krea 2, 6.3e-2 on OmniGen2 on 0.33), still well above float32 reordering (at most 2.0e-6 on
    these images, see the LoRA reuse test)."""
    bare = _stock_image(run["model"], run["vae"], _without_references(run["positive"]), run["family"])
    assert float((run["stock"] - bare).abs().max()) > 5e-6
    if run["family"] == "krea2":
        # Krea 2 ignores ReferenceLatent until Edit Model Reference Method sets a method: bitwise the
        # image without references, which is why the case chains that node
        alone = [[c, {k: v for k, v in e.items() if k != "reference_latents_method"}] for c, e in run["positive"]]
        assert torch.equal(_stock_image(run["model"], run["vae"], alone, run["family"]), bare)


def test_iteration_0_is_the_stock_ksampler_image_with_the_references(run):
    ours = run["images"][0].permute(0, 2, 3, 1)
    assert ours.shape == run["stock"].shape
    # the same float32 model, conditioning and sampler step; only VAEDecode's clamp to [0, 1] and the
    # float order of SISO's private decoder copy (and PyTorch attention for ComfyUI's on the CPU)
    # differ: measured at most 1.6e-6 on these models, as without references (tests/test_families.py)
    torch.testing.assert_close(ours.clamp(0, 1), run["stock"], atol=2e-5, rtol=0)


def test_the_loss_goes_down_and_the_lora_learns(run):
    losses = [h["loss"] for h in run["result"].history]
    assert len(losses) == ITERATIONS and min(losses[1:]) < losses[0], losses
    assert run["result"].best_iteration > 0
    assert float((run["images"][run["result"].best_iteration] - run["images"][0]).abs().max()) > 1e-4
    # OmniGen2's reference-image refiner runs only with references (without them the self-checked
    # path reports its LoRA layers as not run, tests/test_self_checked.py): here they run and learn
    assert "modules these inputs do not run" not in run["result"].loading, run["result"].loading
    for block in REFERENCE_ONLY_BLOCKS.get(run["family"], ()):
        ups = [v for k, v in run["lora"].tensors.items() if f".{block}." in k and k.endswith(".lora_up.weight")]
        assert ups and all(float(v.abs().max()) > 0 for v in ups), block


def test_no_gradient_reaches_the_references_the_text_or_the_host(run):
    training = [s for s in run["seen"] if s["grad"]]
    # with gradients on, the references and the text context entered the model untracked by autograd:
    # a backward pass cannot reach them, only the LoRA's parameters
    assert training and all(not any(g for _, g in s["refs"]) and not s["context"] for s in training)
    assert all(p.grad is None for p in run["model"].model.parameters())
    for before, after in zip(run["conditioning_before"], _tensors(run["positive"])):
        assert after.grad is None and not after.requires_grad and torch.equal(before, after)
    # the LoRA is the only thing trained: its layers are the family's LoRA targets
    ups = {k for k in run["lora"].tensors if k.endswith(".lora_up.weight")}
    assert ups and len(ups) == len(host.lora_target_names(run["model"], host.TARGETS[0]))


def test_the_host_and_a_stock_sample_are_bitwise_unchanged(run):
    after = run["model"].model.state_dict()
    assert all(torch.equal(run["host_before"][k], after[k]) for k in after)
    assert torch.equal(_stock_image(run["model"], run["vae"], run["positive"], run["family"]), run["stock"])


def test_the_lora_reused_by_a_stock_ksampler_with_the_references_gives_the_best_image(run):
    with torch.inference_mode():
        patched = host.apply_lora(run["model"], run["lora"].tensors, 1.0)
    reused = _stock_image(patched, run["vae"], run["positive"], run["family"])
    best = run["best"].clamp(0, 1)
    # ComfyUI merges W + s * up @ down into the weights; SISO adds s * up (down x) to the layer's output:
    # the same function in another float32 order, measured at most 2.0e-6 on these images (0.3.75 and
    # 0.33); 2e-5 as for iteration 0, and the LoRA must have moved the image ten times that (it moved
    # 6.7e-4 on Qwen-Image, 5e-2 to 0.16 on the Flux models) or the check would show nothing
    change, lost = float((best - run["stock"]).abs().max()), float((reused - best).abs().max())
    print(f"\n{run['name']}: the LoRA changes the image by {change:.2e}; reused by KSampler it differs by {lost:.2e}")
    assert change > 2e-4
    torch.testing.assert_close(reused, best, atol=2e-5, rtol=0)


def test_subject_score_of_the_zero_shot_and_the_refined_picture(run, subject, feature_files):
    """What the refine route's SISO Subject Score shows: the zero-shot picture (the reference model's
    stock image) against SISO's refined one. On random weights the figures say only that the loop
    moves the score the way the loss goes (the score is the loss's similarities)."""
    batch = torch.cat([run["stock"], run["best"].clamp(0, 1)])
    with torch.inference_mode():
        dino, ir, table, _, best = NODE["SISOSubjectScore"].execute(batch, subject, feature_files[0], feature_files[1],
                                                                   1.0, 1.0).args[:5]
    print(f"\n{run['name']}: SISO Subject Score zero-shot DINO {dino[0]:.4f} IR {ir[0]:.4f}; "
          f"refined DINO {dino[1]:.4f} IR {ir[1]:.4f}\n{table}")
    assert dino[0] + ir[0] < dino[1] + ir[1] and best == 1


@pytest.mark.parametrize("name", ["flux2_two_references", "flux1_kontext"])
def test_gradient_checkpointing_with_references_gives_the_same_iterations(name, subject, tiny_networks):
    """low_memory on recomputes the blocks, which now also carry the reference tokens, in backward:
    the same losses as without, up to float32 reassociation (as tests/test_families.py without
    references). Two iterations: the second one's loss depends on the first one's backward."""
    from test_families import checkpointing_histories
    model, vae, positive, _ = CASES[name]()
    runs = checkpointing_histories(model, vae, positive, SIZE, subject, tiny_networks)
    assert len(runs[0]) == len(runs[1]) == 2
    for a, b in zip(*runs):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)
