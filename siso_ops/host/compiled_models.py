"""A MODEL that went through ComfyUI's TorchCompileModel node: the node adds an APPLY_MODEL
wrapper (key ``torch.compile``) that swaps the compiled diffusion model in for each sampler call,
and notes its settings in ``model_options["torch_compile_kwargs"]``.

SISO trains on the uncompiled module: the training clone drops that wrapper and note, the host
patcher keeps both. The training forward replaces every layer's forward with a Python object
(its LoRA, ComfyUI's weight casts) and checks Cancel between calls, which a compiled graph of
the stock model would bypass or recompile around; see docs/compile.md. Found from the feature
(the wrapper's key), never from ComfyUI's version."""
from __future__ import annotations

from comfy.patcher_extension import WrappersMP

try:   # the names ComfyUI's helper uses; the same strings where the helper is absent
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY, TORCH_COMPILE_KWARGS
except ImportError:
    COMPILE_KEY, TORCH_COMPILE_KWARGS = "torch.compile", "torch_compile_kwargs"


def user_compiled(model) -> bool:
    """Whether TorchCompileModel (or anything using ComfyUI's compile helper) compiled ``model``."""
    return bool(model.wrappers.get(WrappersMP.APPLY_MODEL, {}).get(COMPILE_KEY))


def drop_user_compile(clone):
    """Take the compile wrapper and its note off ``clone`` (a clone: its wrapper and option
    dicts are its own copies, so the host patcher keeps both)."""
    clone.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY)
    clone.model_options.pop(TORCH_COMPILE_KWARGS, None)


def user_compile_note(model) -> str:
    """The report's sentence for a MODEL from TorchCompileModel, "" otherwise."""
    if not user_compiled(model):
        return ""
    return ("TorchCompileModel: SISO trained the uncompiled model (the compiled one stays on your MODEL for "
            "sampling afterwards)")
