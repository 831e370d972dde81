"""What the pack adds to ComfyUI's start-up: the time ComfyUI's own loader spends importing it
(the figure ComfyUI prints under "Import times for custom nodes"), in fresh processes where
ComfyUI itself is already imported, as at a real start. Also lists heavy modules the import
pulled in that ComfyUI had not (there should be none: timm, groundingdino, segment_anything and
cv2 load when a node first runs).

    python benchmarks/startup.py [runs]        (make bench runs it)
"""
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HEAVY = ("timm", "groundingdino", "segment_anything", "cv2", "kornia", "supervision", "pycocotools")

CHILD = r"""
import asyncio, json, os, sys, tempfile, time
comfy_dir, repo = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
from comfy.cli_args import args
base = tempfile.mkdtemp(prefix="siso-startup-")
args.cpu = True
args.base_directory = base
import utils.extra_config
import folder_paths, nodes, server  # what ComfyUI has imported before it loads custom nodes
os.makedirs(os.path.join(base, "custom_nodes"), exist_ok=True)
link = os.path.join(base, "custom_nodes", "comfyui_siso")
os.symlink(repo, link)
before = set(sys.modules)
start = time.perf_counter()
ok = asyncio.run(nodes.load_custom_node(link))
elapsed = time.perf_counter() - start
new = sorted({m.split(".")[0] for m in set(sys.modules) - before})
import shutil
shutil.rmtree(base, ignore_errors=True)
print(json.dumps({"ok": bool(ok), "seconds": elapsed, "new_top_level_modules": new}))
"""


def measure(runs: int = 5) -> dict:
    comfy_dir = os.environ.get("SISO_COMFYUI_DIR", os.path.join(REPO, ".comfyui"))
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", CHILD, comfy_dir, REPO], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if not all(r["ok"] for r in results):
        raise RuntimeError("ComfyUI failed to load the pack")
    seconds = [r["seconds"] for r in results]
    heavy = sorted({m for r in results for m in r["new_top_level_modules"] if m in HEAVY})
    return {"median_s": statistics.median(seconds), "max_s": max(seconds), "runs": runs, "heavy_imports": heavy,
            "new_modules": results[-1]["new_top_level_modules"]}


if __name__ == "__main__":
    result = measure(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
    print(f"pack import by ComfyUI's loader: median {result['median_s']:.3f} s, max {result['max_s']:.3f} s "
          f"over {result['runs']} fresh processes; heavy modules imported: {result['heavy_imports'] or 'none'}")
    print("new top-level modules:", ", ".join(result["new_modules"]))
