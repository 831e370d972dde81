"""The method's own tests (siso_ops outside host/): plain torch, no ComfyUI.

``siso_ops`` is imported as a top-level package from the repository root, so these tests run
in a venv with torch, timm and safetensors only (`make test-method`, which passes
--confcutdir=tests/method so the root conftest, which loads ComfyUI, is not read). In the normal
suite they run too, beside the pack ComfyUI loaded: that copy (with its host) is not this one."""
import importlib.util
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def _import_method():
    package = REPO / "siso_ops"
    loaded = sys.modules.get("siso_ops")
    if loaded is not None:
        assert pathlib.Path(loaded.__file__).resolve() == package / "__init__.py", loaded.__file__
        return loaded
    spec = importlib.util.spec_from_file_location("siso_ops", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["siso_ops"] = module
    spec.loader.exec_module(module)
    return module


_import_method()
