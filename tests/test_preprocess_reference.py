"""The method's preprocessing against kornia's resize and center crop (the authors' code path).
Kept out of tests/method: kornia is a test requirement of the ComfyUI suite, not of the method's
plain venv (torch, timm, safetensors)."""
import pytest
import torch

from conftest import siso

pre = siso("siso_ops.preprocess")


@pytest.mark.parametrize("h,w", [(384, 512), (512, 384), (512, 512), (300, 401), (64, 64)])
@pytest.mark.parametrize("size", [518, 290])
def test_preprocessing_equals_kornia_resize_and_center_crop(h, w, size):
    import kornia
    x = torch.rand(1, 3, h, w, dtype=torch.float64)
    ours = pre.center_crop(pre.resize_short_side(x, size), size)
    resized = kornia.geometry.transform.resize(x, size, side="short", interpolation="bicubic",
                                               align_corners=False, antialias=False)
    assert resized.shape[-2:] == pre.resize_short_side(x, size).shape[-2:]
    top, left = (resized.shape[-2] - size) // 2, (resized.shape[-1] - size) // 2
    reference = resized[..., top:top + size, left:left + size]
    assert ours.shape == (1, 3, size, size)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
