"""The trainable clone: a LoRA on a clone of the host MODEL, its layers computing through
zero-copy views of the host's weights (never written; layer_forwards.py), gradient
checkpointing of the family's blocks, and the checks that the LoRA is on the model's path. The
clone is unloaded in a ``finally`` by its user, so the shared modules return to their stock
state."""
from __future__ import annotations

import logging

import torch
import torch.utils.checkpoint

import comfy.model_management

from .. import families
from .compiled_models import drop_user_compile
from ..lora import LoRASet, export_lora, warm_start_tensors
from ..precision import agreement_tolerance
from ..self_check import SelfCheckFailed, check_training_path, refusal
from .device_memory import unload_loaded
from .environment import attention_for_training, stock_path
from .layer_forwards import CloneInput, TrainingForward, computes_in_low_precision, stock_forward, training_layer
from .models import TARGETS, check_supported, describe_model, is_dynamic, lora_target_names, model_family, \
    self_checked_path

log = logging.getLogger("siso")


def _detached(weight):
    # For ComfyUI layer types the training forward below does not know: a non-empty wrapper list
    # makes ComfyUI's cast path hand out a fresh copy of the weight, so no inference tensor of the
    # host model is saved for backward. The copy is still linked to the host parameter by autograd
    # (host parameters have requires_grad=True), so cut it here: otherwise every backward writes a
    # full-size .grad onto the host's weights.
    return weight.detach()


def checkpointed(forward, clone_inputs: bool = False):
    """``forward`` under non-reentrant gradient checkpointing. ``clone_inputs``: the block gets
    copies of its tensor inputs, for blocks that add into their inputs in place (ComfyUI's
    Flux blocks), which would change the tensors the checkpoint saved."""
    def block(*args, **kwargs):
        if clone_inputs:
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return forward(*args, **kwargs)

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # ComfyUI updates transformer_options (block indices) in place while it walks the
        # model; the recomputation in backward must see what the forward pass saw.
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
    return run


def training_clone(model):
    """The clone SISO trains on. A regular ModelPatcher is cloned as it is (sharing the host's
    weights, which are never written). A dynamic VRAM patcher is cloned the way ComfyUI's own
    Train LoRA node does it: as a regular ModelPatcher over a fresh copy of the weights
    (``clone(disable_dynamic=True)``, which reloads the model from its file), because the training
    forward and its zero-copy weight views are built and tested for regular loading; the dynamic
    loader's on-demand weights are not something a test without a GPU can show correct."""
    if not is_dynamic(model):
        return model.clone()
    if getattr(model, "cached_patcher_init", None) is None:
        raise ValueError(
            "this MODEL uses ComfyUI's dynamic VRAM loading and was not loaded by a stock loader that can reload it "
            "for training. Load it with Load Checkpoint or Load Diffusion Model, or start ComfyUI with "
            "--disable-dynamic-vram.")
    clone = model.clone(disable_dynamic=True)
    if is_dynamic(clone):
        raise RuntimeError("ComfyUI returned a dynamic clone where a regular one was asked for")
    return clone


class TrainableModel:
    """A clone of the host MODEL with trainable LoRA deltas; the host stays untouched."""

    def __init__(self, model, rank: int = 4, alpha: float | None = None, target: str = TARGETS[0], seed: int = 0,
                 checkpointing: bool = False):
        check_supported(model)
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.host = model
        self.rank = int(rank)
        self.alpha = float(alpha if alpha else rank)
        self.patcher = training_clone(model)
        drop_user_compile(self.patcher)   # TorchCompileModel's wrapper: training runs the uncompiled module
        self.deltas = {}
        self.lora_layers = {}     # weight key -> the layer its delta acts on
        self.training_forwards = {}   # weight key -> the TrainingForward that applies its delta
        self.off_path = set()         # LoRA layers in modules the self-check's inputs do not run (self_check)
        self.forward_patched = []
        device = model.load_device
        diffusion = self.patcher.model.diffusion_model
        family = self.family = model_family(model)
        targets = lora_target_names(model, target)
        blocks = families.checkpointed_blocks(diffusion, family) if checkpointing else set()
        generator = torch.Generator().manual_seed(int(seed))
        # every delta's parameters in one buffer (lora.LoRASet), drawn in the modules' order
        trained = [(name, module) for name, module in diffusion.named_modules() if name in targets]
        self.lora_set = LoRASet([tuple(module.weight.shape[:2]) for _, module in trained], self.rank, self.alpha,
                                device=device, generator=generator)
        made = dict(zip((name for name, _ in trained), self.lora_set.deltas))
        for name, module in diffusion.named_modules():
            full = f"diffusion_model.{name}"
            layer = training_layer(module, family.in_place)
            key = f"{full}.weight"
            delta = made.get(name)
            if delta is not None:
                self.deltas[key] = delta
                self.lora_layers[key] = module
            if layer.computed:
                # An object patch of the clone: applied while it is loaded, undone in unload().
                forward = TrainingForward(layer, delta)
                self._patch_forward(full, module, forward)
                if delta is not None:
                    self.training_forwards[key] = forward
                continue
            if hasattr(module, "weight_function"):
                # Another layer class that is no linear map (a norm of another pack): its own
                # forward, with a detached copy of each weight (ComfyUI's weight-wrapper mechanism).
                if getattr(module, "weight", None) is not None:
                    self.patcher.add_weight_wrapper(key, _detached)
                if getattr(module, "bias", None) is not None:
                    self.patcher.add_weight_wrapper(f"{full}.bias", _detached)
            else:
                # Raw parameters outside ComfyUI's cast path (e.g. Flux's RMSNorm scales):
                # give the clone its own normal copies.
                for pname, param in module.named_parameters(recurse=False):
                    self.patcher.add_object_patch(f"diffusion_model.{name}.{pname}".replace("..", "."),
                                                  torch.nn.Parameter(param.detach().clone(), requires_grad=False))
            if layer.clone_input:
                self._patch_forward(full, module, CloneInput(module.forward))
            elif name in blocks:
                self._patch_forward(full, module, checkpointed(module.forward, clone_inputs=family.in_place))
        attention_for_training(self.patcher.model_options,
                                keep_stock=any(computes_in_low_precision(m) for m in diffusion.modules()))
        if not self.deltas:
            raise ValueError(f"no LoRA target layers found in {describe_model(model)} for target '{target}'")

    def _patch_forward(self, full_name: str, module, forward):
        self.patcher.add_object_patch(f"{full_name}.forward", forward)
        self.forward_patched.append(module)

    def parameters(self) -> dict:
        out = {}
        for key, delta in self.deltas.items():
            out[f"{key}:down"] = delta.down
            out[f"{key}:up"] = delta.up
        return out

    def load_state(self, state: dict):
        with torch.no_grad():
            for name, param in self.parameters().items():
                param.copy_(state[name])

    def export(self, state: dict | None = None) -> dict:
        if state is not None:
            self.load_state(state)
        return export_lora(self.deltas)

    def start_from(self, tensors: dict, what: str = "initial_lora"):
        """Warm start: the deltas take a LoRA's values (ComfyUI layout, e.g. an earlier run's),
        so iteration 0 is the model with that LoRA. It must cover exactly the layers this run
        trains, at this rank; its alpha may differ (up is rescaled: the same delta)."""
        ours = {key[: -len(".weight")]: delta for key, delta in self.deltas.items()}
        values = warm_start_tensors(tensors, {base: (delta.up.shape, delta.down.shape) for base, delta in ours.items()},
                                    self.rank, self.alpha, what)
        with torch.no_grad():
            for base, delta in ours.items():
                up, down = values[base]
                delta.down.copy_(down.to(delta.down))
                delta.up.copy_(up.to(delta.up))

    def unload_host_copies(self):
        """Unload other loaded copies of these weights (the host MODEL after a stock sampler ran it).
        ComfyUI only detaches such a clone, leaving the weights marked as loaded; loading ours then
        takes a shortcut (ModelPatcher.partially_load returns early) that skips what a full load
        sets up, such as the weight wrappers of layer types the training forward does not cover."""
        unload_loaded(lambda patcher: patcher is not self.patcher and patcher.is_clone(self.patcher))

    def check_loaded(self):
        """Raise if ComfyUI loaded the clone without the LoRA wired into its layers."""
        for key, forward in self.training_forwards.items():
            if vars(self.lora_layers[key]).get("forward") is not forward:
                raise RuntimeError("ComfyUI loaded the model without SISO's LoRA layers; nothing would be learned. "
                                   "Free the model cache (Manager: 'Free model and node cache') and run again.")

    def load(self, memory_required: int = 0) -> str:
        """Load the clone as ComfyUI's samplers load a model: under inference mode (ComfyUI's
        quantised tensors are re-wrapped when moved outside it, which would change the host's
        weights they share), with ComfyUI deciding from the free memory whether the weights fit
        or are streamed per layer (lowvram). Returns how it loaded, for the report."""
        with torch.inference_mode():
            self.unload_host_copies()
            comfy.model_management.load_models_gpu([self.patcher], memory_required=int(memory_required))
        loaded, total = self.patcher.loaded_size(), self.patcher.model_size()
        if total and loaded < total:
            return (f"partially loaded by ComfyUI ({loaded / 2**30:.2f} of {total / 2**30:.2f} GiB on the device, "
                    "the rest streamed per layer in every pass)")
        return "fully loaded"

    def check_lora_path(self):
        """Before the loop, on the loaded clone: every LoRA layer, called as the model calls it,
        gives the stock layer's output with its LoRA at zero, and adds exactly the LoRA's product
        when it is not. A layer whose class computes past ``forward`` or a LoRA added in the wrong
        units (a scaled fp8 weight) is caught here, naming the layer, not after minutes of work."""
        if self.family.checked:     # a refusal of the self-checked path names the class and the check
            try:
                return self._check_lora_layers()
            except RuntimeError as error:
                raise SelfCheckFailed(refusal(type(self.host.model).__name__, "0 (each LoRA layer computes as its "
                                              "stock layer plus the LoRA)", str(error))) from error
        return self._check_lora_layers()

    def _check_lora_layers(self):
        self.check_loaded()
        generator = torch.Generator().manual_seed(0)
        dtype = _compute_dtype(self.patcher)
        with torch.no_grad():
            for key, delta in self.deltas.items():
                layer = self.lora_layers[key]
                x = torch.randn(2, delta.down.shape[1], generator=generator).to(delta.down.device, dtype)
                stock = stock_forward(layer, x)
                saved_up = delta.up.detach().clone()
                forward = self.training_forwards[key]
                calls = forward.calls
                try:
                    delta.up.zero_()
                    zero = layer(x)
                    delta.up.copy_(torch.randn(delta.up.shape, generator=generator).to(delta.up) * 0.1)
                    moved = layer(x) - zero
                    expected = delta.on_input(x)
                finally:
                    delta.up.copy_(saved_up)
                    forward.calls = calls
                # the same layer computation twice, in another float order (the LoRA's sum rounds
                # at the output's magnitude): the pack's one rule for that (precision.py)
                tolerance = agreement_tolerance(dtype)
                scale = float(zero.abs().max() + expected.abs().max())
                if not torch.equal(zero, stock) and float((zero - stock).abs().max()) > tolerance * scale:
                    raise RuntimeError(f"SISO's training forward of {key[:-len('.weight')]} ({type(layer).__name__}) does "
                                       "not give the stock layer's output: this layer class cannot be trained by SISO.")
                if float((moved - expected).abs().max()) > tolerance * max(scale, 1e-12) or not bool(expected.abs().max() > 0):
                    raise RuntimeError(f"the LoRA of {key[:-len('.weight')]} ({type(layer).__name__}) does not change the "
                                       "layer's output as it should: this layer class cannot be trained by SISO.")

    def self_check(self, denoise, x, sigma, dtype) -> str:
        """For a model class no table row names (``family.checked``), before the loop: checks 1
        and 2 of siso_ops/self_check.py on the run's first denoiser call (``denoise(x, sigma)``,
        under the loop's autocast to ``dtype``), refusing with the class and the failed check.
        Returns the report's words for the path ("" for a table row, which its tests pin)."""
        path = self_checked_path(self.host)
        if not path:
            return ""
        calls = {key: forward.calls for key, forward in self.training_forwards.items()}
        computes = _compute_dtype(self.patcher)
        check_dtype = computes if dtype == torch.float32 else dtype
        layers = {key[:-len(".weight")]: (delta.down, delta.up) for key, delta in self.deltas.items()}

        def stock():
            with stock_path():
                return denoise(x, sigma)

        # Which modules holding a LoRA layer run in the training call: a layer of a module this
        # input does not run (OmniGen2's reference-image refiner without references) is off this
        # input's path, no fault; a layer whose module ran but which did not is computed past its
        # forward, a fault.
        holders = {name: _holder(self.patcher.model, name) for name in layers}
        ran = set()
        hooks = [module.register_forward_pre_hook(lambda m, args, key=key: ran.add(key))
                 for key, module in {h: self.patcher.model.get_submodule(h) for h in set(holders.values())}.items()]
        try:
            difference, unused = check_training_path(
                type(self.host.model).__name__, lambda: denoise(x, sigma), stock, layers,
                list(self.patcher.model.named_parameters()), check_dtype,
                called=lambda name: self.training_forwards[f"{name}.weight"].calls > calls[f"{name}.weight"],
                on_path=lambda name: holders[name] in ran)
        finally:    # the loop's own check (check_lora_reached) counts from its first pass
            for hook in hooks:
                hook.remove()
            for key, forward in self.training_forwards.items():
                forward.calls = calls[key]
        self.off_path = {name for name in unused if holders[name] not in ran}
        path += f"; checked before the loop: training forward = stock forward (relative difference {difference:.1e}), " \
                "every LoRA layer the output depends on and no host weight gets a gradient"
        reached = [name for name in unused if name not in self.off_path]
        if reached:
            path += (f" ({len(reached)} of {len(layers)} LoRA layers run but their output never reaches the image, "
                     f"e.g. {reached[0]}: they stay zero)")
        if self.off_path:
            path += (f" ({len(self.off_path)} of {len(layers)} LoRA layers are in modules these inputs do not run, "
                     f"e.g. {sorted(self.off_path)[0]}: they stay zero)")
        log.info("SISO: %s", path)
        return path

    def check_lora_reached(self):
        """After the first forward pass: every LoRA was applied on the way to the image (a layer
        the model reaches past its ``forward``, e.g. by reading ``.weight`` itself, is not)."""
        missed = [key[:-len(".weight")] for key, forward in self.training_forwards.items()
                  if forward.calls == 0 and key[:-len(".weight")] not in self.off_path]
        if missed:
            raise RuntimeError(f"{len(missed)} of SISO's {len(self.deltas)} LoRA layers are never called by "
                               f"{describe_model(self.host)} (first: {missed[0]}): the model computes those layers "
                               "another way, so nothing could be learned there. Use lora_target 'attention' or report "
                               "the model class.")

    def unload(self):
        """Detach the clone from the shared modules (weights, wrappers and object patches), in
        inference mode as ComfyUI's own unloads run (see load)."""
        self.lora_set.drop_cast()     # a half-precision cast kept from a forward without backward
        with torch.inference_mode():
            unload_loaded(lambda patcher: patcher is self.patcher)
            self.patcher.detach(unpatch_all=True)
        self.patcher.weight_wrapper_patches = {}
        self.patcher.object_patches = {}
        # ComfyUI leaves weight wrappers on the shared modules after a full-load unpatch (the
        # next load wipes them). Take ours off now so the LoRA is neither active nor kept alive.
        ours = set(map(id, self.deltas.values())) | {id(_detached)}
        for module in self.patcher.model.modules():
            for attr in ("weight_function", "bias_function"):
                functions = getattr(module, attr, None)
                if functions:
                    setattr(module, attr, [f for f in functions if id(f) not in ours])
        for module in self.forward_patched:
            # Restoring an object patch of `forward` leaves the class's own forward, bound, as an
            # instance attribute; drop it so the module is exactly as it was. A forward another
            # pack set on the instance before (a function of its own) was restored: it stays.
            own = vars(module).get("forward")
            if getattr(own, "__self__", None) is module and \
                    getattr(own, "__func__", None) is getattr(type(module).forward, "__func__", type(module).forward):
                del module.forward


def _holder(root: torch.nn.Module, name: str) -> str:
    """The nearest module above layer ``name`` that runs a forward of its own (a ModuleList or
    ModuleDict only holds its layers)."""
    holder = name
    while "." in holder:
        holder = holder.rsplit(".", 1)[0]
        if not isinstance(root.get_submodule(holder), (torch.nn.ModuleList, torch.nn.ModuleDict)):
            return holder
    return ""


def _compute_dtype(patcher) -> torch.dtype:
    """The dtype the model's layers compute in: ComfyUI's manual-cast dtype where the weights are
    stored in another (fp8, GGUF, quantised), else the weights' own."""
    base = patcher.model
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
