"""The pack's ComfyUI side, the only code that knows ComfyUI's internals (0.3.75 and 0.33; where
they differ it checks for the feature, never the version string: the training flag, dynamic VRAM
patchers).

It turns the host's MODEL / VAE / CONDITIONING into what the SISO loop needs: a trainable LoRA on
a *clone* of the model, a denoiser over sigma driven through ComfyUI's own guider, a sigma
schedule, and a differentiable decoder. The host's objects are never mutated.

    folders              model folders and file lookup (similarity networks, LoRAs, SAM, Grounding DINO)
    models               family checks (the table in ../families.py), VAE / LoRA fit, LoRA layers and key layouts
    training             the trainable clone, checkpointing, the checks that its LoRA is on the path
    layer_forwards       how each of the clone's layers computes, and what it keeps for backward
    environment          training mode, differentiable RoPE, the clone's attention, the stock path
    device_memory        unloading other models to make room for training
    sampling             sigma schedules, stock noise, the guider-driven loop
    decoding             stock encode / decode, empty latents, the differentiable decoder copy
    segmentation_models  SubjectMask's models and their cache
    sam3                 SubjectMask with ComfyUI's own SAM3 (the stock loader's MODEL + CLIP, the stock SAM3_Detect)
    prompts              the server's on-prompt hook and the refused value its validation reports (queue-time checks)
    progress             progress bars with previews, the pack's websocket events, Cancel told apart from failure
    references           reference images in the conditioning (Flux.2 / Kontext / Qwen-Image-Edit): what is refused
    memory_probe         what the memory estimate (../memory.py) measures on shape-only copies

The nodes use ``from siso_ops import host`` and ``host.<name>``. The method (siso_ops outside this
package) never imports it: it calls the operations of ``siso_ops.runtime.Host``, which this package
implements and registers on import (the end of this file).
"""
from .folders import (  # noqa: F401
    WEIGHTS_FOLDER, SAM_FOLDER, GROUNDING_DINO_FOLDER, register_model_folders, weight_file_choices, likely_weight_file,
    EXPECTED_FILES, weight_file_path, lora_folder, lora_choices, lora_file, sam_model_choices,
    grounding_dino_choices, sam_model_path, grounding_dino_path, bert_folder_for, input_image_size,
    remove_unfinished_saves)
from .models import (  # noqa: F401
    SUPPORTED_SAMPLING, TARGETS, describe_model, ARCHITECTURES, model_architecture, subject_lora_layouts,
    check_lora_fits, model_family, check_supported, check_vae, compute_device,
    throw_if_interrupted, is_flow, latent_channels, lora_target_names, checkpoint_block_classes,
    diffusers_lora_targets, apply_lora, stored_quantised, is_dynamic, self_checked_path)
from .training import training_clone, TrainableModel  # noqa: F401
from .device_memory import (  # noqa: F401
    free_cached_memory, make_room_for_training, make_room_for, unload_everything_from, keep_similarity_networks_while)
from .environment import training_mode  # noqa: F401
from .sampling import (  # noqa: F401
    SCHEDULERS, sigma_schedule, seed_noise, run_with_denoiser)
from .decoding import (  # noqa: F401
    encode_photo, decode_latent, latent_scale, check_size, empty_latent, DifferentiableDecoder, vae_file_block)
from .prompts import add_prompt_check, RefusedValue  # noqa: F401
from .progress import progress_bar, previews_enabled, send_event, is_cancel  # noqa: F401
from .compiled_models import user_compiled, drop_user_compile, user_compile_note  # noqa: F401
from .references import check_reference_path, reference_latents  # noqa: F401
from .segmentation_models import (  # noqa: F401
    segmentation_runtime, subject_masks, keep_segmentation_models_while)
from .sam3 import (  # noqa: F401
    SAM3_FILE, SAM3_URL, SAM3_SINCE, sam3_available, sam3_problem, subject_masks_sam3, missing_sam3_message)
from .memory_probe import (  # noqa: F401
    device_memory, memory_reserve, model_weight_bytes, model_weights_in_ram, decoder_weight_bytes,
    lora_parameter_count, model_conditioning, prepare_denoiser_probe, probe_apply_model, prepare_decoder_probe,
    probe_environment, probe_decode, vae_first_stage)

# This package is the method's host (siso_ops/runtime.py): the method reaches the names above
# through that interface, never by importing this package.
from .. import runtime  # noqa: E402

runtime.register(__import__("sys").modules[__name__])
