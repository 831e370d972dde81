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


# A seed's "control after generate" widget. The frontend gives every INT input named "seed" one,
# starting at "randomize": for SISO's minutes-long nodes that is a new inversion or optimisation
# on every queue, even when only a later node changed. ComfyUI 0.33's ControlAfterGenerate starts
# it at "fixed" (its frontend takes the value as the widget's start); an older ComfyUI takes only
# true / false, and there a new SISO Optimize starts at "randomize" (the templates save "fixed").
FIXED_SEED = getattr(getattr(io, "ControlAfterGenerate", None), "fixed", True)
# No control widget at all (false stops the frontend's rule for inputs named "seed"): the seed
# changes only when the user changes it, on every ComfyUI; saved workflows keep their values
# (the seed is the node's last widget, so a saved control value after it is ignored).
NO_SEED_CONTROL = False


def search_aliases(*words: str) -> dict:
    """Keyword arguments of a node's Schema: other words the node search finds it by, on a
    ComfyUI whose Schema takes ``search_aliases`` (0.33 does; 0.3.75's search reads the name and
    display name only). Read from the Schema's own fields, not from a version number."""
    import dataclasses
    fields = {f.name for f in dataclasses.fields(io.Schema)} if dataclasses.is_dataclass(io.Schema) else set()
    return {"search_aliases": list(words)} if "search_aliases" in fields else {}
