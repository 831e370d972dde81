"""Single-image DreamBooth's training set for ComfyUI's Train LoRA (siso_ops/dreambooth.py) and the
paper's diversity figure in SISO Subject Score (siso_ops/score.py), in plain torch."""
import pytest
import torch
import torch.nn.functional as F

import siso_ops.dreambooth as db
import siso_ops.score as score_mod


def cond(value):
    return [[torch.full((1, 77, 8), float(value)), {"pooled_output": torch.zeros(1, 8)}]]


def latent(count, value=0.0, size=8):
    return {"samples": torch.full((count, 4, size, size), float(value)) + torch.arange(count).view(-1, 1, 1, 1)}


@pytest.mark.parametrize("weight,subjects,classes", [(1.0, 1, 8), (0.5, 1, 8), (2.0, 1, 8), (1.0, 2, 8), (1.0, 1, 3), (0.3, 1, 4)])
def test_the_sample_ratio_is_the_prior_weight_asked_for(weight, subjects, classes):
    """Train LoRA draws one sample uniformly a step: the expected gradient is proportional to
    k*n_s*L_subject + m*n_c*L_class, so m*n_c/(k*n_s) must be the weight."""
    subject_prompt, class_prompt = cond(1), cond(2)
    dataset = db.training_set(latent(subjects, 100), subject_prompt, latent(classes), class_prompt, weight)
    assert len(dataset.latents) == len(dataset.conditionings)
    subject_samples = sum(1 for c in dataset.conditionings if c is subject_prompt)
    class_samples = sum(1 for c in dataset.conditionings if c is class_prompt)
    assert subject_samples + class_samples == len(dataset.latents)
    assert class_samples / subject_samples == pytest.approx(weight, rel=0.02)
    assert dataset.prior_weight == pytest.approx(class_samples / subject_samples)
    # each latent keeps its own prompt: subject latents (value >= 100) with the rare-token prompt
    for sample, prompt in zip(dataset.latents, dataset.conditionings):
        assert sample["samples"].shape == (1, 4, 8, 8)
        assert (float(sample["samples"][0, 0, 0, 0]) >= 100) == (prompt is subject_prompt)
    # every class image is in the set, as often as every other
    seen = [float(s["samples"][0, 0, 0, 0]) for s, c in zip(dataset.latents, dataset.conditionings) if c is class_prompt]
    assert sorted(set(seen)) == [float(i) for i in range(classes)] and len(seen) == classes * dataset.class_copies
    # accumulation: about one subject draw per optimiser step
    assert dataset.accumulation == round(1 + dataset.prior_weight)
    assert f"prior weight {dataset.prior_weight:.3g}" in dataset.summary()


def test_weight_0_trains_on_the_subject_alone_and_ignores_the_class_inputs():
    dataset = db.training_set(latent(1, 100), cond(1), None, None, 0.0)
    assert len(dataset.latents) == 1 and dataset.class_count == 0 and dataset.prior_weight == 0


@pytest.mark.parametrize("args,message", [
    ((latent(1), [cond(1)[0], cond(1)[0]], latent(2), cond(2), 1.0), "subject conditioning must be one prompt"),
    ((latent(1), cond(1), latent(2), [], 1.0), "class conditioning must be one prompt"),
    (({"samples": torch.zeros(4, 8, 8)}, cond(1), latent(2), cond(2), 1.0), "subject latent must be an image latent"),
    ((latent(1), cond(1), {"samples": torch.zeros(0, 4, 8, 8)}, cond(2), 1.0), "class latent must be an image latent"),
    ((latent(1), cond(1), {"samples": torch.zeros(2, 16, 8, 8)}, cond(2), 1.0), "16 channels and the subject's 4"),
    (({"samples": torch.full((1, 4, 8, 8), float("nan"))}, cond(1), latent(2), cond(2), 1.0), "NaN or infinite"),
])
def test_a_training_set_that_train_lora_would_misread_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        db.training_set(*args)


def test_diversity_is_the_mean_squared_error_to_the_subject_photo():
    g = torch.Generator().manual_seed(0)
    photo = torch.rand(1, 3, 24, 32, generator=g)
    gray = torch.full((1, 3, 24, 32), 0.5)
    twice = F.interpolate(photo, scale_factor=2, mode="nearest")     # the photo at another size
    other = torch.rand(1, 3, 24, 32, generator=g)
    mse = score_mod.subject_mse(torch.cat([photo, gray, other]), [photo])
    assert mse[0] == 0
    assert mse[1] == pytest.approx(float(((photo - 0.5) ** 2).mean()), rel=1e-6)
    assert mse[2] == pytest.approx(float(((other - photo) ** 2).mean()), rel=1e-6) and mse[2] > 0.1
    # another size is resized to the photo's (antialiased: a slight blur, far from a different image)
    assert 0 < score_mod.subject_mse(twice, [photo])[0] < mse[2] / 3
    # several photos: the mean over them
    both = score_mod.subject_mse(gray, [photo, other])[0]
    assert both == pytest.approx((mse[1] + float(((other - 0.5) ** 2).mean())) / 2, rel=1e-6)
