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
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def precision_warnings(device: torch.device, precision: str) -> list:
    """What ``precision`` costs where ``auto`` would choose otherwise (``auto`` knows; an explicit
    choice is kept, and said)."""
    if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        return ["precision bf16 on this CPU (no AVX-512 BF16 or AMX) is emulated and runs many times (about 20x) "
                "slower than fp32: choose auto or fp32"]
    return []


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward passes' context: autocast to ``dtype``, or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
