"""The Python packages the pack's requirements files install: whether one is there, found without
importing it (ComfyUI's start stays cheap), and the command that installs a requirements file."""
from __future__ import annotations

import importlib.util
import os

# The pack's folder, the one ComfyUI loaded it from: its requirements files lie there.
PACK_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def installed(package: str) -> bool:
    """Whether ``package`` is installed as a package (a folder, as pip installs timm and
    groundingdino), not merely a module of that name."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):   # a broken parent package, or a module without a spec
        return False
    return spec is not None and bool(spec.submodule_search_locations)


def install_command(requirements_file: str) -> str:
    """What the user runs, with the file's full path: ComfyUI's own Python, not another one."""
    return f"'python -m pip install -r \"{os.path.join(PACK_FOLDER, requirements_file)}\"'"
