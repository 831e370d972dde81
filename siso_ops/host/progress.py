"""ComfyUI's side of the pack's progress: its progress bar (with a preview image where ComfyUI
sends sampler previews), the pack's own websocket events (the live chart in web/siso.js), and
telling a Cancel apart from a failure."""
from __future__ import annotations

import comfy.model_management
import comfy.utils
from comfy.cli_args import LatentPreviewMethod, args


def progress_bar(total: int, node_id=None):
    """ComfyUI's progress bar of the node ``node_id`` (``update_absolute(value, total, preview)``)."""
    return comfy.utils.ProgressBar(total, node_id=node_id)


def previews_enabled() -> bool:
    """Whether ComfyUI sends sampler previews (--preview-method other than none): API clients of a
    default server get no binary frames from a stock graph, and must get none from the pack's."""
    return args.preview_method != LatentPreviewMethod.NoPreviews


def send_event(event: str, data: dict):
    """A websocket event to the browser that queued the prompt; nothing without a running server
    (ComfyUI used as a library, the in-process tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None or getattr(instance, "loop", None) is None:
        return
    instance.send_sync(event, data, instance.client_id)


def is_cancel(error: BaseException) -> bool:
    """Whether ``error`` is ComfyUI's Cancel (the user's interrupt), not a failure."""
    return isinstance(error, comfy.model_management.InterruptProcessingException)
