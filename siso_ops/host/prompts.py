"""The running server's prompt hook: a handler that sees each prompt as sent to POST /prompt,
before ComfyUI validates (and casts) it, and the value that makes ComfyUI's validation report
the pack's refusal under the input it is about."""
from __future__ import annotations

_registered = []


def add_prompt_check(handler) -> bool:
    """Adds ``handler(json_data) -> json_data`` to ComfyUI's on-prompt handlers, once; False when no
    server runs (ComfyUI imported in-process, as the unit tests do)."""
    if _registered:
        return True
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    instance.add_on_prompt_handler(handler)
    _registered.append(handler)
    return True


class RefusedValue(dict):
    """Stands in the prompt for a widget value the pack refused at queue time. ComfyUI's
    validation asks every widget value ``"__value__" in value`` inside its per-input
    try/except (0.3.75 and 0.33); here that raises ``error(message)``, which ComfyUI reports
    once, under this input ("Failed to convert an input value"). A dict, so the 400 answer (which
    echoes the value) stays JSON."""

    def __init__(self, value=None, message="", error=ValueError):
        super().__init__(value=value, refused=message)
        self._error = error

    def __contains__(self, key):
        raise self._error(dict.__getitem__(self, "refused"))

    def __repr__(self):
        return repr(dict.get(self, "value"))

    __str__ = __repr__

    def __format__(self, spec):
        return repr(self)
