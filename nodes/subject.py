import logging

import torch
from comfy_api.v0_0_2 import io

from ..siso_ops.subject import MIN_SIDE, prepare_subject
from .checks import CheckedNode, checked
from .graph_types import CATEGORY, Subject

log = logging.getLogger(__name__)


class LoadSubject(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadSubject",
            display_name="SISO Load Subject",
            category=CATEGORY,
            description=(
                "The photo(s) of your subject (your dog, your mug...) that SISO learns from. One photo is the "
                "method of the paper; a batch of photos of the SAME subject (other angles, other light) makes the "
                "similarity the mean over all of them, so the LoRA learns the subject rather than one shot. Photos "
                "of different sizes, or each with its own mask: chain several SISO Load Subject nodes through "
                "'add_to'. Optionally blank the background with a mask or the image's alpha channel so the "
                f"similarity networks look at the subject only. RGBA, grayscale and any size from {MIN_SIDE} "
                "pixels a side are fine."),
            inputs=[
                io.Image.Input("image", tooltip="The subject photo, or a batch of photos of the same subject. An RGBA image's alpha is used as the subject mask."),
                io.Mask.Input("mask", optional=True, tooltip="Optional mask of the subject (SubjectMask output or a hand-drawn mask): one for all photos, or one per photo of the batch. Resized to the image if needed."),
                io.Combo.Input("mask_marks", options=["subject", "background"], default="subject",
                               tooltip="What the white part of the mask is. LoadImage's MASK output marks the transparent background: choose 'background' for it."),
                io.Combo.Input("background", options=["white", "black", "gray", "keep"], default="white",
                               tooltip="Colour the background becomes when a mask or alpha is given; 'keep' ignores the mask."),
                Subject.Input("add_to", optional=True, tooltip="Another SISO Load Subject's subject: this node's photos are added to its photos (for photos of other sizes, or with their own mask and background settings)."),
            ],
            outputs=[Subject.Output(display_name="subject", tooltip="The subject for SISO Optimize and SISO Subject Score: all photos, the added-to ones first."),
                     io.Image.Output(display_name="preview", tooltip="This node's photo(s) as the similarity networks will see them (background blanked).")],
        )

    @classmethod
    @checked
    def execute(cls, image, mask_marks, background, mask=None, add_to=None):
        subject = prepare_subject(image, mask, mask_marks, background)
        for warning in subject.warnings:
            log.warning("SISO Load Subject: %s", warning)
        preview = torch.cat(subject.images).permute(0, 2, 3, 1).contiguous()
        if add_to is not None:
            subject = add_to.joined(subject)
        return io.NodeOutput(subject, preview)
