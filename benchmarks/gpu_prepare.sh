#!/usr/bin/env bash
# Run HERE (the CPU machine, with network to PyPI) before the one GPU call of issue 27: it puts into
# the ignored folder .gpu/ what benchmarks/gpu.sh needs on a bare device machine. That machine has
# python3 (3.12) with torch, torchvision, timm, transformers, safetensors, einops, numpy, scipy,
# aiohttp, pyyaml, psutil, pillow and pytest (the device tool's KINDS.md) and no network. What the
# in-process ComfyUI imports beyond that travels as wheels for its Python: torchsde and trampoline
# (comfy.k_diffusion) and av (comfy_api's video types, imported by every V3 node module). The
# embedded ComfyUI travels as a copy without its tests and without the tokenizers of text encoders
# SDXL-Turbo does not use (Llama, Qwen 2.5, T5, ...: 17 MB), so the tree and .gpu/ stay well under
# the 64 MiB one call may carry (this script prints the size).
#   benchmarks/gpu_prepare.sh          then, with the device tool: run(command="bash benchmarks/gpu.sh",
#                                      carry=[".gpu"], timeout_s=540)
#   PYVER=3.11 benchmarks/gpu_prepare.sh && PYTHON=<a venv like the device's> benchmarks/gpu.sh --tiny
#                                      (a dry run here: wheels for this machine's Python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
PY=${PYTHON:-.venv/bin/python}
COMFYUI=${SISO_COMFYUI_DIR:-.comfyui}
rm -rf .gpu
mkdir -p .gpu/whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl torchsde trampoline "av>=14.2.0"
cp -rL "$COMFYUI" .gpu/comfyui
rm -rf .gpu/comfyui/tests .gpu/comfyui/tests-unit .gpu/comfyui/custom_nodes/* .gpu/comfyui/.git
for t in llama qwen25 t5 t5_pile ace_lyrics hydit_clip byt5; do rm -rf ".gpu/comfyui/comfy/text_encoders/${t}_tokenizer"; done
find .gpu -name __pycache__ -prune -exec rm -rf {} +
ls .gpu/whl
echo "to carry: .gpu $(du -sh .gpu | cut -f1), the tracked tree $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes"
