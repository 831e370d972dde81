"""What the Comfy registry and users' installers read: pyproject.toml and requirements.txt."""
import re
import tomllib

from conftest import REPO


def requirement_names(lines):
    return {re.split(r"[<>=!~\[ ;]", line.strip(), maxsplit=1)[0].lower()
            for line in lines if line.strip() and not line.strip().startswith("#")}


def test_pyproject_is_ready_for_the_comfy_registry():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    meta, comfy = project["project"], project["tool"]["comfy"]
    assert "comfyui" not in meta["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert meta["urls"]["Repository"].startswith("https://github.com/")
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert comfy.get(key), key
    assert comfy["Icon"].endswith("docs/icon.png") and (REPO / "docs" / "icon.png").is_file()
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    assert requirement_names(meta["dependencies"]) == requirement_names(requirements)


def test_no_exact_pins_on_the_hosts_shared_libraries():
    for line in (REPO / "requirements.txt").read_text().splitlines():
        name = requirement_names([line])
        if name & {"torch", "diffusers", "transformers", "torchvision", "numpy", "safetensors"}:
            assert "==" not in line, line
    assert "torch" not in requirement_names((REPO / "requirements.txt").read_text().splitlines())


def test_loading_the_pack_imports_no_heavy_library():
    """ComfyUI's start-up stays fast: timm, groundingdino, segment_anything, cv2 and kornia load
    when a node first runs (the time itself is measured by `make bench`, not here)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("siso_startup", REPO / "benchmarks" / "startup.py")
    startup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(startup)
    result = startup.measure(runs=1)
    assert result["heavy_imports"] == [], result


def test_the_benchmark_script_starts_and_completes_tiny_iterations(capsys):
    """Smoke only: `make bench` itself is never run in CI (it is a benchmark, not a test)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("siso_bench", REPO / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(iterations=2, size=64)
    out = capsys.readouterr().out
    assert all(f"{family}" in out for family in ("sd15", "sdxl", "flux_schnell")) and "s/iteration" in out
