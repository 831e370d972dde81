"""``compile``: the similarity networks' and the decoder copy's forward and backward through
``torch.compile`` (pure torch).

Only the parts whose shapes never change within a run are compiled: each similarity network sees
one 1 x 3 x S x S image per iteration (S = 518 for DINOv2, 290 for IR), and the decoder one latent
of the run's size, so one compile serves every iteration. A network's compiled forward is kept on
the FeatureNetwork, keyed by device, dtype, gradient checkpointing and input shape; the networks
stay cached between runs (generation.py), so a second run with the same key compiles nothing. The
decoder's compiled function is kept here and takes each run's decoder copy as an argument; it
does not replay as CUDA graphs (decoder_forward says why). On CUDA the compiled code also replays as
CUDA graphs (``mode="reduce-overhead"``): the many small kernels of a ViT block become one launch.

Cancel: ComfyUI's interrupt check takes a lock, which torch.compile cannot trace (each per-block
check would cut the graph in pieces), so a compiled network checks Cancel once per call instead
of before every block. See docs/compile.md for what that does to Cancel's latency.
"""
from __future__ import annotations

import time
import types

import torch

from .precision import autocast

COMPILE_CHOICES = ("auto", "on", "off")


def check_compile(choice: str):
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got '{choice}'")


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile's default backend has a code generator here: Triton on CUDA, a C++
    compiler on the CPU (what inductor builds its kernels with)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return has_triton()
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler
        try:
            return bool(get_cpp_compiler())
        except Exception:   # no compiler found: inductor raises its own error types
            return False
    return False


def compiles(device: torch.device, choice: str) -> bool:
    """``auto``: on CUDA only, where launches bound the iteration. On the CPU compiling measured
    slower or no faster than eager over a whole run (BENCHMARKS.md, "compile on the CPU"), so auto
    leaves it off there and a CPU run is as it was."""
    check_compile(choice)
    if choice == "off":
        return False
    if choice == "on":
        if not can_compile(device):
            raise ValueError(f"compile on: torch.compile cannot build code on {device.type} here (no Triton for "
                             "CUDA, or no C++ compiler for the CPU); choose auto or off")
        return True
    return device.type == "cuda" and can_compile(device)


def _compiled_forward(module, device: torch.device):
    # CUDA graphs only where they exist; on the CPU the default mode (inductor's fused kernels).
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(module, mode=mode)


def prepare_networks(networks, choice: str, device: torch.device, dtype: torch.dtype, checkpointing: bool) -> str:
    """Compile (or reuse) each network's forward for this run and warm it up with one forward and
    backward of a dummy image of the run's shape, under the loop's autocast, so iteration 0 runs
    compiled code. Returns the report's sentence, "" when nothing is compiled."""
    if not networks or not compiles(device, choice):
        return ""
    built, reused, start = [], [], time.perf_counter()
    for network in networks:
        key = (str(device), dtype, bool(checkpointing), (1, 3, network.image_size, network.image_size))
        if key in network.compiled:
            network.use_compiled(key)
            reused.append(network)
            continue
        network.compiled[key] = _compiled_forward(network.module, device)
        network.use_compiled(key)
        dummy = torch.rand(*key[3], device=device, requires_grad=True)
        with torch.inference_mode(False), torch.enable_grad(), autocast(device, dtype):
            # the same path as the loop (preprocessing, dtype cast) so the guards match iteration 0's call
            network.embed(dummy).float().sum().backward()
        built.append(network)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    parts = []
    if built:
        parts.append(f"compiled {' and '.join(n.role for n in built)} in {seconds:.1f} s")
    if reused:
        parts.append(f"reused the compiled {' and '.join(n.role for n in reused)}")
    return "Similarity networks: " + "; ".join(parts)


def _decode(module: torch.nn.Module, latent: torch.Tensor) -> torch.Tensor:
    return module.decode(latent)


# decode functions compiled so far, kept across runs: key -> torch.compile'd _decode
_DECODERS: dict = {}


def decoder_forward(choice: str, device: torch.device, dtype: torch.dtype, checkpointing: bool, kind: str):
    """The compiled decode for this run's decoder copy (``fn(module, latent)``), or None: eager.

    Each run decodes with a new private copy of the VAE's decoder, so the copy is an argument of
    the compiled function, not baked into it: torch.compile lifts a module's weights into graph
    inputs (``inline_inbuilt_nn_modules``), and its guards check their shapes and dtypes, not which
    module holds them. One compile per (device, dtype, checkpointing, decoder class) and latent
    shape therefore serves every later run of the same VAE (tests/test_compile.py counts it)."""
    if not compiles(device, choice):
        return None
    key = (str(device), dtype, bool(checkpointing), kind)
    if key not in _DECODERS:
        # A function of its own per key: torch.compile keeps its compiled graphs on the code object
        # and stops compiling new variants of one code object after a limit (dynamo's
        # recompile_limit, 8), running them eager; a session that switches VAEs, precision and
        # low_memory must not reach it through one shared function. Inductor's fused kernels,
        # without CUDA graphs on any device: the decoder's work is a few dozen large convolutions
        # at the image's size (not bound by launches, as the networks' hundreds of small kernels
        # are), and CUDA graphs would keep its activations in a private memory pool between
        # iterations, outside what the memory estimate plans for.
        name = f"_decode_{len(_DECODERS)}"
        own = types.FunctionType(_decode.__code__.replace(co_name=name), _decode.__globals__, name)
        _DECODERS[key] = torch.compile(own)
    return _DECODERS[key]


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's own count)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def decoder_note(decoder) -> str:
    """The report's sentence for the decoder copy: what its first compiled call built, or ""."""
    if decoder is None or decoder.compile_seconds is None:
        return ""
    if decoder.compile_graphs:
        return f"Decoder: compiled in {decoder.compile_seconds:.1f} s"
    return "Decoder: reused the compiled decoder"


def finish_networks(networks):
    """Back to the eager forward (and its per-block Cancel checks, if a check is set) after a run;
    the compiled code stays on each network for the next run."""
    for network in networks:
        network.use_compiled(None)
