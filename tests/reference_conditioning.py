"""Reference conditioning as the stock nodes make it (VAEEncode, then ReferenceLatent), for the
tiny models of tests/tiny_families.py: shared by test_references.py and test_refusals.py."""
import pytest
import torch

import nodes as comfy_nodes
import tiny_families as tf


def stock_node(module: str, name: str):
    """A node class of ComfyUI's comfy_extras (the suite does not load ComfyUI's extra nodes)."""
    import importlib
    try:
        return getattr(importlib.import_module(f"comfy_extras.{module}"), name)
    except (ImportError, AttributeError):
        pytest.skip(f"this ComfyUI has no {name} in comfy_extras/{module}.py")


def photo(seed, height=64, width=64):
    g = torch.Generator().manual_seed(seed)
    # smooth random pictures (a few colour blobs), so the VAE sees image-like input
    small = torch.rand(1, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear").permute(0, 2, 3, 1).contiguous()


def encode(vae, image):
    with torch.inference_mode():
        return comfy_nodes.VAEEncode().encode(vae, image)[0]


def reference(conditioning, latent):
    with torch.inference_mode():
        return stock_node("nodes_edit_model", "ReferenceLatent").execute(conditioning, latent).args[0]


def flux2_with_references(count):
    model, vae = tf.build_model("flux2"), tf.build_vae("flux2")
    positive = tf.conditioning("flux2", 0)       # guidance 4.0, as FluxGuidance sets it for Flux.2 [dev]
    # two references of different sizes: Flux.2 places each at its own RoPE index (ref_index_scale)
    for seed, (h, w) in list(zip((11, 12), ((64, 64), (48, 80))))[:count]:
        positive = reference(positive, encode(vae, photo(seed, h, w)))
    return model, vae, positive, "flux2"
