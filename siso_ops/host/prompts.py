"""The running server's prompt hook: a handler that sees each prompt as sent to POST /prompt,
before ComfyUI validates (and casts) it."""
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
