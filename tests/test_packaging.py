"""What the Comfy registry and users' installers read: pyproject.toml and requirements.txt."""
import re
import sys
import tomllib

import pytest

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


def test_the_package_that_changes_shared_packages_is_installed_apart():
    """groundingdino-py pins supervision==0.6.0 and pulls opencv-python (whose newest releases need
    numpy 2), and its sdist fails under a CJK Windows locale: what every install gets
    (requirements.txt, pyproject's dependencies) leaves it out; requirements-subject-mask.txt and the
    optional extra 'subject-mask' hold it, and the development venvs install that file."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    everyone = (REPO / "requirements.txt").read_text().splitlines()
    mask = (REPO / "requirements-subject-mask.txt").read_text().splitlines()
    assert "groundingdino-py" not in requirement_names(everyone) | requirement_names(project["dependencies"])
    assert requirement_names(mask) == {"groundingdino-py"}
    assert requirement_names(project["optional-dependencies"]["subject-mask"]) == requirement_names(mask)
    makefile = (REPO / "Makefile").read_text()
    assert makefile.count("-r requirements.txt -r requirements-subject-mask.txt") == 2


def test_no_exact_pins_on_the_hosts_shared_libraries():
    for line in (REPO / "requirements.txt").read_text().splitlines():
        name = requirement_names([line])
        if name & {"torch", "diffusers", "transformers", "torchvision", "numpy", "safetensors"}:
            assert "==" not in line, line
    assert "torch" not in requirement_names((REPO / "requirements.txt").read_text().splitlines())


COMFYUI_INTERNALS = ("comfy", "folder_paths", "server")


def _imports(path):
    """(level, module, names) of every import in a file, those inside functions included."""
    import ast
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", tuple(a.name for a in node.names)


def test_only_the_host_package_touches_comfyui_internals():
    """The method (siso_ops/) is plain torch; ComfyUI's internals are reached through siso_ops/host
    only, so a change in ComfyUI is a change in one package. The nodes use ComfyUI's public node
    API (comfy_api) and the host; the method uses neither, and reaches the host only through
    siso_ops/runtime.py (never `import host`, not even inside a function)."""
    offenders = []
    host = REPO / "siso_ops" / "host"
    files = [REPO / "__init__.py", *sorted((REPO / "nodes").rglob("*.py")), *sorted((REPO / "siso_ops").rglob("*.py"))]
    for path in files:
        if host in path.parents:
            continue
        method = (REPO / "siso_ops") in path.parents
        forbidden = COMFYUI_INTERNALS + (("comfy_api",) if method else ())
        for level, module, names in _imports(path):
            where = f"{path.relative_to(REPO)}: {'.' * level}{module}"
            if not level and module.split(".")[0] in forbidden:
                offenders.append(where)
            if method and level and (module.split(".")[0] == "host" or (not module and "host" in names)):
                offenders.append(where + " (the host, imported by the method)")
    assert (REPO / "siso_ops" / "host" / "__init__.py").is_file()
    assert offenders == []


def test_the_method_imports_with_comfyui_unimportable():
    """Every siso_ops module outside host/ imports as the top-level package ``siso_ops`` in a
    process where comfy, comfy_api, folder_paths and server cannot be imported (ComfyUI's tree is
    on sys.path, so only the blocker stops them), and imports neither ComfyUI nor the host."""
    import subprocess
    from conftest import COMFYUI
    code = f"""
import importlib, importlib.abc, pathlib, sys
BLOCKED = {{"comfy", "comfy_api", "folder_paths", "server"}}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
        return None

sys.meta_path.insert(0, Blocker())
sys.path[:0] = [{str(REPO)!r}, {str(COMFYUI)!r}]
for name in BLOCKED:
    try:
        importlib.import_module(name)
    except ImportError as error:
        assert "blocked" in str(error), error
    else:
        raise AssertionError(name + " was importable")
names = sorted(p.stem for p in pathlib.Path({str(REPO / "siso_ops")!r}).glob("*.py") if p.stem != "__init__")
for name in names:
    importlib.import_module("siso_ops." + name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith("siso_ops.host"))
assert not leaked, leaked
print("imported", len(names))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count = len([p for p in (REPO / "siso_ops").glob("*.py") if p.stem != "__init__"])
    assert proc.stdout.split() == ["imported", str(count)] and count > 20


def test_the_host_package_is_the_registered_host_of_the_method():
    from conftest import siso
    runtime = siso("siso_ops.runtime")
    host = siso("siso_ops.host")
    assert runtime.current() is host and isinstance(host, runtime.Host)


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
    its own process, with --count-ops (the operators of one iteration, per phase). On the embedded
    ComfyUI only, the one `make bench` uses by default: about 2.5 minutes that another tree adds nothing to
    (the pack's paths on each tree are the other tests' work)."""
    import json
    import subprocess
    from conftest import COMFYUI
    if COMFYUI != (REPO / ".comfyui").resolve():
        pytest.skip("the benchmark smoke runs on the embedded ComfyUI (`make test`), the one `make bench` uses by default")
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