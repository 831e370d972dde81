"""The method stands alone: every siso_ops module outside host/ imports with no ComfyUI, and
what it needs of a host it asks through siso_ops.runtime's one interface, which says so
clearly when no host is registered."""
import importlib
import pathlib
import types

import pytest
import torch

import siso_ops
import siso_ops.runtime as runtime

METHOD_MODULES = sorted(p.stem for p in pathlib.Path(siso_ops.__file__).parent.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", METHOD_MODULES)
def test_every_method_module_imports_here(name):
    module = importlib.import_module(f"siso_ops.{name}")
    assert module.__name__ == f"siso_ops.{name}"


def _fake_host(**overrides):
    fake = types.SimpleNamespace(**{name: (lambda *a, **k: None) for name in runtime.OPERATIONS})
    vars(fake).update(overrides)
    return fake


def test_a_method_call_that_needs_a_host_says_none_is_registered(monkeypatch):
    monkeypatch.setattr(runtime, "_registered", [])
    generation = importlib.import_module("siso_ops.generation")
    with pytest.raises(runtime.NoHost, match="no host is registered for the SISO method"):
        generation.optimize_subject(None, None, None, None, None, None, generation.GenerationSettings())


def test_a_host_missing_an_operation_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(runtime, "_registered", [])
    incomplete = _fake_host()
    del incomplete.compute_device, incomplete.probe_decode
    with pytest.raises(TypeError, match="missing compute_device, probe_decode"):
        runtime.register(incomplete)
    assert runtime._registered == []


def test_the_method_calls_the_registered_host_at_each_call(monkeypatch):
    monkeypatch.setattr(runtime, "_registered", [])
    first = _fake_host(compute_device=lambda: torch.device("cpu"))
    runtime.register(first)
    assert isinstance(first, runtime.Host)
    assert runtime.host.compute_device() == torch.device("cpu")
    # replacing an operation through the method's handle replaces it on the host itself
    runtime.host.compute_device = lambda: "replaced"
    assert first.compute_device() == "replaced"
    second = _fake_host(compute_device=lambda: "second")
    runtime.register(second)
    assert runtime.host.compute_device() == "second"
    with pytest.raises(AttributeError, match="not an operation of siso_ops.runtime.Host"):
        runtime.host.weight_file_path   # a node's lookup, not the method's


def test_the_default_lora_target_is_the_methods_own_name():
    generation = importlib.import_module("siso_ops.generation")
    targets = importlib.import_module("siso_ops.targets")
    assert generation.GenerationSettings().target == targets.TARGETS[0] == targets.ATTENTION


def test_an_operation_replaced_through_the_method_s_host_is_put_back_after_the_test(monkeypatch):
    """pytest's monkeypatch (8.4 and later) restores what the target's __dict__ held: through the
    method's ``host`` object that is the registered host's own attribute, so its undo puts the
    operation back instead of deleting it from the host."""
    monkeypatch.setattr(runtime, "_registered", [])
    fake = types.SimpleNamespace(**{name: (lambda *a, **k: "real") for name in runtime.OPERATIONS})
    runtime.register(fake)
    real = fake.TrainableModel
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime.host, "TrainableModel", lambda *a, **k: "replaced")
        assert fake.TrainableModel() == "replaced"
    assert fake.TrainableModel is real
