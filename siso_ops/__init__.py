"""The SISO method: pure torch pieces plus one ComfyUI adapter (``comfy_adapter``).

Nothing heavy is imported here so that ComfyUI's start-up stays fast; each module imports
what it needs when it is first used.
"""
