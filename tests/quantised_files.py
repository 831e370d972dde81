"""Diffusion-model files in the weight layouts users load today, written with random values in the
layout the loaders read (nothing here is a trained weight; write them to a temporary folder):

* ``plain``: an fp16 safetensors UNet / DiT file, for UNETLoader's ``weight_dtype`` (fp8_e4m3fn,
  fp8_e5m2: ComfyUI stores the weights in fp8 itself and computes through manual_cast).
* ``fp8_scaled``: the ``*_fp8_scaled`` layout: a ``scaled_fp8`` marker tensor of the fp8 dtype
  (comfy.model_detection pops it; ComfyUI 0.33 converts the file to its mixed-precision layout in
  comfy.utils.convert_old_quants), every Linear weight stored as ``W / scale`` in float8_e4m3fn with
  its float32 ``scale_weight`` beside it, everything else fp16.
* ``fp8mixed``: ComfyUI's mixed-precision layout as 0.3.75 and the official ``*_fp8mixed`` files
  write it: the safetensors header's ``_quantization_metadata`` JSON (``{"format_version": "1.0",
  "layers": {layer: {"format": "float8_e4m3fn"}}}``, read by detect_layer_quantization) and per
  layer a float8 ``weight`` with its float32 ``weight_scale``. ComfyUI 0.33 reads it too (it turns
  the header into per-layer ``comfy_quant`` keys).
* ``comfy_quant``: 0.33's own per-layer layout: ``<layer>.comfy_quant`` (the layer's JSON config as
  uint8 bytes, here ``{"format": "float8_e4m3fn"}``; ``int8_tensorwise`` and ``nvfp4`` can be written
  too) next to its quantised weight and scale. nvfp4 is quantised by ComfyUI's own quantiser
  (``QuantizedTensor.from_float`` with its NVFP4 layout) and stored as its loader pops it: the packed
  4-bit ``weight`` (uint8), the float8 block scales ``weight_scale`` (padded and swizzled as the
  layout makes them) and the float32 tensor scale ``weight_scale_2``.
* GGUF (``gguf_q8_0``, ``gguf_q4_0``, ``gguf_q5_1``): written with the ``gguf`` package's writer and
  quantiser as ComfyUI-GGUF's tools/convert.py writes them (``general.architecture``, tensors under
  their state-dict names, 1-D and small tensors in F32, other unquantisable ones in F16) and read by
  its loader (UnetLoaderGGUF). gguf-py cannot quantise K-quants (its Q4_K quantiser raises
  NotImplementedError), so ``gguf_q4_k`` is written block by block in Q4_K's published layout
  (256 weights per 144-byte block: float16 ``d`` and ``dmin``, 12 bytes of packed 6-bit scales and
  mins, 128 bytes of 4-bit values) with random scales and values and ``d`` / ``dmin`` set so that
  each tensor dequantises to mean 0 and the source tensor's standard deviation. The bytes are
  checked against gguf-py's own Q4_K dequantiser before they are written.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
GGUF_TYPES = {"gguf_q8_0": "Q8_0", "gguf_q4_0": "Q4_0", "gguf_q5_1": "Q5_1", "gguf_q4_k": "Q4_K"}


def linear_weight_keys(diffusion_model: torch.nn.Module) -> set:
    return {f"{name}.weight" for name, m in diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)}


def _save(path, tensors: dict, metadata: dict | None = None) -> str:
    import safetensors.torch
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def _fp8(weight: torch.Tensor, dtype=torch.float8_e4m3fn):
    scale = (weight.float().abs().max() / FP8_MAX[dtype]).clamp(min=1e-12)
    return (weight.float() / scale).to(dtype), scale.reshape(()).float()


def _int8(weight: torch.Tensor):
    scale = (weight.float().abs().max() / 127.0).clamp(min=1e-12)
    return (weight.float() / scale).round().clamp(-127, 127).to(torch.int8), scale.reshape(()).float()


def _nvfp4(weight: torch.Tensor) -> dict:
    from comfy.quant_ops import QuantizedTensor     # ComfyUI 0.33's quantiser (comfy-kitchen layouts)
    quantised = QuantizedTensor.from_float(weight.float(), "TensorCoreNVFP4Layout")
    params = quantised._params
    return {"weight": quantised._qdata, "weight_scale": params.block_scale, "weight_scale_2": params.scale.float()}


def write(path, state_dict: dict, linear_keys: set, layout: str, arch: str = "sd1", quant_format: str = "float8_e4m3fn"):
    """``state_dict``: the diffusion model's own keys (no prefix). Returns the path."""
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    if layout == "plain":
        return _save(path, {k: v.half() for k, v in sd.items()})
    if layout == "fp8_scaled":
        out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
        for k, v in sd.items():
            if k in linear_keys:
                out[k], out[k[:-len("weight")] + "scale_weight"] = _fp8(v)
            else:
                out[k] = v.half()
        return _save(path, out)
    if layout in ("fp8mixed", "comfy_quant"):
        out, layers = {}, {}
        for k, v in sd.items():
            if k in linear_keys:
                layer = k[:-len(".weight")]
                if layout == "fp8mixed":
                    out[k], out[f"{layer}.weight_scale"] = _fp8(v)
                    layers[layer] = {"format": "float8_e4m3fn"}
                else:
                    if quant_format == "nvfp4":
                        out.update({f"{layer}.{name}": t for name, t in _nvfp4(v).items()})
                    else:
                        out[k], out[f"{layer}.weight_scale"] = _int8(v) if quant_format == "int8_tensorwise" else _fp8(v)
                    out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": quant_format}).encode()),
                                                               dtype=torch.uint8)
            else:
                out[k] = v.half()
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if layers else None
        return _save(path, out, metadata)
    if layout in GGUF_TYPES:
        return _write_gguf(path, sd, linear_keys, GGUF_TYPES[layout], arch)
    raise ValueError(f"unknown layout {layout}")


def _random_q4_k(data: np.ndarray, seed: int = 0) -> np.ndarray:
    """Q4_K blocks (see the module docstring) for a tensor shaped like ``data``: random 6-bit scales
    and mins and 4-bit values; ``d`` / ``dmin`` chosen from the dequantised moments. A block
    dequantises to ``d * scale * q - dmin * min``, linear in (d, dmin), so two probes give them."""
    import gguf
    qtype = gguf.GGMLQuantizationType.Q4_K
    rows, cols = int(np.prod(data.shape[:-1])), data.shape[-1]
    blocks = rows * cols // 256
    rng = np.random.default_rng(seed)
    body = rng.integers(0, 256, size=(blocks, 140), dtype=np.uint8)     # scales, mins and values

    def packed(d: float, dmin: float) -> np.ndarray:
        head = np.tile(np.array([d, dmin], dtype=np.float16).view(np.uint8), (blocks, 1))
        return np.concatenate([head, body], axis=1).reshape(rows, cols // 256 * 144)
    a = gguf.quants.dequantize(packed(1.0, 0.0), qtype)       # d * scale * q with d = 1
    b = -gguf.quants.dequantize(packed(0.0, 1.0), qtype)      # dmin * min with dmin = 1
    ratio = float(a.mean() / b.mean())                        # dmin / d that centres the weights
    spread = float((a - ratio * b).std())
    d = float(data.std()) / spread if spread > 0 else 1.0
    out = packed(d, d * ratio)
    check = gguf.quants.dequantize(out, qtype)
    assert np.isfinite(check).all() and abs(float(check.std()) / float(data.std()) - 1) < 0.05
    return out


def _write_gguf(path, sd: dict, linear_keys: set, qtype_name: str, arch: str) -> str:
    import gguf
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in sd.items():
        data = value.float().numpy()
        if key in linear_keys and data.shape[-1] % block == 0:
            packed = _random_q4_k(data) if qtype == gguf.GGMLQuantizationType.Q4_K else gguf.quants.quantize(data, qtype)
            writer.add_tensor(key, packed, raw_dtype=qtype)
        elif data.ndim == 1 or data.size <= 1024:     # convert.py keeps these in F32
            writer.add_tensor(key, data.astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
        else:
            writer.add_tensor(key, data.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
