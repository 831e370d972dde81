"""Reading weight files safely (no ComfyUI import): safetensors, or pickles through
``torch.load(weights_only=True)`` with at most a few named harmless classes allowed."""
from __future__ import annotations

import contextlib
import os

import torch


class WeightFileError(ValueError):
    """A weight file is missing, unreadable or not what it should be; the message says which file."""


def _allowing(classes):
    allow = getattr(torch.serialization, "safe_globals", None)
    return allow(list(classes)) if classes and allow else contextlib.nullcontext()


def _refused_classes(path: str, allowed) -> list:
    try:
        with _allowing(allowed):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # an older torch or not a zip checkpoint: the load error is all we have
        return []


def read_checkpoint(path: str, what: str, allowed=()) -> dict:
    """The state dict of a checkpoint, unwrapping a ``{"model": ...}`` / ``{"state_dict": ...}``
    dict and a ``module.`` prefix. ``allowed``: classes a weights-only load may rebuild."""
    if not os.path.isfile(path):
        raise WeightFileError(f"{what} file not found: {path}")
    name = os.path.basename(path)
    if path.endswith(".safetensors"):
        import safetensors.torch
        data = safetensors.torch.load_file(path, device="cpu")
    else:
        try:
            with _allowing(allowed):
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            refused = _refused_classes(path, allowed)
            detail = (f"it holds Python objects that a weights-only load refuses: {', '.join(refused)}"
                      if refused else f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
            raise WeightFileError(
                f"{name} could not be read as a {what} file with torch.load(weights_only=True): {detail}. "
                "Such a file could run code when loaded, so it is not opened; use the published file or "
                "convert its tensors to .safetensors.") from error
    for wrapper in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightFileError(f"{name} does not hold a {what} state dict of tensors")
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data
