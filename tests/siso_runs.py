"""How the tests run SISO Optimize as ComfyUI's executor calls it (under torch.inference_mode()),
a stock KSampler pass to compare with, and the checks that the host MODEL came out unchanged:
shared by test_generation.py, test_editing.py, test_families.py and test_refusals.py."""
import torch

import comfy.model_management
import nodes as comfy_nodes
from conftest import siso

host = siso("siso_ops.host")
NODE = comfy_nodes.NODE_CLASS_MAPPINGS
SIZE = 64


def ksampler(model, positive, negative, steps=1, seed=42):
    with torch.inference_mode():
        latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
        return comfy_nodes.common_ksampler(model, seed, steps, 1.0, "euler", "simple", positive, negative, latent)[0]["samples"]


def run_node(model, vae, positive, subject, feature_files, **overrides):
    args = dict(dino_weights=feature_files[0], ir_weights=feature_files[1], seed=42, width=SIZE, height=SIZE, steps=1,
                grad_steps=1, scheduler="simple", max_iterations=3, learning_rate=2e-4, lora_rank=4, lora_alpha=0.0,
                lora_target=host.TARGETS[0], dino_weight=1.0, ir_weight=1.0, early_stop_percent=3.0, early_stop_patience=7)
    args.update(overrides)
    with torch.inference_mode():
        return NODE["SISOOptimize"].execute(model, vae, positive, subject, **args).args


def host_state(model):
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def assert_shared_modules_are_stock(model):
    for name, module in model.model.diffusion_model.named_modules():
        assert not getattr(module, "weight_function", []), name
        assert not getattr(module, "bias_function", []), name
        assert "forward" not in vars(module), name
    # the training clone's attention choice stays on the clone
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    assert not any(lm.model.model is model.model and lm.model is not model
                   for lm in comfy.model_management.current_loaded_models)


def random_lora(model, scale: float, alpha: float | None = None, rank: int = 4, seed: int = 4) -> dict:
    """LoRA file tensors (ComfyUI's layout) on SISO's target layers of ``model``: random down, up
    scaled by ``scale``, an alpha per layer where given."""
    from conftest import siso
    host = siso("siso_ops.host")
    g = torch.Generator().manual_seed(seed)
    layers = dict(model.model.diffusion_model.named_modules())
    tensors = {}
    for name in sorted(host.lora_target_names(model)):
        weight = layers[name].weight
        tensors[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=g) * scale
        tensors[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=g)
        if alpha is not None:
            tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    return tensors


class _QuietServer:
    """What ComfyUI's PromptExecutor needs of the server when no client listens."""
    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self, *args, **kwargs):
        pass


def prompt_executor():
    """ComfyUI's own executor in this process, with its node caches as main.py sets them up
    (cache_args as main.py passes them: 0.33 reads "ram_inactive"; 0.3.75 ignores it)."""
    import execution
    return execution.PromptExecutor(_QuietServer(), cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})


def free_model_and_node_cache(executor) -> None:
    """POST /free {"unload_models": true, "free_memory": true}, as main.py's prompt_worker runs it,
    then a collection."""
    import gc
    comfy.model_management.unload_all_models()
    executor.reset()
    gc.collect()
