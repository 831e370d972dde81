#!/usr/bin/env bash
# The one GPU check of issue 27 (a lent GPU machine: no network, about 15 minutes in all; this
# script takes at most 8). SDXL-Turbo at 512 px, generation, 3 iterations: the paper's settings,
# the defaults, checkpointing off and the similarity networks compiled, all in one run so the
# figures compare; operator counts and a profile per configuration under $OUT/prof.
#   OUT=/some/dir benchmarks/gpu.sh            (on the device machine: run from the repository root)
#   benchmarks/gpu.sh --tiny                   (CPU dry run of the same command on tiny models)
#   OUT=/some/dir benchmarks/gpu.sh --dreambooth   (issue 29: SISO or DreamBooth, both routes to their end)
# On the device machine (bare, no network), run benchmarks/gpu_prepare.sh here first and carry .gpu:
# its wheels go to /tmp/site and its ComfyUI copy is the one used; python3 is the device's own.
set -euo pipefail
OUT=${OUT:-$(mktemp -d)}
if [ -d .gpu/whl ]; then
  PY=${PYTHON:-python3}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export SISO_COMFYUI_DIR=${SISO_COMFYUI_DIR:-$PWD/.gpu/comfyui}
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
else
  PY=${PYTHON:-.venv/bin/python}
  export SISO_COMFYUI_DIR=${SISO_COMFYUI_DIR:-$PWD/.comfyui}
fi
mkdir -p "$OUT/prof"
if [ "${1:-}" = "--tiny" ]; then
  exec timeout 600 "$PY" benchmarks/bench.py --tiny --configs paper,defaults,checkpointing-off,compiled \
    --paths generation --iterations 1 --json "$OUT/tiny.json"
fi
export SISO_DEVICE=cuda
if [ "${1:-}" = "--dreambooth" ]; then
  # issue 29's GPU figures, a second call on the warm machine: SISO to its early stop against
  # DreamBooth's 500 Train LoRA steps (benchmarks/dreambooth.py's defaults, SD-Turbo at 256 px)
  exec timeout 540 "$PY" benchmarks/dreambooth.py --json "$OUT/dreambooth.json"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" || true
timeout 470 "$PY" benchmarks/bench.py --models sdxl_turbo --configs paper,defaults,checkpointing-off,compiled \
  --paths generation --iterations 3 --count-ops --profile "$OUT/prof" --json "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu_table.txt"
