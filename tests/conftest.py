"""Runs the tests against a REAL ComfyUI 0.3.75 (the embedded runtime unless SISO_COMFYUI_DIR
points elsewhere): ComfyUI is imported in-process on the CPU with a temporary base directory,
and the pack is loaded through ComfyUI's own custom-node loader."""
import asyncio
import importlib
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COMFYUI = pathlib.Path(os.environ.get("SISO_COMFYUI_DIR", REPO / ".comfyui")).resolve()
if not (COMFYUI / "main.py").exists():
    raise RuntimeError(f"no ComfyUI at {COMFYUI}: run the tests with `make test` (it installs one)")
PACK_NAME = "comfyui_siso"
BASE = pathlib.Path(tempfile.mkdtemp(prefix="siso-inproc-"))

sys.path.insert(0, str(COMFYUI))
from comfy.cli_args import args  # noqa: E402

# CPU unless a benchmark asks for the GPU (SISO_DEVICE=cuda); the tests always run on the CPU.
args.cpu = os.environ.get("SISO_DEVICE", "cpu") == "cpu"
args.base_directory = str(BASE)
args.disable_api_nodes = True

import utils.extra_config  # noqa: E402,F401  (as main.py does first: ComfyUI's `utils` package before nodes.py puts comfy/ on sys.path)
import folder_paths  # noqa: E402
import nodes  # noqa: E402  (ComfyUI's nodes.py)

(BASE / "custom_nodes").mkdir(parents=True, exist_ok=True)
_link = BASE / "custom_nodes" / PACK_NAME
_link.symlink_to(REPO, target_is_directory=True)
if not asyncio.run(nodes.load_custom_node(str(_link))):
    raise RuntimeError("ComfyUI failed to load the pack; see the log above")
pack = next(m for m in list(sys.modules.values())
            if getattr(m, "__file__", None) and pathlib.Path(m.__file__) == _link / "__init__.py")


def siso(module: str):
    """A pack module as ComfyUI loaded it (the same objects the nodes use)."""
    return importlib.import_module(f"{pack.__name__}.{module}")


def pack_node_ids() -> tuple:
    """Every node the pack registers (its own list: a new node cannot be left out of a test)."""
    return tuple(cls.define_schema().node_id for cls in siso("nodes").NODES)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(BASE, ignore_errors=True)


@pytest.fixture(scope="session")
def comfy_base():
    return BASE


@pytest.fixture(scope="session")
def feature_files():
    import tiny
    folder = pathlib.Path(folder_paths.models_dir) / "siso"
    return tiny.write_feature_files(str(folder))


@pytest.fixture(scope="module")
def sd15():
    """A tiny random SD1.5 MODEL, its VAE and two prompts' conditioning (ComfyUI's classes)."""
    import tiny
    return tiny.build_model("sd15"), tiny.build_vae(4), tiny.conditioning("sd15", 0), tiny.conditioning("sd15", 7)


@pytest.fixture(scope="module")
def subject():
    """A random subject photo, prepared by the LoadSubject node as ComfyUI runs it."""
    import torch
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        return nodes.NODE_CLASS_MAPPINGS["LoadSubject"].execute(torch.rand(1, 72, 96, 3, generator=g), "subject", "white").args[0]


@pytest.fixture(scope="session")
def tiny_networks(feature_files):
    import torch
    fn = siso("siso_ops.feature_networks")
    folder = pathlib.Path(folder_paths.models_dir) / "siso"
    with torch.inference_mode(False):
        return fn.load_dino(str(folder / feature_files[0])), fn.load_ir(str(folder / feature_files[1]))


from comfy_server import object_info, server  # noqa: E402,F401  (session fixtures: one ComfyUI server process)
