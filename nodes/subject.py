from comfy_api.v0_0_2 import io

from ..siso_ops.subject import prepare_subject
from .graph_types import CATEGORY, Subject


class LoadSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadSubject",
            display_name="SISO Load Subject",
            category=CATEGORY,
            description=(
                "The ONE photo of your subject (your dog, your mug...) that SISO learns from. "
                "Optionally blank the background with a mask or the image's alpha channel so the "
                "similarity networks look at the subject only. RGBA, grayscale and any size are fine; "
                "a batch must hold exactly one image."),
            inputs=[
                io.Image.Input("image", tooltip="The subject photo (one image). An RGBA image's alpha is used as the subject mask."),
                io.Mask.Input("mask", optional=True, tooltip="Optional mask of the subject (SubjectMask output or a hand-drawn mask). Resized to the image if needed."),
                io.Combo.Input("mask_marks", options=["subject", "background"], default="subject",
                               tooltip="What the white part of the mask is. LoadImage's MASK output marks the transparent background: choose 'background' for it."),
                io.Combo.Input("background", options=["white", "black", "gray", "keep"], default="white",
                               tooltip="Colour the background becomes when a mask or alpha is given; 'keep' ignores the mask."),
            ],
            outputs=[Subject.Output(display_name="subject", tooltip="The subject for SISO Optimize."),
                     io.Image.Output(display_name="preview", tooltip="The subject as the similarity networks will see it.")],
        )

    @classmethod
    def execute(cls, image, mask_marks, background, mask=None):
        subject = prepare_subject(image, mask, mask_marks, background)
        return io.NodeOutput(subject, subject.image.permute(0, 2, 3, 1).contiguous())
