"""The pack's graph types."""
from comfy_api.v0_0_2 import io

Subject = io.Custom("SISO_SUBJECT")
SubjectLoRA = io.Custom("SISO_LORA")
Inversion = io.Custom("SISO_INVERSION")
CATEGORY = "SISO subject"


def _has_advanced_flag() -> bool:
    """Whether this ComfyUI's V3 inputs take ``advanced`` (0.33 does: the frontend folds those
    inputs away until the user shows them; 0.3.75 does not). Read from the constructor's own
    signature, not from a version number."""
    import inspect
    return "advanced" in inspect.signature(io.Input.__init__).parameters


# Keyword arguments of an input a typical user never touches: ``**ADVANCED``.
ADVANCED = {"advanced": True} if _has_advanced_flag() else {}
