"""The refine route keeps the zero-shot picture's background: SISO Optimize with a MASK and no
inversion adds ``background_weight`` x the mean squared error outside the mask between each
iteration's image and iteration 0's image (the picture the model makes before the LoRA moves it:
the zero-shot picture with the zero LoRA, the warm start's picture with ``initial_lora``). The loss
is the editing route's (siso_ops/editing.py: ``background_weights``, ``background_loss``,
``EditScore``), with iteration 0's image in place of the photo.

Tiny random-weight Flux.2 with a ReferenceLatent conditioning made by the stock nodes
(tests/test_references.py), on the CPU, in float32, on whichever ComfyUI the suite runs against."""
import pytest
import torch
from PIL import Image

import nodes as comfy_nodes
from conftest import siso
from reference_conditioning import flux2_with_references as _flux2
from test_references import SIZE, _stock_image

gen = siso("siso_ops.generation")
optim = siso("siso_ops.optimize")

NODE = comfy_nodes.NODE_CLASS_MAPPINGS
ITERATIONS = 5
WEIGHT = 10.0


def subject_mask():
    """1 = subject: a square in the middle of the 64 x 64 picture, the rest is background."""
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 16:48, 20:44] = 1.0
    return mask


def background_error(image_bchw, reference_bchw, mask):
    """Mean squared error over the background pixel-channels, as the loss computes it."""
    keep = (1 - mask).unsqueeze(1).expand_as(image_bchw)
    return float(((image_bchw - reference_bchw) ** 2 * keep).sum() / keep.sum())


@pytest.fixture(scope="module")
def flux2():
    return _flux2(1)


def optimise(flux2, subject, tiny_networks, mask, background_weight, iterations=ITERATIONS, initial_lora=None):
    model, vae, positive, _ = flux2
    reports = []
    settings = gen.GenerationSettings(
        width=SIZE, height=SIZE, seed=42, precision="fp32", gradient_checkpointing=False,
        background_weight=background_weight,
        optimization=optim.OptimizationSettings(max_iterations=iterations, learning_rate=5e-2,
                                                early_stop_patience=100))
    with torch.inference_mode():
        lora, best, result = gen.optimize_subject(model, vae, positive, subject, None, None, settings,
                                                  feature_networks=tiny_networks, mask=mask,
                                                  on_iteration=reports.append, initial_lora=initial_lora)
    return dict(lora=lora, best=best, result=result, reports=reports)


@pytest.fixture(scope="module")
def kept(flux2, subject, tiny_networks):
    return optimise(flux2, subject, tiny_networks, subject_mask(), WEIGHT)


@pytest.fixture(scope="module")
def free(flux2, subject, tiny_networks):
    """The same run with background_weight 0: the mask is not used."""
    return optimise(flux2, subject, tiny_networks, subject_mask(), 0.0)


def test_iteration_0_is_the_zero_shot_picture_and_its_background_term_is_0(flux2, kept):
    model, vae, positive, family = flux2
    first = kept["reports"][0]
    # the zero-shot picture: stock KSampler + VAEDecode with the same model, conditioning and seed
    # (float32; the tolerance of tests/test_references.py)
    torch.testing.assert_close(first.image.permute(0, 2, 3, 1).clamp(0, 1), _stock_image(model, vae, positive, family),
                               atol=2e-5, rtol=0)
    assert set(first.terms) == {"loss", "dino", "ir", "background"}
    assert first.terms["background"] == 0.0
    assert first.terms["loss"] == pytest.approx(first.terms["dino"] + first.terms["ir"], abs=1e-6)


def test_the_loss_includes_the_background_term_afterwards(kept):
    later = [r.terms for r in kept["reports"][1:]]
    assert len(later) == ITERATIONS - 1
    # the LoRA moved the picture, so the background moved a little too, and the loss carries c times it
    assert all(t["background"] > 0 for t in later), later
    for t in later:
        assert t["loss"] == pytest.approx(t["dino"] + t["ir"] + WEIGHT * t["background"], rel=1e-5, abs=1e-6)
    history = kept["result"].history
    assert [h["background"] for h in history] == [r.terms["background"] for r in kept["reports"]]
    assert "background error" in kept["result"].describe()


def test_the_term_is_the_editing_background_loss_against_the_first_image():
    """EditScore without a photo (what the route uses): the first image it scores is the reference,
    its term is exactly 0 with a zero gradient; later images get editing's background_loss
    (the mean squared error over the background pixel-channels) against it."""
    editing = siso("siso_ops.editing")
    keep = editing.check_refine_mask(subject_mask(), SIZE, SIZE, WEIGHT)
    torch.testing.assert_close(keep, (1 - subject_mask()).unsqueeze(1))
    similarity = lambda image: {"loss": image.mean() * 0}       # noqa: E731
    score = editing.EditScore(similarity, None, keep, WEIGHT)
    g = torch.Generator().manual_seed(0)
    first = torch.rand(1, 3, SIZE, SIZE, generator=g).requires_grad_()
    terms = score(first)
    terms["loss"].backward()
    assert float(terms["background"].detach()) == 0.0 and float(first.grad.abs().max()) == 0.0
    second = first.detach() + 0.1 * torch.rand(1, 3, SIZE, SIZE, generator=g)
    terms = score(second)
    expected = background_error(second, first.detach(), subject_mask())
    assert float(terms["background"]) == pytest.approx(expected, rel=1e-6)
    assert float(terms["loss"]) == pytest.approx(WEIGHT * expected, rel=1e-6)
    assert torch.equal(score.photo, first.detach())            # the reference stays the first image
    assert editing.check_refine_mask(subject_mask(), SIZE, SIZE, 0.0) is None     # weight 0: unused


def test_outside_the_mask_the_result_stays_closer_to_the_zero_shot_picture(kept, free):
    mask = subject_mask()
    zero_shot = kept["reports"][0].image
    assert torch.equal(free["reports"][0].image, zero_shot)        # both start from the same picture
    assert "background" not in free["reports"][1].terms           # weight 0: no term, the mask unused
    # the learning rate moves the picture: without the term its background drifts
    moved = [background_error(r.image, zero_shot, mask) for r in free["reports"]]
    kept_errors = [background_error(r.image, zero_shot, mask) for r in kept["reports"]]
    print(f"\nbackground error per iteration, weight {WEIGHT}: {['%.2e' % e for e in kept_errors]}; "
          f"weight 0: {['%.2e' % e for e in moved]}")
    assert free["result"].best_iteration > 0 and max(moved) > 1e-4, moved
    best = {name: background_error(run["best"].permute(0, 3, 1, 2), zero_shot, mask) for name, run in
            (("kept", kept), ("free", free))}
    assert best["kept"] < best["free"], best
    # iteration 1 is the same in both (the term's gradient is 0 at iteration 0); from then on the
    # background loss holds the background closer to the zero-shot picture
    assert kept_errors[1] == pytest.approx(moved[1], rel=1e-4)
    assert kept_errors[-1] < moved[-1], (kept_errors, moved)


def test_a_warm_start_keeps_the_background_of_its_own_first_picture(flux2, subject, tiny_networks, kept):
    """With initial_lora, iteration 0 is the model with that LoRA: its picture is the one whose
    background is kept (its term is 0 there), not the zero-shot picture."""
    warm = optimise(flux2, subject, tiny_networks, subject_mask(), WEIGHT, iterations=2, initial_lora=kept["lora"])
    first = warm["reports"][0]
    assert first.terms["background"] == 0.0
    # that picture is the earlier run's best image (the LoRA it started from)
    torch.testing.assert_close(first.image.permute(0, 2, 3, 1), kept["best"].clamp(0, 1), atol=2e-5, rtol=0)
    if kept["result"].best_iteration > 0:
        assert not torch.allclose(first.image, kept["reports"][0].image, atol=1e-4)


def test_a_mask_of_another_size_is_refused_before_any_work(flux2, subject, tiny_networks, monkeypatch):
    model, vae, positive, _ = flux2
    for where in ((gen.memory, "plan"), (gen.networks, "get"), (gen.host, "TrainableModel"), (gen, "optimize")):
        monkeypatch.setattr(*where, lambda *a, **k: pytest.fail("work started despite the wrong-size mask"))
    settings = gen.GenerationSettings(width=SIZE, height=SIZE, seed=42, precision="fp32")
    wrong = torch.zeros(1, SIZE, SIZE + 8)
    wrong[:, 16:48, 16:48] = 1.0
    with torch.inference_mode(), pytest.raises(ValueError) as error:
        gen.optimize_subject(model, vae, positive, subject, None, None, settings, feature_networks=tiny_networks,
                             mask=wrong, on_iteration=lambda r: pytest.fail("an iteration ran"))
    assert str(error.value) == (
        "the mask is 72x64 but the picture SISO Optimize makes (width x height) is 64x64: make the mask from that "
        "picture (SISO Subject Mask on the zero-shot picture, which KSampler made at the same size), or set SISO "
        "Optimize's width and height to the mask's size")
    # an empty mask (nothing found) and a mask over the whole picture are refused too
    for mask, message in ((torch.zeros(1, SIZE, SIZE), "the mask is empty"),
                          (torch.ones(1, SIZE, SIZE), "the mask covers the whole photo")):
        with torch.inference_mode(), pytest.raises(ValueError, match=message):
            gen.optimize_subject(model, vae, positive, subject, None, None, settings, feature_networks=tiny_networks,
                                 mask=mask)


def test_the_wrong_size_is_refused_at_queue_time_where_the_mask_size_is_known(tmp_path, monkeypatch):
    """SISOOptimize.check_prompt: a mask from LoadImage (or SISO Subject Mask on a LoadImage) of
    another size than width x height. A mask of a picture made in the run (SISO Subject Mask on a
    VAE Decode) is checked when the node starts (above)."""
    import folder_paths
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    Image.new("RGBA", (72, 64)).save(tmp_path / "mask_72x64.png")

    def prompt(mask_link, **inputs):
        return {"1": {"class_type": "LoadImage", "inputs": {"image": "mask_72x64.png"}},
                "2": {"class_type": "SubjectMask", "inputs": {"image": ["1", 0], "text": "dog"}},
                "3": {"class_type": "VAEDecode", "inputs": {}},
                "4": {"class_type": "SubjectMask", "inputs": {"image": ["3", 0], "text": "dog"}},
                "9": {"class_type": "SISOOptimize", "inputs": dict(dict(width=64, height=64, mask=mask_link), **inputs)}}

    check = NODE["SISOOptimize"].check_prompt
    for link in (["1", 1], ["2", 0]):
        refusal = check(prompt(link), "9")
        assert refusal == {"mask": "mask: the mask is 72x64 but the picture SISO Optimize makes is 64x64 (width x height): "
                                   "make the mask from that picture, or set width and height to the mask's size"}, refusal
        assert check(prompt(link, width=72), "9") == {}                       # the same size
        assert check(prompt(link, background_weight=0.0), "9") == {}          # the mask is not used
        assert check(prompt(link, width=["5", 0]), "9") == {}                 # a linked width: checked at run time
    assert check(prompt(["4", 0]), "9") == {}                                 # made in the run: unknown here
