"""SISO (Single Image Subject Optimization) for ComfyUI.

Registered through ComfyUI's V3 extension API. Importing the pack is cheap: timm and the
feature networks load only when SISO Optimize first runs.
"""
from comfy_api.v0_0_2 import ComfyExtension

from .siso_ops.host import register_model_folders, remove_unfinished_saves

WEB_DIRECTORY = "./web"

register_model_folders()
remove_unfinished_saves()   # what a save killed mid-write left (the pack's own temporary files only)


class SISOExtension(ComfyExtension):
    async def get_node_list(self):
        from .nodes import NODES
        from .nodes.queue_checks import register_queue_check
        register_queue_check(NODES)   # queue-time checks on the prompt as sent (nodes/queue_checks.py)
        return NODES


async def comfy_entrypoint() -> SISOExtension:
    return SISOExtension()
