import os
import re

import safetensors.torch
from comfy_api.v0_0_2 import io

from ..siso_ops import comfy_adapter as host
from .graph_types import CATEGORY, SubjectLoRA

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.\-]*")


class ApplySISOLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplySISOLoRA",
            display_name="SISO Apply LoRA",
            category=CATEGORY,
            description=("Applies the learned subject LoRA to a MODEL (a patched clone, the input is not changed), "
                         "exactly as the stock LoRA loader would: use it with any prompt and more steps in a stock KSampler."),
            inputs=[io.Model.Input("model", tooltip="The model the LoRA was optimised on (same checkpoint)."),
                    SubjectLoRA.Input("subject_lora", tooltip="Output of SISO Optimize."),
                    io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                                   tooltip="LoRA strength; 1.0 reproduces the optimised model.")],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the subject LoRA.")],
        )

    @classmethod
    def execute(cls, model, subject_lora, strength):
        return io.NodeOutput(host.apply_lora(model, subject_lora.tensors, strength))


def lora_file_path(name: str) -> str:
    """A file name inside the loras folder; anything that could leave it is refused."""
    name = name.strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"LoRA name '{name}' is not allowed: use letters, digits, spaces, '_', '-' and '.', "
            "starting with a letter or digit, with no folders ('/', '\\') and no '..'.")
    folder = host.lora_folder()
    path = os.path.join(folder, name + ".safetensors")
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):
        raise ValueError(f"LoRA name '{name}' would leave the loras folder {folder}")
    return path


class SaveSISOLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveSISOLoRA",
            display_name="SISO Save LoRA",
            category=CATEGORY,
            is_output_node=True,
            description=("Writes the subject LoRA as .safetensors into the first 'loras' model folder, so "
                         "LoraLoader / LoraLoaderModelOnly can load it later with the same result as SISO Apply LoRA."),
            inputs=[SubjectLoRA.Input("subject_lora", tooltip="Output of SISO Optimize."),
                    io.String.Input("name", default="siso_subject", tooltip="File name (no folders); '.safetensors' is added."),
                    io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name.")],
            outputs=[io.String.Output(display_name="file_name", tooltip="The file name as the LoRA loaders list it.")],
        )

    @classmethod
    def validate_inputs(cls, name, **kwargs):
        try:
            lora_file_path(name)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, subject_lora, name, overwrite):
        path = lora_file_path(name)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists: choose another name or set overwrite to true")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        metadata = {"siso.model": subject_lora.model, "siso.rank": str(subject_lora.rank),
                    "siso.best_iteration": str(subject_lora.best_iteration + 1),
                    "siso.iterations": str(subject_lora.iterations), "siso.best_loss": f"{subject_lora.best_loss:.6f}"}
        safetensors.torch.save_file({k: v.contiguous() for k, v in subject_lora.tensors.items()}, path, metadata=metadata)
        file_name = os.path.basename(path)
        return io.NodeOutput(file_name, ui={"text": [file_name]})
