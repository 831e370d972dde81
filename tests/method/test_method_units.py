"""The method's pure pieces: early stopping, preprocessing, the optimisation loop, LoRA init."""
import math

import pytest
import torch

import siso_ops.early_stopping as early
import siso_ops.lora as lora_mod
import siso_ops.optimize as optimize_mod
import siso_ops.preprocess as pre


def run_rule(losses, percent=3.0, patience=7):
    rule = early.EarlyStopping(percent, patience)
    for i, loss in enumerate(losses):
        if rule.update(loss):
            return i
    return None


def test_early_stopping_stops_after_patience_iterations_without_a_3_percent_gain():
    # -1.00 improves (first); -1.02 is only 2 % better than -1.00: not an improvement;
    # -1.031 is 3.1 % better: improvement, resets; then 7 iterations above -1.031 * 1.03 = -1.0619.
    losses = [-1.00, -1.02, -1.031, -1.05, -1.06, -1.06, -1.0, -1.061, -1.05, -1.0615]
    assert run_rule(losses) == 9
    assert run_rule(losses[:9]) is None


def test_early_stopping_counts_from_the_last_improvement_not_the_best_value():
    rule = early.EarlyStopping(3.0, 2)
    assert rule.update(1.0) is False          # first: improvement, reference 1.0
    assert rule.update(0.98) is False         # 2 % lower: stale 1
    assert rule.update(0.96) is False         # 4 % lower than 1.0: improvement, reference 0.96
    assert rule.reference_loss == 0.96 and rule.stale_iterations == 0
    assert rule.update(0.95) is False         # stale 1
    assert rule.update(0.94) is True          # 2.08 % < 3 %: stale 2 -> stop


def test_early_stopping_matches_the_authors_test_for_negative_losses():
    # Authors: improvement iff loss < best * (1 + x/100) for their (negative) losses.
    for best, loss in [(-1.5, -1.54), (-1.5, -1.546), (-0.2, -0.2061), (-0.2, -0.2059)]:
        rule = early.EarlyStopping(3.0, 7)
        rule.update(best)
        assert rule.improves(loss) == (loss < best * 1.03)


def test_early_stopping_rejects_bad_settings_and_nan():
    with pytest.raises(ValueError, match="patience"):
        early.EarlyStopping(3.0, 0)
    with pytest.raises(FloatingPointError, match="NaN"):
        early.EarlyStopping().update(math.nan)


def test_preprocessing_truncates_the_long_side():
    x = torch.rand(1, 3, 384, 512)
    assert pre.resize_short_side(x, 290).shape[-2:] == (290, 386)  # 512*290/384 = 386.67


def test_preprocessing_keeps_gradients_of_an_unclamped_image():
    x = (torch.rand(1, 3, 64, 64) * 1.4 - 0.2).requires_grad_(True)
    pre.prepare_for_network(x, 290, pre.OPENAI_CLIP_MEAN, pre.OPENAI_CLIP_STD).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert (x.grad[(x < 0) | (x > 1)] != 0).any()  # no clamp: out-of-range pixels still get gradient


def test_lora_delta_starts_as_identity_and_exports_stock_keys():
    delta = lora_mod.LoRADelta(8, 6, rank=4, alpha=4)
    w = torch.randn(8, 6)

    def merged(weight):     # the delta merged into the weight, as ComfyUI's LoRA loaders apply a file
        return weight + (delta.up @ delta.down) * delta.scale
    assert torch.equal(merged(w), w)
    with torch.no_grad():
        delta.up.normal_()
    assert not torch.equal(merged(w), w)
    x = torch.randn(5, 6, dtype=torch.float64)
    # on the input side it is the same function as merged into the weight
    torch.testing.assert_close(x @ w.T.double() + delta.on_input(x.float()).double(), x @ merged(w).T.double(),
                               atol=1e-5, rtol=1e-5)
    out = lora_mod.export_lora({"diffusion_model.a.to_q.weight": delta})
    assert set(out) == {"diffusion_model.a.to_q.lora_up.weight", "diffusion_model.a.to_q.lora_down.weight",
                        "diffusion_model.a.to_q.alpha"}
    out["diffusion_model.a.to_q.lora_up.weight"].zero_()   # a real copy: the delta is untouched
    assert delta.up.abs().sum() > 0


def _scripted_loop(losses, max_iterations=50, patience=7):
    """A toy problem whose loss sequence is scripted; the parameter moves every step."""
    p = torch.nn.Parameter(torch.zeros(3))
    calls = {"i": 0}

    def generate():
        return (p.sum() * 0 + 0.5).reshape(1, 1, 1, 1).expand(1, 3, 2, 2)

    def score(image):
        value = losses[min(calls["i"], len(losses) - 1)]
        calls["i"] += 1
        return {"loss": image.mean() * 0 + value + (p ** 2).sum() * 0 + p.sum() - p.sum().detach()}

    settings = optimize_mod.OptimizationSettings(max_iterations=max_iterations, learning_rate=0.1,
                                                 early_stop_patience=patience)
    seen = []
    result = optimize_mod.optimize({"p": p}, generate, score, settings,
                                   on_iteration=lambda r: seen.append((r.iteration, p.detach().clone())))
    return result, seen, p


def test_the_best_iteration_not_the_last_is_returned_as_a_real_copy():
    losses = [-1.0, -1.2, -1.5, -1.4, -1.3, -1.2, -1.1, -1.0, -0.9, -0.8, -0.7]
    result, seen, p = _scripted_loop(losses)
    assert result.best_iteration == 2
    assert result.best_loss == pytest.approx(-1.5)
    assert result.stop_reason == "early_stop" and result.iterations == 10  # 2 + 7 stale + 1
    assert torch.equal(result.best_state["p"], seen[2][1])   # the parameters that produced iteration 2
    assert not torch.equal(result.best_state["p"], p.detach())  # the optimizer kept moving p


def test_the_iteration_cap_ends_a_run_that_keeps_improving():
    losses = [-1.0 * 1.05 ** i for i in range(10)]
    result, _, _ = _scripted_loop(losses, max_iterations=6)
    assert result.stop_reason == "max_iterations" and result.iterations == 6 and result.best_iteration == 5


# ----------------------------------------------------------------------------- precision auto on a GPU
@pytest.mark.parametrize("capability, hip, emulated_ok, expect", [
    ((8, 0), None, True, torch.bfloat16),      # A100
    ((8, 9), None, True, torch.bfloat16),      # RTX 40xx
    ((7, 5), None, True, torch.float32),       # T4, RTX 20xx: torch's default answer says yes (emulated)
    ((7, 0), None, True, torch.float32),       # V100
    ((6, 1), None, True, torch.float32),       # GTX 10xx
    ((9, 0), "6.2", True, torch.bfloat16),     # ROCm: torch.cuda.is_bf16_supported() is the answer there
    ((9, 0), "6.2", False, torch.float32),
])
def test_auto_precision_takes_bfloat16_only_on_a_gpu_that_has_it_in_hardware(monkeypatch, capability, hip,
                                                                              emulated_ok, expect):
    """torch.cuda.is_bf16_supported() says yes by default where bfloat16 is emulated (it checks
    including_emulation), which would run precision auto many times slower on pre-Ampere GPUs."""
    import siso_ops.precision as precision
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: emulated_ok)
    monkeypatch.setattr(torch.version, "hip", hip)
    gpu = torch.device("cuda")
    assert precision.compute_dtype(gpu, "auto") == expect
    assert precision.compute_dtype(gpu, "bf16") == torch.bfloat16 and precision.compute_dtype(gpu, "fp32") == torch.float32
    warned = precision.precision_warnings(gpu, "bf16")
    assert (warned == []) == (expect == torch.bfloat16), warned
    if warned:
        assert "is emulated and runs slower than fp32: choose auto or fp32" in warned[0]
    assert precision.precision_warnings(gpu, "auto") == precision.precision_warnings(gpu, "fp32") == []
