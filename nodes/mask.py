import logging

from comfy_api.v0_0_2 import io

from ..siso_ops import host
from ..siso_ops.masks import KEEP_RULES, NOTHING_FOUND, caption_for
from ..siso_ops.segmentation import BERT_FOLDER, BERT_SOURCE, MaskSettings, WeightFileError, grounding_dino_package_missing
from .checks import CheckedNode, checked, file_choice
from .graph_types import CATEGORY

log = logging.getLogger("siso")


def _sam3_connected(values) -> bool:
    """SAM3 takes the place of SAM + Grounding DINO: their files are then not asked for."""
    return values.get("sam3_model") is not None or values.get("sam3_clip") is not None


def _grounding_dino_ready(name: str) -> str:
    """The checkpoint and its BERT folder, once the package that reads them is installed (it is
    not part of requirements.txt: a queue names the file that installs it)."""
    missing = grounding_dino_package_missing()
    if missing:
        raise WeightFileError(missing)
    return host.bert_folder_for(host.grounding_dino_path(name))


# What the SAM + Grounding DINO dropdowns may hold in a workflow made for SAM3 (they are unused there).
UNUSED_WITH_SAM3 = "(unused with SAM3)"


class SubjectMask(CheckedNode):
    # ComfyUI 0.3.75 does not check V3 dropdown values itself: refuse missing files (and a
    # missing BERT folder) at queue time, naming the folder, instead of mid-run.
    CHOICE_CHECKS = {"sam_model": file_choice("sam_model", host.sam_model_path, _sam3_connected),
                     "grounding_dino_model": file_choice(
                         "grounding_dino_model", _grounding_dino_ready,
                         _sam3_connected)}

    def __init__(self):
        super().__init__()
        # ComfyUI keeps one object per node of the running workflow; the loaded models live
        # while it does, so "Free model and node cache" releases them.
        host.keep_segmentation_models_while(self)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SubjectMask",
            display_name="SISO Subject Mask",
            category=CATEGORY,
            description=(
                "Finds the subject named by the text (e.g. 'dog') with Grounding DINO and segments it with SAM: "
                "one MASK per image (1 = subject, the mask editor's convention), plus a preview with the mask in "
                "red and the boxes (kept: green, other detections: yellow). Files: a SAM checkpoint in models/sams; "
                "groundingdino_swint_ogc.pth with GroundingDINO_SwinT_OGC.cfg.py in models/grounding-dino; and "
                f"Grounding DINO's text encoder as a local folder models/grounding-dino/{BERT_FOLDER}/ holding the "
                f"files of {BERT_SOURCE} (config.json, vocab.txt, tokenizer.json, tokenizer_config.json, "
                "model.safetensors). Nothing is downloaded. Models load on first use and stay cached until "
                "'Free model and node cache'. Or, on a ComfyUI with SAM3 (0.22 and later): connect sam3_model and "
                f"sam3_clip from a Load Checkpoint of {host.SAM3_FILE} (models/checkpoints) and SAM3 finds and "
                "segments the text instead, with the same keep rule, grow and refusals; the SAM and Grounding DINO "
                "files are then not needed."),
            inputs=[
                io.Image.Input("image", tooltip="The photo(s); every image of a batch gets its own mask."),
                io.String.Input("text", default="dog", tooltip="What the subject is, e.g. 'dog' or 'red mug' (made lower-case and ended with '.' for Grounding DINO)."),
                io.Combo.Input("sam_model", options=host.sam_model_choices(), tooltip="SAM checkpoint in models/sams: sam_vit_b_01ec64.pth (fastest), sam_vit_l_0b3195.pth or sam_vit_h_4b8939.pth (best); the size is read from the file."),
                io.Combo.Input("grounding_dino_model", options=host.grounding_dino_choices(), tooltip=f"Grounding DINO checkpoint in models/grounding-dino (groundingdino_swint_ogc.pth, with GroundingDINO_SwinT_OGC.cfg.py beside it). Needs the folder {BERT_FOLDER}/ with BERT's files next to it."),
                io.Float.Input("box_threshold", default=0.3, min=0.0, max=1.0, step=0.01, tooltip="A box counts as a detection when its score is above this (the method uses 0.3). With SAM3: SAM3's score threshold (its own node's default is 0.5)."),
                io.Float.Input("text_threshold", default=0.25, min=0.0, max=1.0, step=0.01, tooltip="...and when at least one word of the text scores above this (Grounding DINO only; unused with SAM3)."),
                io.Combo.Input("keep", options=list(KEEP_RULES), default=KEEP_RULES[0], tooltip="Which detection becomes the mask: the largest segmented region (the method's rule), the most confident box, or all of them together."),
                io.Int.Input("grow_pixels", default=0, min=-512, max=512, step=1, tooltip="Grow the mask by this many pixels (negative shrinks it)."),
                io.Combo.Input("when_nothing_found", options=list(NOTHING_FOUND), default=NOTHING_FOUND[0], tooltip="If the text is not found in an image: stop with an error naming the image, or give that image an empty mask and show a warning."),
                io.Model.Input("sam3_model", optional=True, tooltip=f"Optional, ComfyUI 0.22 and later: the MODEL of a Load Checkpoint that loads SAM3 ({host.SAM3_FILE} in models/checkpoints). With sam3_clip, SAM3 replaces SAM + Grounding DINO, whose files are then unused."),
                io.Clip.Input("sam3_clip", optional=True, tooltip="Optional: the CLIP output of the same Load Checkpoint (SAM3's text encoder); it encodes the text."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="One mask per image (batch, height, width), 1 = subject; same convention as a mask drawn in the mask editor."),
                io.Image.Output(display_name="preview", tooltip="The photo with the mask tinted red and the detected boxes (kept: green, others: yellow)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def check_values(cls, text=None, sam3_model=None, sam3_clip=None, **values):
        if isinstance(text, str):
            try:
                caption_for(text)
            except ValueError as error:
                return f"text: {error}"
        # at queue time a connected input is LINKED: its MODEL / CLIP is checked when the node runs
        if sam3_model is not None or sam3_clip is not None:
            return host.sam3_problem(sam3_model, sam3_clip)
        return None

    @classmethod
    @checked
    def execute(cls, image, text, sam_model, grounding_dino_model, box_threshold, text_threshold, keep, grow_pixels,
                when_nothing_found, sam3_model=None, sam3_clip=None):
        settings = MaskSettings(text=text, box_threshold=box_threshold, text_threshold=text_threshold, keep=keep,
                                grow_pixels=grow_pixels, when_nothing_found=when_nothing_found)
        node_id = getattr(cls.hidden, "unique_id", None)
        if sam3_model is not None or sam3_clip is not None:
            bar = host.progress_bar(image.shape[0], node_id=node_id)
            result = host.subject_masks_sam3(image, settings, sam3_model, sam3_clip, on_step=lambda: bar.update(1))
        else:
            bar = host.progress_bar(2 * image.shape[0], node_id=node_id)
            result = host.subject_masks(image, settings, sam_model, grounding_dino_model, on_step=lambda: bar.update(1))
        for warning in result.warnings:
            log.warning(warning)
        return io.NodeOutput(result.masks, result.previews, ui={"text": result.warnings} if result.warnings else None)
