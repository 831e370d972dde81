"""Attention in the training clone: ComfyUI's choice on a CPU (sub-quadratic, chunked in Python)
against PyTorch's fused scaled_dot_product_attention, which SISO Optimize's training clone uses
there. Forward + backward of one self-attention call at the sizes of SD-Turbo's first UNet level
(320 channels, 5 heads of 64), median of 5 after a warm-up.

    python benchmarks/attention.py
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import conftest  # noqa: E402,F401  (ComfyUI in-process)
import torch  # noqa: E402

import comfy.ldm.modules.attention as attention  # noqa: E402


def timed(fn, q, k, v, dtype):
    times = []
    for i in range(6):
        q_, k_, v_ = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = fn(q_, k_, v_, 5)
        out.float().square().mean().backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times), out.detach().float()


def main():
    print(f"ComfyUI's attention here: {attention.optimized_attention.__name__}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for size in (256, 512):
        tokens = (size // 8) ** 2
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, tokens, 320, generator=g) for _ in range(3))
        for dtype in (torch.float32, torch.bfloat16):
            chunked, a = timed(attention.attention_sub_quad, q, k, v, dtype)
            fused, b = timed(attention.attention_pytorch, q, k, v, dtype)
            print(f"{size} px ({tokens} tokens), {str(dtype)[6:]}: sub-quadratic {chunked * 1000:.1f} ms, "
                  f"scaled_dot_product_attention {fused * 1000:.1f} ms, ratio {fused / chunked:.2f}, "
                  f"max |difference| {float((a - b).abs().max()):.2e}")


if __name__ == "__main__":
    main()
