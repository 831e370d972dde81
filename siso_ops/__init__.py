"""The SISO method: pure torch pieces plus the ComfyUI side in one package (``host``).

Nothing heavy is imported here so that ComfyUI's start-up stays fast; each module imports
what it needs when it is first used.
"""
