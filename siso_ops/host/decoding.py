"""The VAE side: stock encode and decode (as VAEEncode / VAEDecode), the latent a stock empty-latent
node makes for the model, size checks at the VAE's scale, and the differentiable decoder: a
private, unclamped copy of the VAE's decoder (the host VAE is untouched)."""
from __future__ import annotations

import copy
import time

import torch

import comfy.ldm.modules.diffusionmodules.model as vae_blocks
import comfy.sample
import folder_paths

from ..auto_settings import size_off_block
from ..compiled import compiled_graphs
from ..weights import read_safetensors_header
from .models import model_family, throw_if_interrupted
from .training import checkpointed


def encode_photo(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Stock VAE encode of a BHWC photo (sizes already checked: no silent crop), in inference mode
    as ComfyUI's VAEEncode runs it (a VAE loaded outside it cannot decode inside it on a GPU)."""
    with torch.inference_mode():
        return vae.encode(pixels[..., :3]).detach().float().clone().cpu()


def decode_latent(vae, model, model_latent: torch.Tensor) -> torch.Tensor:
    """Stock VAE decode of a model-space latent, BHWC in [0, 1]."""
    with torch.inference_mode():
        latent = model.model.process_latent_out(model_latent.detach().float().clone())
        images = vae.decode(latent)
        # a video VAE (Qwen-Image's Wan 2.1) gives B x T x H x W x C: frames as images, as VAEDecode does
        return images.reshape(-1, *images.shape[-3:]).detach().float().clone().cpu()


def latent_scale(vae) -> int:
    """Pixels per latent cell of the VAE: 8 (SD, SDXL, Flux.1, SD3, Qwen-Image...), 16 (Flux.2),
    32 (HunyuanImage 2.1, Sana's DC-AE), 1 (pixel-space models).

    ComfyUI's VAE says it (``downscale_ratio``, set in ``VAE.__init__``). A VAE class of another
    pack that skips ``VAE.__init__`` (ComfyUI_ExtraModels' EXVAE, for DC-AE) has no such attribute,
    and the model's latent format keeps LatentFormat's default of 8 whatever the VAE does; its
    autoencoder says it in diffusers' words (``spatial_compression_ratio``), or the pack's VAE
    object does (EXVAE's ``latent_scale``). Read, never set: the VAE is the user's."""
    if vae is None:
        return 8
    if hasattr(vae, "downscale_ratio"):
        return int(vae.spacial_compression_encode())
    for owner, name in ((getattr(vae, "first_stage_model", None), "spatial_compression_ratio"), (vae, "latent_scale")):
        value = getattr(owner, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1 and int(value) == value:
            return int(value)
    raise ValueError(f"the VAE ({type(vae).__name__}) does not say how many pixels one latent cell holds: it has "
                     "neither ComfyUI's downscale_ratio nor diffusers' spatial_compression_ratio. Load the VAE with "
                     "a stock VAE loader, or report the VAE loader node.")


def check_size(vae, width: int, height: int):
    scale = latent_scale(vae)
    for name, value in (("width", width), ("height", height)):
        problem = size_off_block(name, value, scale, f"this model's VAE works on {scale}-pixel blocks")
        if problem:
            raise ValueError(problem)


# Keys by which ComfyUI's VAE loader (comfy.sd.VAE) takes a file down another branch before the
# SD-autoencoder one that reads a batch-norm latent as Flux.2's (0.3.75 and 0.33): a file that has
# one is not claimed here.
_OTHER_VAE_KINDS = ("dec_in_proj.weight", "decoder.mid.block_1.mix_factor", "taesd_decoder.1.weight",
                    "vquantizer.codebook.weight", "backbone.1.0.block.0.1.num_batches_tracked",
                    "blocks.11.num_batches_tracked", "encoder.backbone.1.0.block.0.1.num_batches_tracked",
                    "decoder.up_blocks.2.upsamplers.0.upscale_conv.weight", "student.dconv_encoder.proj_out.weight",
                    "decoder.conv_in_x_t.weight")


def vae_file_block(folder: str, name: str, prefix: str = "") -> int | None:
    """The pixels per latent cell of a VAE file as ComfyUI's VAE loader will read it, from the
    safetensors header alone (no tensor read), where the layout says it: 16 for Flux.2's VAE (the
    SD autoencoder with 32 latent channels and a batch norm over its 2x2-patchified latent:
    ``bn.running_mean``, which makes comfy.sd.VAE double its block). None for every other file,
    which the queue leaves to the 8-pixel rule and the run checks against the loaded VAE itself
    (check_size). ``folder``, ``name``: a file of a ComfyUI model folder ("vae", "checkpoints"), as a
    loader's dropdown names it; ``prefix``: where a checkpoint keeps its VAE (``first_stage_model.``)."""
    try:
        path = folder_paths.get_full_path(folder, name)
    except Exception:
        return None
    if not path or not str(path).lower().endswith(".safetensors"):
        return None
    try:
        entries = read_safetensors_header(path, "VAE file")[0]
    except (ValueError, OSError):     # the loader names a bad file itself
        return None
    keys = {k[len(prefix):] for k in entries if k.startswith(prefix)}
    conv_in = entries.get(prefix + "decoder.conv_in.weight")
    if conv_in is None or len(conv_in.shape) != 4 or conv_in.shape[1] != 32 or any(k in keys for k in _OTHER_VAE_KINDS):
        return None
    return 16 if "bn.running_mean" in keys else None


def empty_latent(model, width: int, height: int, vae=None) -> torch.Tensor:
    """The zeros a stock EmptyLatentImage-like node gives this model: its latent channels and
    dimensions (one frame for the Wan-latent image models), at the VAE's scale."""
    latent_format = model.model.latent_format
    scale = latent_scale(vae)
    frames = (1,) if getattr(latent_format, "latent_dimensions", 2) == 3 else ()
    latent = torch.zeros((1, 4) + frames + (height // scale, width // scale))
    return comfy.sample.fix_empty_latent_channels(model, latent)


class DifferentiableDecoder:
    """A private copy of the VAE decoder: model latents -> unclamped RGB in [0, 1] range, BCHW.

    ``VAE.decode`` clamps (zero gradients), may tile and moves data off the device; the host
    VAE's weights are inference tensors, so we decode with our own copy. The latent format is
    copied too: some keep their statistics as inference tensors (Wan 2.1's, for Qwen-Image)."""

    def __init__(self, vae, model, device, dtype=torch.float32, checkpointing: bool = False):
        first_stage = vae.first_stage_model
        encoder = getattr(first_stage, "encoder", None)
        memo = {id(encoder): None} if encoder is not None else {}
        self.module = copy.deepcopy(first_stage, memo)  # the encoder is not needed to decode
        self.module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if checkpointing:
            # Our private copy, so its blocks may be rewrapped: each ResNet / attention block
            # keeps only its input for backward and recomputes the rest (KL autoencoders; not
            # where decoding keeps state across blocks, see families.py).
            blocks = model_family(model).decoder_blocks
            for block in self.module.modules():
                if type(block).__name__ in blocks:
                    block.forward = checkpointed(block.forward)
        # Cancel within one block's work: ComfyUI's stock layers check its interrupt flag, other
        # layer classes and the work between layers need not, so every block of the copy checks
        # it before it runs. Blocks are found from the structure, so this holds for every VAE
        # ComfyUI builds (SD's 4-channel, Flux's 16-channel, ...).
        from ..feature_networks import check_before_blocks
        self.interrupt_hooks = check_before_blocks(self.module, throw_if_interrupted)
        self.model = model.model
        self.latent_format = copy.copy(model.model.latent_format)
        for name, value in vars(self.latent_format).items():
            if isinstance(value, torch.Tensor):
                setattr(self.latent_format, name, value.detach().clone())
        self.dtype = dtype
        self.compiled = None          # compiled.decoder_forward's function, while compiled
        self.compile_seconds = None   # its first call's forward and backward (the compile)
        self.compile_graphs = 0       # graphs that call built (0: a later run reusing the code)

    def use_compiled(self, decode):
        """Decode through ``decode(module, latent)`` (compiled.decoder_forward) from now on; None:
        eager. While compiled, the per-block Cancel hooks come off (torch.compile cannot trace the
        check's lock) and the decoder checks Cancel once per call; ComfyUI's split attention, which
        reads the free memory to choose its slices (the VAE attention on a machine without PyTorch
        attention), stays eager, or every change of free memory would compile again."""
        for handle in self.interrupt_hooks:
            handle.remove()
        self.compiled, self.interrupt_hooks = decode, []
        for block in self.module.modules():
            attention = getattr(block, "optimized_attention", None)
            if decode is not None and attention is vae_blocks.normal_attention:
                block.optimized_attention = torch.compiler.disable(attention)
            elif decode is None and getattr(attention, "__wrapped__", None) is vae_blocks.normal_attention:
                block.optimized_attention = vae_blocks.normal_attention
        if decode is None:
            from ..feature_networks import check_before_blocks
            self.interrupt_hooks = check_before_blocks(self.module, throw_if_interrupted)

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.module.decode(latent)
        throw_if_interrupted()
        if self.compile_seconds is None:
            # the first call compiles: a forward and backward of a copy of the real input, under
            # the caller's autocast and grad mode, so the loop's calls meet the same guards and the
            # report can say what compiling took
            start, graphs = time.perf_counter(), compiled_graphs()
            with torch.enable_grad():
                warm = latent.detach().clone().requires_grad_(True)
                self.compiled(self.module, warm).float().sum().backward()
            if latent.device.type == "cuda":
                torch.cuda.synchronize(latent.device)
            self.compile_seconds = time.perf_counter() - start
            self.compile_graphs = compiled_graphs() - graphs
        return self.compiled(self.module, latent)

    def __call__(self, model_latent: torch.Tensor) -> torch.Tensor:
        latent = self.latent_format.process_out(model_latent)
        pixels = self._decode(latent.to(self.dtype))
        if pixels.ndim == 5:        # [B, C, T, H, W] of a video VAE decoding one frame
            pixels = pixels[:, :, 0]
        return (pixels.float() + 1.0) / 2.0

    def release(self):
        for handle in self.interrupt_hooks:
            handle.remove()
        self.interrupt_hooks = []
        self.compiled = None
        self.module = None
