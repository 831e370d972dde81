"""What the Comfy registry and users' installers read: pyproject.toml and requirements.txt."""
import re
import sys
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


def test_only_the_host_package_touches_comfyui_internals():
    """The method (siso_ops/) is plain torch; ComfyUI's internals are reached through siso_ops/host
    only, so a change in ComfyUI is a change in one package."""
    import ast
    offenders = []
    for path in sorted((REPO / "siso_ops").rglob("*.py")):
        if "host" in path.relative_to(REPO / "siso_ops").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("comfy", "comfy_api", "folder_paths")]
    assert (REPO / "siso_ops" / "host" / "__init__.py").is_file()
    assert offenders == []


def test_loading_the_pack_imports_no_heavy_library():
    """ComfyUI's start-up stays fast: timm, groundingdino, segment_anything, cv2 and kornia load
    when a node first runs (the time itself is measured by `make bench`, not here)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("siso_startup", REPO / "benchmarks" / "startup.py")
    startup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(startup)
    result = startup.measure(runs=1)
    assert result["heavy_imports"] == [], result


def test_the_benchmark_script_starts_and_completes_tiny_iterations(tmp_path):
    """Smoke only: `make bench` itself is never run in CI (it is a benchmark, not a test). The
    same script with --tiny: tiny SD-Turbo- and SDXL-shaped models and text encoders at 64 px,
    the paper's configuration (text-encoder LoRA, float32) and the defaults, both paths, each in
    its own process, with --count-ops (the operators of one iteration, per phase)."""
    import json
    import subprocess
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--tiny", "--iterations", "1",
                           "--count-ops", "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {(r["model"], r["config"]) for r in results} == {(m, c) for m in ("sd_turbo", "sdxl_turbo")
                                                           for c in ("paper", "defaults")}
    for r in results:
        assert "aborted" not in r, r.get("aborted", "")[-2000:]
        assert r["compute_dtype"] == ("float32" if r["config"] == "paper" else r["compute_dtype"])
        for path in ("generation", "editing"):
            entry = r["paths"][path]
            assert len(entry["seconds"]) == 1 and entry["seconds"][0] > 0 and entry["peak_mb"] > 0
            assert len(entry["losses"]) == 3 and all(abs(v) < 100 for v in entry["losses"])
        count = r["paths"]["generation"]["count"]     # --count-ops: every phase dispatched kernels
        assert all(count["ops"].get(phase, 0) > 0 for phase in ("denoise", "decode", "embed", "backward")), count
        assert count["ops_total"] == sum(count["ops"].values())
        assert count["metadata_ops"].get("denoise", 0) > 0     # views: the LoRA and attention reshapes
    assert "| sd_turbo | generation | defaults |" in proc.stdout