"""tests/third_party.py: where the tests find an optional third-party pack (ComfyUI-GGUF, ComfyUI_ExtraModels),
in temporary folders: the test ComfyUI's custom_nodes first, ../shared second, else a skip that says how
to enable it, or a failure under CI."""
from __future__ import annotations

import pathlib
import tarfile

import pytest

import third_party
from conftest import COMFYUI, REPO

PACK = third_party.Pack("ComfyUI-Example", "comfyui-example", "ComfyUI-Example-*.tar.gz", "ExampleNode",
                        "https://example.invalid/ComfyUI-Example", "example")


def _pack_folder(parent: pathlib.Path, name: str) -> pathlib.Path:
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    return folder


def _tarball(shared: pathlib.Path, tmp: pathlib.Path, name="ComfyUI-Example-abc1234.tar.gz") -> pathlib.Path:
    source = _pack_folder(tmp / "src", "ComfyUI-Example")
    (source / "nodes.py").write_text("# the packed source\n")
    (shared / PACK.shared_dir).mkdir(parents=True, exist_ok=True)
    path = shared / PACK.shared_dir / name
    with tarfile.open(path, "w:gz") as archive:
        archive.add(source, arcname="ComfyUI-Example")
    return path


@pytest.fixture
def places(tmp_path, monkeypatch):
    """(ComfyUI tree, ../shared, the test's custom_nodes), all empty; _load records what it was given."""
    comfyui, shared, custom_nodes = tmp_path / "ComfyUI", tmp_path / "shared", tmp_path / "base" / "custom_nodes"
    (comfyui / "custom_nodes").mkdir(parents=True)
    loaded = []
    monkeypatch.setattr(third_party, "_load", lambda folder, node: loaded.append((folder, node)) or node)
    monkeypatch.delenv("CI", raising=False)
    return comfyui, shared, custom_nodes, loaded


def test_the_users_own_install_comes_first_whatever_its_case(places, tmp_path):
    comfyui, shared, custom_nodes, loaded = places
    _tarball(shared, tmp_path)
    own = _pack_folder(comfyui / "custom_nodes", "comfyui_example")    # e.g. as ComfyUI-Manager names it
    assert third_party.require(PACK, custom_nodes, comfyui, shared) == "ExampleNode"
    assert loaded == [(own, "ExampleNode")]
    assert not custom_nodes.exists(), "the tarball was unpacked although the user's install was found"


def test_a_folder_without_init_or_of_another_name_is_not_the_pack(places, tmp_path):
    comfyui, shared, custom_nodes, loaded = places
    (comfyui / "custom_nodes" / "ComfyUI-Example").mkdir()           # an empty folder (a failed clone)
    _pack_folder(comfyui / "custom_nodes", "ComfyUI-Example-Extras")
    assert third_party.installed(PACK, comfyui) is None
    _tarball(shared, tmp_path)
    third_party.require(PACK, custom_nodes, comfyui, shared)
    assert loaded == [(custom_nodes / "ComfyUI-Example", "ExampleNode")]


def test_the_shared_tarball_is_unpacked_into_the_tests_custom_nodes(places, tmp_path):
    comfyui, shared, custom_nodes, loaded = places
    _tarball(shared, tmp_path)
    third_party.require(PACK, custom_nodes, comfyui, shared)
    target = custom_nodes / "ComfyUI-Example"
    assert loaded == [(target, "ExampleNode")]
    assert (target / "nodes.py").read_text() == "# the packed source\n"
    (target / "nodes.py").write_text("# kept\n")     # a second test of the session reuses the unpacked folder
    third_party.require(PACK, custom_nodes, comfyui, shared)
    assert (target / "nodes.py").read_text() == "# kept\n"


def test_missing_everywhere_skips_saying_how_to_enable(places):
    comfyui, shared, custom_nodes, loaded = places
    with pytest.raises(pytest.skip.Exception) as skipped:
        third_party.require(PACK, custom_nodes, comfyui, shared)
    reason = str(skipped.value)
    for needed in (str(comfyui / "custom_nodes"), "git clone " + PACK.url, "pip install example",
                   str(shared / "comfyui-example" / "ComfyUI-Example-*.tar.gz"), "CI=true"):
        assert needed in reason, (needed, reason)
    assert loaded == []


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_missing_under_ci_fails(places, monkeypatch, value):
    comfyui, shared, custom_nodes, loaded = places
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception) as failed:
        third_party.require(PACK, custom_nodes, comfyui, shared)
    assert "is not installed" in str(failed.value) and str(comfyui / "custom_nodes") in str(failed.value)


def test_ci_false_still_skips(places, monkeypatch):
    comfyui, shared, custom_nodes, loaded = places
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        third_party.require(PACK, custom_nodes, comfyui, shared)


def test_the_benchmark_gets_the_same_message_as_an_error(places):
    comfyui, shared, custom_nodes, loaded = places
    with pytest.raises(third_party.PackMissing, match="git clone"):
        third_party.load(PACK, custom_nodes, comfyui, shared)


def test_the_real_packs_point_at_the_real_places():
    """The packs' ../shared tarball names, where ../shared exists (CI), match their glob, and
    every tests/ or benchmarks/ file reaches ../shared only through this module."""
    for pack in (third_party.GGUF, third_party.EXTRA_MODELS):
        if (third_party.SHARED / pack.shared_dir).is_dir():
            assert third_party.shared_tarball(pack) is not None, pack
    assert third_party.SHARED == REPO.parent / "shared" and COMFYUI.is_dir()
    offenders = [str(path.relative_to(REPO)) for folder in ("tests", "benchmarks") for path in (REPO / folder).rglob("*.py")
                 if path.name not in ("third_party.py", "test_third_party.py") and '"shared"' in path.read_text(errors="replace")]
    assert offenders == [], f"reach ../shared through tests/third_party.py: {offenders}"
