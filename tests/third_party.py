"""Optional third-party ComfyUI packs that some tests (and benchmarks/bench.py) load next to ours,
found the same way everywhere:

  1. the test ComfyUI's own ``custom_nodes`` (``<COMFYUI>/custom_nodes``: a user's install), the
     pack's folder recognised by name (case-insensitive, ``-`` and ``_`` alike), loaded from there;
  2. else its source tarball in ``../shared/<dir>/`` beside the repository (what CI has), unpacked
     into the test's temporary ``custom_nodes``;
  3. else the test is skipped, the reason saying how to enable it; under CI (``CI=true``) it fails
     instead, so that CI never passes by skipping.

A pack is loaded by ComfyUI's own custom-node loader, as a user's ComfyUI loads it."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import tarfile

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@dataclasses.dataclass(frozen=True)
class Pack:
    folder: str          # the folder name it is installed under (git clone's name)
    shared_dir: str      # its folder in ../shared
    tarball: str         # glob of its source tarball in that folder
    node: str            # a node id it registers: loaded means this node exists
    url: str             # where users get it
    requirements: str    # what it needs from PyPI beyond ComfyUI


GGUF = Pack("ComfyUI-GGUF", "comfyui-gguf", "ComfyUI-GGUF-*.tar.gz", "UnetLoaderGGUF",
            "https://github.com/city96/ComfyUI-GGUF", "gguf")
EXTRA_MODELS = Pack("ComfyUI_ExtraModels", "comfyui-extramodels", "ComfyUI_ExtraModels-*.tar.gz", "SanaCheckpointLoader",
                    "https://github.com/Efficient-Large-Model/ComfyUI_ExtraModels", "its requirements.txt")


class PackMissing(RuntimeError):
    """Neither installed in the test ComfyUI nor available as a tarball in ../shared."""


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _key(name: str) -> str:
    return name.lower().replace("-", "_")


def installed(pack: Pack, comfyui: pathlib.Path) -> pathlib.Path | None:
    """The pack's folder in ``<comfyui>/custom_nodes``, if the user installed it there."""
    custom_nodes = pathlib.Path(comfyui) / "custom_nodes"
    if not custom_nodes.is_dir():
        return None
    for entry in sorted(custom_nodes.iterdir()):
        if _key(entry.name) == _key(pack.folder) and (entry / "__init__.py").is_file():
            return entry
    return None


def shared_tarball(pack: Pack, shared: pathlib.Path = SHARED) -> pathlib.Path | None:
    found = sorted((pathlib.Path(shared) / pack.shared_dir).glob(pack.tarball))
    return found[-1] if found else None


def how_to_enable(pack: Pack, comfyui: pathlib.Path, shared: pathlib.Path = SHARED) -> str:
    custom_nodes = pathlib.Path(comfyui) / "custom_nodes"
    return (f"{pack.folder} ({pack.url}) is not installed: no '{pack.folder}' folder in {custom_nodes} and no "
            f"{pathlib.Path(shared) / pack.shared_dir / pack.tarball}. To run these tests, install it into {custom_nodes} "
            f"(git clone {pack.url}, then pip install {pack.requirements} into the tests' venv), or put its source "
            f"tarball at {pathlib.Path(shared) / pack.shared_dir}/. Under CI (CI=true) this is a failure.")


def install(pack: Pack, custom_nodes: pathlib.Path, comfyui: pathlib.Path, shared: pathlib.Path = SHARED) -> pathlib.Path:
    """The folder to load the pack from: the user's install, else the shared tarball unpacked into
    ``custom_nodes`` (once); PackMissing naming how to enable it where it is in neither."""
    own = installed(pack, comfyui)
    if own is not None:
        return own
    tarball = shared_tarball(pack, shared)
    if tarball is None:
        raise PackMissing(how_to_enable(pack, comfyui, shared))
    custom_nodes = pathlib.Path(custom_nodes)
    with tarfile.open(tarball) as archive:
        top = {member.name.split("/")[0] for member in archive.getmembers()}
        if len(top) != 1:
            raise PackMissing(f"{tarball} does not unpack to one folder (it holds {sorted(top)[:4]})")
        target = custom_nodes / top.pop()
        if not target.exists():
            custom_nodes.mkdir(parents=True, exist_ok=True)
            archive.extractall(custom_nodes, filter="data")
    return target


def _load(folder: pathlib.Path, node: str):
    """ComfyUI's own custom-node loader (the in-process ComfyUI of tests/conftest.py)."""
    import asyncio
    import nodes as comfy_nodes
    if node not in comfy_nodes.NODE_CLASS_MAPPINGS:
        loaded = asyncio.run(comfy_nodes.load_custom_node(str(folder)))
        if not loaded or node not in comfy_nodes.NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"ComfyUI failed to load {folder} (no {node} node); see its log above")
    return comfy_nodes.NODE_CLASS_MAPPINGS[node]


def load(pack: Pack, custom_nodes: pathlib.Path, comfyui: pathlib.Path, shared: pathlib.Path = SHARED):
    """The pack's ``node`` class, the pack loaded from where it was found; PackMissing if absent."""
    return _load(install(pack, custom_nodes, comfyui, shared), pack.node)


def require(pack: Pack, custom_nodes: pathlib.Path, comfyui: pathlib.Path, shared: pathlib.Path = SHARED):
    """``load`` for a test: a missing pack skips it with how to enable it, or fails it under CI."""
    try:
        return load(pack, custom_nodes, comfyui, shared)
    except PackMissing as missing:
        reason = str(missing)
    skip_or_fail(reason)


def skip_or_fail(reason: str):
    """What a test does when something optional it needs is missing: skip, saying how to enable
    it, or under CI fail (a skip there would hide a check that never ran)."""
    import pytest
    if under_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
