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
  uint8 bytes, here ``{"format": "float8_e4m3fn"}``; ``int8_tensorwise`` can be written too) next to its quantised weight and scale.
* GGUF (``gguf_q8_0``, ``gguf_q4_0``, ``gguf_q5_1``): written with the ``gguf`` package's writer and
  quantiser as ComfyUI-GGUF's tools/convert.py writes them (``general.architecture``, tensors under
  their state-dict names, 1-D and small tensors in F32, other unquantisable ones in F16) and read by
  its loader (UnetLoaderGGUF). gguf-py cannot quantise K-quants (its Q4_K quantiser raises
  NotImplementedError), so no K-quant file can be written here.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
GGUF_TYPES = {"gguf_q8_0": "Q8_0", "gguf_q4_0": "Q4_0", "gguf_q5_1": "Q5_1"}


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
            writer.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        elif data.ndim == 1 or data.size <= 1024:     # convert.py keeps these in F32
            writer.add_tensor(key, data.astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
        else:
            writer.add_tensor(key, data.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
