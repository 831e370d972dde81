import datetime
import logging
import os
import re

from comfy_api.v0_0_2 import io

from ..siso_ops import host
from ..siso_ops.lora import (LORA_FORMATS, changes_nothing, file_metadata, load_subject_lora, lora_file_layout,
                              no_change_warning, to_diffusers, write_lora_file)
from .checks import CheckedNode, checked, file_choice
from .graph_types import CATEGORY, SubjectLoRA

log = logging.getLogger("siso")

# Letters of any alphabet and digits first, then also spaces, '_', '.' and '-': nothing that can
# name a folder or leave one.
SAFE_NAME = re.compile(r"[^\W_][\w .\-]*")
# File systems allow 255 bytes a name (UTF-8 on Linux and macOS); '.safetensors' takes 12 and
# a copy's suffix may add some.
MAX_NAME_BYTES = 200
# Names Windows reserves for devices: a workflow shared to a Windows user must still save.
WINDOWS_DEVICES = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}


class ApplySISOLoRA(CheckedNode):
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
    @checked
    def execute(cls, model, subject_lora, strength):
        # a LoRA of another model: ComfyUI would skip its layers with a log line only, and the
        # picture would come out without the subject
        host.check_lora_fits(model, subject_lora.tensors, "subject_lora")
        why = changes_nothing(subject_lora.tensors)
        warnings = [no_change_warning("the LoRA", why)] if why else []
        if strength == 0:
            warnings.append("strength is 0: the model comes out unchanged; 1.0 reproduces the optimised model")
        return warned(io.NodeOutput(host.apply_lora(model, subject_lora.tensors, strength)), "SISO Apply LoRA", warnings)


def warned(output, node: str, warnings: list):
    """``output`` with ``warnings`` logged and shown under the node (its ui text)."""
    for warning in warnings:
        log.warning("%s: %s", node, warning)
    if warnings:
        output.ui = {"text": ["Warning: " + "; ".join(warnings)]}
    return output


def lora_file_header_rank(name: str) -> int:
    """The rank of a LoRA file of the loras folder, from its header alone (no tensor is read)."""
    return lora_file_layout(host.lora_file(name), name)[0]


def lora_file_path(name: str) -> str:
    """A file name inside the loras folder; anything that could leave it is refused."""
    name = name.strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not SAFE_NAME.fullmatch(name) or ".." in name or name.endswith("."):
        raise ValueError(
            f"LoRA name '{name}' is not allowed: use letters (any alphabet), digits, spaces, '_', '-' and '.', "
            "starting with a letter or digit and not ending with '.', with no folders ('/', '\\') and no '..'.")
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise ValueError(f"LoRA name '{name[:40]}...' is too long: {size} bytes in UTF-8, at most {MAX_NAME_BYTES} "
                         "(file systems allow 255 a file name): use a shorter name.")
    if name.split(".")[0].strip().lower() in WINDOWS_DEVICES:
        raise ValueError(f"LoRA name '{name}' is a device name on Windows (CON, NUL, COM1...): choose another name.")
    folder = host.lora_folder()
    path = os.path.join(folder, name + ".safetensors")
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):
        raise ValueError(f"LoRA name '{name}' would leave the loras folder {folder}")
    return path


def existing_file(path: str) -> str:
    return (f"'{os.path.basename(path)}' already exists in {os.path.dirname(path)} and overwrite is false: "
            "choose another name or set overwrite to true")


class SaveSISOLoRA(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveSISOLoRA",
            display_name="SISO Save LoRA",
            category=CATEGORY,
            is_output_node=True,
            description=("Writes the subject LoRA as .safetensors into the first 'loras' model folder. The comfyui "
                         "layout loads in LoraLoader / LoraLoaderModelOnly with the same result as SISO Apply LoRA, and "
                         "in SISO Load LoRA to warm-start a later run; the diffusers layout is what diffusers' "
                         "load_lora_weights reads (SD1.x, SD2.x, SDXL, Flux). The header holds rank, alpha, the base "
                         "model and the best iteration, shown in ComfyUI's model library."),
            inputs=[SubjectLoRA.Input("subject_lora", tooltip="Output of SISO Optimize or SISO Load LoRA."),
                    io.String.Input("name", default="siso_subject", tooltip="File name (no folders); '.safetensors' is added."),
                    io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
                    io.Combo.Input("format", options=list(LORA_FORMATS), default=LORA_FORMATS[0], optional=True,
                                   tooltip="comfyui: ComfyUI's LoRA keys (its loaders, SISO Load LoRA). diffusers: the "
                                           "PEFT layout diffusers reads (unet.* / transformer.* with lora_A / lora_B).")],
            outputs=[io.String.Output(display_name="file_name", tooltip="The file name as the LoRA loaders list it.")],
        )

    @classmethod
    def check_values(cls, name=None, overwrite=None, **values):
        if isinstance(name, str):
            try:
                path = lora_file_path(name)
            except ValueError as error:
                return f"name: {error}"
            if overwrite is False and os.path.exists(path):
                return f"name: {existing_file(path)}"
        return None

    @classmethod
    @checked
    def execute(cls, subject_lora, name, overwrite, format="comfyui"):
        path = lora_file_path(name)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(existing_file(path))
        if format == "diffusers":
            if subject_lora.diffusers_targets is None:
                raise ValueError(f"no diffusers layout is known for {subject_lora.model}: save in the comfyui format")
            tensors = to_diffusers(subject_lora.tensors, subject_lora.diffusers_targets)
        else:
            tensors = subject_lora.tensors
        file_name = os.path.basename(path)
        metadata = file_metadata(subject_lora, file_name[: -len(".safetensors")], format,
                                 datetime.date.today().isoformat())
        host.throw_if_interrupted()
        write_lora_file(tensors, path, metadata)
        return io.NodeOutput(file_name, ui={"text": [file_name]})


class LoadSISOLoRA(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadSISOLoRA",
            display_name="SISO Load LoRA",
            category=CATEGORY,
            description=("Loads a subject LoRA saved by SISO Save LoRA (comfyui layout) from the loras folder as a "
                         "SISO_LORA: connect it to SISO Optimize's initial_lora to go on from it (warm start: "
                         "iteration 0 is the model with this LoRA), or to SISO Apply LoRA / SISO Save LoRA. A file made "
                         "for another model is refused, naming the layer that does not fit."),
            inputs=[io.Model.Input("model", tooltip="The model the LoRA was made for (its layers are checked)."),
                    io.Combo.Input("lora_name", options=host.lora_choices(), tooltip="A LoRA in models/loras saved by SISO Save LoRA.")],
            outputs=[SubjectLoRA.Output(display_name="subject_lora", tooltip="The LoRA, for SISO Optimize (initial_lora), Apply or Save.")],
        )

    # the file's header (layout, ranks, dtypes, SISO's fields) at queue time, before any tensor is read
    CHOICE_CHECKS = {"lora_name": file_choice("lora_name", lora_file_header_rank)}

    @classmethod
    @checked
    def execute(cls, model, lora_name):
        lora = load_subject_lora(host.lora_file(lora_name), lora_name,
                                 lambda tensors: host.check_lora_fits(model, tensors, lora_name),
                                 host.describe_model(model), host.subject_lora_layouts(model))
        return warned(io.NodeOutput(lora), "SISO Load LoRA", lora.warnings)
