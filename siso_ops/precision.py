"""Compute precision of the optimisation loop (pure torch).

Mixed precision: the LoRA, its gradients and AdamW state stay float32; the forward passes
(denoiser, decoder, similarity networks) run under ``torch.autocast`` in bfloat16 where the
hardware has fast bfloat16 (CUDA GPUs from Ampere on, CPUs with AVX-512 BF16 or AMX). bfloat16
has float32's range, so no loss scaling is needed. float16 is not offered: without a loss
scale LoRA gradients underflow in it.
"""
from __future__ import annotations

import contextlib
import functools

import torch

PRECISIONS = ("auto", "bf16", "fp32")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bfloat16 matrix products in hardware (Linux reports the flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cuda_has_fast_bf16(device: torch.device) -> bool:
    """NVIDIA GPUs from Ampere on (compute capability 8.0) multiply bfloat16 in hardware. Not
    ``torch.cuda.is_bf16_supported()``: by default it also says yes where bfloat16 is only
    emulated (Turing, Volta, Pascal: T4, RTX 20xx, V100), many times slower than float32. On ROCm
    its answer is the one there is."""
    if getattr(torch.version, "hip", None):
        return bool(torch.cuda.is_bf16_supported())
    return torch.cuda.get_device_capability(device)[0] >= 8


def check_precision(precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{precision}'")


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    check_precision(precision)
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_fast_bf16(device) else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def precision_warnings(device: torch.device, precision: str) -> list:
    """What ``precision`` costs where ``auto`` would choose otherwise (``auto`` knows; an explicit
    choice is kept, and said)."""
    if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        return ["precision bf16 on this CPU (no AVX-512 BF16 or AMX) is emulated and runs many times (about 20x) "
                "slower than fp32: choose auto or fp32"]
    if precision == "bf16" and device.type == "cuda" and not cuda_has_fast_bf16(device):
        return ["precision bf16 on this GPU (before NVIDIA Ampere: no bfloat16 in hardware) is emulated and runs "
                "slower than fp32: choose auto or fp32"]
    return []


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward passes' context: autocast to ``dtype``, or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def agreement_tolerance(dtype: torch.dtype) -> float:
    """Largest relative difference (max |a - b| over the output's scale) the pack's self-checks
    accept between two computations of one function in ``dtype`` that differ only in the order
    of float operations: the training clone against the stock model (self_check.py, the whole
    denoiser) and each LoRA layer of the clone against its stock layer plus the LoRA
    (host/training.py's check of the LoRA path, one layer). One rule for both, written once.

    Each reordering rounds at the dtype's unit roundoff u (half its machine epsilon), and a deep
    network carries those roundings to its output amplified: the bound is 2**10 u, in float32
    (u = 2**-24) 2**-14, about 6e-5 of the output's scale: room for that amplification (SISO's
    tiny models measure below 1e-6, one layer far below), while a path that computes something
    else (a layer skipped, a block taking another branch while gradients are on, a LoRA added in
    the wrong units) moves the output by far more. In half precision 2**10 u is 0.5 (float16,
    u = 2**-11) or 4 (bfloat16, u = 2**-8), too loose to catch anything: there the bound is capped
    at 2**-3, an eighth of the output's scale, still below the changes a wrong path makes. (The
    one-layer check used 1e-4 in float32 and 2**-6 in half precision before this rule; the
    whole-denoiser bounds, which tests pin, are this rule's values.)"""
    unit_roundoff = torch.finfo(dtype).eps / 2
    return min(2.0 ** 10 * unit_roundoff, 2.0 ** -3)
