"""The code's shape, checked: no private name crosses between the modules of siso_ops/host (nor
from host to the code that uses it), and SISO's LoRA is computed by one function
(siso_ops/lora.py's lora_output) on every path: the training clone's layers, SISO Apply LoRA's
on-the-fly layers and the memory estimate's shape-only layers."""
import ast
import pathlib

import pytest
import torch

from conftest import REPO, siso

host = siso("siso_ops.host")
lora_mod = siso("siso_ops.lora")
memory = siso("siso_ops.memory")

HOST = REPO / "siso_ops" / "host"
PACK_SOURCES = sorted((REPO / "siso_ops").rglob("*.py")) + sorted((REPO / "nodes").rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _tree(path: pathlib.Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


def test_no_private_name_crosses_between_host_modules():
    crossings = []
    for path in sorted(HOST.glob("*.py")):
        tree = _tree(path)
        siblings = set()     # names bound to other host modules (`from . import training`)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                for alias in node.names:
                    if _private(alias.name):
                        crossings.append(f"{path.name}: from {'.' * node.level}{node.module or ''} import {alias.name}")
                    if node.level == 1 and node.module is None:
                        siblings.add(alias.asname or alias.name)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in siblings):
                crossings.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not crossings, crossings


def test_no_private_name_of_host_is_used_outside_it():
    """host/__init__ exports no private name, and no pack module reaches one as ``host._x``."""
    assert not [name for name in vars(host) if _private(name)]
    uses = []
    for path in PACK_SOURCES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name) \
                    and node.value.id == "host":
                uses.append(f"{path.relative_to(REPO)}: host.{node.attr}")
    assert not uses, uses


def _names(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def test_the_lora_formula_is_written_once():
    """Outside siso_ops/lora.py no pack module multiplies a LoRA's up and down itself: no linear
    map of an ``up`` / ``down`` and no ``up @ down``."""
    copies = []
    for path in PACK_SOURCES:
        if path == REPO / "siso_ops" / "lora.py":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)) and \
                    (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in ("linear", "matmul"):
                if {"up", "down"} & set().union(*(_names(a) for a in node.args)):
                    copies.append(f"{path.relative_to(REPO)}:{node.lineno}")
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult) and \
                    {"up", "down"} <= _names(node.left) | _names(node.right):
                copies.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not copies, copies


@pytest.fixture
def formula_calls(monkeypatch):
    """Every call of lora.lora_output: (device type of its input, the output's shape)."""
    calls = []
    original = lora_mod.lora_output

    def spy(x, down, up, scale, base=None):
        out = original(x, down, up, scale, base)
        calls.append((x.device.type, tuple(out.shape)))
        return out
    monkeypatch.setattr(lora_mod, "lora_output", spy)
    return calls


def _lora_layer(model):
    name = sorted(host.lora_target_names(model))[0]
    return name, dict(model.model.diffusion_model.named_modules())[name]


def test_the_training_forward_computes_its_lora_with_the_formula(sd15, formula_calls):
    model = sd15[0]
    name, layer = _lora_layer(model)
    with torch.inference_mode(False), host.training_mode():
        trainable = host.TrainableModel(model, 4)
        try:
            key = f"diffusion_model.{name}.weight"
            x = torch.randn(2, layer.weight.shape[1])
            out = trainable.training_forwards[key](x)
        finally:
            trainable.unload()
    assert formula_calls == [("cpu", tuple(out.shape))]


def test_apply_lora_on_the_fly_computes_the_lora_with_the_formula(formula_calls, monkeypatch):
    import test_quantised
    model = test_quantised.load_model("sd15", "fp8_e4m3fn", monkeypatch)
    name, layer = _lora_layer(model)
    assert host.stored_quantised(layer)      # fp8 storage: SISO Apply LoRA applies it on the fly
    g = torch.Generator().manual_seed(0)
    base = f"diffusion_model.{name}"
    tensors = {f"{base}.lora_up.weight": torch.randn(layer.weight.shape[0], 4, generator=g) * 0.01,
               f"{base}.lora_down.weight": torch.randn(4, layer.weight.shape[1], generator=g),
               f"{base}.alpha": torch.tensor(4.0)}
    with torch.inference_mode():
        patched = host.apply_lora(model, tensors, 1.0)
        forward = patched.object_patches[f"{base}.forward"]
        out = forward(torch.randn(2, layer.weight.shape[1]))
    assert formula_calls == [("cpu", tuple(out.shape))]


def test_the_memory_probe_computes_its_lora_with_the_formula(sd15, formula_calls):
    model, _, positive, _ = sd15
    latent = host.empty_latent(model, 64, 64)
    with torch.inference_mode(), host.training_mode():
        # rank 3: a count no other test has remembered on this model
        memory.denoiser_activations(model, positive, latent, "cpu", torch.float32, rank=3)
    targets = host.lora_target_names(model)
    # the shape-only pass runs every LoRA layer (SD1.5's attention layers each run once)
    assert len(formula_calls) == len(targets)
    assert {device for device, _ in formula_calls} == {"meta"}


def test_the_training_forward_and_the_probe_share_the_layer_decision(sd15):
    """The probe's layers are built from the training path's own decision (training_layer): a
    layer's decision changed there changes the probe's layer."""
    model = sd15[0]
    name, layer = _lora_layer(model)
    decided = host.layer_forwards.training_layer(layer, in_place=False)
    probe_base = host.prepare_denoiser_probe(memory.meta_copy(model.model), model, 4, 0.0, host.TARGETS[0])
    probed = dict(probe_base.diffusion_model.named_modules())[name].forward
    assert probed.layer.op is decided.op and probed.layer.kind == decided.kind
    assert decided.keeps(torch.empty(1, layer.weight.shape[1], dtype=layer.weight.dtype)) == \
        host.layer_forwards.AS_STORED
